"""The offline build as a chain of small steps (Polygraphy style), each logged with its duration:

    policy factory (--policy) -> probe + MC-dropout masks -> calibration data, split by episode
    (or pre-exported graphs, --onnx-spec: checked, Dropout nodes rewritten into masks; onnx_bundle.py)
    -> FP32 graphs (checked against PyTorch, or written as imported) -> calibration ranges (once)
    -> INT8 graphs (TensorRT Q/DQ layout, CPU layout), FP16 graphs, dynamic-INT8 language graph
    -> layout verification -> draft bundle -> accuracy gate (held-out tensors; a closed loop in an
    environment, --env; the open-loop replay of held-out recorded episodes, episode_replay.py, or the
    replay hook) + uncertainty thresholds
    -> TensorRT engines (where TensorRT and a GPU exist) -> manifest (schema v2) -> atomic rename

Every option, the policy and the calibration data are checked before the first graph is exported.
Everything is written into a temporary directory beside the output and renamed at the end, so an
interrupted or refused build never leaves a half-written bundle that looks valid.

The open-loop replay gate plugs in as `BuildOptions.replay_gate` (see build_engines/gate.py for its
signature: `replay_gate(runners: dict[target, Runner], episodes: list[list[CalibrationSample]]) -> report`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
import shutil
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

# BuildError and GateRefused are imported from here by callers and tests; they are defined in errors.py.
from build_engines.camera_codec import DEFAULT_QUALITIES, check_qualities
from build_engines.errors import BuildError, CalibrationError, GateError, GateRefused, PolicyError
from build_engines.gate import ReplayGate, format_report, format_summary  # noqa: F401  (re-exported)
from build_engines.manifest import write_manifest as _write_manifest  # noqa: F401  (tools re-key bundles with it)
from build_engines.policy import DEFAULT_POLICY
from build_engines.replay_gate import ReplayTolerances
from build_engines.samples import DatasetOptions
from edge.errors import EdgeError

logger = logging.getLogger(__name__)

CALIB_METHODS = ("entropy", "percentile", "minmax")
UNCERTAINTY_SIGNALS = ("mc-dropout", "none")
NO_ENVIRONMENT = "none"


@dataclass(frozen=True)
class Tolerances:
    min_vision_cosine: float = 0.98
    min_language_cosine: float = 0.98
    max_head_action_error: float = 0.05  # mean |a - a_fp32| over the action range
    max_success_drop: float = 0.06  # closed-loop success points below FP32 (3 of 50 episodes)


@dataclass(frozen=True)
class BuildOptions:
    out: Path
    policy: str = DEFAULT_POLICY  # "module:factory" returning a build_engines.policy.Policy
    onnx_spec: Path | None = None  # pre-exported graphs and their spec (YAML) instead of `policy`
    int8: bool = True
    fp16: bool = True
    checkpoint: Path | None = None  # passed to the factory as checkpoint=
    calib_source: str | None = None  # None: the policy's own calibration data (Policy.calibration)
    calib_instructions: Path | None = None
    calib_samples: int = 256
    calib_method: str = "percentile"
    min_calib_samples: int = 32
    heldout_fraction: float = 0.2  # of recorded episodes (LeRobot, HDF5), held out for the gate
    dataset: DatasetOptions = field(default_factory=DatasetOptions)
    replay_tolerances: ReplayTolerances = field(default_factory=ReplayTolerances)
    max_mc_samples: int = 32
    default_mc_samples: int = 16
    uncertainty: str = "mc-dropout"  # or "none": no masks, T = 1, no threshold
    env: str | None = None  # "module:factory" of the closed-loop environment; None: the policy's; "none"
    gate_seeds: int = 50
    heldout_samples: int = 128  # >= 99: the failure monitor's conformal thresholds at 1% of ticks need them
    threshold_quantile: float = 0.99
    monitor_rate: float = 0.01  # the failure monitor's false alarms per in-distribution tick (conformal)
    monitor_check_seeds: int = 10  # in-distribution episodes per target of the monitor's closed-loop check
    camera_jpeg: tuple[int, ...] = DEFAULT_QUALITIES  # the camera's JPEG qualities (build_engines/camera_codec.py)
    tensorrt: str = "auto"  # auto | off
    force: bool = False
    tolerances: Tolerances = field(default_factory=Tolerances)
    replay_gate: ReplayGate | None = None
    seed: int = 0


@contextlib.contextmanager
def step(name: str) -> Iterator[None]:
    started = time.monotonic()
    logger.info("step %s: start", name)
    try:
        yield
    except Exception:
        # The CLI prints one line for the error; this one says in which step it happened.
        logger.error("step %s: failed after %.1f s", name, time.monotonic() - started)
        raise
    logger.info("step %s: done in %.1f s", name, time.monotonic() - started)


def _integer(name: str, value, low: int, high: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
        bound = f"{low}..{high}" if high is not None else f">= {low}"
        raise BuildError(f"{name} must be an integer {bound}, got {value!r}")


def _fraction(name: str, value, low: float = 0.0, high: float = 1.0) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or not low <= value <= high:
        raise BuildError(f"{name} must be a number in [{low}, {high}], got {value!r}")


def validate_options(options: BuildOptions) -> None:
    """Every option, before any work (one-line errors naming the option and what it accepts)."""
    if options.calib_method not in CALIB_METHODS:
        raise CalibrationError(f"--calib-method must be one of {CALIB_METHODS}, got {options.calib_method!r}")
    _integer("--calib-samples", options.calib_samples, 1)
    if options.calib_samples < options.min_calib_samples:
        raise CalibrationError(f"--calib-samples {options.calib_samples} is below the minimum of "
                               f"{options.min_calib_samples} for a stable calibration")
    _integer("--gate-seeds", options.gate_seeds, 1, 10_000)
    _integer("--max-mc-samples", options.max_mc_samples, 1, 1024)
    _integer("--mc-samples", options.default_mc_samples, 1, options.max_mc_samples)
    _integer("held-out samples", options.heldout_samples, 8)
    _fraction("--heldout-fraction", options.heldout_fraction, 0.01, 0.99)
    if options.onnx_spec is not None:
        if options.policy != DEFAULT_POLICY:
            raise BuildError(f"--onnx-spec and --policy {options.policy} both name the policy; give one of them")
        if options.checkpoint is not None:
            raise BuildError("--checkpoint is passed to a --policy factory; pre-exported graphs (--onnx-spec) "
                             "carry their weights: drop --checkpoint")
    _fraction("threshold quantile", options.threshold_quantile, 0.5, 1.0)
    _fraction("--monitor-rate", options.monitor_rate, 1e-4, 0.5)
    _integer("--monitor-check-seeds", options.monitor_check_seeds, 0, 10_000)
    try:
        check_qualities(options.camera_jpeg)
    except ValueError as exc:
        raise BuildError(f"--camera-jpeg: {exc} (or give none for a camera that delivers raw frames)") from None
    if options.uncertainty not in UNCERTAINTY_SIGNALS:
        raise BuildError(f"--uncertainty must be one of {UNCERTAINTY_SIGNALS}, got {options.uncertainty!r}")
    if options.tensorrt not in ("auto", "off"):
        raise BuildError(f"--tensorrt must be auto or off, got {options.tensorrt!r}")
    tol = options.tolerances
    _fraction("--min-vision-cosine", tol.min_vision_cosine, -1.0, 1.0)
    _fraction("--min-language-cosine", tol.min_language_cosine, -1.0, 1.0)
    _fraction("--max-head-error", tol.max_head_action_error, 0.0, 10.0)
    _fraction("--max-success-drop", tol.max_success_drop, 0.0, 1.0)
    if options.checkpoint is not None and not Path(options.checkpoint).exists():
        raise BuildError(f"--checkpoint {options.checkpoint}: no such file or folder")
    if options.calib_instructions is not None and not Path(options.calib_instructions).is_file():
        raise CalibrationError(f"--calib-instructions {options.calib_instructions}: no such file")


def check_output_location(options: BuildOptions) -> None:
    out = options.out
    if out.exists() and not options.force:
        raise BuildError(f"output {out} already exists; pass --force to replace it")
    parent = out.resolve().parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise BuildError(f"cannot create the output's parent directory {parent}: {exc}") from exc
    if not os.access(parent, os.W_OK):
        raise BuildError(f"output directory {parent} is not writable; choose another --out")


def _temporary_dir(out: Path) -> Path:
    tmp = out.resolve().parent / f".{out.name}.building-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


def coordinate_matmuls(model_path: Path) -> list[str]:
    """MatMul nodes whose constant operand is a coordinate grid [tokens, 2] (e.g. a soft-argmax over a
    feature grid: keypoints and attention-weighted positions). They stay in float: the product is an
    expected position, so its precision is the policy's spatial precision, and the grid itself is not a
    weight that quantizes well per channel (2 channels of evenly spaced values)."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(model_path), load_external_data=False)
    constants = {init.name: tuple(init.dims) for init in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value":
                    constants[node.output[0]] = tuple(numpy_helper.to_array(attr.t).shape)
    return [node.name for node in model.graph.node
            if node.op_type == "MatMul" and len(node.input) == 2
            and len(constants.get(node.input[1], ())) == 2 and constants[node.input[1]][1] == 2]


class _Sessions:
    """ONNX Runtime sessions over the graphs of a build, created on first use."""

    def __init__(self, threads: int = 0):
        self._sessions: dict[Path, object] = {}
        self.threads = threads
        self.configs: dict[Path, dict[str, str]] = {}  # a graph's recorded ort_session, as the runtime applies it

    def get(self, path: Path):
        import onnxruntime as ort

        from edge.inference.backends.onnxruntime import session_options

        session = self._sessions.get(path)
        if session is None:
            session = ort.InferenceSession(str(path), session_options(ort, self.threads, self.configs.get(path)),
                                           providers=["CPUExecutionProvider"])
            self._sessions[path] = session
        return session

    def run(self, path: Path, feeds: dict[str, np.ndarray]) -> np.ndarray:
        return self.get(path).run(None, feeds)[0]

    def latency_ms(self, path: Path, feeds: dict[str, np.ndarray], runs: int = 20) -> float:
        session = self.get(path)
        session.run(None, feeds)
        times = []
        for _ in range(runs):
            started = time.perf_counter()
            session.run(None, feeds)
            times.append((time.perf_counter() - started) * 1e3)
        return float(np.median(times))


@dataclass
class Plan:
    """What the checks before any work established: the policy, its shapes and masks, the data."""

    policy: object
    shapes: dict
    layers: list  # mc_dropout.DropoutLayer, in call order
    rate: float
    head_module: object  # the head as exported (masks as inputs, or the plain head)
    data: object  # samples.Prepared: calibration samples then held-out samples
    heldout: slice
    heldout_episodes: list
    source: dict
    environment: str | None
    episode_ids: dict  # "calibration" / "heldout" -> the episodes each part came from (None: single frames)
    dataset: object = None  # calibration.episodes.EpisodeDataset of recorded episodes (with actions), or None
    heldout_ids: list = field(default_factory=list)  # the held-out episodes of `dataset`, replayed by the gate
    imported: object = None  # onnx_bundle.ImportedGraphs for --onnx-spec; None for a --policy factory


def plan_build(options: BuildOptions) -> Plan:
    """Options, policy, masks and calibration data, all checked before any graph is exported."""
    from build_engines import samples as samples_mod
    from build_engines.policy import resolve

    validate_options(options)
    check_output_location(options)
    imported = None
    if options.onnx_spec is not None:
        from build_engines.onnx_bundle import load_imported

        with step(f"load ONNX graphs of {options.onnx_spec}"):
            imported = load_imported(options.onnx_spec, options.uncertainty)
        policy, shapes, layers, rate, head_module = imported.policy, {}, imported.layers, imported.rate, None
    else:
        policy, shapes, layers, rate, head_module = _torch_policy(options)
    spec = policy.spec
    environment = _environment(options, policy)
    if environment is not None:
        resolve(environment, "--env")  # importable now, not after the graphs are built
    with step("calibration data"):
        gathered = samples_mod.gather(options, policy, options.dataset)
        calib, heldout = gathered.calibration, gathered.heldout
        data, held = samples_mod.concatenate(samples_mod.prepare(calib, spec), samples_mod.prepare(heldout, spec))
        describe = _portable(gathered.source)
    if spec.language is not None:
        _check_instructions(policy, [*data.instructions, *policy.instructions, *policy.held_out_instructions])
    grouped: dict = {}
    for index, sample in enumerate(heldout):
        grouped.setdefault(("sample", index) if sample.episode is None else sample.episode, []).append(sample)
    episodes = list(grouped.values())
    logger.info("calibration: %d samples, held out: %d samples in %d episodes", len(calib), len(heldout),
                len(episodes))
    heldout_ids = list(gathered.split.held_out) if gathered.split is not None else []
    return Plan(policy, shapes, layers, rate, head_module, data, held, episodes, describe, environment,
                gathered.episode_ids, gathered.dataset, heldout_ids, imported)


def _torch_policy(options: BuildOptions) -> tuple:
    """A --policy factory's policy, its probed shapes, dropout layers, rate and head as exported."""
    from build_engines.mc_dropout import MaskedHead, check_rate, find_dropouts
    from build_engines.policy import load_policy, probe

    with step(f"load policy {options.policy}"):
        policy = load_policy(options.policy, options.checkpoint)
        shapes, head_args = probe(policy)
    if options.uncertainty != "mc-dropout":
        return policy, shapes, [], 0.0, policy.head
    layers = find_dropouts(policy.head, head_args)
    if not layers:
        raise PolicyError(f"the head of {options.policy} has no nn.Dropout, so MC-dropout cannot measure "
                          "its uncertainty: add nn.Dropout layers to the head (and spec.dropout_rate), or "
                          "pass --uncertainty none (no uncertainty gate on the robot)")
    rate = check_rate(layers, policy.spec.dropout_rate)
    logger.info("MC-dropout: %d mask inputs, widths %s, rate %g", len(layers), [x.width for x in layers], rate)
    return policy, shapes, layers, rate, MaskedHead(policy.head, layers)


_ABSOLUTE_PATH = re.compile(r"(?<![\w.])/(?:[^\s/]+/)*([^\s/]+)")


def _portable(value):
    """A description for the manifest without build-machine paths: an absolute path keeps its last part."""
    if isinstance(value, str):
        return _ABSOLUTE_PATH.sub(lambda m: m.group(1), value)
    if isinstance(value, dict):
        return {k: _portable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_portable(v) for v in value]
    return value


def _relative(value, root: Path):
    """`value` with every path under `root` made relative to it (strings, nested dicts and lists)."""
    prefix = str(root) + os.sep
    if isinstance(value, str):
        return value.replace(prefix, "")
    if isinstance(value, dict):
        return {k: _relative(v, root) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_relative(v, root) for v in value]
    return value


def _check_instructions(policy, texts: list[str]) -> None:
    """Every instruction the build will tokenize fits the policy's tokenizer, checked before any work."""
    from edge.inference.tokenizer import InstructionTokenizer

    try:
        tokenizer = InstructionTokenizer(policy.tokenizer_file, max_tokens=policy.spec.language.max_tokens)
    except EdgeError as exc:
        raise PolicyError(f"Policy.tokenizer_file {policy.tokenizer_file} cannot be used: {exc}") from exc
    ids = np.zeros(policy.spec.language.max_tokens, np.int64)
    mask = np.zeros_like(ids)
    for text in sorted(set(texts)):
        try:
            tokenizer.encode_into(text, ids, mask)
        except EdgeError as exc:
            raise CalibrationError(f"instruction {text!r} (calibration data or Policy.instructions): {exc}") from exc


def _environment(options: BuildOptions, policy) -> str | None:
    """The closed-loop environment, or None. The loop runs the bundle through the runtime's pipeline, one
    frame and one action per step, so a policy it cannot drive (several cameras, chunks) is refused here,
    before any graph is built, when --env names one explicitly; the policy's own default environment is
    then skipped with a warning (the held-out gate still runs)."""
    from build_engines.accuracy_gate import closed_loop_gaps
    from edge.inference.bundle import runtime_gaps

    explicit = options.env is not None
    environment = options.env if explicit else policy.environment
    if environment in (None, NO_ENVIRONMENT):
        return None
    gaps = runtime_gaps(policy.spec, options.uncertainty) + closed_loop_gaps(policy.spec)
    if not gaps:
        return environment
    if explicit:
        raise GateError(f"--env {environment}: the closed-loop gate steps the environment with one camera frame "
                        f"and one action per step, so it cannot run {', '.join(gaps)} yet; pass --env none to "
                        "gate on held-out data only")
    logger.warning("closed-loop gate in %s skipped: the gate cannot run %s yet; gating on held-out data",
                   environment, ", ".join(gaps))
    return None


def run_build(options: BuildOptions) -> dict:
    """Run every step; returns the summary (also written into the bundle).

    Raises a BuildError subclass naming the step that failed (GateRefused when the accuracy gate refuses
    the bundle), or an EdgeError of the runtime for unusable input data; `out` is then left as it was."""
    plan = plan_build(options)
    tmp = _temporary_dir(options.out)
    try:
        summary = _build_into(tmp, options, plan)
        from edge.fileio import normalise_modes

        normalise_modes(tmp)
        _commit(tmp, options.out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return summary


def _commit(tmp: Path, out: Path) -> None:
    """Swap the finished bundle into place; the old one (with --force) is removed only afterwards."""
    old = None
    if out.exists():
        old = out.resolve().parent / f".{out.name}.old-{os.getpid()}"
        os.replace(out, old)
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    logger.info("bundle written to %s", out)


def _file(graphs_dir: Path, graph: str, variant: str) -> Path:
    return graphs_dir / f"{graph}_{variant.replace('-', '_')}.onnx"


def _build_into(root: Path, options: BuildOptions, plan: Plan) -> dict:
    import torch

    from build_engines import cpu_candidates, quantize
    from build_engines.export import export_policy, graph_specs
    from build_engines.layout import verify_cpu_layout, verify_tensorrt_layout
    from build_engines.mc_dropout import sample_masks
    from edge.inference.tokenizer import InstructionTokenizer

    policy, spec, layers, data = plan.policy, plan.policy.spec, plan.layers, plan.data
    torch.manual_seed(options.seed)
    rng = np.random.default_rng(options.seed)
    graphs_dir, reports_dir = root / "graphs", root / "reports"
    for folder in (graphs_dir, reports_dir, root / "calibration"):
        folder.mkdir()
    n_calib = plan.heldout.start
    max_samples = options.max_mc_samples if layers else 1
    default_samples = options.default_mc_samples if layers else 1

    def masks(samples: int) -> list[np.ndarray]:
        return sample_masks(layers, plan.rate, samples, rng) if layers else []

    tokenizer = None
    if spec.language is not None:
        shutil.copyfile(policy.tokenizer_file, root / "tokenizer.json")
        tokenizer = InstructionTokenizer(root / "tokenizer.json", max_tokens=spec.language.max_tokens)

    def token_feeds(texts: list[str]) -> dict[str, np.ndarray]:
        ids = np.zeros((len(texts), spec.language.max_tokens), np.int64)
        mask = np.zeros((len(texts), spec.language.max_tokens), np.int64)
        for i, text in enumerate(texts):
            tokenizer.encode_into(text, ids[i], mask[i])
        return {"input_ids": ids, "attention_mask": mask}

    sessions = _Sessions()
    if plan.imported is not None:
        from build_engines.onnx_bundle import save_graphs

        specs = plan.imported.specs
        with step("write the imported FP32 graphs"):
            exported = save_graphs(plan.imported, graphs_dir)

        def encode(graph: str, feeds: dict[str, np.ndarray]) -> np.ndarray:
            return sessions.run(exported[graph]["path"], feeds)
    else:
        specs = graph_specs(spec, plan.shapes, [layer.width for layer in layers])

        def encode(graph: str, feeds: dict[str, np.ndarray]) -> np.ndarray:
            with torch.inference_mode():
                return getattr(policy, graph)(*(torch.from_numpy(v) for v in feeds.values())).numpy()
    head_names = [s.name for s in specs["head"].inputs]
    # Reference inputs exercise every dynamic axis (batch 2, T 4).
    reference_inputs = {"vision": data.vision_feeds(0, 2)}
    head_ref = {"vision_features": encode("vision", data.vision_feeds(0, 1)), "proprio": data.proprio[:1].copy()}
    if spec.language is not None:
        reference_inputs["language"] = token_feeds(data.instructions[:2])
        head_ref["language_features"] = encode("language", {k: v[:1] for k, v in reference_inputs["language"].items()})
    head_ref.update({f"dropout_mask_{i}": m for i, m in enumerate(masks(4))})
    reference_inputs["head"] = {name: head_ref[name] for name in head_names}
    if plan.imported is None:
        modules = {"vision": policy.vision, "head": plan.head_module}
        if spec.language is not None:
            modules["language"] = policy.language
        with step("export FP32 graphs"):
            exported = export_policy(modules, specs, reference_inputs, graphs_dir)
    fp32 = {name: info["path"] for name, info in exported.items()}

    with step("FP32 features for calibration"):
        vision_features = np.concatenate([sessions.run(fp32["vision"], data.vision_feeds(i, i + 16))
                                          for i in range(0, len(data), 16)])
        language_features = None
        if spec.language is not None:
            unique = sorted(set(data.instructions))
            embeddings = dict(zip(unique, sessions.run(fp32["language"], token_feeds(unique))))
            language_features = np.stack([embeddings[t] for t in data.instructions])

    def head_feeds(index: int, mask_list: list[np.ndarray], vision=None, language=None) -> dict[str, np.ndarray]:
        feeds = {"vision_features": (vision_features if vision is None else vision)[index : index + 1],
                 "proprio": data.proprio[index : index + 1],
                 **{f"dropout_mask_{i}": m for i, m in enumerate(mask_list)}}
        if language_features is not None:
            feeds["language_features"] = (language_features if language is None else language)[index : index + 1]
        return {name: feeds[name] for name in head_names}

    files: dict[str, dict[str, Path]] = {name: {"fp32": path} for name, path in fp32.items()}
    candidate_sessions = cpu_candidates.session_configs()
    layout_reports = {}
    ranges_files = {}
    if options.int8:
        for name in ("vision", "head"):
            with step(f"calibrate {name} ({options.calib_method}, {n_calib} samples)"):
                if name == "vision":
                    feeds = (data.vision_feeds(i, i + 1) for i in range(n_calib))
                else:
                    feeds = (head_feeds(i, masks(8)) for i in range(n_calib))
                ranges = quantize.calibrate(fp32[name], feeds, options.calib_method, root / "calibration")
                ranges_path = root / "calibration" / f"{name}_ranges.json"
                ranges.save(ranges_path)
                ranges_files[name] = ranges_path
            with step(f"quantize {name}"):
                trt_path, cpu_path = _file(graphs_dir, name, "int8-tensorrt"), _file(graphs_dir, name, "int8-cpu")
                keep_float = coordinate_matmuls(fp32[name])
                if keep_float:
                    logger.info("%s: keeping %d coordinate MatMuls in float: %s", name, len(keep_float), keep_float)
                quantize.quantize_for_tensorrt(fp32[name], ranges, trt_path, nodes_to_exclude=keep_float)
                quantize.quantize_for_cpu(fp32[name], ranges, cpu_path, nodes_to_exclude=keep_float)
                # the reports name their graph by path: relative to the bundle, not the temporary build folder
                layout_reports[f"{name}_int8-tensorrt"] = _relative(
                    _as_dict(verify_tensorrt_layout(trt_path, fp32[name])), root)
                layout_reports[f"{name}_int8-cpu"] = _relative(_as_dict(verify_cpu_layout(cpu_path)), root)
                files[name]["int8-tensorrt"] = trt_path
                files[name]["int8-cpu"] = cpu_path
            with step(f"quantize {name}: CPU INT8 candidates {', '.join(cpu_candidates.CANDIDATE_VARIANTS)}"):
                written = cpu_candidates.quantize_candidates(fp32[name], ranges, keep_float,
                                                             lambda variant, graph=name: _file(graphs_dir, graph, variant))
                for variant, (path, layout) in written.items():
                    layout_reports[f"{name}_{variant}"] = _relative(_as_dict(layout), root)
                    files[name][variant] = path
                    sessions.configs[path] = candidate_sessions.get(variant, {})
        for leftover in (root / "calibration").iterdir():
            if leftover.suffix == ".onnx" or leftover.name.endswith(".data"):
                leftover.unlink()  # the calibrator's augmented graphs are not part of the bundle
        if spec.language is not None:
            with step("quantize language (dynamic INT8 for CPU)"):
                path = _file(graphs_dir, "language", "int8-cpu")
                # Per-channel weights: per-tensor dynamic INT8 of MiniLM measured cosine 0.967 to FP32 (the
                # gate refuses < 0.98), per-channel 0.992, both faster than FP32 on ONNX Runtime CPU.
                quantize.quantize_dynamic_int8(fp32["language"], path, per_channel=True)
                files["language"]["int8-cpu"] = path
    if options.fp16:
        for name in exported:
            with step(f"convert {name} to FP16"):
                path = _file(graphs_dir, name, "fp16")
                quantize.convert_fp16(fp32[name], path)
                files[name]["fp16"] = path

    targets = _targets(list(exported), options)

    graph_tolerances = {"vision": options.tolerances.min_vision_cosine,
                        "language": options.tolerances.min_language_cosine}
    with step("held-out accuracy per graph"):
        accuracy = _graph_accuracy(sessions, files, data, plan, vision_features, token_feeds, head_feeds, masks,
                                   spec)
        # optional CPU INT8 candidates that fail leave the bundle here, before anything else runs them
        cpu_candidates.drop(cpu_candidates.screen_graphs(accuracy, targets, options.tolerances, graph_tolerances),
                            root=root, targets=targets, files=files, accuracy=accuracy, layout_reports=layout_reports)

    with step("reference inputs/outputs and embeddings"):
        reference_files = _write_reference(root, sessions, files, reference_inputs)
        known = list(policy.instructions) if spec.language is not None else []
        if known:
            known_vectors = sessions.run(fp32["language"], token_feeds(known))
            np.savez(root / "embeddings.npz", embeddings=known_vectors.astype(np.float32))

    from build_engines.manifest import builder, graphs_section, provenance, write_manifest

    bundled_spec = spec.to_dict()
    if spec.language is not None:
        bundled_spec["language"]["tokenizer"] = "tokenizer.json"
    manifest = {
        "builder": builder(),
        "policy": plan.imported.manifest_entry() if plan.imported is not None else {
            "name": spec.name, "factory": options.policy,
            "checkpoint": Path(policy.checkpoint).name if policy.checkpoint else None,
            "checkpoint_sha256": provenance(policy.checkpoint)},
        "spec": bundled_spec,
        "graphs": graphs_section(root, exported, files, {}, {}, candidate_sessions),
        "targets": targets,
        "dropout": {"layers": [layer.to_dict() for layer in layers], "widths": [layer.width for layer in layers],
                    "rate": plan.rate, "max_samples": max_samples, "default_samples": default_samples,
                    "mask_inputs": [f"dropout_mask_{i}" for i in range(len(layers))]},
        "uncertainty": {"signal": options.uncertainty, "status": "draft",
                        "threshold": {t: 1.0 for t in targets} if layers else {}},
        "tokenizer": None if spec.language is None else {"path": "tokenizer.json", "kind": "huggingface-tokenizers",
                                                         "max_tokens": spec.language.max_tokens},
        "embeddings": {"path": "embeddings.npz", "instructions": known} if known else None,
        "calibration": {"source": plan.source, "samples": n_calib, "heldout_samples": len(data) - n_calib,
                        "method": options.calib_method, "episodes": plan.episode_ids,
                        "ranges": {n: str(p.relative_to(root)) for n, p in ranges_files.items()},
                        "layout_checks": layout_reports},
        "accuracy": {"report": "reports/accuracy.json", "passed": False},
        "reference": reference_files,
        "engines": [],
    }
    write_manifest(root, manifest)

    loop = None
    traces: dict[str, list] = {}  # the gate's successful episodes, tick by tick, for the failure monitor
    if plan.environment is not None:
        loop = _closed_loop(root, options, plan, list(targets), traces)
    replay = None
    if options.replay_gate is not None:
        with step("open-loop replay gate"):
            replay = options.replay_gate(_runners(sessions, files, targets, data, plan, token_feeds, spec,
                                                  head_names), plan.heldout_episodes)
    elif plan.dataset is not None:
        from build_engines.episode_replay import replay_episodes

        with step(f"open-loop replay gate on {len(plan.heldout_ids)} held-out episodes"):
            replay = replay_episodes(root, files, targets, plan, options)
    from build_engines.gate import judge

    late = (cpu_candidates.screen_closed_loop(loop, options.tolerances) if loop else []) \
        + (cpu_candidates.screen_replay(replay) if replay is not None else [])
    cpu_candidates.drop(late, root=root, targets=targets, files=files, accuracy=accuracy,
                        reference_files=reference_files, layout_reports=layout_reports)
    report = judge(accuracy, loop, replay, options.tolerances, graph_tolerances)
    manifest["accuracy"] = {"report": "reports/accuracy.json", "passed": report["passed"],
                            "summary": report["summary"]}
    (reports_dir / "accuracy.json").write_text(json.dumps(report, indent=2) + "\n")
    (reports_dir / "accuracy.md").write_text(format_report(report) + "\n")
    if not report["passed"]:
        raise GateRefused("accuracy gate refused the bundle: " + "; ".join(report["failures"]), report)
    if layers and not loop and replay is not None and replay.get("kind") == "open_loop_replay":
        from build_engines.episode_replay import replay_uncertainty

        manifest["uncertainty"] = replay_uncertainty(replay, options, plan)
    elif layers:
        manifest["uncertainty"] = _uncertainty(options, plan, loop, targets, sessions, files, data, token_feeds,
                                               head_feeds, masks, spec)
    else:
        manifest["uncertainty"] = {"signal": "none", "threshold": {},
                                   "method": "--uncertainty none: no MC-dropout masks, T = 1, no threshold"}
    with step(f"failure monitor: feature novelty, instruction novelty, action consistency "
              f"(conformal, rate {options.monitor_rate:g})"):
        monitor = _monitor(root, options, plan, targets, sessions, files, data, token_feeds, head_feeds, masks, spec,
                           {t: rows for t, rows in traces.items() if t in targets} if layers else None)
        if monitor is not None:
            manifest["monitor"] = monitor
            if "spread" in monitor:
                _spread_from_monitor(manifest["uncertainty"], monitor, plan.environment)
    manifest["gate"] = {"environment": plan.environment if loop else None, "closed_loop_seeds":
                        options.gate_seeds if loop else 0, "replay": replay is not None,
                        "heldout_episodes": len(plan.heldout_ids) if plan.dataset is not None
                        else len(plan.heldout_episodes),
                        "camera_jpeg": list(options.camera_jpeg) if loop else [],
                        "optional_targets": list(cpu_candidates.OPTIONAL_TARGETS),
                        "dropped_targets": report["dropped_targets"]}
    if loop and "monitor" in manifest and options.monitor_check_seeds:
        from build_engines.monitor_check import gate_check

        # the monitor's files and thresholds, and the graphs of the targets kept, for the runtime to load
        manifest["graphs"] = graphs_section(root, exported, files, {}, _accuracy_rows(accuracy), candidate_sessions)
        write_manifest(root, manifest)
        with step(f"failure monitor in closed loop ({options.monitor_check_seeds} seeds per target)"):
            manifest["gate"]["monitor"] = gate_check(root, list(targets), plan.environment,
                                                     options.monitor_check_seeds, options.default_mc_samples,
                                                     options.seed)

    with step("TensorRT engines"):
        manifest["engines"] = _tensorrt_engines(root, options, files, exported, reference_inputs)

    with step("latency per graph on this machine"):
        report["latency_ms"] = _latencies(sessions, files, reference_inputs)
    manifest["graphs"] = graphs_section(root, exported, files, report["latency_ms"], _accuracy_rows(accuracy),
                                        candidate_sessions)
    summary = {"report": report, "files": {n: {v: _size(p) for v, p in fv.items()} for n, fv in files.items()},
               "thresholds": manifest["uncertainty"]["threshold"]}
    (reports_dir / "accuracy.json").write_text(json.dumps(report, indent=2) + "\n")
    text = format_summary(summary)
    if replay is not None and replay.get("kind") == "open_loop_replay":
        from build_engines.episode_replay import format_replay

        text += "\n\n" + format_replay(replay)
    if (reports_dir / "monitor.md").exists():
        text += "\n\n" + (reports_dir / "monitor.md").read_text()
    summary["text"] = text
    (reports_dir / "summary.md").write_text(text + "\n")
    write_manifest(root, manifest)
    return summary


def _targets(graphs: list[str], options: BuildOptions) -> dict[str, dict[str, str]]:
    """The runtime's config key policy.target -> the variant of each graph it runs."""
    def each(**variants: str) -> dict[str, str]:
        return {graph: variants[graph] for graph in graphs}

    targets = {"cpu-fp32": each(vision="fp32", language="fp32", head="fp32")}
    if options.int8:
        from build_engines.cpu_candidates import add_targets

        targets["cpu"] = each(vision="int8-cpu", language="int8-cpu", head="int8-cpu")
        add_targets(targets, graphs)  # optional: each gated, left out of the bundle when it fails
        # TensorRT compiles the symmetric Q/DQ graphs; a sentence encoder runs once per instruction,
        # so it gets FP16 there (INT8 would save nothing a tick waits for).
        targets["tensorrt"] = each(vision="int8-tensorrt", language="fp16" if options.fp16 else "fp32",
                                   head="int8-tensorrt")
    if options.fp16:
        targets["fp16"] = each(vision="fp16", language="fp16", head="fp16")
    return targets


def _as_dict(report) -> dict:
    return asdict(report) if hasattr(report, "__dataclass_fields__") else dict(vars(report))


def _size(path: Path) -> int:
    size = path.stat().st_size
    data = path.with_name(path.name + ".data")
    return size + (data.stat().st_size if data.exists() else 0)


def _action_range(spec) -> np.ndarray:
    return (np.asarray(spec.action.high, np.float64) - np.asarray(spec.action.low, np.float64)).astype(np.float32)


def _graph_accuracy(sessions, files, data, plan, vision_features, token_feeds, head_feeds, masks, spec) -> dict:
    from build_engines.gate import action_accuracy, feature_accuracy

    held = plan.heldout
    results: dict[str, dict[str, dict]] = {graph: {} for graph in files}
    reference_vision = vision_features[held]
    for variant, path in files["vision"].items():
        if variant != "fp32":
            out = np.concatenate([sessions.run(path, data.vision_feeds(i, min(i + 8, held.stop)))
                                  for i in range(held.start, held.stop, 8)])
            results["vision"][variant] = feature_accuracy(out, reference_vision)
    if "language" in files:
        texts = sorted(set(data.instructions)) + list(plan.policy.held_out_instructions)
        feeds = token_feeds(texts)
        reference_language = sessions.run(files["language"]["fp32"], feeds)
        for variant, path in files["language"].items():
            if variant != "fp32":
                results["language"][variant] = feature_accuracy(sessions.run(path, feeds), reference_language)
    indices = range(held.start, held.stop)
    mask_sets = [masks(8) for _ in indices]
    reference = [sessions.run(files["head"]["fp32"], head_feeds(i, m)) for i, m in zip(indices, mask_sets)]
    for variant, path in files["head"].items():
        if variant != "fp32":
            outs = [sessions.run(path, head_feeds(i, m)) for i, m in zip(indices, mask_sets)]
            results["head"][variant] = action_accuracy(outs, reference, _action_range(spec))
    return {"samples": held.stop - held.start, "episodes": len(plan.heldout_episodes), "graphs": results}


def _accuracy_rows(accuracy: dict) -> dict:
    return accuracy["graphs"]


def _closed_loop(root: Path, options: BuildOptions, plan: Plan, targets: list[str], traces: dict) -> dict:
    from build_engines.accuracy_gate import closed_loop
    from edge.inference.bundle import Bundle

    Bundle.load(root).check_runnable()  # _environment() refused these before the build; the draft must agree
    with step(f"closed-loop gate in {plan.environment} ({options.gate_seeds} seeds per target)"):
        try:
            return closed_loop(root, targets, options.gate_seeds, options.default_mc_samples,
                               options.threshold_quantile, options.seed, environment=plan.environment,
                               traces=traces, camera_jpeg=options.camera_jpeg)
        except EdgeError:
            raise
        except Exception as exc:  # a user's simulator may fail in any way: one line naming it
            raise GateError(f"--env {plan.environment}: the environment failed during the closed-loop gate "
                            f"({type(exc).__name__}: {exc})") from exc


def _uncertainty(options, plan, loop, targets, sessions, files, data, token_feeds, head_feeds, masks, spec) -> dict:
    from build_engines.gate import samples_to_calibrate, uncertainty_score

    score = "RMS over action values of the MC-dropout std, divided by the largest action range"
    q = options.threshold_quantile
    if loop:
        thresholds = {target: loop[target]["threshold"] for target in targets}
        return {"signal": "mc-dropout", "source": "closed-loop", "score": score, "threshold": thresholds,
                "hard_ceiling": {t: 3.0 * v for t, v in thresholds.items()},
                "by_samples": {t: {str(options.default_mc_samples): v} for t, v in thresholds.items()},
                "method": (f"{q:.0%} quantile of the score over every tick of successful episodes in "
                           f"{plan.environment} ({options.gate_seeds} seeds per target, "
                           f"T={options.default_mc_samples})")}
    held = plan.heldout
    action_range = float(np.max(_action_range(spec)))
    by_samples: dict[str, dict[str, float]] = {}
    vision_cache: dict[str, np.ndarray] = {}
    language_cache: dict[str, np.ndarray] = {}
    for target, variants in targets.items():
        vision = vision_cache.get(variants["vision"])
        if vision is None:
            path = files["vision"][variants["vision"]]
            vision = np.concatenate([sessions.run(path, data.vision_feeds(i, i + 16)) for i in range(0, len(data), 16)])
            vision_cache[variants["vision"]] = vision
        language = None
        if "language" in variants:
            language = language_cache.get(variants["language"])
            if language is None:
                unique = sorted(set(data.instructions))
                vectors = dict(zip(unique, sessions.run(files["language"][variants["language"]], token_feeds(unique))))
                language = np.stack([vectors[t] for t in data.instructions])
                language_cache[variants["language"]] = language
        head = files["head"][variants["head"]]
        by_samples[target] = {}
        for samples in samples_to_calibrate(options.default_mc_samples, options.max_mc_samples):
            scores = [uncertainty_score(sessions.run(head, head_feeds(i, masks(samples), vision, language)), action_range)
                      for i in range(held.start, held.stop)]
            threshold = float(np.quantile(scores, q))
            if not threshold > 0:
                raise GateError(f"target {target}: the MC-dropout score is 0 on every held-out sample at T={samples}; "
                                "the head's dropout does not change its actions (is it after the last layer?)")
            by_samples[target][str(samples)] = threshold
    default = str(options.default_mc_samples)
    thresholds = {t: rows.get(default, rows[max(rows, key=int)]) for t, rows in by_samples.items()}
    return {"signal": "mc-dropout", "source": "held-out", "score": score, "threshold": thresholds,
            "hard_ceiling": {t: 3.0 * v for t, v in thresholds.items()}, "by_samples": by_samples,
            "method": (f"{q:.0%} quantile of the score over {held.stop - held.start} held-out samples "
                       f"({len(plan.heldout_episodes)} episodes not used for calibration), per target and T")}


def _spread_from_monitor(uncertainty: dict, monitor: dict, environment: str) -> None:
    """The spread's threshold from the monitor's windowed closed-loop calibration (the immediate-trip
    ceiling stays 3x the per-tick quantile: what a single tick must reach to stop the robot at once)."""
    thresholds = monitor["spread"]["threshold"]
    for target, value in thresholds.items():
        uncertainty["hard_ceiling"][target] = max(uncertainty["hard_ceiling"][target], value)
        uncertainty["threshold"][target] = value
        for t in uncertainty["by_samples"].get(target, {}):
            uncertainty["by_samples"][target][t] = value
    uncertainty["per_tick_method"] = uncertainty["method"]
    uncertainty["method"] = (f"the failure monitor's windowed conformal threshold in {environment} "
                             f"({monitor['method']}); entering after {monitor['spread']['enter_ticks']} ticks "
                             "above it")


def _monitor(root, options, plan, targets, sessions, files, data, token_feeds, head_feeds, masks, spec,
             traces=None) -> dict | None:
    """The failure monitor's models and thresholds (build_engines/monitor.py) from every vision variant's
    features, the known and held-out instructions' embeddings and each target's held-out actions."""
    from build_engines.camera_codec import augment
    from build_engines.monitor import fit_monitor
    from edge.control.uncertainty_gate import GateConfig

    # Every sample raw and as the camera may deliver it (build_engines/camera_codec.py), in batches of 16.
    raw_batches = [data.vision_feeds(i, i + 16) for i in range(0, len(data), 16)]
    coded_batches = [[augment(feeds, quality) for feeds in raw_batches] for quality in options.camera_jpeg]

    def features(path: str, batches: list) -> np.ndarray:
        return np.concatenate([sessions.run(path, feeds) for feeds in batches])

    vision = {variant: features(path, raw_batches) for variant, path in files["vision"].items()}
    compressed = {variant: [features(path, batches) for batches in coded_batches]
                  for variant, path in files["vision"].items()}
    instruction_vectors = None
    known = list(plan.policy.instructions) if spec.language is not None else []
    if known:
        held_texts = [t for t in plan.policy.held_out_instructions if t not in set(known)]
        language = files["language"]["fp32"]  # the runtime's cache holds the FP32 embeddings of known ones
        held_vectors = sessions.run(language, token_feeds(held_texts)) if held_texts else np.zeros((0, 1))
        instruction_vectors = (sessions.run(language, token_feeds(known)), held_vectors)
    held = plan.heldout
    samples = options.default_mc_samples if plan.layers else 1
    actions: dict[str, list[np.ndarray]] = {}
    for target, variants in targets.items():
        language = None
        if "language" in variants:
            unique = sorted(set(data.instructions))
            by_text = dict(zip(unique, sessions.run(files["language"][variants["language"]], token_feeds(unique))))
            language = np.stack([by_text[t] for t in data.instructions])
        outs = [sessions.run(files["head"][variants["head"]], head_feeds(i, masks(samples),
                                                                         vision[variants["vision"]], language))
                for i in range(held.start, held.stop)]
        actions[target] = [out.reshape(out.shape[0], spec.action.horizon, spec.action.dim).mean(axis=0)
                           for out in outs]
    return fit_monitor(root, vision_features=vision, targets=targets, calibration=slice(0, held.start),
                       heldout=held, episodes=data.episodes, rate=options.monitor_rate,
                       instruction_vectors=instruction_vectors, known_instructions=known,
                       heldout_instructions=list(plan.policy.held_out_instructions),
                       heldout_actions=actions, action_range=float(np.max(_action_range(spec))),
                       traces=traces, enter_ticks=GateConfig.enter_ticks, compressed_features=compressed,
                       camera_jpeg=options.camera_jpeg)


def _runners(sessions, files, targets, data, plan, token_feeds, spec, head_names) -> dict:
    """Per target: frames, instruction, proprio -> deterministic actions [1, H, action_dim] (replay gate)."""
    widths = [layer.width for layer in plan.layers]

    def make(variants: dict[str, str]):
        def runner(frames: dict, instruction: str, proprio: np.ndarray) -> np.ndarray:
            feeds = {"vision_features": sessions.run(files["vision"][variants["vision"]], frames),
                     "proprio": np.asarray(proprio, np.float32).reshape(1, -1)}
            if "language" in variants:
                feeds["language_features"] = sessions.run(files["language"][variants["language"]],
                                                          token_feeds([instruction]))
            feeds.update({f"dropout_mask_{i}": np.ones((1, w), np.float32) for i, w in enumerate(widths)})
            out = sessions.run(files["head"][variants["head"]], {n: feeds[n] for n in head_names})
            return out.reshape(out.shape[0], spec.action.horizon, spec.action.dim)

        return runner

    return {target: make(variants) for target, variants in targets.items()}


def _latencies(sessions, files, reference_inputs) -> dict:
    feeds = {graph: {k: v[:1] for k, v in reference_inputs[graph].items()} for graph in ("vision", "language")
             if graph in reference_inputs}
    feeds["head"] = reference_inputs["head"]
    return {graph: {variant: sessions.latency_ms(path, feeds[graph]) for variant, path in variants.items()}
            for graph, variants in files.items()}


def _write_reference(root: Path, sessions, files, reference_inputs) -> dict:
    """Reference inputs/outputs per graph variant: npz, and Polygraphy JSON for
    `polygraphy run ENGINE --trt --load-inputs X --load-outputs Y` on the target."""
    from build_engines.polygraphy_io import save_inputs, save_outputs

    ref_dir = root / "reference"
    ref_dir.mkdir()
    written = {}
    for graph, variants in files.items():
        feeds = reference_inputs[graph]
        np.savez(ref_dir / f"{graph}_inputs.npz", **feeds)
        save_inputs(ref_dir / f"{graph}_inputs.json", [feeds])
        written[graph] = {"inputs": f"reference/{graph}_inputs.json", "outputs": {}}
        for variant, path in variants.items():
            session = sessions.get(path)
            names = [o.name for o in session.get_outputs()]
            outputs = dict(zip(names, session.run(None, feeds)))
            np.savez(ref_dir / f"{graph}_{variant}_outputs.npz", **outputs)
            save_outputs(ref_dir / f"{graph}_{variant}_outputs.json", f"onnxrt-{variant}", [outputs])
            written[graph]["outputs"][variant] = f"reference/{graph}_{variant}_outputs.json"
    return written


def _tensorrt_engines(root, options, files, exported, reference_inputs) -> list[dict]:
    if options.tensorrt == "off":
        logger.info("TensorRT engines: skipped (--tensorrt off)")
        return []
    from build_engines.tensorrt_builder import tensorrt_status

    available, reason = tensorrt_status()
    if not available:
        logger.info("TensorRT engines: not built (%s); the ONNX bundle is complete without them", reason)
        return []
    from build_engines.tensorrt_engines import build_all

    return build_all(root, options, files, exported, None, reference_inputs)
