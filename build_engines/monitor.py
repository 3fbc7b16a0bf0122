"""The failure monitor's models and conformal thresholds, fitted at build time (issue: failure detection
beyond MC-dropout; docs/bundle.md, "monitor").

    calibration samples -> vision features of each vision variant, pooled to [n, D]
        -> mean + Ledoit-Wolf shrunk covariance -> whitening matrix W (d(x) = |W (x - mean)|, Mahalanobis)
    held-out samples (other episodes) -> d(x) per sample -> conformal threshold at the stated rate
    known instructions -> unit embeddings; held-out instructions (paraphrases the policy grounds)
        -> nearest cosine distance -> conformal threshold
    held-out episodes -> mean actions of consecutive samples -> RMS change / action range -> threshold
    (closed loop only) successful episodes' inference counts -> time on task: the longest a task may run

Where the build drives a closed loop (the gate's environment), the per-inference signals are calibrated
again on what the runtime will see: every tick of the gate's successful episodes, through the runtime's
pipeline, in order. The runtime's alarms are windowed (`over` of the last `ticks` scores above the
threshold; the spread gate: `enter_ticks` in a row), so the threshold is set on the windowed statistic
itself (`windowed_statistic`: the over-th largest of the last `ticks` scores, which exceeds a threshold
exactly when the alarm would be on), and the stated rate is split evenly over those signals (Bonferroni),
so the monitor as a whole raises at most `rate` of in-distribution ticks (`closed_loop_thresholds`).
Ticks of one episode are not exchangeable with each other; the rate is an estimate over episodes, and
the evaluation (reference_policy/evaluate_monitor.py) measures what it is on held-out seeds.

A threshold is the split-conformal quantile: the ceil((n + 1)(1 - rate))-th smallest of n held-out
scores, so a new in-distribution score exceeds it with probability at most `rate` (exchangeability).
A per-tick signal whose n is too small for the rate (n + 1 < 1 / rate) is left out (the manifest's
`skipped` says why); the instruction signal is judged per instruction, not per tick: with fewer
held-out instructions than the rate needs its threshold is the largest held-out distance (every
held-out instruction is one the policy grounds) and `supported_rate` says what the count supports. The runtime (edge/control/monitor.py) reads the models
and thresholds; signals are derived from any bundle's graphs (vision output, language output, head
actions), so nothing here knows the policy.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np

from build_engines.errors import GateError

logger = logging.getLogger(__name__)

FEATURES_FILE = "monitor/features.npz"
INSTRUCTIONS_FILE = "monitor/instructions.npz"
DEFAULT_RATE = 0.01  # false alarms per in-distribution tick, before the window
DEFAULT_EPISODE_RATE = 0.05  # successful episodes with any false alarm (closed-loop calibration only)
DEFAULT_WINDOW = {"over": 3, "ticks": 5}  # an alarm: `over` of the last `ticks` scores above the threshold
FEATURE_SCORE = ("Mahalanobis distance of the pooled vision features (mean over every axis but the last) "
                 "to the calibration samples' mean, Ledoit-Wolf shrunk covariance")
INSTRUCTION_SCORE = "1 - the largest cosine similarity of the instruction's embedding to a known instruction's"
# Time on task: durations are right-skewed and the longest of 50 gate episodes under-estimates the tail;
# at 1.0x the longest (72 inferences) it stopped 2 of 50 held-out successes of the reference policy.
TASK_MARGIN = 1.5
TASK_SCORE = ("inferences since the instruction (or a resume); on above the most a successful episode took: a "
              "task that runs longer is taken as one that cannot succeed")
CONSISTENCY_SCORE = ("RMS over channels of the change of the first executed action between consecutive "
                     "inferences, divided by the largest action range")


def pool(features: np.ndarray) -> np.ndarray:
    """Vision features [n, ..., D] -> [n, D] (mean over the token axes; [n, D] stays as it is)."""
    features = np.asarray(features, np.float64)
    if features.ndim < 2:
        raise GateError(f"vision features must have a batch axis and a feature axis, got shape {features.shape}")
    return features.reshape(features.shape[0], -1, features.shape[-1]).mean(axis=1)


def shrunk_covariance(x: np.ndarray) -> tuple[np.ndarray, float]:
    """Ledoit-Wolf (2004) shrinkage of the sample covariance towards mu * I: (covariance, shrinkage)."""
    n, d = x.shape
    centred = x - x.mean(axis=0)
    sample = centred.T @ centred / n
    mu = float(np.trace(sample)) / d
    target = mu * np.eye(d)
    delta = float(np.sum((sample - target) ** 2)) / d
    squares = centred ** 2
    beta = float(np.sum(squares.T @ squares / n - sample ** 2)) / (d * n)
    shrinkage = 1.0 if delta <= 0 else min(max(beta / delta, 0.0), 1.0)
    return (1.0 - shrinkage) * sample + shrinkage * target, shrinkage


def fit_mahalanobis(x: np.ndarray) -> dict[str, np.ndarray]:
    """mean [D] and whitening matrix [D, D] with |W (x - mean)| the Mahalanobis distance."""
    x = pool(x)
    if x.shape[0] < 2:
        raise GateError(f"the feature-novelty model needs at least 2 calibration samples, got {x.shape[0]}")
    covariance, shrinkage = shrunk_covariance(x)
    values, vectors = np.linalg.eigh(covariance)
    floor = max(float(values.max()) * 1e-9, 1e-12)  # all-constant features: a finite, scale-free distance
    whiten = (vectors / np.sqrt(np.maximum(values, floor))).T
    return {"mean": x.mean(axis=0).astype(np.float32), "whiten": whiten.astype(np.float32),
            "shrinkage": np.float32(shrinkage)}


def mahalanobis(x: np.ndarray, model: dict[str, np.ndarray]) -> np.ndarray:
    diff = pool(x) - model["mean"].astype(np.float64)
    return np.linalg.norm(diff @ model["whiten"].astype(np.float64).T, axis=1)


def conformal_threshold(scores: np.ndarray, rate: float) -> tuple[float, float]:
    """(threshold, the rate the count supports): the ceil((n + 1)(1 - rate))-th smallest score."""
    scores = np.sort(np.asarray(scores, np.float64))
    n = len(scores)
    if n == 0 or not np.all(np.isfinite(scores)):
        raise GateError(f"conformal calibration needs finite held-out scores, got {n} scores "
                        f"({int(np.sum(~np.isfinite(scores)))} not finite)")
    rank = math.ceil((n + 1) * (1.0 - rate))
    if rank > n:
        return float(scores[-1]), 1.0 / (n + 1)
    return float(scores[rank - 1]), float(rate)


def windowed_statistic(scores: np.ndarray, over: int, ticks: int) -> np.ndarray:
    """Per tick of one episode: the `over`-th largest of the last `ticks` scores (-inf while fewer than
    `over` scores have been seen). A windowed alarm (edge/control/monitor.py, WindowedAlarm) is on at a
    tick exactly when this exceeds its threshold; `over == ticks` is the spread gate's "above the
    threshold `enter_ticks` times in a row"."""
    scores = np.asarray(scores, np.float64)
    if not 1 <= over <= ticks:
        raise GateError(f"a window needs 1 <= over <= ticks, got over {over}, ticks {ticks}")
    out = np.full(len(scores), -np.inf)
    for i in range(over - 1, len(scores)):
        window = scores[max(0, i - ticks + 1):i + 1]
        out[i] = np.partition(window, len(window) - over)[len(window) - over]
    return out


