"""torchvision EfficientNet-B0 with the released 2-class head, in the released key layout."""

from __future__ import annotations

import torch
from torch import nn
from torchvision.models import efficientnet_b0


class ArtifactNet(nn.Module):
    """State-dict keys: `efficientnet.features...`, `efficientnet.classifier.{0,3}.*` (362 tensors)."""

    def __init__(self) -> None:
        super().__init__()
        self.efficientnet = efficientnet_b0(weights=None)
        self.efficientnet.classifier = nn.Sequential(
            nn.Linear(1280, 256), nn.ReLU(inplace=True), nn.Dropout(0.5), nn.Linear(256, 2)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.efficientnet(x)


def fold_grayscale_stem(net: ArtifactNet) -> ArtifactNet:
    """Replace the 3-channel stem with a 1-channel one whose weights are summed over input channels.

    The released input repeats one grayscale image in 3 channels, so conv(repeat(x), W) == conv(x, sum_c W):
    a third of the stem's input traffic and no repeat copy.
    """
    stem = net.efficientnet.features[0][0]
    if stem.in_channels == 1:
        return net
    folded = nn.Conv2d(1, stem.out_channels, stem.kernel_size, stem.stride, stem.padding,
                       bias=stem.bias is not None)
    with torch.no_grad():
        folded.weight.copy_(stem.weight.sum(dim=1, keepdim=True))
        if stem.bias is not None:
            folded.bias.copy_(stem.bias)
    net.efficientnet.features[0][0] = folded.to(stem.weight.device, stem.weight.dtype)
    return net
