"""What the CPU offers INT8 inference, read from /proc/cpuinfo (no library loaded).

ONNX Runtime's u8s8 GEMM kernels (MLAS) are exact and fast where the CPU has int8 dot products that
accumulate in 32 bits (x86 AVX-512 VNNI or AVX-VNNI: VPDPBUSD; Arm dotprod). On x86 with AVX2 alone they
multiply pairs into 16-bit sums that saturate (VPMADDUBSW), so INT8 graphs with full-range int8 weights
come out wrong there unless the session selects ONNX Runtime's exact path
(`session.x64quantprecision` = 1), which is slower.
"""

from __future__ import annotations

import platform
from pathlib import Path

VNNI = ("AVX-512 VNNI", "AVX-VNNI")


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> set[str]:
    try:
        text = cpuinfo.read_text(errors="replace")
    except OSError:
        return set()
    flags: set[str] = set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip().lower() in ("flags", "features"):
            flags |= set(value.split())
    return flags


def int8_dot_product_isa(flags: set[str] | None = None) -> str:
    """The CPU's int8 dot-product instructions by name, the ones ONNX Runtime's fast u8s8 kernels need, or
    what the CPU has instead (INT8 on the CPU pays only with them)."""
    flags = cpu_flags() if flags is None else flags
    for flag, name in (("avx512_vnni", "AVX-512 VNNI"), ("avx_vnni", "AVX-VNNI"), ("asimddp", "Arm dotprod")):
        if flag in flags:
            return name
    if "avx2" in flags:
        return "AVX2 without VNNI"
    return f"{platform.machine()} without int8 dot products"


def x64_quant_precision(isa: str | None = None) -> str:
    """The `session.x64quantprecision` value for this CPU: "0" (ONNX Runtime's fast u8s8 kernels) where they
    accumulate in 32 bits (VNNI; measured on the reference INT8 vision graph: the same cosine to FP32,
    0.9908, in 4.35 ms against 9.37 ms with the exact path), "1" (the exact path) elsewhere. The option acts
    only on x86 CPUs with AVX2 (ONNX Runtime's MlasPlatformU8S8Overflow); on Arm it changes nothing."""
    return "0" if (isa if isa is not None else int8_dot_product_isa()) in VNNI else "1"
