"""The CPU's int8 dot products from /proc/cpuinfo, and the INT8 session option they decide."""

from __future__ import annotations

import pytest

from edge.inference.cpu_isa import cpu_flags, int8_dot_product_isa, x64_quant_precision

X86 = "processor\t: 0\nmodel name\t: Example CPU\nflags\t\t: fpu sse2 avx avx2 {extra}\n\nprocessor\t: 1\n"
ARM = "processor\t: 0\nFeatures\t: fp asimd evtstrm aes {extra}\nCPU part\t: 0xd42\n"


@pytest.mark.parametrize(("cpuinfo", "extra", "isa", "precision"), [
    (X86, "", "AVX2 without VNNI", "1"),  # the fast u8s8 kernels saturate: the exact path
    (X86, "avx512f avx512_vnni", "AVX-512 VNNI", "0"),
    (X86, "avx_vnni", "AVX-VNNI", "0"),
    (ARM, "asimddp", "Arm dotprod", "1"),  # the option acts only on x86; "1" changes nothing there
])
def test_the_isa_and_the_session_option_follow_the_flags(tmp_path, cpuinfo, extra, isa, precision):
    path = tmp_path / "cpuinfo"
    path.write_text(cpuinfo.format(extra=extra))
    flags = cpu_flags(path)
    assert int8_dot_product_isa(flags) == isa
    assert x64_quant_precision(isa) == precision


def test_an_unreadable_cpuinfo_means_no_flags_and_the_exact_path(tmp_path):
    flags = cpu_flags(tmp_path / "missing")
    assert flags == set()
    assert "without int8 dot products" in int8_dot_product_isa(flags)
    assert x64_quant_precision(int8_dot_product_isa(flags)) == "1"
