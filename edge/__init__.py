"""On-device runtime for VLA policies on NVIDIA Jetson robots.

Sub-packages by concern (docs/architecture.md, "Parts"):

- ``edge.io``         devices: camera, serial protocol (framing, messages), motor link;
- ``edge.inference``  bundle, backends (ONNX Runtime, TensorRT), CUDA layer, engine key, tokenizer,
                      frame preparation, policy pipeline;
- ``edge.control``    control loop, rate keeper, real-time set-up, uncertainty gate, safety layer;
- ``edge.service``    config, wiring, run, doctor, control-socket server, sd_notify, metrics;
- ``edge.cli``        the ``vla-edge`` command and the control-socket client.

Shared by all: ``edge.errors``, ``edge.fileio``, ``edge.ratelimit``, ``edge.validation``.

Dependency rule, enforced by the import-linter contracts in pyproject.toml (tests/test_architecture.py):
cli > service > control > io | inference. A layer imports only the layers below it; io and inference
never import each other; io, inference and control never import the service. Nothing in ``edge`` imports
torch, onnx, build code (build_engines, calibration), the benchmark, the simulator or the reference
task, so the runtime starts fast on a Jetson with numpy, onnxruntime, OpenCV, pyserial and tokenizers;
TensorRT and cuda-python are imported lazily, only where installed.
"""

__version__ = "0.1.0"
