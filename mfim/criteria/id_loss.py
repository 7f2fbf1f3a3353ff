"""ID loss, eq. (1): L_id = 1 - cos(R(x_swap), R(x_src)) with R a frozen face-recognition network.

Not in the paper (docs/DEVIATIONS.md#additions-to-the-objective; ``views`` 0 by default, eq. (1) as written):
``views`` > 0 averages the loss over that many randomly jittered copies of the swap as well
(scale, shift, in-plane rotation, mirror; the source's embedding stays that of the clean image). Against a single
frozen network an encoder can raise the cosine through features that network alone reads (on the embedded default
MobileFaceNet's cosine to the source rose while the independent dlib evaluator saw no change, docs/EXPERIMENTS.md
§9, §12); an identity that must survive small re-crops is one a face recogniser trained with such augmentation
would also see. This is "expectation over transformation" (Athalye et al. 2018), used here the other way round.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def jitter(x: torch.Tensor, scale: float, shift: float, rotate_deg: float, flip: bool) -> torch.Tensor:
    """Each image of a B×C×H×W batch under its own random similarity transform (differentiable in ``x``):
    zoom in 1 ± ``scale``, shift ± ``shift`` of the width, rotation ± ``rotate_deg``, mirrored with p 0.5."""
    b = x.shape[0]
    u = torch.rand(b, 4, device=x.device) * 2 - 1
    s = 1.0 + scale * u[:, 0]
    a = math.radians(rotate_deg) * u[:, 1]
    mirror = torch.where(torch.rand(b, device=x.device) < 0.5, -1.0, 1.0) if flip else torch.ones(b, device=x.device)
    cos, sin = torch.cos(a) / s, torch.sin(a) / s
    theta = torch.stack([torch.stack([cos * mirror, -sin, shift * 2 * u[:, 2]], 1),
                         torch.stack([sin * mirror, cos, shift * 2 * u[:, 3]], 1)], 1)
    grid = F.affine_grid(theta.to(x.dtype), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


JITTER_DEFAULTS = {"scale": 0.08, "shift": 0.04, "rotate_deg": 8.0, "flip": True}
"""``jitter``'s magnitudes (params.yaml ``loss.id_jitter``), each overridable."""


class IDLoss(nn.Module):
    def __init__(self, embedder: nn.Module, views: int = 0, jitter: dict | None = None):
        super().__init__()
        if views < 0:
            raise ValueError(f"loss.id_views must be >= 0, got {views}")
        unknown = sorted(set(jitter or {}) - set(JITTER_DEFAULTS))
        if unknown:
            raise ValueError(f"loss.id_jitter: unknown keys {unknown} (known: {sorted(JITTER_DEFAULTS)})")
        self.embedder = embedder  # frozen; takes FFHQ-aligned B×3×H×W in [-1, 1]
        self.views = int(views)
        self.jitter = {**JITTER_DEFAULTS, **(jitter or {})}

    def forward(self, x_swap: torch.Tensor, x_src: torch.Tensor, src_embedding: torch.Tensor | None = None):
        """Mean over the batch (and the clean + ``views`` jittered copies); pass ``src_embedding`` to reuse a
        precomputed R(x_src)."""
        if src_embedding is None:
            with torch.no_grad():
                src_embedding = self.embedder(x_src)
        src_embedding = src_embedding.detach()
        x, src_embedding = self._with_jittered_views(x_swap, src_embedding)
        e_swap = self.embedder(x)
        return (1.0 - F.cosine_similarity(e_swap, src_embedding, dim=1)).mean()

    def _with_jittered_views(self, x_swap: torch.Tensor, src_embedding: torch.Tensor):
        """Not in the paper: the swap followed by its ``views`` jittered copies, and R(x_src) repeated for each
        (the inputs unchanged when ``views`` is 0)."""
        if not self.views:
            return x_swap, src_embedding
        x = torch.cat([x_swap] + [jitter(x_swap, **self.jitter) for _ in range(self.views)])
        return x, src_embedding.repeat(self.views + 1, 1)
