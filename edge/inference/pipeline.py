"""The policy pipeline of one control tick (docs/architecture.md, "One control tick").

    frames (one per camera) -> resize into the vision inputs -> vision graph/engine
          -> head with T Monte-Carlo dropout masks in ONE batch -> a chunk of H actions per sample
          -> mean actions [H, A], spread [H, A], score per chunk step, score over the executed steps

Any bundle schema v2 describes runs: one or more cameras (one uint8 input of the vision graph each),
with or without language, proprio of any size (0 included), single actions (H = 1) or chunks, and
heads without dropout masks (``--uncertainty none``: T = 1, spread 0). The bundle's graph IO is checked
against its spec once, at construction; every buffer is allocated at `activate()`, none per tick.

The language encoder runs only when the instruction changes, on its own thread, behind an LRU cache
seeded with the bundle's precomputed embeddings; until a new instruction's embedding is ready the
pipeline reports "not ready" and the loop holds the robot (it never waits for the encoder).

Dropout masks come from a bank generated once at start-up; each tick copies T consecutive rows from a
random offset into the head's mask inputs, so nothing is allocated per tick. The score's meaning over a
chunk is in docs/bundle.md, "Uncertainty over chunks".
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from edge.errors import BundleError, ConfigError, EdgeError, InputError
from edge.inference.backends.base import InferenceBackend, TensorSpec
from edge.inference.bundle import Bundle, rebuild_hint
from edge.inference.frames import resize_into
from edge.inference.graph_contract import check_policy_io
from edge.inference.tokenizer import InstructionTokenizer
from edge.validation import check_choice, check_range

logger = logging.getLogger(__name__)

# Which graphs of the bundle a pipeline runs, and on what (the ``policy:`` section of the config).
TARGETS = ("cpu", "cpu-fp32", "cpu-qoperator", "cpu-reduce-range", "tensorrt", "fp16")
AUTO = "auto"  # policy.target / policy.threads: measured on this machine
BACKENDS = ("onnxruntime", "tensorrt")
DEVICES = ("cpu", "cuda")


@dataclass(frozen=True)
class PolicyConfig:
    """The ``policy:`` section of the robot config: which graphs, on which backend, how many samples.

    ``target: auto`` and ``threads: auto`` (the defaults) are measured on the machine at start-up, or taken
    from `vla-edge tune`'s cache (edge/inference/tuning.py); explicit values are used as given.
    """

    target: str = "auto"  # auto, or which graphs of the bundle: cpu (INT8 CPU layout), cpu-fp32, tensorrt, fp16
    backend: str = "onnxruntime"  # onnxruntime | tensorrt
    device: str = "cpu"  # onnxruntime only: cpu | cuda
    mc_samples: int = 16  # Monte-Carlo dropout samples T per tick (<= the bundle's max_samples)
    threads: int | str = "auto"  # onnxruntime intra-op threads: auto, or a count (0 = its default)
    mask_seed: int = 0
    tune_budget_s: float = 2.0  # start-up measurement of the auto choices (vla-edge tune takes longer)
    tune_cache: str | None = None  # vla-edge tune's cache file (None: tune.json in the state directory)

    def __post_init__(self) -> None:
        check_choice("policy.target", self.target, (AUTO, *TARGETS))
        check_choice("policy.backend", self.backend, BACKENDS)
        check_choice("policy.device", self.device, DEVICES)
        check_range("policy.mc_samples", self.mc_samples, 1, 256, integer=True)
        if self.threads != AUTO:
            check_range("policy.threads", self.threads, 0, 64, integer=True, hint="set a count, or auto (measured on this machine)")
        check_range("policy.mask_seed", self.mask_seed, 0, integer=True)
        check_range("policy.tune_budget_s", self.tune_budget_s, 0.1, 600.0, unit="s")
        if self.tune_cache is not None and (not isinstance(self.tune_cache, str) or not self.tune_cache.strip()):
            raise ConfigError(f"policy.tune_cache must be a file path or null, got {self.tune_cache!r}")

    @property
    def needs_tuning(self) -> bool:
        return AUTO in (self.target, self.threads)


BackendFactory = Callable[[str, str, tuple[TensorSpec, ...], tuple[TensorSpec, ...], int], InferenceBackend]


def onnxruntime_factory(bundle: Bundle, device: str = "cpu", threads: int = 0) -> BackendFactory:
    """Backends for a bundle's graphs on ONNX Runtime."""
    from edge.inference.backends.onnxruntime import OnnxRuntimeBackend

    def make(graph: str, variant: str, inputs, outputs, max_batch: int) -> InferenceBackend:
        return OnnxRuntimeBackend(bundle.graph_path(graph, variant), inputs, outputs, max_batch=max_batch,
                                  device=device, threads=threads, precision=variant,
                                  session_config=bundle.session_config(graph, variant))

    return make


