"""The evaluation command, end to end on a small seed set, and its AUROC arithmetic."""

import json

import numpy as np
import pytest

from reference_policy import evaluate


def test_auroc_known_values():
    assert evaluate.auroc(np.array([0.0, 0.1]), np.array([0.2, 0.3])) == 1.0
    assert evaluate.auroc(np.array([0.2, 0.3]), np.array([0.0, 0.1])) == 0.0
    assert evaluate.auroc(np.array([0.1, 0.1]), np.array([0.1, 0.1])) == 0.5
    rng = np.random.default_rng(0)
    assert abs(evaluate.auroc(rng.random(2000), rng.random(2000)) - 0.5) < 0.03
    with pytest.raises(ValueError):
        evaluate.auroc(np.array([]), np.array([1.0]))


def test_evaluation_command_small_seed_set(tmp_path, capsys):
    out = tmp_path / "eval.json"
    code = evaluate.main(["--seeds", "2", "--paraphrase-seeds", "2", "--ood-seeds", "1", "--mc-samples", "8",
                          "--json", str(out)])
    assert code == 0
    report = json.loads(out.read_text())
    names = [row["name"] for row in report["success"]]
    assert names == ["training instructions", "held-out paraphrases"]
    assert all(row["episodes"] == 2 and 0 <= row["successes"] <= 2 for row in report["success"])
    variants = report["uncertainty"]["variants"]
    for name in ("black_frame", "heavy_noise", "novel_colour", "absent_object"):
        assert 0.0 <= variants[name]["auroc"] <= 1.0 and variants[name]["frames"] > 0
    printed = capsys.readouterr().out
    assert "held-out paraphrases" in printed and "AUROC" in printed
