"""Benchmarks of the runtime: `python -m benchmarks.latency --bundle DIR` (see benchmarks/README.md).

Nothing in `edge/` imports this package; it may use build and simulator code, and torch where installed.
"""
