"""TensorRanges: JSON round trip (bit-exact), validation with errors naming the tensor, the report table."""

from __future__ import annotations

import json

import numpy as np
import pytest

from calibration.ranges import SCHEMA, Histogram, TensorRanges
from edge.errors import BundleError, InputError


def float32(value: float) -> float:
    return float(np.float32(value))


@pytest.fixture
def ranges() -> TensorRanges:
    return TensorRanges(
        method="entropy",
        sample_count=64,
        ranges={"image_norm": (float32(-2.1179), float32(2.64)), "conv1_out": (-3.0, float32(5.9999))},
        histograms={"conv1_out": Histogram(counts=(1, 6, 2, 1), edges=(-6.0, -3.0, 0.0, 3.0, 6.0))},
        settings={"num_bins": 4, "symmetric": False},
        model_sha256="ab" * 32,
    )


def test_save_load_round_trip_is_exact_and_atomic(tmp_path, ranges):
    path = ranges.save(tmp_path / "calibration" / "vision_ranges.json")
    loaded = TensorRanges.load(path)
    assert loaded == ranges
    assert list(loaded.ranges) == list(ranges.ranges), "graph order must survive the round trip"
    for name, (low, high) in ranges.ranges.items():  # bit-identical float32 after the trip through text
        assert np.float32(loaded[name][0]).tobytes() == np.float32(low).tobytes()
        assert np.float32(loaded[name][1]).tobytes() == np.float32(high).tobytes()
    document = json.loads(path.read_text())
    assert document["schema"] == SCHEMA and document["method"] == "entropy" and document["sample_count"] == 64
    assert document["tensors"]["conv1_out"]["histogram"]["counts"] == [1, 6, 2, 1]
    assert sorted(p.name for p in path.parent.iterdir()) == ["vision_ranges.json"], "temporary file left behind"


def test_mapping_access(ranges):
    assert len(ranges) == 2 and "conv1_out" in ranges and "nope" not in ranges
    assert ranges["conv1_out"] == (-3.0, float32(5.9999))


def test_histogram_clipped_fraction():
    histogram = Histogram(counts=(1, 6, 2, 1), edges=(-6.0, -3.0, 0.0, 3.0, 6.0))  # centres -4.5 -1.5 1.5 4.5
    assert histogram.clipped_fraction(-6.0, 6.0) == 0.0
    assert histogram.clipped_fraction(-2.0, 6.0) == pytest.approx(0.1)
    assert histogram.clipped_fraction(0.0, 3.0) == pytest.approx(0.8)
    with pytest.raises(ValueError, match="one more edge"):
        Histogram(counts=(1, 2), edges=(0.0, 1.0))


def test_report_is_a_table_with_every_tensor(ranges):
    text = ranges.report()
    lines = text.splitlines()
    assert lines[0] == "calibration method: entropy, samples: 64, tensors: 2"
    assert "num_bins=4" in lines[1]
    header = next(line for line in lines if line.startswith("tensor"))
    assert "clipped %" in header and "|max|" in header
    conv_row = next(line for line in lines if line.startswith("conv1_out"))
    assert conv_row.split()[1:4] == ["-3", "5.9999", "5.9999"]
    assert conv_row.split()[-2:] == ["4", "10.0000"]  # bins, and the bin centred at -4.5 is clipped
    image_row = next(line for line in lines if line.startswith("image_norm"))
    assert image_row.split()[-2:] == ["-", "-"]
    short = ranges.report(max_rows=1)
    assert "... 1 more tensors" in short and "conv1_out" not in short


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"method": "kl"}, "method 'kl' is not one of"),
        ({"sample_count": 0}, "sample_count must be a positive integer"),
        ({"ranges": {}}, "no tensor ranges"),
        ({"ranges": {"t": (float("nan"), 1.0)}}, r"tensor 't': range \(nan, 1.0\) is not finite"),
        ({"ranges": {"t": (2.0, 1.0)}}, r"tensor 't': min 2.0 > max 1.0"),
        ({"ranges": {"t": (0, 1)}}, "must be floats"),
    ],
)
def test_invalid_ranges_are_refused_naming_the_problem(change, message):
    fields = dict(method="minmax", sample_count=3, ranges={"t": (0.0, 1.0)})
    with pytest.raises(InputError, match=message):
        TensorRanges(**{**fields, **change})


def test_load_errors_name_the_file_and_key(tmp_path, ranges):
    with pytest.raises(BundleError, match="cannot read calibration ranges"):
        TensorRanges.load(tmp_path / "missing.json")
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    with pytest.raises(BundleError, match=r"broken\.json are not valid JSON"):
        TensorRanges.load(broken)
    document = ranges.to_dict()
    for mutate, message in [
        (lambda d: d.update(schema="other/9"), "schema is 'other/9'"),
        (lambda d: d.pop("tensors"), "key 'tensors' is missing"),
        (lambda d: d["tensors"]["conv1_out"].pop("max"), "tensor 'conv1_out' is malformed"),
        (lambda d: d["tensors"]["conv1_out"].update(min=9.0), r"tensor 'conv1_out': min 9.0 > max"),
    ]:
        bad = json.loads(json.dumps(document))
        mutate(bad)
        path = tmp_path / "bad.json"
        path.write_text(json.dumps(bad))
        with pytest.raises(BundleError, match=message) as caught:
            TensorRanges.load(path)
        assert "bad.json" in str(caught.value)
