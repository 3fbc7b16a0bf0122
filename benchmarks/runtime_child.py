"""The runtime alone, in a fresh interpreter: `python -m benchmarks.runtime_child BUNDLE POLICY_JSON ITERATIONS`.

Started by benchmarks.startup. Imports only edge (and numpy, which edge imports), activates the
pipeline through the service's own wiring (edge.service.wiring), runs the first inference and then ITERATIONS more,
and prints one JSON line: import, activation and first-inference times, RSS, and whether torch or
build code ended up in sys.modules.
"""

from __future__ import annotations

import json
import sys
import time

# Top-level packages the runtime must not pull in. This program is itself a module of the benchmarks
# package, which `python -m` imports first; a submodule of it would mean edge imported the benchmark.
FORBIDDEN = ("torch", "build_engines", "reference_policy", "reference_world", "simulator", "benchmarks")


def forbidden_modules() -> list[str]:
    tops = {name.split(".")[0] for name in sys.modules if name != "benchmarks"}
    return sorted(top for top in FORBIDDEN if top in tops)


def _kib(status: dict[str, str], key: str) -> int | None:
    return int(status[key].split()[0]) if key in status else None


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 3:
        print("usage: python -m benchmarks.runtime_child BUNDLE POLICY_JSON ITERATIONS", file=sys.stderr)
        return 2
    bundle_dir, policy, iterations = args[0], json.loads(args[1]), int(args[2])
    started = time.monotonic()
    # Imported here, not at the top: their import time is part of what is measured.
    import numpy as np

    from edge.inference.bundle import Bundle
    from edge.service.config import config_from_dict
    from edge.service.wiring import build_pipeline

    imported = time.monotonic()
    # The service's own wiring; camera and motor are placeholders that are never opened here.
    config = config_from_dict({"bundle": bundle_dir, "camera": {"source": 0}, "motor": {"port": "loop://"},
                               "policy": policy})
    bundle = Bundle.load(bundle_dir)
    pipeline = build_pipeline(bundle, config)
    pipeline.activate()
    activated = time.monotonic()
    known = list(bundle.embeddings())
    embedding = pipeline.cache.encode_now(known[0] if known else "go to the red block")
    frame = np.random.default_rng(0).integers(0, 256, (240, 320, 3), dtype=np.uint8)
    proprio = np.zeros(int(bundle.action["dim"]), np.float32)
    pipeline.infer(frame, proprio, embedding)
    first = time.monotonic()
    for _ in range(iterations):
        pipeline.infer(frame, proprio, embedding)
    with open("/proc/self/status") as proc_status:
        status = dict(line.split(":", 1) for line in proc_status if ":" in line)
    print(json.dumps({
        "import_s": imported - started, "activate_s": activated - imported, "first_infer_s": first - activated,
        "activation_to_first_infer_s": first - imported, "first_infer_monotonic_s": first,
        "rss_mib": _kib(status, "VmRSS") / 1024, "peak_rss_mib": _kib(status, "VmHWM") / 1024,
        "torch_imported": "torch" in sys.modules,
        "forbidden_modules": forbidden_modules(),
        "modules": len(sys.modules), "iterations": iterations,
    }))
    pipeline.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
