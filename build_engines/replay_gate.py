"""Open-loop replay gate: a bundle's variants on held-out recorded episodes, without a simulator.

Each variant (fp32, fp16, int8, ...) is a runner: a callable taking one ``Observation`` (the uint8 frame
of every camera, the proprio vector, the instruction's embedding or None) and returning the action
chunk ``[H, action_dim]`` of the deterministic policy (dropout masks of ones), optionally with its
MC-dropout score. Every held-out step is replayed through every variant, and per chunk step ``h``:

- error vs the reference variant (fp32): what quantisation costs, the part the build can change;
- error vs the recorded actions (step ``t + h`` of the episode, where the episode has one): how well
  the policy imitates the data at all, the same for every precision if quantisation is harmless.

Errors are absolute differences divided by each channel's range (``spec.action.high - low``), so 0.01
is 1 % of the range, whatever the units. The MC-dropout score (the runtime's definition: RMS over
chunk steps and channels of the standard deviation over T samples, divided by the largest channel
range, ``edge/inference/pipeline.py``) is collected on the same steps and the uncertainty threshold
is its split-conformal quantile: the ``ceil((n + 1)(1 - alpha))``-th smallest of n held-out scores, so
that on data like the held-out episodes a tick scores above it with probability at most ``alpha``
(the false-alarm rate; Vovk et al., "Algorithmic Learning in a Random World", and Angelopoulos & Bates,
"A Gentle Introduction to Conformal Prediction", sec. 1). Steps of one episode are correlated, so the
guarantee is per episode-exchangeable data only approximately per tick; the report says so.

``onnx_variant`` builds a runner straight from a variant's ONNX graphs with ONNX Runtime.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from build_engines.errors import BuildError, GateRefused
from calibration.episodes import EpisodeDataset
from edge.inference.spec import PolicySpec

logger = logging.getLogger(__name__)

CONFORMAL_NOTE = ("threshold = the ceil((n+1)(1-alpha))-th smallest of the n held-out scores (split conformal); "
                  "held-out ticks score above it with probability <= alpha if ticks are exchangeable, which "
                  "steps of one episode are only approximately")


@dataclass(frozen=True, eq=False)
class Observation:
    frames: Mapping[str, np.ndarray]  # camera name -> uint8 [H, W, 3] in the spec's channel order and size
    proprio: np.ndarray  # float32 [P]
    language: np.ndarray | None  # the instruction's embedding as the head takes it; None without language


@dataclass(frozen=True, eq=False)
class RunnerOutput:
    actions: np.ndarray  # float [H, A]: the deterministic chunk (dropout masks of ones)
    score: float | None = None  # the MC-dropout score of this observation, if the runner samples


Runner = Callable[[Observation], "RunnerOutput | np.ndarray"]


@dataclass(frozen=True)
class ReplayVariant:
    """One variant under test: its runner and, for a policy with language, its instruction encoder."""

    run: Runner
    embed: Callable[[str], np.ndarray] | None = None


@dataclass(frozen=True)
class ReplayTolerances:
    """Pass/fail limits, in fractions of each channel's action range."""

    max_mean_abs_vs_reference: float = 0.02  # mean over steps and channels, at the worst chunk step
    max_abs_vs_reference: float = 0.10  # the single worst step and channel
    max_mean_abs_vs_recorded: float | None = None  # None: report only (how well the policy fits the data)
    false_alarm_rate: float = 0.05  # alpha of the conformal threshold

    def __post_init__(self) -> None:
        for name in ("max_mean_abs_vs_reference", "max_abs_vs_reference", "max_mean_abs_vs_recorded"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, int | float) and value > 0 and math.isfinite(value)):
                raise BuildError(f"replay tolerance {name} must be a positive number, got {value!r}")
        if not 0 < self.false_alarm_rate < 1:
            raise BuildError(f"false_alarm_rate must be in (0, 1), got {self.false_alarm_rate!r}")