def first_action_changes(first_actions: np.ndarray, action_range: float) -> np.ndarray:
    """The action-consistency score per inference of one episode, as the runtime computes it (0 at first)."""
    first_actions = np.asarray(first_actions, np.float64)
    change = np.sqrt(np.mean(np.diff(first_actions, axis=0) ** 2, axis=1)) / action_range
    return np.concatenate([[0.0], change])


def closed_loop_thresholds(traces: dict[str, list], targets: dict[str, dict[str, str]], models: dict,
                           action_range: float, rate: float, window: dict, enter_ticks: int,
                           episode_rate: float = DEFAULT_EPISODE_RATE) -> dict:
    """Per signal, per target: the windowed conformal threshold over the gate's successful episodes
    (`traces`: target -> EpisodeTrace list, build_engines/accuracy_gate.py), the larger of two:

    - per tick: the conformal quantile of the windowed statistic over every tick, at rate / n_signals;
    - per episode: the conformal quantile of each episode's largest windowed statistic, at
      episode_rate / n_signals. Episodes are exchangeable where ticks are not, so this one bounds the
      chance that a new successful episode sees any false alarm (a stop that, with a policy whose
      stopped state is itself unusual, may not lift again) by episode_rate, over every signal together.

    Returns {"thresholds": {signal: {target: value}}, "rate_per_signal", "episode_rate_per_signal",
    "episodes", "ticks", "supported_rate", "supported_episode_rate"}; a target without successful
    episodes is left out."""
    signals = ["spread", "action_consistency"] + (["feature_novelty"] if models else [])
    # time on task raises no alarm on a successful episode's ticks, only on one that runs too long: it takes
    # a share of the episode rate, none of the per-tick rate
    share, episode_share = rate / len(signals), episode_rate / (len(signals) + 1)
    thresholds: dict[str, dict[str, float]] = {name: {} for name in (*signals, "time_on_task")}
    counts, supported, supported_episodes = {}, {}, {}
    for target, episodes in traces.items():
        if not episodes:
            continue
        per_signal: dict[str, list[np.ndarray]] = {name: [] for name in signals}
        for episode in episodes:
            per_signal["spread"].append(windowed_statistic(episode.spread, enter_ticks, enter_ticks))
            per_signal["action_consistency"].append(windowed_statistic(
                first_action_changes(episode.first_actions, action_range), window["over"], window["ticks"]))
            if "feature_novelty" in per_signal:
                model = models[targets[target]["vision"]]
                per_signal["feature_novelty"].append(windowed_statistic(
                    mahalanobis(episode.features, model), window["over"], window["ticks"]))
        for name, rows in per_signal.items():
            rows = [row[row > -np.inf] for row in rows]  # the window is not full yet: the alarm cannot be on
            rows = [row for row in rows if len(row)]
            if not rows:
                continue
            by_tick, achieved = conformal_threshold(np.concatenate(rows), share)
            by_episode, achieved_episodes = conformal_threshold(np.array([row.max() for row in rows]), episode_share)
            thresholds[name][target] = _positive(max(by_tick, by_episode))
            supported[target] = max(supported.get(target, 0.0), achieved)
            supported_episodes[target] = max(supported_episodes.get(target, 0.0), achieved_episodes)
        # every inference of a successful episode ran on its task: the longest allowed is the conformal
        # quantile of their counts (a new successful episode runs longer with probability <= episode_share),
        # times TASK_MARGIN for the right-skewed tail a few dozen episodes under-estimate
        longest, _ = conformal_threshold(np.array([len(e.spread) for e in episodes], np.float64), episode_share)
        thresholds["time_on_task"][target] = float(math.ceil(TASK_MARGIN * longest))
        counts[target] = (len(episodes), int(sum(len(e.spread) for e in episodes)))
    return {"thresholds": thresholds, "rate_per_signal": share, "episode_rate_per_signal": episode_share,
            "signals": signals, "episodes": min((c[0] for c in counts.values()), default=0),
            "ticks": min((c[1] for c in counts.values()), default=0),
            "supported_rate": max(supported.values(), default=1.0),
            "supported_episode_rate": max(supported_episodes.values(), default=1.0)}


