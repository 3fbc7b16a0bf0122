"""The policy pipeline of one control tick (docs/architecture.md, "One control tick").

    frame -> resize into the vision input buffer -> vision graph/engine
          -> head with T Monte-Carlo dropout masks in ONE batch -> mean action, spread, score

The language encoder runs only when the instruction changes, on its own thread, behind an LRU cache
seeded with the bundle's precomputed embeddings; until a new instruction's embedding is ready the
pipeline reports "not ready" and the loop holds the robot (it never waits for the encoder).

Dropout masks come from a bank generated once at start-up; each tick copies T consecutive rows from a
random offset into the head's mask inputs, so nothing is allocated per tick.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from edge.errors import ConfigError, EdgeError, InputError
from edge.inference.backends.base import InferenceBackend, TensorSpec
from edge.inference.bundle import Bundle
from edge.inference.frames import resize_into
from edge.inference.tokenizer import InstructionTokenizer
from edge.validation import check_choice, check_range

logger = logging.getLogger(__name__)

# Which graphs of the bundle a pipeline runs, and on what (the ``policy:`` section of the config).
TARGETS = ("cpu", "cpu-fp32", "tensorrt", "fp16")
BACKENDS = ("onnxruntime", "tensorrt")
DEVICES = ("cpu", "cuda")


@dataclass(frozen=True)
class PolicyConfig:
    """The ``policy:`` section of the robot config: which graphs, on which backend, how many samples."""

    target: str = "cpu"  # which graphs of the bundle: cpu (INT8 CPU layout), cpu-fp32, tensorrt, fp16
    backend: str = "onnxruntime"  # onnxruntime | tensorrt
    device: str = "cpu"  # onnxruntime only: cpu | cuda
    mc_samples: int = 16  # Monte-Carlo dropout samples T per tick (<= the bundle's max_samples)
    threads: int = 0  # onnxruntime intra-op threads (0 = its default)
    mask_seed: int = 0

    def __post_init__(self) -> None:
        check_choice("policy.target", self.target, TARGETS)
        check_choice("policy.backend", self.backend, BACKENDS)
        check_choice("policy.device", self.device, DEVICES)
        check_range("policy.mc_samples", self.mc_samples, 1, 256, integer=True)
        check_range("policy.threads", self.threads, 0, 64, integer=True)
        check_range("policy.mask_seed", self.mask_seed, 0, integer=True)


BackendFactory = Callable[[str, str, tuple[TensorSpec, ...], tuple[TensorSpec, ...], int], InferenceBackend]


def onnxruntime_factory(bundle: Bundle, device: str = "cpu", threads: int = 0) -> BackendFactory:
    """Backends for a bundle's graphs on ONNX Runtime."""
    from edge.inference.backends.onnxruntime import OnnxRuntimeBackend

    def make(graph: str, variant: str, inputs, outputs, max_batch: int) -> InferenceBackend:
        return OnnxRuntimeBackend(bundle.graph_path(graph, variant), inputs, outputs, max_batch=max_batch,
                                  device=device, threads=threads, precision=variant)

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
    action: np.ndarray  # float32 [action_dim], mean over the T samples (buffer reused every tick)
    spread: np.ndarray  # float32 [action_dim], std over the T samples (buffer reused every tick)
    score: float  # RMS of spread over the action range
    samples: np.ndarray  # float32 [T, action_dim], a view of the head's output buffer
    times: StageTimes = field(default_factory=StageTimes)


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
    """Vision + cached language + MC-dropout head, on any backend, with preallocated buffers."""

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
        bundle.check_runnable()  # several cameras, chunks, no language: a clear refusal, before any device
        dropout = bundle.dropout
        self.max_samples = int(dropout["max_samples"])
        self.samples = int(mc_samples if mc_samples is not None else dropout["default_samples"])
        if not 1 <= self.samples <= self.max_samples:
            raise ConfigError(f"policy.mc_samples must be in 1..{self.max_samples} (the engine profile's "
                              f"maximum), got {self.samples}")
        if mask_bank_rows < self.samples:
            raise ConfigError(f"mask bank of {mask_bank_rows} rows cannot hold {self.samples} samples")
        self.bundle = bundle
        self.target = target
        self.variants = bundle.target_variants(target)
        self._factory = backend_factory or onnxruntime_factory(bundle)
        self.widths = [int(w) for w in dropout["widths"]]
        rate = float(dropout["rate"])
        rng = np.random.default_rng(mask_seed)
        keep = np.float32(1.0 - rate)
        self._bank = [((rng.random((mask_bank_rows, w)) < keep).astype(np.float32) / keep) for w in self.widths]
        self._rng = rng
        self.action_range = float(np.max(np.asarray(bundle.action["high"]) - np.asarray(bundle.action["low"])))
        self.tokenizer = InstructionTokenizer(bundle.tokenizer_path, max_tokens=bundle.max_tokens)
        self.cache = EmbeddingCache(self._encode, cache_capacity, bundle.embeddings())
        self._vision: InferenceBackend | None = None
        self._head: InferenceBackend | None = None
        self._language: InferenceBackend | None = None
        self._language_lock = threading.Lock()
        self._deterministic = False

    # -- life cycle ---------------------------------------------------------------------------------
    def activate(self) -> None:
        graphs = self.bundle.graphs
        make = self._factory
        self._vision = make("vision", self.variants["vision"], graphs["vision"].inputs, graphs["vision"].outputs, 1)
        self._head = make("head", self.variants["head"], graphs["head"].inputs, graphs["head"].outputs,
                          self.max_samples)
        self._language = make("language", self.variants["language"], graphs["language"].inputs,
                              graphs["language"].outputs, 1)
        for backend in (self._vision, self._head, self._language):
            backend.activate()
        self._image = self._vision.input("image")[0]
        self._head_vision = self._head.input("vision_features")
        self._head_language = self._head.input("language_features")
        self._head_proprio = self._head.input("proprio")
        self._masks = [self._head.input(f"dropout_mask_{i}") for i in range(len(self.widths))]
        self._ids = self._language.input("input_ids")
        self._attention = self._language.input("attention_mask")
        action_dim = int(self.bundle.action["dim"])
        self._mean = np.zeros(action_dim, np.float32)
        self._spread = np.zeros(action_dim, np.float32)
        self._scratch = np.zeros((self.max_samples, action_dim), np.float32)
        self._times = StageTimes()
        self._output = PolicyOutput(self._mean, self._spread, 0.0, self._scratch[:1], self._times)
        self.cache.start()

    def close(self) -> None:
        self.cache.stop()
        for backend in (self._vision, self._head, self._language):
            if backend is not None:
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
        """The cached embedding, or None while it is being computed. Raises InputError if refused."""
        vector = self.cache.request(text)
        if vector is None:
            error = self.cache.error(text)
            if error is not None:
                raise error
        return vector

    # -- the tick -----------------------------------------------------------------------------------
    def set_mc_samples(self, samples: int, deterministic: bool = False) -> None:
        if not 1 <= samples <= self.max_samples:
            raise ConfigError(f"mc_samples must be in 1..{self.max_samples}, got {samples}")
        self.samples = samples
        self._deterministic = deterministic

    def infer(self, frame: np.ndarray, proprio: np.ndarray, language: np.ndarray) -> PolicyOutput:
        t0 = time.perf_counter()
        resize_into(frame, self._image)
        t1 = time.perf_counter()
        features = self._vision.run(1)["vision_features"]
        np.copyto(self._head_vision, features)
        t2 = time.perf_counter()
        np.copyto(self._head_language, language)
        proprio = np.asarray(proprio)
        if proprio.shape[-1] != self._head_proprio.shape[-1]:
            raise InputError(f"proprio must have {self._head_proprio.shape[-1]} values, got shape {proprio.shape}")
        self._head_proprio[0] = proprio
        samples = self.samples
        if self._deterministic:
            for mask in self._masks:
                mask[:samples] = 1.0
        else:
            offset = int(self._rng.integers(0, self._bank[0].shape[0] - samples + 1))
            for mask, bank in zip(self._masks, self._bank):
                np.copyto(mask[:samples], bank[offset : offset + samples])
        actions = self._head.run(samples)["actions"]
        t3 = time.perf_counter()
        np.mean(actions, axis=0, out=self._mean)
        np.std(actions, axis=0, out=self._spread)
        score = float(np.sqrt(np.mean(self._spread * self._spread))) / self.action_range
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

    @property
    def backends(self) -> dict[str, InferenceBackend]:
        return {"vision": self._vision, "head": self._head, "language": self._language}