def conformal_threshold(scores: Sequence[float], alpha: float) -> float | None:
    """The split-conformal threshold of ``scores`` at false-alarm rate ``alpha``; None with too few scores."""
    n = len(scores)
    rank = math.ceil((n + 1) * (1 - alpha))
    if n == 0 or rank > n:
        return None
    return float(np.sort(np.asarray(scores, np.float64))[rank - 1])


class _ErrorAccumulator:
    """Per chunk step h: sum and max of |a - b| / range over every step and channel seen."""

    def __init__(self, horizon: int, ranges: np.ndarray) -> None:
        self.ranges = ranges
        self.total = np.zeros(horizon)
        self.count = np.zeros(horizon, np.int64)
        self.worst = np.zeros(horizon)

    def add(self, predicted: np.ndarray, target: np.ndarray, steps: int) -> None:
        errors = np.abs(predicted[:steps].astype(np.float64) - target[:steps]) / self.ranges
        self.total[:steps] += errors.sum(axis=1)
        self.count[:steps] += errors.shape[1]
        self.worst[:steps] = np.maximum(self.worst[:steps], errors.max(axis=1))

    def to_dict(self) -> dict[str, Any]:
        mean = np.where(self.count > 0, self.total / np.maximum(self.count, 1), np.nan)
        seen = self.count > 0
        return {"mean_abs": [_num(v) for v in mean], "max_abs": [_num(v) if c else None for v, c in
                                                                  zip(self.worst, seen)],
                "worst_mean_abs": _num(np.max(mean[seen])) if seen.any() else None,
                "max_abs_overall": _num(np.max(self.worst[seen])) if seen.any() else None,
                "values": int(self.count.sum())}


def _num(value: float) -> float | None:
    return None if not np.isfinite(value) else round(float(value), 6)


def replay_gate(variants: Mapping[str, ReplayVariant], dataset: EpisodeDataset, episode_ids: Sequence[Hashable],
                spec: PolicySpec, tolerances: ReplayTolerances = ReplayTolerances(),
                reference: str = "fp32") -> dict[str, Any]:
    """Replay ``episode_ids`` of ``dataset`` through every variant; a JSON-able report with ``passed``."""
    if reference not in variants:
        raise BuildError(f"the replay gate needs the reference variant '{reference}' among the variants "
                         f"{sorted(variants)}")
    if not episode_ids:
        raise BuildError("the replay gate has no held-out episodes: split the data with held-out episodes")
    horizon, dim = spec.action.horizon, spec.action.dim
    ranges = np.asarray(spec.action.high, np.float64) - np.asarray(spec.action.low, np.float64)
    vs_reference = {name: _ErrorAccumulator(horizon, ranges) for name in variants}
    vs_recorded = {name: _ErrorAccumulator(horizon, ranges) for name in variants}
    scores: dict[str, list[float]] = {name: [] for name in variants}
    embeddings: dict[tuple[str, str], np.ndarray] = {}
    steps_seen = 0
    for episode_id in episode_ids:
        steps = dataset.load_episode(episode_id)
        recorded = np.stack([s.action for s in steps]).astype(np.float64)
        for t, step in enumerate(steps):
            outputs = {}
            for name, variant in variants.items():
                language = None
                if spec.language is not None:
                    if variant.embed is None:
                        raise BuildError(f"variant '{name}' has no language encoder but the spec has language")
                    key = (name, step.instruction)
                    if key not in embeddings:
                        embeddings[key] = np.asarray(variant.embed(step.instruction))
                    language = embeddings[key]
                result = variant.run(Observation(frames=step.images, proprio=step.proprio, language=language))
                outputs[name] = _check_output(name, result, horizon, dim, episode_id, t)
            target = recorded[t:t + horizon]
            for name, (actions, score) in outputs.items():
                vs_reference[name].add(actions, outputs[reference][0], horizon)
                vs_recorded[name].add(actions, target, len(target))
                if score is not None:
                    scores[name].append(score)
            steps_seen += 1
    report = {"kind": "open_loop_replay", "reference": reference, "episodes": [_id(e) for e in episode_ids],
              "steps": steps_seen, "horizon": horizon, "action_dim": dim,
              "normalisation": "|error| / (spec.action.high - spec.action.low), per channel",
              "tolerances": asdict(tolerances), "variants": {}}
    failures: list[str] = []
    for name in variants:
        entry = {"vs_reference": vs_reference[name].to_dict(), "vs_recorded": vs_recorded[name].to_dict(),
                 "score": _score_summary(scores[name], tolerances.false_alarm_rate)}
        report["variants"][name] = entry
        failures.extend(_failures(name, entry, tolerances, name == reference))
    report["passed"] = not failures
    report["failures"] = failures
    logger.info("replay gate on %d steps of %d episodes: %s", steps_seen, len(episode_ids),
                "passed" if not failures else "; ".join(failures))
    return report