@dataclass
class StageTimes:
    """Milliseconds of the last tick's stages."""

    resize_ms: float = 0.0
    vision_ms: float = 0.0  # the vision backend's run, copies included
    head_ms: float = 0.0  # the head backend's run (T samples in one batch), copies included
    reduce_ms: float = 0.0
    h2d_ms: float = 0.0  # host -> device copies of both runs (0 on CPU backends)
    d2h_ms: float = 0.0  # device -> host copies of both runs (0 on CPU backends)


@dataclass
class PolicyOutput:
    """One inference: a chunk of H actions (H = 1 for a single-step policy) from T samples. Every array is
    a buffer of the pipeline, overwritten by its next infer(): copy what must outlive the tick."""

    actions: np.ndarray  # float32 [H, A], mean over the T samples
    spread: np.ndarray  # float32 [H, A], std over the T samples (0 without uncertainty)
    samples: np.ndarray  # float32 [T, H, A], a view of the head's output buffer
    score_per_step: np.ndarray  # float32 [H], RMS of the spread over the channels / the action range
    score: float  # RMS of the spread over the first `score_steps` steps and every channel / the action range
    action: np.ndarray  # float32 [A], actions[0] (a view): the step a single-step loop executes
    times: StageTimes = field(default_factory=StageTimes)
    features: np.ndarray | None = None  # the vision graph's output [1, ..., D] (a read-only view)


class EmbeddingCache:
    """LRU cache of sentence embeddings with a background encoder thread.

    request(text) returns the embedding when cached; otherwise it queues the text for the encoder and
    returns None. Errors (e.g. an instruction longer than the tokenizer allows) are kept per text and
    raised to the caller by `error(text)`.
    """

    def __init__(self, encode: Callable[[str], np.ndarray], capacity: int = 64,
                 seed: dict[str, np.ndarray] | None = None):
        if capacity < 1:
            raise ConfigError(f"embedding cache capacity must be >= 1, got {capacity}")
        self._encode = encode
        self._capacity = capacity
        self._cache: OrderedDict[str, np.ndarray] = OrderedDict()
        self._errors: dict[str, EdgeError] = {}
        self._pending: set[str] = set()
        self._lock = threading.Lock()
        self._queue: queue.Queue[str | None] = queue.Queue()
        self._thread: threading.Thread | None = None
        self.encoded = 0
        for text, vector in (seed or {}).items():
            self._cache[text] = vector
        while len(self._cache) > capacity:
            self._cache.popitem(last=False)

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._worker, name="language-encoder", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join(timeout=5.0)
            self._thread = None

    def request(self, text: str) -> np.ndarray | None:
        with self._lock:
            vector = self._cache.get(text)
            if vector is not None:
                self._cache.move_to_end(text)
                return vector
            if text in self._errors or text in self._pending:
                return None
            self._pending.add(text)
        self._queue.put(text)
        return None

    def error(self, text: str) -> EdgeError | None:
        with self._lock:
            return self._errors.get(text)

    def encode_now(self, text: str) -> np.ndarray:
        """Blocking encode (start-up, tools and tests; never from the tick)."""
        with self._lock:
            vector = self._cache.get(text)
            if vector is not None:
                self._cache.move_to_end(text)
                return vector
            self._errors.pop(text, None)
        vector = self._encode(text)
        self._store(text, vector)
        return vector

    def _store(self, text: str, vector: np.ndarray) -> None:
        with self._lock:
            self._cache[text] = vector
            self._cache.move_to_end(text)
            while len(self._cache) > self._capacity:
                self._cache.popitem(last=False)
            self._pending.discard(text)
            self.encoded += 1

    def _worker(self) -> None:
        while True:
            text = self._queue.get()
            if text is None:
                return
            try:
                vector = self._encode(text)
            except EdgeError as exc:
                logger.warning("instruction %r refused: %s", text[:80], exc)
                with self._lock:
                    self._errors[text] = exc
                    self._pending.discard(text)
                continue
            self._store(text, vector)


