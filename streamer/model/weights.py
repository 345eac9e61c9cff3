"""The model weights: loading a checkpoint file in the released format, with a clear error for every way it
can be wrong (not the offset checkpoints: those are streamer/checkpointing/)."""

from __future__ import annotations

import hashlib
import io
import pickle
import zipfile
from pathlib import Path

from typing import TYPE_CHECKING

import torch

from streamer.model.errors import CheckpointError  # raised here; imported from here by callers too

if TYPE_CHECKING:  # torchvision costs ~1.5 s to import; only building the torch network needs it
    from streamer.model.network import ArtifactNet

RELEASED_NAME = "okekeclean-ecg-efficientnet_b0"
RELEASED_FILE = "cnn-efficientnet_b0-full-best-v65-5ef1694d9ae9fab6c6e0023903f63997.pth"


def load_state_dict(path: str | Path, expected_sha256: str | None = None) -> tuple[dict[str, torch.Tensor], str]:
    """Returns (state_dict, sha256). Never unpickles code: torch.load(weights_only=True).

    The file is read once: the bytes that were hashed (and checked against expected_sha256) are the bytes
    loaded, so a file swapped on disk between the check and the load cannot slip in."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise CheckpointError(f"checkpoint {path} is not readable: {exc.strerror}") from None
    digest = hashlib.sha256(data).hexdigest()
    if expected_sha256 and digest.lower() != expected_sha256.strip().lower():
        raise CheckpointError(f"checkpoint {path} has sha256 {digest}, but model.expected_sha256 pins "
                              f"{expected_sha256.strip().lower()}: refusing to load another file")
    if not zipfile.is_zipfile(io.BytesIO(data)) and data[:1] != b"\x80":  # torch zip archive, or a legacy pickle
        raise CheckpointError(f"checkpoint {path} is not a readable torch file (neither a torch archive nor a pickle)")
    try:
        obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(f"checkpoint {path} holds objects other than tensors (refused by "
                              f"weights_only loading): {str(exc).splitlines()[0]}") from None
    except Exception as exc:  # noqa: BLE001 (truncated or not a torch file at all: torch raises anything)
        raise CheckpointError(f"checkpoint {path} is not a readable torch file: {exc}") from None
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"checkpoint {path} is not a state dict (got {type(obj).__name__}); "
                              "expected a plain mapping of parameter names to tensors")
    return obj, digest


def build_network(state: dict[str, torch.Tensor], source: str = "checkpoint") -> ArtifactNet:
    """An ArtifactNet holding `state`, after checking keys and shapes against the released layout."""
    from streamer.model.network import ArtifactNet

    net = ArtifactNet()
    expected = net.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        hint = ""
        if unexpected and not any(k.startswith("efficientnet.") for k in state):
            hint = " (keys must carry the released 'efficientnet.' prefix)"
        raise CheckpointError(
            f"{source} does not match the released layout{hint}: "
            f"{len(missing)} missing key(s) {missing[:5]}, {len(unexpected)} unexpected key(s) {unexpected[:5]}")
    wrong = [f"{k}: {tuple(state[k].shape)} != {tuple(v.shape)}" for k, v in expected.items()
             if tuple(state[k].shape) != tuple(v.shape)]
    if wrong:
        raise CheckpointError(f"{source} has wrong tensor shapes: {wrong[:5]}")
    state = {k: v.to(expected[k].dtype) for k, v in state.items()}  # a float64 1e39 is inf in float32
    # a NaN or an infinity anywhere makes every probability NaN: refused at start, never scored
    not_finite = [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if not_finite:
        raise CheckpointError(f"{source} holds NaN or infinite values in {len(not_finite)} tensor(s), first "
                              f"{not_finite[0]}: refusing to score with it")
    net.load_state_dict(state)
    return net.eval()


def model_name_for(path: Path) -> str:
    if path.name == RELEASED_FILE:
        return RELEASED_NAME
    return path.stem