def refuse_unless_passed(report: Mapping[str, Any]) -> None:
    """Raise ``GateRefused`` (exit 3, the report written beside the output) when the replay gate failed."""
    if not report["passed"]:
        raise GateRefused("open-loop replay gate refused the bundle: " + "; ".join(report["failures"]),
                          dict(report))


def _id(value: Hashable) -> Any:
    return value if isinstance(value, int | str) else str(value)


def _check_output(name: str, result: Any, horizon: int, dim: int, episode: Hashable,
                  t: int) -> tuple[np.ndarray, float | None]:
    output = result if isinstance(result, RunnerOutput) else RunnerOutput(actions=np.asarray(result))
    actions = np.asarray(output.actions, np.float64)
    if horizon == 1 and actions.shape == (dim,):
        actions = actions[None]
    if actions.shape != (horizon, dim) or not np.all(np.isfinite(actions)):
        raise BuildError(f"variant '{name}' returned actions of shape {list(actions.shape)} at episode {episode} "
                         f"step {t}, expected [{horizon}, {dim}] finite values (spec.action horizon and channels)")
    score = output.score
    if score is not None and not (np.isfinite(score) and score >= 0):
        raise BuildError(f"variant '{name}' returned MC-dropout score {score!r} at episode {episode} step {t}")
    return actions, None if score is None else float(score)


def _score_summary(scores: list[float], alpha: float) -> dict[str, Any] | None:
    if not scores:
        return None
    values = np.asarray(scores)
    threshold = conformal_threshold(scores, alpha)
    return {"count": len(scores),
            "quantiles": {q: _num(np.quantile(values, float(q))) for q in ("0.5", "0.9", "0.95", "0.99")},
            "max": _num(values.max()), "false_alarm_rate": alpha,
            "threshold": None if threshold is None else _num(threshold),
            "above_threshold": None if threshold is None else float(np.mean(values > threshold)),
            "method": CONFORMAL_NOTE}


def _failures(name: str, entry: Mapping[str, Any], tol: ReplayTolerances, is_reference: bool) -> list[str]:
    failures = []
    ref = entry["vs_reference"]
    if not is_reference:
        if ref["worst_mean_abs"] is not None and ref["worst_mean_abs"] > tol.max_mean_abs_vs_reference:
            failures.append(f"{name}: mean error vs the reference {ref['worst_mean_abs']:.4f} of the action range "
                            f"> {tol.max_mean_abs_vs_reference}")
        if ref["max_abs_overall"] is not None and ref["max_abs_overall"] > tol.max_abs_vs_reference:
            failures.append(f"{name}: max error vs the reference {ref['max_abs_overall']:.4f} of the action range "
                            f"> {tol.max_abs_vs_reference}")
    recorded = entry["vs_recorded"]["worst_mean_abs"]
    if tol.max_mean_abs_vs_recorded is not None and recorded is not None and recorded > tol.max_mean_abs_vs_recorded:
        failures.append(f"{name}: mean error vs the recorded actions {recorded:.4f} of the action range "
                        f"> {tol.max_mean_abs_vs_recorded}")
    score = entry["score"]
    if score is not None and score["threshold"] is None:
        failures.append(f"{name}: {score['count']} held-out scores cannot set a threshold at false-alarm rate "
                        f"{tol.false_alarm_rate} (needs at least {math.ceil(1 / tol.false_alarm_rate) - 1}): "
                        "hold out more episodes")
    return failures


