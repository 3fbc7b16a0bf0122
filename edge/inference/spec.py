"""The policy spec: what a policy sees and commands, shared by the build (which writes it into the bundle's
manifest) and the runtime (which checks the robot config and the controller against it).

A user states it once, in their policy factory (`build-engines --policy module:function`) or in the
YAML of pre-exported graphs (`build-engines --onnx-spec policy.yaml`); docs/bring-your-own-policy.md
describes every field. The YAML / manifest form::

    name: my-arm-policy
    cameras:                       # one or more; each is one uint8 input of the vision graph
      - {name: front, height: 224, width: 224, channel_order: bgr}
    language: {tokenizer: tokenizer.json, max_tokens: 32}      # or null: a single-task policy
    proprio:                       # what the head gets from telemetry, in order
      names: [left_wheel_vel, right_wheel_vel]
      sources: ["velocities[0]", "velocities[1]"]              # positions[i] or velocities[i], quoted
    action:
      names: [left_wheel, right_wheel]
      horizon: 1                   # H: actions per inference (a chunk when > 1)
      kinds: [velocity, velocity]  # per channel: velocity or position
      low: [-1.0, -1.0]
      high: [1.0, 1.0]
      max_slew_per_s: [4.0, 4.0]   # the safety layer's slew limit per channel, units per second
    dropout_rate: 0.2              # the head's MC-dropout rate; null: the head has no dropout

Every field is checked here with a message naming it (``spec.action.low[1]``); nothing in this module
knows about any particular policy. The channel limit of the serial protocol is checked where the
protocol is known (the build and the service's wiring), not here: inference does not import io.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from edge.errors import ConfigError, InputError
from edge.validation import check_choice, check_range, check_sequence, check_text

CHANNEL_ORDERS = ("bgr", "rgb")  # what the vision graph's uint8 input expects; OpenCV delivers bgr
COMMAND_KINDS = ("velocity", "position")
TELEMETRY_FIELDS = ("velocities", "positions")
_SOURCE = re.compile(r"(velocities|positions)\[(\d+)\]")
_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_.-]{0,63}")


def _name(key: str, value: Any) -> str:
    check_text(key, value, "a name of letters, digits, '_', '.' or '-' (starting with a letter)")
    if not _NAME.fullmatch(value):
        raise ConfigError(f"{key} must be a name of letters, digits, '_', '.' or '-' (starting with a letter, "
                          f"at most 64 characters), got {value!r}")
    return value


def _names(key: str, value: Any, length: int | None = None, each: str = "") -> tuple[str, ...]:
    names = check_sequence(key, value, _name, length=length, noun="names", each=each)
    if len(set(names)) != len(names):
        raise ConfigError(f"{key} must not repeat a name, got {list(names)}")
    return names


def _fields(key: str, raw: Any, allowed: set[str], required: set[str]) -> Mapping[str, Any]:
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{key} must be a mapping with keys {', '.join(sorted(allowed))}, got {raw!r}")
    unknown = sorted(set(raw) - allowed)
    if unknown:
        raise ConfigError(f"unknown key(s) {', '.join(f'{key}.{k}' for k in unknown)}; allowed: "
                          f"{', '.join(sorted(allowed))}")
    missing = sorted(required - set(raw))
    if missing:
        raise ConfigError(f"missing key(s) {', '.join(f'{key}.{k}' for k in missing)}")
    return raw


@dataclass(frozen=True)
class CameraSpec:
    name: str
    height: int  # pixels of the frame the vision graph takes (the runtime resizes into it)
    width: int
    channel_order: str = "bgr"

    @property
    def input_name(self) -> str:
        """The vision graph's uint8 input for this camera: `image` for a single camera, else `image_<name>`."""
        return f"image_{self.name}"

    @classmethod
    def from_dict(cls, raw: Any, key: str) -> CameraSpec:
        raw = _fields(key, raw, {"name", "height", "width", "channel_order"}, {"name", "height", "width"})
        return cls(name=_name(f"{key}.name", raw["name"]),
                   height=check_range(f"{key}.height", raw["height"], 8, 4096, integer=True, unit="pixels"),
                   width=check_range(f"{key}.width", raw["width"], 8, 4096, integer=True, unit="pixels"),
                   channel_order=check_choice(f"{key}.channel_order", raw.get("channel_order", "bgr"), CHANNEL_ORDERS))

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "height": self.height, "width": self.width, "channel_order": self.channel_order}


@dataclass(frozen=True)
class LanguageSpec:
    tokenizer: str  # a `tokenizers` JSON; relative to the bundle once bundled
    max_tokens: int

    @classmethod
    def from_dict(cls, raw: Any, key: str) -> LanguageSpec:
        raw = _fields(key, raw, {"tokenizer", "max_tokens"}, {"tokenizer", "max_tokens"})
        return cls(tokenizer=check_text(f"{key}.tokenizer", raw["tokenizer"], "the path of a tokenizers JSON"),
                   max_tokens=check_range(f"{key}.max_tokens", raw["max_tokens"], 1, 4096, integer=True))

    def to_dict(self) -> dict[str, Any]:
        return {"tokenizer": self.tokenizer, "max_tokens": self.max_tokens}


