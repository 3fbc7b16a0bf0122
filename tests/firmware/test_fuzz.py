"""libFuzzer on the firmware's frame receiver and controller, with AddressSanitizer and UBSan, 1M runs.

The harness (firmware/fuzz/fuzz_frame_decoder.c) feeds arbitrary bytes through the receiver and the
whole controller and aborts on any broken promise (a verdict without a counter, a buffer beyond its
bound, an accepted message that does not survive re-encoding). The seed corpus is the spec's own
worked examples, so mutation starts from valid frames.
"""

from __future__ import annotations

import re
import subprocess

import pytest

from edge.io.protocol import SetTargets, encode
from tests.firmware import build

RUNS = 1_000_000
SPEC_FRAMES = (  # docs/serial-protocol.md, section 7
    "07 02 01 02 01 02 02 01 01 02 3f 01 05 a0 3f 6f 50 00",
    "04 02 02 05 03 f8 3d 00",
    "04 02 03 06 03 9a 5e 00",
    "04 02 04 07 03 2c ff 00",
)


@pytest.mark.slow
def test_frame_decoder_survives_a_million_fuzz_runs_under_asan_and_ubsan(tmp_path):
    if build.missing_tools("make", "clang"):
        pytest.skip("the fuzzer needs clang with libFuzzer (apt-get install clang libclang-rt-14-dev)")
    try:
        build.make("fuzz", tmp_path / "build")
    except AssertionError as exc:
        if "libclang_rt.fuzzer" in str(exc) or "cannot find" in str(exc):
            pytest.skip(f"clang lacks its libFuzzer/sanitizer runtime (apt-get install libclang-rt-14-dev): {exc}")
        raise
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for index, frame in enumerate(SPEC_FRAMES):
        (corpus / f"spec-{index}").write_bytes(bytes.fromhex(frame))
    (corpus / "stream").write_bytes(b"".join(encode(SetTargets(seq=s, targets=(0.1 * s - 0.4, 0.0)))
                                             for s in range(1, 9)))
    result = subprocess.run([str(tmp_path / "build" / "fuzz" / "fuzz_frame_decoder"), f"-runs={RUNS}",
                             "-max_len=256", "-seed=19", "-print_final_stats=1",
                             # libFuzzer's RSS check reads ru_maxrss, which Linux carries across exec from
                             # the parent (this pytest process, gigabytes with the bundles loaded), so it
                             # would measure pytest, not the harness; the harness allocates nothing, so
                             # single allocations are capped instead and LeakSanitizer (on under ASan)
                             # still fails the run on a leak.
                             "-rss_limit_mb=0", "-malloc_limit_mb=256", str(corpus)],
                            capture_output=True, text=True, timeout=900)
    log = result.stderr
    assert result.returncode == 0, log[-4000:]
    done = re.search(r"Done (\d+) runs in (\d+) second", log)
    assert done and int(done.group(1)) >= RUNS, log[-2000:]
    rate = re.findall(r"exec/s: (\d+)", log)
    print(f"\nfuzz: {done.group(1)} runs in {done.group(2)} s, {rate[-1] if rate else '?'} exec/s")