# -- runners from ONNX graphs ----------------------------------------------------------------------------
class OnnxPolicy:
    """A policy's ONNX graphs ({'vision', 'head'} and 'language' when the spec has language) on ONNX Runtime.

    Vision: one uint8 input per camera (``spec.camera_input``), [H, W, 3] or [1, H, W, 3]. Head inputs are
    fed by name: the vision graph's outputs, ``language_features`` (the language graph's output),
    ``proprio`` [1, P] and ``dropout_mask_<i>`` [T, width] (or [T, 1, ..., width]); its first output is
    the actions, [T, H, A] or [T, A]. The chunk is the head with masks of ones (T = 1); with
    ``mc_samples`` > 0 and masks, the score comes from that many masked samples (keep probability
    1 - spec.dropout_rate, kept units scaled by 1/keep, as the runtime's mask bank does).
    """

    def __init__(self, graphs: Mapping[str, str | os.PathLike[str]], spec: PolicySpec, *,
                 tokenizer: str | os.PathLike[str] | None = None, mc_samples: int = 16, mask_seed: int = 0) -> None:
        import onnxruntime as ort

        from edge.inference.backends.onnxruntime import session_options
        from edge.inference.tokenizer import InstructionTokenizer

        def session(role: str) -> Any:
            path = graphs.get(role)
            if path is None:
                raise BuildError(f"the replay gate needs the {role} graph; given: {sorted(graphs)}")
            if not Path(path).is_file():
                raise BuildError(f"{role} graph {path} does not exist")
            # the runtime's CPU session options: on x86 without VNNI, INT8 graphs are exact only with them
            return ort.InferenceSession(str(path), session_options(ort), providers=["CPUExecutionProvider"])

        self.spec = spec
        self.mc_samples = mc_samples
        self.vision, self.head = session("vision"), session("head")
        vision_inputs = {i.name: i for i in self.vision.get_inputs()}
        for camera in spec.cameras:
            if spec.camera_input(camera) not in vision_inputs:
                raise BuildError(f"vision graph {graphs['vision']} has no input '{spec.camera_input(camera)}' for "
                                 f"camera '{camera.name}'; its inputs: {sorted(vision_inputs)}")
        self._batched = {name: len(i.shape) == 4 for name, i in vision_inputs.items()}
        self.vision_outputs = [o.name for o in self.vision.get_outputs()]
        self.masks: list[tuple[str, tuple[int, ...]]] = []  # name, shape after the T axis
        for i in self.head.get_inputs():
            if i.name.startswith("dropout_mask_"):
                rest = tuple(i.shape[1:])
                if not rest or not all(isinstance(d, int) for d in rest):
                    raise BuildError(f"head input {i.name} has shape {i.shape}; declare it [T, width]")
                self.masks.append((i.name, rest))
            elif i.name not in (*self.vision_outputs, "language_features", "proprio"):
                raise BuildError(f"head input '{i.name}' is none of the vision outputs {self.vision_outputs}, "
                                 "language_features, proprio or dropout_mask_<i>")
        self.masks.sort(key=lambda m: int(m[0].rsplit("_", 1)[1]))
        self.head_inputs = {i.name for i in self.head.get_inputs()}
        self.action_output = self.head.get_outputs()[0].name
        if self.masks and spec.dropout_rate is None:
            raise BuildError("the head has dropout mask inputs but spec.dropout_rate is null; state the dropout rate")
        self._keep = 1.0 - (spec.dropout_rate or 0.0)
        self._rng = np.random.default_rng(mask_seed)
        self._action_range = float(np.max(np.asarray(spec.action.high) - np.asarray(spec.action.low)))
        self.language = None
        if spec.language is not None:
            self.language = session("language")
            if tokenizer is None:
                raise BuildError("the spec has language: pass the tokenizers JSON (spec.language.tokenizer)")
            self.tokenizer = InstructionTokenizer(tokenizer, max_tokens=spec.language.max_tokens)
            self._language_output = self.language.get_outputs()[0].name

    # -- feeds ----------------------------------------------------------------------------------------
    def tokens(self, text: str) -> dict[str, np.ndarray]:
        ids, attention = self.tokenizer.encode(text)
        return {"input_ids": ids, "attention_mask": attention}

    def embed(self, text: str) -> np.ndarray:
        assert self.language is not None
        return self.language.run([self._language_output], self.tokens(text))[0]

    def vision_feeds(self, frames: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        feeds = {}
        for camera in self.spec.cameras:
            name = self.spec.camera_input(camera)
            image = np.ascontiguousarray(frames[camera.name], np.uint8)
            feeds[name] = image[None] if self._batched[name] else image
        return feeds

    def head_feeds(self, observation: Observation, samples: int = 0) -> dict[str, np.ndarray]:
        """The head's inputs; masks of ones with ``samples`` = 0, else that many random masks."""
        features = dict(zip(self.vision_outputs, self.vision.run(None, self.vision_feeds(observation.frames))))
        feeds = {k: v for k, v in features.items() if k in self.head_inputs}
        if "proprio" in self.head_inputs:
            feeds["proprio"] = np.asarray(observation.proprio, np.float32)[None]
        if "language_features" in self.head_inputs:
            feeds["language_features"] = np.asarray(observation.language, np.float32)
        return {**feeds, **self.mask_feeds(samples)}

    def mask_feeds(self, samples: int) -> dict[str, np.ndarray]:
        if samples == 0:
            return {name: np.ones((1, *rest), np.float32) for name, rest in self.masks}
        return {name: (self._rng.random((samples, *rest)) < self._keep).astype(np.float32) / np.float32(self._keep)
                for name, rest in self.masks}

    def calibration_feeds(self, steps: Sequence[Any], mask_samples: int = 8) -> dict[str, list[dict[str, np.ndarray]]]:
        """Per graph, the input dicts of ``steps`` (``EpisodeStep`` s) for INT8 calibration
        (``build_engines.quantize.calibrate``). The head's come with ``mask_samples`` random dropout masks,
        as the runtime runs it (the reference build calibrates its head the same way); 0 gives masks of
        ones, the deterministic policy only."""
        feeds: dict[str, list[dict[str, np.ndarray]]] = {"vision": [], "head": []}
        if self.language is not None:
            feeds["language"] = [self.tokens(text) for text in sorted({s.instruction for s in steps})]
        embeddings: dict[str, np.ndarray] = {}
        for step in steps:
            language = None
            if self.language is not None:
                if step.instruction not in embeddings:
                    embeddings[step.instruction] = self.embed(step.instruction)
                language = embeddings[step.instruction]
            feeds["vision"].append(self.vision_feeds(step.images))
            feeds["head"].append(self.head_feeds(Observation(step.images, step.proprio, language), mask_samples))
        return feeds

    # -- the runner -----------------------------------------------------------------------------------
    def __call__(self, observation: Observation) -> RunnerOutput:
        shape = (self.spec.action.horizon, self.spec.action.dim)
        feeds = self.head_feeds(observation)
        chunk = np.asarray(self.head.run([self.action_output], feeds)[0][0], np.float64).reshape(shape)
        if not self.masks or self.mc_samples < 1:
            return RunnerOutput(actions=chunk)
        feeds.update(self.mask_feeds(self.mc_samples))
        samples = np.asarray(self.head.run([self.action_output], feeds)[0], np.float64)
        spread = samples.reshape(self.mc_samples, -1).std(axis=0)
        return RunnerOutput(actions=chunk, score=float(np.sqrt(np.mean(spread * spread))) / self._action_range)


def onnx_variant(graphs: Mapping[str, str | os.PathLike[str]], spec: PolicySpec, *,
                 tokenizer: str | os.PathLike[str] | None = None, mc_samples: int = 16,
                 mask_seed: int = 0) -> ReplayVariant:
    """A replay variant from a variant's ONNX graphs (see ``OnnxPolicy``)."""
    policy = OnnxPolicy(graphs, spec, tokenizer=tokenizer, mc_samples=mc_samples, mask_seed=mask_seed)
    return ReplayVariant(run=policy, embed=policy.embed if policy.language is not None else None)
