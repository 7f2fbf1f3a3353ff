"""Small stand-ins for the frozen networks, for fast unit tests of the encoder / objective / training loop.

The stub generator honours the StyleGAN2 S-space contract (style_layers, noise_layers, styles_from_ws, synthesize)
with a few cheap layers, so code written against that contract can be tested in milliseconds.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from mfim.nets.types import ThreeDMMParams


@dataclass(frozen=True)
class Layer:
    index: int
    name: str
    resolution: int
    channels: int
    kind: str = "conv"


class StubGenerator(nn.Module):
    """res 4..R; per resolution one conv style + one torgb style and one noise input; styles scale features."""

    def __init__(self, resolution: int = 32, channels: int = 16, w_dim: int = 16):
        super().__init__()
        self.resolution = resolution
        self.w_dim = w_dim
        res = [2**i for i in range(2, resolution.bit_length())]
        self.style_layers, self.noise_layers = [], []
        for r in res:
            self.style_layers.append(Layer(len(self.style_layers), f"conv{r}", r, channels, "conv"))
            self.style_layers.append(Layer(len(self.style_layers), f"torgb{r}", r, channels, "torgb"))
            self.noise_layers.append(Layer(len(self.noise_layers), f"noise{r}", r, channels, "conv"))
        self.num_ws = len(self.style_layers)
        self.affines = nn.ModuleList(nn.Linear(w_dim, channels) for _ in self.style_layers)
        self.const = nn.Parameter(torch.randn(1, channels, 4, 4))
        self.convs = nn.ModuleList(nn.Conv2d(channels, channels, 3, padding=1) for _ in res)
        self.torgbs = nn.ModuleList(nn.Conv2d(channels, 3, 1) for _ in res)
        self.noise_strength = nn.Parameter(torch.full((len(res),), 0.5))
        self.register_buffer("w_avg", torch.zeros(w_dim))

    def styles_from_ws(self, ws):
        return [a(ws[:, i]) for i, a in enumerate(self.affines)]

    def synthesize(self, styles, noise=None, noise_mode="const", style_maps=None):
        b = styles[0].shape[0]
        x = self.const.expand(b, -1, -1, -1)
        img = None
        for k, (conv, torgb) in enumerate(zip(self.convs, self.torgbs)):
            if k > 0:
                x = F.interpolate(x, scale_factor=2)
            x = conv(x * (1 + styles[2 * k][:, :, None, None]))
            n = noise[k] if noise is not None else None
            sm = style_maps[k] if style_maps is not None else None
            if sm is not None:  # the direct path: added at the activations' scale, in place of the noise
                x = x + sm
            elif n is not None:
                x = x + self.noise_strength[k] * n
            x = F.leaky_relu(x, 0.2)
            rgb = torgb(x * (1 + styles[2 * k + 1][:, :, None, None]))
            img = rgb if img is None else F.interpolate(img, scale_factor=2) + rgb
        return torch.tanh(img)


class StubEmbedder(nn.Module):
    """Frozen random conv net -> 32-d embedding (differentiable)."""

    def __init__(self, dim: int = 32):
        super().__init__()
        torch.manual_seed(1)
        self.net = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.ReLU(), nn.Conv2d(8, dim, 3, 2, 1), nn.AdaptiveAvgPool2d(1))
        self.requires_grad_(False)

    def forward(self, x):
        return self.net(x).flatten(1)


class Stub3DMM(nn.Module):
    """Frozen linear read-out of pooled colour -> ThreeDMMParams (differentiable)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(2)
        self.head = nn.Linear(3 * 16, 40 + 10 + 3)
        self.requires_grad_(False)

    def forward(self, x):
        f = F.adaptive_avg_pool2d(x, 4).flatten(1)
        o = self.head(f)
        return ThreeDMMParams(o[:, :40], o[:, 40:50], o[:, 50:53])


class StubDiscriminator(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.LeakyReLU(0.2), nn.Conv2d(8, 1, 3, 2, 1))

    def forward(self, x):
        return self.net(x).mean(dim=(1, 2, 3))[:, None]
