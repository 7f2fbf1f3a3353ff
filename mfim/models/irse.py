"""IR / IR-SE residual backbones (ArcFace-style), the body of the pSp encoder.

Module names follow the TreB1eN/pSp layout (``input_layer``, ``body.<i>.shortcut_layer``, ``body.<i>.res_layer``)
so pSp's ``model_ir_se50.pth`` loads into the 50-layer configuration with ``load_ir_se50``. The same unit also
builds the small backbone of the embedded default, with GroupNorm instead of BatchNorm so that its output does not
depend on how a batch is split across processes (DDP parity on CPU, where SyncBatchNorm is unavailable).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


def make_norm(kind: str, channels: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "group":
        return nn.GroupNorm(min(8, channels), channels)
    raise ValueError(f"unknown norm {kind!r} (batch | group)")


class SqueezeExcite(nn.Module):
    """Channel attention of IR-SE units (names fc1/fc2 as in the pSp checkpoint)."""

    def __init__(self, channels: int, reduction: int = 16):
        super().__init__()
        hidden = max(channels // reduction, 1)
        self.avg_pool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(channels, hidden, 1, bias=False)
        self.relu = nn.ReLU(inplace=True)
        self.fc2 = nn.Conv2d(hidden, channels, 1, bias=False)
        self.sigmoid = nn.Sigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.sigmoid(self.fc2(self.relu(self.fc1(self.avg_pool(x)))))
        return x * w


class BottleneckIRSE(nn.Module):
    """norm -> conv3x3 -> PReLU -> conv3x3(stride) -> norm -> SE, plus a (projected) shortcut."""

    def __init__(self, in_ch: int, depth: int, stride: int, norm: str = "batch", se: bool = True):
        super().__init__()
        if in_ch == depth:
            self.shortcut_layer: nn.Module = nn.MaxPool2d(1, stride)
        else:
            self.shortcut_layer = nn.Sequential(
                nn.Conv2d(in_ch, depth, 1, stride, bias=False), make_norm(norm, depth)
            )
        layers = [
            make_norm(norm, in_ch),
            nn.Conv2d(in_ch, depth, 3, 1, 1, bias=False),
            nn.PReLU(depth),
            nn.Conv2d(depth, depth, 3, stride, 1, bias=False),
            make_norm(norm, depth),
        ]
        if se:
            layers.append(SqueezeExcite(depth, 16))
        self.res_layer = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.res_layer(x) + self.shortcut_layer(x)


@dataclass(frozen=True)
class StageSpec:
    depth: int  # output channels
    units: int  # number of bottleneck units (the first one strides by 2)


IR_SE50_STAGES = (StageSpec(64, 3), StageSpec(128, 4), StageSpec(256, 14), StageSpec(512, 3))


class IRSEBackbone(nn.Module):
    """Stem + stages of IR-SE units; ``forward`` returns the output of every stage.

    Each stage's first unit strides by 2 (strides 2, 4, 8, 16 as in IR-SE50), except that ``first_stride=1`` keeps
    the first stage at input resolution (strides 1, 2, 4, 8), used by the small backbone on 64 px faces.
    ``in_channels`` > 3: the refinement encoder's input (the image beside the current reconstruction).
    """

    def __init__(
        self, stages=IR_SE50_STAGES, stem: int = 64, norm: str = "batch", se: bool = True, first_stride: int = 2,
        in_channels: int = 3,
    ):
        super().__init__()
        self.input_layer = nn.Sequential(
            nn.Conv2d(in_channels, stem, 3, 1, 1, bias=False), make_norm(norm, stem), nn.PReLU(stem)
        )
        units, ends, in_ch = [], [], stem
        for spec in stages:
            for u in range(spec.units):
                stride = (first_stride if not ends else 2) if u == 0 else 1
                units.append(BottleneckIRSE(in_ch, spec.depth, stride, norm=norm, se=se))
                in_ch = spec.depth
            ends.append(len(units) - 1)
        self.body = nn.Sequential(*units)
        self.stage_ends = ends
        self.stage_channels = [s.depth for s in stages]

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.input_layer(x)
        feats = []
        for i, unit in enumerate(self.body):
            x = unit(x)
            if i in self.stage_ends:
                feats.append(x)
        return feats
