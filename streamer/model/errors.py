"""Why the model cannot be used: the file (CheckpointError) or where it would run (DeviceError)."""


class ModelError(RuntimeError):
    """The model cannot be loaded or run as configured; the message says what to change."""


class CheckpointError(ModelError):
    """The checkpoint file: missing, unreadable, another digest, not the released layout."""


class DeviceError(ModelError):
    """The device or runtime: CUDA absent, ONNX Runtime not installed or asked for on a GPU."""
