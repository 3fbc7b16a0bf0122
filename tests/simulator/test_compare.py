"""The real-path comparison (simulator process + service process + control socket) on one episode."""

import json
from pathlib import Path

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


def test_bundles_are_named_name_equals_directory():
    import pytest

    from simulator.demo import parse_bundles

    assert parse_bundles(["reference=artifacts/bundle", "act=artifacts/bundle-act"]) == {
        "reference": Path("artifacts/bundle"), "act": Path("artifacts/bundle-act")}
    with pytest.raises(ValueError, match="NAME=DIRECTORY"):
        parse_bundles(["artifacts/bundle"])
    with pytest.raises(ValueError, match="twice"):
        parse_bundles(["a=x", "a=y"])


def test_a_missing_named_bundle_is_refused_with_the_command_that_builds_it(tmp_path):
    import pytest

    with pytest.raises(SystemExit, match="build-engines --int8 --policy"):
        compare.main(["--bundles", f"act={tmp_path / 'nothing'}", "--out", str(tmp_path / "out")])


def test_a_bundle_the_runtime_cannot_run_is_reported_not_run(tmp_path, monkeypatch, capsys):
    # A bundle of another policy is used as built; the runtime's refusal is reported per target, exit 1.
    import json as _json

    bundle = tmp_path / "chunks"
    bundle.mkdir()
    (bundle / "manifest.json").write_text(_json.dumps({"policy": {"name": "chunks", "factory": "x.y:make"}}))
    monkeypatch.setattr(compare, "runtime_refusal", lambda path: "action chunks (horizon 16)")
    assert compare.main(["--bundles", f"act={bundle}", "--targets", "cpu", "--out", str(tmp_path / "out")]) == 1
    rows = _json.loads((tmp_path / "out" / "compare.json").read_text())
    assert rows == [{"bundle": "act", "target": "cpu", "refused": "action chunks (horizon 16)"}]
    assert "| act | cpu | not run: action chunks (horizon 16)" in capsys.readouterr().out
