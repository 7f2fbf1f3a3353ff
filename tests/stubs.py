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


class StubEvaluators:
    """Stands in for mfim.evaluation.evaluators.Evaluators: the same ``features`` contract (batched, float64
    Features) from the frozen stub networks above, on a 64 px copy so 1024 px swaps cost no more than small ones."""

    def __init__(self, params=None, device="cpu", batch_size: int = 16):
        self.batch_size = batch_size
        self.embedder, self.threedmm, self.train_embedder = StubEmbedder(), Stub3DMM(), StubEmbedder(dim=16)

    def describe(self) -> dict:
        return {"identity_embedder": "stub", "threedmm_encoder": "stub", "pose_network": "stub"}

    @torch.no_grad()
    def features(self, images: torch.Tensor, landmarks=None):  # landmarks: DECA's crop; the stubs crop nothing
        from mfim.evaluation.evaluators import Features

        parts = []
        for i in range(0, len(images), self.batch_size):
            x = images[i : i + self.batch_size].float().clamp(-1, 1)
            x = F.interpolate(x, size=(64, 64), mode="area") if x.shape[-1] > 64 else x
            p = self.threedmm(x)
            parts.append([self.embedder(x), p.shape, p.exp, p.pose, p.pose * 57.3, self.train_embedder(x)])
        return Features(*(torch.cat(col).double().numpy() for col in zip(*parts)))


class StubLPIPS(nn.Module):
    """lpips(a, b) -> B×1×1×1: mean squared difference of frozen random conv features."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(3)
        self.net = nn.Conv2d(3, 8, 3, 2, 1)
        self.requires_grad_(False)

    def forward(self, a, b):
        return (self.net(a) - self.net(b)).pow(2).mean(dim=(1, 2, 3), keepdim=True)


class StubFeatureNet(nn.Module):
    """A Fréchet feature network named like a substitute (never "fid"): per-channel mean and standard deviation
    (6-d, so a dozen images give a full-rank covariance). The deviation sees fine detail, so it depends on the
    resolution an image is shown at."""

    name = "fd_stub"

    def __init__(self):
        super().__init__()
        self.dummy = nn.Parameter(torch.zeros(()))

    def forward(self, x):
        return torch.cat([x.mean(dim=(2, 3)), x.std(dim=(2, 3))], 1)


def write_evalsets(root, n_images: int, n_pairs: int, n_triplets: int, size: int = 48, seed: int = 0):
    """An evalsets folder the evaluate stage reads (pairs.parquet, triplets.parquet, protocol.json) over
    ``n_images`` smooth random aligned PNGs of n_images // 2 labelled identities; no shards (PNG paths are read)."""
    from pathlib import Path

    import numpy as np
    import pandas as pd
    from PIL import Image

    root = Path(root)
    (root / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    keys, paths = [], []
    for i in range(n_images):
        a, b, c = rng.uniform(2, 9, 3)
        img = np.stack([np.sin(a * xx + c), np.cos(b * yy - c), np.sin(a * xx * yy + b)], -1) * 0.4 + 0.5
        paths.append(root / "images" / f"{i:05d}.png")
        Image.fromarray(np.clip(img * 255, 0, 255).astype(np.uint8)).save(paths[-1])
        keys.append(f"eval/{i:05d}")
    identity = np.arange(n_images) // 2
    src, tgt = rng.integers(0, n_images, n_pairs), rng.integers(0, n_images, n_pairs)
    pd.DataFrame({"pair_id": np.arange(n_pairs), "source_key": [keys[i] for i in src],
                  "target_key": [keys[i] for i in tgt], "source_path": [str(paths[i]) for i in src],
                  "target_path": [str(paths[i]) for i in tgt], "source_identity": identity[src],
                  "target_identity": identity[tgt], "source_frame_index": -1}).to_parquet(root / "pairs.parquet")
    trip = rng.integers(0, n_images, (n_triplets, 3))
    pd.DataFrame({f"{c}_{f}": [(keys if f == "key" else [str(p) for p in paths])[i] for i in trip[:, j]]
                  for j, c in enumerate(("target", "global", "local")) for f in ("key", "path")}
                 ).to_parquet(root / "triplets.parquet")
    (root / "protocol.json").write_text('{"protocol": "synthetic", "images": "stub evalsets"}')
    return root


def stub_evaluation_networks(setattr_) -> None:
    """Route the evaluate stage's networks to the stubs above; ``setattr_(obj, name, value)`` is e.g. pytest's
    monkeypatch.setattr. MLflow logging is skipped."""
    import mfim.evaluation.evaluate as evaluate
    import mfim.evaluation.evaluators as evaluators
    import mfim.nets.fid as fid
    import mfim.nets.perceptual as perceptual

    setattr_(evaluators, "Evaluators", StubEvaluators)
    setattr_(perceptual, "load_lpips", lambda net="alex", **kw: StubLPIPS())
    setattr_(fid, "find_inception_checkpoint", lambda path=None: None)
    setattr_(fid, "build_substitute_extractor", lambda network="lpips_alex", device="cpu": StubFeatureNet())
    setattr_(evaluate, "log_to_mlflow", lambda *a, **k: None)
