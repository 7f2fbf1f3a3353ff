"""ID loss, eq. (1): L_id = 1 - cos(R(x_swap), R(x_src)) with R a frozen face-recognition network."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class IDLoss(nn.Module):
    def __init__(self, embedder: nn.Module):
        super().__init__()
        self.embedder = embedder  # frozen; takes FFHQ-aligned B×3×H×W in [-1, 1]

    def forward(self, x_swap: torch.Tensor, x_src: torch.Tensor, src_embedding: torch.Tensor | None = None):
        """Mean over the batch; pass ``src_embedding`` to reuse a precomputed R(x_src)."""
        e_swap = self.embedder(x_swap)
        if src_embedding is None:
            with torch.no_grad():
                src_embedding = self.embedder(x_src)
        return (1.0 - F.cosine_similarity(e_swap, src_embedding.detach(), dim=1)).mean()