class PolicyPipeline:
    """Vision + cached language + MC-dropout head, on any backend, with preallocated buffers.

    Attributes other parts read: `cameras` (the spec's CameraSpec tuple, the order of infer's frames),
    `horizon` (H), `action_dim` (A), `proprio_dim` (P, may be 0), `needs_language`, `has_uncertainty`,
    `samples` (T), `score_steps` (how many leading chunk steps the score covers) and `features` (the last
    inference's vision features, read by the failure monitor).
    """

    def __init__(
        self,
        bundle: Bundle,
        target: str = "cpu",
        mc_samples: int | None = None,
        mask_bank_rows: int = 512,
        mask_seed: int = 0,
        backend_factory: BackendFactory | None = None,
        cache_capacity: int = 64,
    ):
        bundle.check_runnable()  # before any device
        self.graph_io = check_policy_io(bundle)
        spec = bundle.spec
        self.bundle = bundle
        self.cameras = spec.cameras
        self.horizon = spec.action.horizon
        self.action_dim = spec.action.dim
        self.proprio_dim = spec.proprio.dim
        self.needs_language = spec.language is not None
        self.has_uncertainty = bundle.has_uncertainty
        dropout = bundle.dropout
        self.max_samples = int(dropout["max_samples"])
        self.samples = int(mc_samples if mc_samples is not None else dropout["default_samples"])
        if not self.has_uncertainty and self.samples != 1:
            raise ConfigError(f"policy.mc_samples must be 1 for this bundle, got {self.samples}: it was built with "
                              "--uncertainty none, so its head has no dropout masks and runs once per inference")
        if not 1 <= self.samples <= self.max_samples:
            raise ConfigError(f"policy.mc_samples must be in 1..{self.max_samples} (the engine profile's "
                              f"maximum), got {self.samples}")
        if mask_bank_rows < self.samples:
            raise ConfigError(f"mask bank of {mask_bank_rows} rows cannot hold {self.samples} samples")
        self.target = target
        self.variants = bundle.target_variants(target)
        missing = sorted(set(bundle.graphs) - set(self.variants))
        if missing:
            raise BundleError(f"bundle {bundle.root}: target {target!r} names no variant of the {', '.join(missing)} "
                              f"graph; rebuild with: {rebuild_hint(bundle.manifest)}")
        self._factory = backend_factory or onnxruntime_factory(bundle)
        self.widths = [int(w) for w in dropout["widths"]]
        rng = np.random.default_rng(mask_seed)
        keep = np.float32(1.0 - float(dropout["rate"])) if self.has_uncertainty else np.float32(1.0)
        # One bank per mask input, of the input's own trailing shape ([width], or [1, width] for a mask
        # shared over a token or chunk axis), 0 or 1/(1-p).
        self._bank = [((rng.random((mask_bank_rows, *mask.shape[1:])) < keep).astype(np.float32) / keep)
                      for mask in self.graph_io.masks]
        self._rng = rng
        self.action_range = float(np.max(np.asarray(spec.action.high) - np.asarray(spec.action.low)))
        self.tokenizer: InstructionTokenizer | None = None
        self.cache: EmbeddingCache | None = None  # None for a policy without language
        if self.needs_language:
            self.tokenizer = InstructionTokenizer(bundle.tokenizer_path, max_tokens=bundle.max_tokens)
            self.cache = EmbeddingCache(self._encode, cache_capacity, bundle.embeddings())
        self._vision: InferenceBackend | None = None
        self._head: InferenceBackend | None = None
        self._language: InferenceBackend | None = None
        self._language_lock = threading.Lock()
        self._deterministic = False
        self._score_steps = self.horizon
        self.tuning: dict | None = None  # how target and threads were chosen (edge/service/tune.py)

    # -- life cycle ---------------------------------------------------------------------------------
    def activate(self) -> None:
        """Open the backends and allocate every buffer a tick uses."""
        graphs = self.bundle.graphs
        make = self._factory
        self._vision = make("vision", self.variants["vision"], graphs["vision"].inputs, graphs["vision"].outputs, 1)
        self._head = make("head", self.variants["head"], graphs["head"].inputs, graphs["head"].outputs,
                          self.max_samples)
        if self.needs_language:
            self._language = make("language", self.variants["language"], graphs["language"].inputs,
                                  graphs["language"].outputs, 1)
        for backend in self.backends.values():
            backend.activate()
        spec = self.bundle.spec
        self._images = tuple(self._vision.input(spec.camera_input(c))[0] for c in self.cameras)
        self._head_vision = self._head.input("vision_features")
        self._head_language = self._head.input("language_features") if self.needs_language else None
        self._head_proprio = self._head.input("proprio")[0] if self.proprio_dim else None
        self._masks = [self._head.input(mask.name) for mask in self.graph_io.masks]
        if self.needs_language:
            self._ids = self._language.input("input_ids")
            self._attention = self._language.input("attention_mask")
        chunk = (self.horizon, self.action_dim)
        self._actions = np.zeros(chunk, np.float32)
        self._spread = np.zeros(chunk, np.float32)
        self._square = np.zeros(chunk, np.float32)
        self._deviation = np.zeros((self.max_samples, *chunk), np.float32)
        self._score_per_step = np.zeros(self.horizon, np.float32)
        self._times = StageTimes()
        self._features = self._head_vision.view()  # what the failure monitor reads (read-only)
        self._features.flags.writeable = False
        self._output = PolicyOutput(actions=self._actions, spread=self._spread,
                                    samples=np.zeros((1, *chunk), np.float32), score_per_step=self._score_per_step,
                                    score=0.0, action=self._actions[0], times=self._times, features=self._features)
        if self.cache is not None:
            self.cache.start()

    def close(self) -> None:
        if self.cache is not None:
            self.cache.stop()
        for backend in self.backends.values():
            backend.close()

    def __enter__(self) -> PolicyPipeline:
        self.activate()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- language -----------------------------------------------------------------------------------
    def _encode(self, text: str) -> np.ndarray:
        with self._language_lock:  # one language backend, used by the worker and by encode_now
            self.tokenizer.encode_into(text, self._ids[0], self._attention[0])
            out = self._language.run(1)["language_features"]
            return out.copy()

    def embedding(self, text: str) -> np.ndarray | None:
        """The cached embedding, or None while it is being computed. Raises InputError if refused, and
        for a policy without language (it takes no instruction)."""
        if self.cache is None:
            raise InputError(f"the policy {self.bundle.spec.name} takes no instruction (its bundle has no "
                             "language graph): run it without one")
        vector = self.cache.request(text)
        if vector is None:
            error = self.cache.error(text)
            if error is not None:
                raise error
        return vector

    # -- the tick -----------------------------------------------------------------------------------
    def set_mc_samples(self, samples: int, deterministic: bool = False) -> None:
        if not self.has_uncertainty and samples != 1:
            raise ConfigError(f"mc_samples must be 1 for a bundle without uncertainty (no dropout masks), got {samples}")
        if not 1 <= samples <= self.max_samples:
            raise ConfigError(f"mc_samples must be in 1..{self.max_samples}, got {samples}")
        self.samples = samples
        self._deterministic = deterministic

    @property
    def score_steps(self) -> int:
        """How many leading steps of the chunk the score covers: the part that will be executed (default H)."""
        return self._score_steps

    @score_steps.setter
    def score_steps(self, steps: int) -> None:
        if isinstance(steps, bool) or not isinstance(steps, int | np.integer) or not 1 <= steps <= self.horizon:
            raise ConfigError(f"score_steps must be an integer in 1..{self.horizon} (the chunk's horizon), "
                              f"got {steps!r}")
        self._score_steps = int(steps)

    def infer(self, frames: Sequence[np.ndarray] | np.ndarray, proprio: np.ndarray | None,
              language: np.ndarray | None = None) -> PolicyOutput:
        """One inference: `frames` one uint8 [H, W, 3] frame per camera in `cameras` order (a single array
        for a one-camera policy), `proprio` float [proprio_dim], `language` the instruction's embedding
        (None for a policy without language). Raises InputError naming what does not fit."""
        t0 = time.perf_counter()
        if isinstance(frames, np.ndarray):
            frames = (frames,)
        if len(frames) != len(self._images):
            raise InputError(f"the policy has {len(self._images)} camera(s) ({', '.join(c.name for c in self.cameras)}); "
                             f"got {len(frames)} frame(s): pass one uint8 [H, W, 3] frame per camera, in that order")
        for frame, image in zip(frames, self._images):
            resize_into(frame, image)
        t1 = time.perf_counter()
        features = self._vision.run(1)["vision_features"]
        np.copyto(self._head_vision, features)
        t2 = time.perf_counter()
        self._set_language(language)
        self._set_proprio(proprio)
        samples = self.samples
        if self._deterministic:
            for mask in self._masks:
                mask[:samples] = 1.0
        elif self._masks:
            offset = int(self._rng.integers(0, self._bank[0].shape[0] - samples + 1))
            for mask, bank in zip(self._masks, self._bank):
                np.copyto(mask[:samples], bank[offset : offset + samples])
        actions = self._head.run(samples)["actions"].reshape(samples, self.horizon, self.action_dim)
        t3 = time.perf_counter()
        np.mean(actions, axis=0, out=self._actions)
        deviation = self._deviation[:samples]  # the std over the T samples, in preallocated buffers
        np.subtract(actions, self._actions, out=deviation)
        np.multiply(deviation, deviation, out=deviation)
        np.mean(deviation, axis=0, out=self._spread)
        np.sqrt(self._spread, out=self._spread)
        np.multiply(self._spread, self._spread, out=self._square)
        score = float(np.sqrt(np.mean(self._square[: self._score_steps]))) / self.action_range
        np.mean(self._square, axis=1, out=self._score_per_step)
        np.sqrt(self._score_per_step, out=self._score_per_step)
        self._score_per_step /= np.float32(self.action_range)
        t4 = time.perf_counter()
        self._times.resize_ms = (t1 - t0) * 1e3
        self._times.vision_ms = (t2 - t1) * 1e3
        self._times.head_ms = (t3 - t2) * 1e3
        self._times.reduce_ms = (t4 - t3) * 1e3
        vision, head = self._vision.last_timing, self._head.last_timing
        self._times.h2d_ms = vision.host_to_device_ms + head.host_to_device_ms
        self._times.d2h_ms = vision.device_to_host_ms + head.device_to_host_ms
        self._output.score = score
        self._output.samples = actions
        return self._output

    def _set_language(self, language: np.ndarray | None) -> None:
        if self._head_language is None:
            if language is not None:
                raise InputError(f"the policy {self.bundle.spec.name} takes no instruction (no language graph): "
                                 "pass language=None")
            return
        if language is None:
            raise InputError("the policy is conditioned on an instruction: pass its embedding "
                             "(pipeline.embedding(text)), not None")
        shape = np.shape(language)
        if shape not in ((self._head_language.shape[-1],), tuple(self._head_language.shape)):
            raise InputError(f"the language embedding must be float [{self._head_language.shape[-1]}] or "
                             f"{list(self._head_language.shape)}, got shape {list(shape)}")
        np.copyto(self._head_language, language)

    def _set_proprio(self, proprio: np.ndarray | None) -> None:
        size = 0 if proprio is None else np.size(proprio)
        if size != self.proprio_dim:
            names = ", ".join(self.bundle.spec.proprio.names) or "none"
            raise InputError(f"proprio must have {self.proprio_dim} values ({names}), got shape "
                             f"{None if proprio is None else list(np.shape(proprio))}")
        if self._head_proprio is not None:
            np.copyto(self._head_proprio, np.reshape(proprio, self.proprio_dim))

    @property
    def features(self) -> np.ndarray:
        """The last inference's vision features [1, ..., D], a read-only view overwritten by the next infer()."""
        return self._features

    @property
    def backends(self) -> dict[str, InferenceBackend]:
        """The active backends by graph ("language" only for a policy with language)."""
        backends = {"vision": self._vision, "head": self._head, "language": self._language}
        return {name: backend for name, backend in backends.items() if backend is not None}
