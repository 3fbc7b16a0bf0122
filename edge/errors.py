"""Error hierarchy of the runtime.

Every error a robot operator can see derives from EdgeError and says what failed,
what was expected and, where there is one, the command that fixes it.
"""


class EdgeError(Exception):
    """Base of every error the runtime raises on purpose."""


class ConfigError(EdgeError):
    """A configuration value is missing, malformed or out of its allowed range."""


class BundleError(EdgeError):
    """A policy bundle is missing files, fails its hashes or does not fit this device."""


class BackendError(EdgeError):
    """An inference backend could not be activated or failed while running."""


class CudaError(BackendError):
    """A CUDA driver or runtime call failed; the message carries the CUDA error name."""


class CameraError(EdgeError):
    """A camera source could not be opened or stopped delivering frames."""


class LinkError(EdgeError):
    """The motor link (serial device) could not be opened or written."""


class ProtocolError(EdgeError):
    """A serial frame is malformed: bad framing, bad CRC, unknown message or bad length."""


class InputError(EdgeError):
    """An input (frame, instruction, telemetry) has the wrong shape, type or size."""
