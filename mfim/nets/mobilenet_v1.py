"""MobileNetV1 as 3DDFA_V2 ships it: 120 px input, BatchNorm folded into the convolutions, 62 outputs.

The registry carries 3DDFA_V2's regressor only as ONNX (``tddfa_mb1_onnx``); onnx2torch turns it into a graph module
that runs but is awkward to fine-tune, save and reload without the ONNX file. This is the same network as plain torch
layers, so a 3DMM regressor can start from 3DDFA_V2's weights (features trained on 300W-LP faces to predict these very
BFM coefficients) and be fitted on renders (mfim.nets.threedmm_regressor, ``backbone: mobilenet_v1``).
"""

from __future__ import annotations

import os

import torch
from torch import nn

# (output channels, stride) of the 13 depthwise-separable blocks after the 3x3 stride-2 stem (32 channels)
BLOCKS = ((64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2), (512, 1), (512, 1), (512, 1), (512, 1),
          (512, 1), (1024, 2), (1024, 1))
STEM = 32
FEATURES = BLOCKS[-1][0]


def _conv(cin: int, cout: int, kernel: int, stride: int, groups: int = 1) -> nn.Sequential:
    # biased convolutions: the BatchNorm of training is folded into them (as in the ONNX file)
    return nn.Sequential(nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups), nn.ReLU(inplace=True))


class GlobalMean(nn.Module):
    """B×C×H×W -> B×C: the global average pooling before the linear layer."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(2, 3))


class MobileNetV1(nn.Module):
    """B×3×H×W -> B×n_out; ``features`` gives the B×1024 pooled vector before the linear layer."""

    def __init__(self, n_out: int = 62):
        super().__init__()
        layers, cin = [_conv(3, STEM, 3, 2)], STEM
        for cout, stride in BLOCKS:
            layers += [_conv(cin, cin, 3, stride, groups=cin), _conv(cin, cout, 1, 1)]
            cin = cout
        self.body = nn.Sequential(*layers)
        self.pool = GlobalMean()
        self.fc = nn.Linear(FEATURES, n_out)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.body(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))

    def convolutions(self) -> list[nn.Conv2d]:
        return [m for m in self.body.modules() if isinstance(m, nn.Conv2d)]


def tddfa_state(onnx_path: str | os.PathLike | None = None) -> dict[str, torch.Tensor]:
    """3DDFA_V2's weights (``tddfa_mb1_onnx`` from the asset cache, or ``onnx_path``) as a :class:`MobileNetV1`
    state dict. Raises ValueError naming the file when its layers are not this network's."""
    from mfim.assets import resolve
    from mfim.nets.onnx_utils import onnx_to_torch

    path = resolve("tddfa_mb1_onnx", onnx_path)
    graph = onnx_to_torch(path)
    convs = [m for m in graph.modules() if isinstance(m, nn.Conv2d)]
    linears = [m for m in graph.modules() if isinstance(m, nn.Linear)]
    model = MobileNetV1(n_out=linears[0].out_features if len(linears) == 1 else 62)
    mine = model.convolutions()
    if len(convs) != len(mine) or len(linears) != 1 or any(
            a.weight.shape != b.weight.shape or a.stride != b.stride or a.groups != b.groups for a, b in zip(convs, mine)):
        raise ValueError(f"{path}: not 3DDFA_V2's MobileNetV1 (mb1_120x120): its layers do not match")
    with torch.no_grad():
        for src, dst in zip(convs, mine):
            dst.weight.copy_(src.weight)
            dst.bias.copy_(src.bias)
        model.fc.weight.copy_(linears[0].weight)
        model.fc.bias.copy_(linears[0].bias)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}
