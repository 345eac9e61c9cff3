"""Why the model cannot be used: the file (CheckpointError), where it would run (DeviceError) or an unsafe
cache directory (CacheError)."""


class ModelError(RuntimeError):
    """The model cannot be loaded or run as configured; the message says what to change."""


class CheckpointError(ModelError):
    """The checkpoint file: missing, unreadable, another digest, not the released layout."""


class DeviceError(ModelError):
    """The device or runtime: CUDA absent, ONNX Runtime not installed or asked for on a GPU."""


class CacheError(ModelError):
    """The backend cache directory: writable by another user, so nothing in it can be trusted."""
