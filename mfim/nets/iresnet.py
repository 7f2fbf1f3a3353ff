"""insightface arcface_torch IResNet (r18/r34/r50/r100/r200) for official ``backbone.pth`` files, by path.

The module names reproduce arcface_torch's state-dict layout exactly (``conv1``, ``bn1``, ``prelu``,
``layer{1-4}.{i}.{bn1,conv1,bn2,prelu,conv2,bn3,downsample.0,downsample.1}``, ``bn2``, ``fc``, ``features``), so an
official checkpoint loads with ``strict=True``. The depth is read off the checkpoint. Input pre-processing as in
arcface_torch: RGB, (x / 255 - 0.5) / 0.5 -- which is exactly our [-1, 1] range -- on the ArcFace 112 template crop.
"""

from __future__ import annotations

import os
import re

import torch
from torch import nn

from mfim.assets import resolve
from mfim.nets.identity import ArcFaceCropEmbedder
from mfim.nets.onnx_utils import load_state_dict_file, load_strict

# blocks per stage of each arcface_torch depth
IRESNET_LAYERS = {
    18: (2, 2, 2, 2),
    34: (3, 4, 6, 3),
    50: (3, 4, 14, 3),
    100: (3, 13, 30, 3),
    200: (6, 26, 60, 6),
}


class IBasicBlock(nn.Module):
    """Pre-activation residual block: BN -> conv3x3 -> BN -> PReLU -> conv3x3 (stride) -> BN, plus shortcut."""

    def __init__(self, in_ch: int, ch: int, stride: int = 1):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_ch, eps=1e-5)
        self.conv1 = nn.Conv2d(in_ch, ch, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(ch, eps=1e-5)
        self.prelu = nn.PReLU(ch)
        self.conv2 = nn.Conv2d(ch, ch, 3, stride, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(ch, eps=1e-5)
        self.downsample = None
        if stride != 1 or in_ch != ch:
            self.downsample = nn.Sequential(nn.Conv2d(in_ch, ch, 1, stride, bias=False), nn.BatchNorm2d(ch, eps=1e-5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn3(self.conv2(self.prelu(self.bn2(self.conv1(self.bn1(x))))))
        shortcut = x if self.downsample is None else self.downsample(x)
        return out + shortcut


class IResNet(nn.Module):
    """The arcface_torch backbone: 112x112 normalised input -> B×num_features embedding."""

    def __init__(self, layers=IRESNET_LAYERS[50], num_features: int = 512):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(64, eps=1e-5)
        self.prelu = nn.PReLU(64)
        in_ch = 64
        for i, (ch, n) in enumerate(zip((64, 128, 256, 512), layers), start=1):
            blocks = [IBasicBlock(in_ch, ch, stride=2)] + [IBasicBlock(ch, ch) for _ in range(n - 1)]
            setattr(self, f"layer{i}", nn.Sequential(*blocks))
            in_ch = ch
        self.bn2 = nn.BatchNorm2d(512, eps=1e-5)
        self.dropout = nn.Dropout(p=0.0)
        self.fc = nn.Linear(512 * 7 * 7, num_features)
        self.features = nn.BatchNorm1d(num_features, eps=1e-5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.prelu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = torch.flatten(self.bn2(x), 1)
        return self.features(self.fc(self.dropout(x)))


def iresnet_layers_from_state_dict(state: dict[str, torch.Tensor]) -> tuple[int, int, int, int]:
    """Blocks per stage, counted from the ``layer{s}.{i}.`` keys of a state dict."""
    counts = [0, 0, 0, 0]
    for key in state:
        m = re.match(r"layer([1-4])\.(\d+)\.", key)
        if m:
            s, i = int(m.group(1)) - 1, int(m.group(2))
            counts[s] = max(counts[s], i + 1)
    if min(counts) == 0:
        raise ValueError("not an arcface_torch iresnet state dict (no layer1..layer4 blocks)")
    return tuple(counts)


class IResNetEmbedder(ArcFaceCropEmbedder):
    """An official arcface_torch iresnet behind the same crop/call API as ``MobileFaceNetEmbedder``."""

    pixel_mean = 127.5
    pixel_std = 127.5

    def __init__(self, net: IResNet):
        super().__init__()
        self.net = net
        self.embedding_dim = net.fc.out_features
        self.freeze()


def load_iresnet(path: str | os.PathLike | None = None, device: str | torch.device = "cpu") -> IResNetEmbedder:
    """Load an insightface arcface_torch ``backbone.pth`` (any depth) as a frozen, differentiable embedder.

    A missing file raises ``MissingAssetError`` naming the file, the params key and where to get it.
    """
    path = resolve("arcface_iresnet", path)
    state = load_state_dict_file(path)
    layers = iresnet_layers_from_state_dict(state)
    net = IResNet(layers, num_features=state["fc.weight"].shape[0])
    load_strict(net, state, f"arcface iresnet {os.fspath(path)}")
    return IResNetEmbedder(net).to(device)


__all__ = [
    "IRESNET_LAYERS",
    "IBasicBlock",
    "IResNet",
    "IResNetEmbedder",
    "load_iresnet",
    "iresnet_layers_from_state_dict",
]
