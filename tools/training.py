"""Building checkpoints in the released format without the released file (tests, demo).

Random EfficientNet-B0 weights, BatchNorm statistics calibrated on real spectrogram images (so outputs
depend on the input), and optionally a classifier head fitted on frozen pooled features.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from streamer.model.network import ArtifactNet
from streamer.model.preprocess import Preprocessor


def random_network(seed: int) -> ArtifactNet:
    torch.manual_seed(seed)
    return ArtifactNet()


@torch.no_grad()
def calibrate_batchnorm(net: ArtifactNet, images: torch.Tensor, batch: int = 32) -> None:
    """Set every BatchNorm's running mean/var to the cumulative statistics over `images` (N,3,224,224)."""
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None  # cumulative average
    net.train()
    for i in range(0, len(images), batch):
        net(images[i:i + batch])
    net.eval()
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = 0.1


def images_of(windows: np.ndarray) -> torch.Tensor:
    """(N, 5000) float32 windows -> (N, 3, 224, 224) released model input (3 identical channels)."""
    return Preprocessor("cpu")(windows).expand(-1, 3, -1, -1).contiguous()


@torch.no_grad()
def pooled_features(net: ArtifactNet, images: torch.Tensor, batch: int = 32) -> torch.Tensor:
    eff = net.efficientnet
    out = [torch.flatten(eff.avgpool(eff.features(images[i:i + batch])), 1) for i in range(0, len(images), batch)]
    return torch.cat(out)


def fit_head(net: ArtifactNet, features: torch.Tensor, labels: np.ndarray, seed: int, epochs: int = 300) -> None:
    """Train the released head (Linear-ReLU-Dropout-Linear) on frozen features, full batch, Adam."""
    torch.manual_seed(seed)
    head = net.efficientnet.classifier
    y = torch.as_tensor(labels, dtype=torch.long)
    mean, std = features.mean(0), features.std(0) + 1e-6
    x = (features - mean) / std
    counts = torch.bincount(y, minlength=2).float()
    loss_fn = nn.CrossEntropyLoss(weight=counts.sum() / (2 * counts.clamp(min=1)))
    opt = torch.optim.Adam(head.parameters(), lr=1e-3, weight_decay=1e-4)
    head.train()
    for _ in range(epochs):
        opt.zero_grad()
        loss_fn(head(x), y).backward()
        opt.step()
    head.eval()
    # fold the feature standardisation into the first linear layer, keeping the released layout
    with torch.no_grad():
        first = head[0]
        first.bias -= (first.weight * (mean / std)).sum(1)
        first.weight /= std


def save_checkpoint(net: ArtifactNet, path: str | Path, half: bool = False) -> Path:
    state = {k: (v.half() if half and v.is_floating_point() else v).clone() for k, v in net.state_dict().items()}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)
    return path


def calibrated_checkpoint(path: str | Path, windows: np.ndarray, seed: int = 0) -> Path:
    """A random-weight checkpoint with calibrated BatchNorm: the test fixture's model."""
    net = random_network(seed)
    calibrate_batchnorm(net, images_of(windows))
    return save_checkpoint(net, path)
