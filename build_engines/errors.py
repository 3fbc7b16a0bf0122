"""Errors of the offline build: one root, ``BuildError``, and one subclass per step.

``BuildError`` derives from the runtime's ``EdgeError``, so the build and the runtime share one
hierarchy and ``build-engines`` (``build_engines/cli.py``) turns any of them into one line on stderr and
the exit code the error class carries (``exit_code``): 3 for ``GateRefused``, 1 for every other build
error. Errors that come from the runtime's own code (``BundleError``, ``ConfigError``, ``InputError``:
a bad option value or malformed input data handed to a step) keep their classes and exit 1 as well.

Each message says what failed, what was expected and, where there is one, the command that fixes it.
"""

from __future__ import annotations

from collections.abc import Sequence

from edge.errors import BundleError, EdgeError

EXIT_BUILD_ERROR = 1
EXIT_GATE_REFUSED = 3


class BuildError(EdgeError):
    """The build cannot go on; the message names what and where.

    Raised as such before any step runs (an option out of range, the output already exists, or its
    folder cannot be created or written); each step raises its own subclass below.
    """

    exit_code = EXIT_BUILD_ERROR


class PolicyError(BuildError):
    """The policy named by --policy cannot be used: the factory cannot be imported or fails, returns
    something other than a Policy, its spec disagrees with its modules (shapes, action dimension or
    horizon, the serial protocol's channel limit), or its head has no dropout for MC-dropout
    uncertainty while --uncertainty asks for it."""


class ExportError(BuildError):
    """Exporting a PyTorch module to ONNX failed, or the exported graph does not reproduce the module
    on the reference inputs (shape, or a difference beyond the graph's tolerance)."""


class CalibrationError(BuildError):
    """Calibration cannot run or did not give usable ranges: the calibration options or source are
    unusable (method, sample count, a missing folder or instructions file), or ONNX Runtime's calibrator
    failed on the data (a tensor holding Inf/NaN) or returned ranges of the wrong shape."""


class QuantizationError(BuildError):
    """Writing an INT8 or FP16 graph failed: the result fails ``onnx.checker``, or the FP16 graph does
    not load on ONNX Runtime's CPU provider even with the offending op types kept in FP32."""


class LayoutError(BuildError, BundleError):
    """An INT8 graph breaks its target's layout (TensorRT's symmetric Q/DQ, or the CPU's uint8/int8);
    ``violations`` lists each problem, naming the node.

    Also a ``BundleError``: the same check applies to the graphs of a bundle that is inspected later.
    """

    def __init__(self, model: str, target: str, violations: Sequence[str]) -> None:
        self.model = model
        self.target = target
        self.violations = tuple(violations)
        listed = "\n".join(f"  - {v}" for v in self.violations)
        super().__init__(f"{model} does not have the {target} INT8 layout ({len(self.violations)} "
                         f"violations):\n{listed}\nrebuild the INT8 graphs with build_engines --int8")


class EngineBuildError(BuildError):
    """A TensorRT engine could not be built (TensorRT missing, the parser rejected the graph, a bad
    profile or precision for the graph, the builder returned no engine), or was built but does not
    reproduce the reference outputs of the same graph on ONNX Runtime."""


class GateError(BuildError):
    """The gate cannot run: the --env environment cannot be made or does not follow the environment
    interface, or the runtime cannot run this policy's bundle in a closed loop yet."""


class GateRefused(BuildError):
    """The accuracy gate refused the bundle (held-out accuracy or closed-loop success beyond the
    tolerances); ``report`` says which graph or target failed by how much. Nothing is written to the
    output; the CLI writes the report beside it as ``<out>.refused.json``."""

    exit_code = EXIT_GATE_REFUSED

    def __init__(self, message: str, report: dict) -> None:
        super().__init__(message)
        self.report = report