@dataclass(frozen=True)
class ProprioSpec:
    names: tuple[str, ...] = ()
    sources: tuple[tuple[str, int], ...] = ()  # (telemetry field, channel index) per entry

    @property
    def dim(self) -> int:
        return len(self.names)

    @classmethod
    def from_dict(cls, raw: Any, key: str) -> ProprioSpec:
        raw = _fields(key, raw, {"names", "sources"}, {"names", "sources"})
        if not raw["names"] and not raw["sources"]:
            return cls()  # a policy without proprio
        names = _names(f"{key}.names", raw["names"])
        sources = check_sequence(f"{key}.sources", raw["sources"], _source, length=len(names), noun="sources",
                                 each="one per name: velocities[i] or positions[i]")
        return cls(names=names, sources=sources)

    def to_dict(self) -> dict[str, Any]:
        return {"names": list(self.names), "sources": [f"{f}[{i}]" for f, i in self.sources]}

    def fill(self, out: Any, velocities: Any, positions: Any) -> bool:
        """Write the proprio vector of one telemetry sample into `out` (float [dim], preallocated), entry i
        from its source (`velocities[j]` or `positions[j]`). False when a source's channel is missing from
        the sample (fewer channels than the spec reads, or a field the sample lacks, None): the caller
        treats the sample as missing; `out` may then be partly written. Allocates nothing."""
        if len(out) != len(self.sources):
            raise InputError(f"the proprio buffer has {len(out)} values; the policy's proprio has {self.dim} "
                             f"({', '.join(self.names) or 'none'})")
        for i, (source, index) in enumerate(self.sources):
            values = velocities if source == "velocities" else positions
            if values is None or index >= len(values):
                return False
            out[i] = values[index]
        return True


def _source(key: str, value: Any) -> tuple[str, int]:
    match = _SOURCE.fullmatch(value) if isinstance(value, str) else None
    if match is None:
        raise ConfigError(f"{key} must be velocities[i] or positions[i] (a telemetry field and channel), "
                          f"got {value!r}")
    return match.group(1), int(match.group(2))


@dataclass(frozen=True)
class ActionSpec:
    names: tuple[str, ...]
    kinds: tuple[str, ...]
    low: tuple[float, ...]
    high: tuple[float, ...]
    max_slew_per_s: tuple[float, ...]
    horizon: int = 1

    @property
    def dim(self) -> int:
        return len(self.names)

    @classmethod
    def from_dict(cls, raw: Any, key: str) -> ActionSpec:
        raw = _fields(key, raw, {"names", "kinds", "low", "high", "max_slew_per_s", "horizon"},
                      {"names", "low", "high", "max_slew_per_s"})
        names = _names(f"{key}.names", raw["names"], each="one per action channel")
        n = len(names)
        each = "one per action channel"
        kinds = check_sequence(f"{key}.kinds", raw.get("kinds", ["velocity"] * n),
                               lambda k, v: check_choice(k, v, COMMAND_KINDS), length=n, noun="kinds", each=each)
        low = check_sequence(f"{key}.low", raw["low"], check_range, length=n, each=each)
        high = check_sequence(f"{key}.high", raw["high"], check_range, length=n, each=each)
        for i, (lo, hi) in enumerate(zip(low, high)):
            if not lo < hi:
                raise ConfigError(f"{key}.low[{i}] must be below {key}.high[{i}], got {lo} and {hi}")
        slew = check_sequence(f"{key}.max_slew_per_s", raw["max_slew_per_s"],
                              lambda k, v: check_range(k, v, 0, unit="units/s", low_open=True), length=n, each=each)
        horizon = check_range(f"{key}.horizon", raw.get("horizon", 1), 1, 1024, integer=True)
        return cls(names=names, kinds=kinds, low=low, high=high, max_slew_per_s=slew, horizon=horizon)

    def to_dict(self) -> dict[str, Any]:
        return {"names": list(self.names), "kinds": list(self.kinds), "low": list(self.low),
                "high": list(self.high), "max_slew_per_s": list(self.max_slew_per_s), "horizon": self.horizon}


@dataclass(frozen=True)
class PolicySpec:
    name: str
    cameras: tuple[CameraSpec, ...]
    action: ActionSpec
    language: LanguageSpec | None = None
    proprio: ProprioSpec = field(default_factory=ProprioSpec)
    dropout_rate: float | None = None  # None: the head has no dropout layer

    @classmethod
    def from_dict(cls, raw: Any, key: str = "spec") -> PolicySpec:
        raw = _fields(key, raw, {"name", "cameras", "language", "proprio", "action", "dropout_rate"},
                      {"name", "cameras", "action"})
        cameras = check_sequence(f"{key}.cameras", raw["cameras"], lambda k, v: CameraSpec.from_dict(v, k),
                                 noun="cameras")
        names = [c.name for c in cameras]
        if len(set(names)) != len(names):
            raise ConfigError(f"{key}.cameras must have distinct names, got {names}")
        language = raw.get("language")
        dropout = raw.get("dropout_rate")
        if dropout is not None and check_range(f"{key}.dropout_rate", dropout, 0, 1, low_open=True) >= 1:
            raise ConfigError(f"{key}.dropout_rate must be below 1 (masks scale kept units by 1/(1-p)), got {dropout}")
        return cls(name=_name(f"{key}.name", raw["name"]), cameras=cameras,
                   action=ActionSpec.from_dict(raw["action"], f"{key}.action"),
                   language=None if language is None else LanguageSpec.from_dict(language, f"{key}.language"),
                   proprio=ProprioSpec.from_dict(raw.get("proprio", {"names": [], "sources": []}),
                                                 f"{key}.proprio"),
                   dropout_rate=None if dropout is None else check_range(f"{key}.dropout_rate", dropout, 0, 1,
                                                                         low_open=True))

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "cameras": [c.to_dict() for c in self.cameras],
                "language": None if self.language is None else self.language.to_dict(),
                "proprio": self.proprio.to_dict(), "action": self.action.to_dict(),
                "dropout_rate": self.dropout_rate}

    def camera_input(self, camera: CameraSpec) -> str:
        """The vision graph's input name for `camera`: `image` when the policy has one camera."""
        return "image" if len(self.cameras) == 1 else camera.input_name
