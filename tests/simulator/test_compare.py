"""The real-path comparison (simulator process + service process + control socket) on one episode."""

import json

from simulator import compare


def test_compare_runs_one_episode_through_the_real_path(reference_bundle, tmp_path, capsys):
    bundle, _ = reference_bundle
    assert compare.main(["--bundle", str(bundle), "--targets", "cpu", "--episodes", "1", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "compare.json").read_text())[0]
    assert result["target"] == "cpu" and result["episodes"] == 1
    row = result["episodes_detail"][0]
    assert row["ticks"] > 0 and 0.0 <= row["fallback_share"] <= 1.0
    assert result["tick_ms"]["p50"] > 0
    assert "| cpu | " in capsys.readouterr().out