def _positive(value: float) -> float:
    return max(float(value), 1e-6)  # the schema's score is > 0; an all-zero held-out score stays tiny


def unit_rows(vectors: np.ndarray) -> np.ndarray:
    vectors = np.asarray(vectors, np.float64).reshape(len(vectors), -1)
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return (vectors / np.maximum(norms, 1e-12)).astype(np.float32)


def instruction_distance(vectors: np.ndarray, known_unit: np.ndarray) -> np.ndarray:
    return 1.0 - np.max(unit_rows(vectors).astype(np.float64) @ known_unit.astype(np.float64).T, axis=1)


def consistency_scores(actions: list[np.ndarray], episodes: list, action_range: float) -> np.ndarray:
    """RMS change of the first action between consecutive samples of one episode, / action range."""
    scores = []
    for i in range(1, len(actions)):
        if episodes[i] is not None and episodes[i] == episodes[i - 1]:
            change = np.asarray(actions[i][0], np.float64) - np.asarray(actions[i - 1][0], np.float64)
            scores.append(float(np.sqrt(np.mean(change ** 2))) / action_range)
    return np.asarray(scores)


def fit_monitor(root: Path, *, vision_features: dict[str, np.ndarray], targets: dict[str, dict[str, str]],
                calibration: slice, heldout: slice, episodes: list, rate: float,
                instruction_vectors: tuple[np.ndarray, np.ndarray] | None,
                known_instructions: list[str], heldout_instructions: list[str],
                heldout_actions: dict[str, list[np.ndarray]], action_range: float,
                traces: dict[str, list] | None = None, enter_ticks: int = 3,
                compressed_features: dict[str, list[np.ndarray]] | None = None,
                camera_jpeg: tuple[int, ...] = ()) -> dict:
    """Write monitor/*.npz under `root` and return the manifest's `monitor` section.

    vision_features: vision variant -> features of every sample (calibration then held-out);
    instruction_vectors: (known, held-out) embeddings, or None without language;
    heldout_actions: target -> mean first actions of the held-out samples, in order;
    traces: the closed-loop gate's successful episodes per target (None: no closed loop), whose windowed
    conformal thresholds replace the per-sample ones and set the spread's (section `spread`);
    compressed_features: vision variant -> the same samples' features once per camera JPEG quality
    (`camera_jpeg`, build_engines/camera_codec.py): the feature model is fitted on the calibration samples
    raw and compressed, the per-sample thresholds are set on the held-out ones raw and compressed."""
    (root / "monitor").mkdir(exist_ok=True)
    skipped: dict[str, str] = {}
    arrays: dict[str, np.ndarray] = {}
    feature_thresholds: dict[str, float] = {}
    supported: dict[str, float] = {}
    models = {}
    compressed_features = compressed_features or {}

    def as_delivered(variant: str, rows: slice) -> np.ndarray:
        return np.concatenate([vision_features[variant][rows]]
                              + [extra[rows] for extra in compressed_features.get(variant, [])])

    for variant in vision_features:
        model = fit_mahalanobis(as_delivered(variant, calibration))
        models[variant] = model
        arrays[f"mean_{variant}"] = model["mean"]
        arrays[f"whiten_{variant}"] = model["whiten"]
    for target, variants in targets.items():
        variant = variants["vision"]
        threshold, achieved = conformal_threshold(mahalanobis(as_delivered(variant, heldout), models[variant]), rate)
        feature_thresholds[target] = _positive(threshold)
        supported[target] = achieved
    n_heldout = heldout.stop - heldout.start
    heldout_episodes = len({e if e is not None else ("sample", i) for i, e in enumerate(episodes[heldout])})
    signals: dict = {}
    has_loop = bool(traces) and any(traces.values())  # the closed loop recalibrates: held-out counts matter less
    if _enough("feature_novelty", n_heldout, rate, skipped) or has_loop:
        np.savez(root / FEATURES_FILE, **arrays)
        signals["feature_novelty"] = {
            "path": FEATURES_FILE, "score": FEATURE_SCORE, "threshold": feature_thresholds,
            "dim": int(next(iter(models.values()))["mean"].shape[0]),
            "shrinkage": {v: float(m["shrinkage"]) for v, m in models.items()},
            "calibration_samples": calibration.stop - calibration.start, "heldout_samples": n_heldout,
            "heldout_episodes": heldout_episodes, "supported_rate": max(supported.values())}
    if instruction_vectors is not None:
        known, held = instruction_vectors
        known_unit = unit_rows(known)
        if len(held):
            scores, source = instruction_distance(held, known_unit), "held-out instructions"
        elif len(known) > 1:  # leave one out: each known instruction against the others
            similarity = known_unit.astype(np.float64) @ known_unit.astype(np.float64).T
            np.fill_diagonal(similarity, -np.inf)
            scores, source = 1.0 - similarity.max(axis=1), "known instructions, leave one out"
        else:
            scores, source = None, None
        if scores is not None:
            threshold, achieved = conformal_threshold(scores, rate)
            np.savez(root / INSTRUCTIONS_FILE, embeddings=known_unit)
            signals["instruction_novelty"] = {
                "path": INSTRUCTIONS_FILE, "score": INSTRUCTION_SCORE, "threshold": _positive(threshold),
                "instructions": list(known_instructions), "heldout_instructions": len(scores),
                "calibrated_on": source, "supported_rate": achieved}
            logger.info("monitor: instruction novelty threshold %.4f over %d %s", threshold, len(scores), source)
    pairs = None
    consistency: dict[str, float] = {}
    for target, actions in heldout_actions.items():
        scores = consistency_scores(actions, episodes[heldout], action_range)
        if len(scores) == 0:
            break
        pairs = len(scores)
        threshold, achieved = conformal_threshold(scores, rate)
        consistency[target] = _positive(threshold)
    if pairs and _enough("action_consistency", pairs, rate, skipped):
        signals["action_consistency"] = {"score": CONSISTENCY_SCORE, "threshold": consistency,
                                         "heldout_pairs": pairs,
                                         "supported_rate": 1.0 / (pairs + 1) if (pairs + 1) * rate < 1 else rate}
    loop = None
    if has_loop:
        loop = closed_loop_thresholds(traces, targets, models if "feature_novelty" in signals else {},
                                      action_range, rate, DEFAULT_WINDOW, enter_ticks)
        source = (f"closed loop: {loop['episodes']} successful gate episodes ({loop['ticks']} ticks), windowed "
                  f"statistic, rate {loop['rate_per_signal']:.4g} per tick and {loop['episode_rate_per_signal']:.4g} "
                  f"per episode for each signal (supported: {loop['supported_rate']:.4g}, "
                  f"{loop['supported_episode_rate']:.4g})")
        for name in ("feature_novelty", "action_consistency"):
            if name not in loop["thresholds"]:
                continue
            entry = signals.setdefault(name, {"score": CONSISTENCY_SCORE, "threshold": {}})
            entry["threshold"] = {**entry["threshold"], **loop["thresholds"][name]}
            entry.update(calibrated_on=source, closed_loop_ticks=loop["ticks"], supported_rate=loop["supported_rate"])
            skipped.pop(name, None)
        if loop["thresholds"]["time_on_task"]:
            signals["time_on_task"] = {
                "score": TASK_SCORE, "threshold": loop["thresholds"]["time_on_task"],
                "calibrated_on": f"closed loop: {TASK_MARGIN:g} x the conformal quantile of the inferences of "
                                 f"each of {loop['episodes']} successful gate episodes, at "
                                 f"{loop['episode_rate_per_signal']:.4g} of episodes (supported: "
                                 f"{loop['supported_episode_rate']:.4g})", "margin": TASK_MARGIN}
        logger.info("monitor: closed-loop thresholds %s", {n: {t: round(v, 4) for t, v in row.items()}
                                                           for n, row in loop["thresholds"].items()})
    if not any((root / "monitor").iterdir()):
        (root / "monitor").rmdir()
    if not signals:
        logger.warning("failure monitor: no signal could be calibrated (%s); the bundle runs with the MC-dropout "
                       "spread alone", "; ".join(skipped.values()) or "nothing to calibrate on")
        return None
    logger.info("monitor: feature-novelty thresholds %s (%d held-out samples); signals %s",
                {t: round(v, 3) for t, v in feature_thresholds.items()}, n_heldout, sorted(signals))
    section = {"method": "split conformal: the ceil((n + 1)(1 - rate))-th smallest held-out score per signal",
               "false_alarm_rate": float(rate), "window": dict(DEFAULT_WINDOW), "signals": signals,
               "camera_jpeg": list(camera_jpeg)}
    if loop is not None:
        section["method"] = ("split conformal on the closed loop: per signal the larger of the ceil((n + 1)(1 - "
                             f"rate / {len(loop['signals'])}))-th smallest windowed statistic over the gate's "
                             "successful ticks and the same quantile at episode_rate of each successful "
                             "episode's largest (the statistic: the over-th largest of the last `ticks` "
                             "scores; the spread: the smallest of the last enter_ticks)")
        section["episode_rate"] = float(DEFAULT_EPISODE_RATE)
        section["spread"] = {"threshold": loop["thresholds"]["spread"], "enter_ticks": int(enter_ticks)}
    if skipped:
        section["skipped"] = skipped
    return section


def _enough(signal: str, scores: int, rate: float, skipped: dict[str, str]) -> bool:
    """A per-tick signal is written only where its held-out scores support the stated rate: with n scores
    the conformal threshold can promise no rate below 1 / (n + 1)."""
    if (scores + 1) * rate >= 1.0 - 1e-9:
        return True
    needed = math.ceil(1.0 / rate) - 1
    skipped[signal] = (f"{scores} held-out scores cannot support a false-alarm rate of {rate:g} per tick "
                       f"(at least {needed} needed): raise --heldout-samples or --monitor-rate")
    logger.warning("failure monitor: %s left out: %s", signal, skipped[signal])
    return False
