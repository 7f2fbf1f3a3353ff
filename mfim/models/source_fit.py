"""Test-time fitting of a source's ID style codes (hybrid inversion: the encoder's codes, then a few optimiser steps).

The paper's swap is feed-forward: the source's ID style codes are whatever the encoder outputs. An amortised encoder
inverts a face it has never seen only approximately, and what it loses is the person: on the embedded default, dlib
finds another render of a held-out person from the encoder's reconstruction 32.5 % of the time, from a real render
95 % (docs/EXPERIMENTS.md §16). Starting at the encoder's output and optimising an image's codes against the image is
the standard remedy of GAN inversion (Image2StyleGAN's optimisation started from an encoder as in e4e/ReStyle
practice, PTI's first stage); here only the *ID* codes (the layers above ``coarse_max_res``, the ones a swap takes
from the source) move, with the source's own coarse codes and style maps held fixed, so what the fit adds can only
reach the swap through the source's half of the split. The loss is the paper's own reconstruction and ID terms
(L1 + LPIPS + ``id`` x (1 - cos R)), on the source image only: nothing of the target or of the evaluators is seen.

Fitting is off by default in the library (``steps: 0``); ``params.yaml`` ``source_fit`` turns it on for evaluation
and the CLI. Fitted codes are cached per image (exact pixel bytes), so an image used as a source several times (ID
mixing uses each source in three results) is fitted once.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from mfim.criteria.threedmm_loss import l2_distance


CACHE_SIZE = 4096


@dataclass(frozen=True)
class SourceFitConfig:
    """params.yaml group ``source_fit`` (values there only; mfim.params_schema bounds them)."""

    steps: int  # optimiser steps per source image; 0 = the paper's feed-forward swap
    lr: float  # Adam on additive offsets to the S-space codes
    # Small pixel weights: the pixel terms also copy the source's expression into the ID codes (EXPERIMENTS §16)
    l1: float
    lpips: float
    id: float  # weight of 1 - cos(R(fit), R(source)), R the training ID network
    # Expression anchor: weight of the L2 between the training 3DMM network's (standardised) expression of the fitted
    # image and of the encoder's own reconstruction. The fit is there for the person; the pixel terms also pull the
    # source's expression into the ID codes, which a swap then puts on the target's face (EXPERIMENTS §19).
    exp: float
    # images whose fitted codes are kept (a few KB each at 64 px); not a params key: memory, not what is computed
    cache_size: int = CACHE_SIZE

    @classmethod
    def from_params(cls, group: dict) -> SourceFitConfig:
        """From the validated ``source_fit`` group (every key present)."""
        cfg = cls(steps=int(group["steps"]), **{k: float(group[k]) for k in ("lr", "l1", "lpips", "id", "exp")})
        if cfg.steps < 0 or cfg.lr <= 0 or min(cfg.l1, cfg.lpips, cfg.id, cfg.exp) < 0:
            raise ValueError(f"source_fit: steps must be >= 0, lr > 0 and weights >= 0, got {cfg}")
        return cfg


class SourceCodeFitter:
    """``fitter(model, x, indices)`` -> {layer index: B×C code} like ``MFIM.encode_codes``, after ``cfg.steps`` of
    Adam on the ID codes of each image of ``x``. ``embedder``: the ID network (B×3×H×W in [-1, 1] -> B×D), ``lpips``:
    a frozen lpips.LPIPS; ``expression``: B×3×H×W -> B×E standardised 3DMM expression (the training 3DMM network);
    all are only read."""

    def __init__(self, cfg: SourceFitConfig, embedder: torch.nn.Module, lpips: torch.nn.Module | None,
                 expression=None):
        if cfg.lpips > 0 and lpips is None:
            raise ValueError("source_fit.lpips > 0 needs an LPIPS network")
        if cfg.exp > 0 and expression is None:
            raise ValueError("source_fit.exp > 0 needs a 3DMM expression network")
        self.cfg, self.embedder, self.lpips, self.expression = cfg, embedder, lpips, expression
        self._cache: OrderedDict[bytes, dict[int, torch.Tensor]] = OrderedDict()

    @staticmethod
    def _key(image: torch.Tensor) -> bytes:
        return hashlib.sha256(image.detach().float().cpu().contiguous().numpy().tobytes()).digest()

    def __call__(self, model, x: torch.Tensor, indices: Sequence[int]) -> dict[int, torch.Tensor]:
        keys = [self._key(img) for img in x]
        todo = sorted({k: i for i, k in enumerate(keys) if k not in self._cache}.values())
        if todo:
            fitted = self.fit(model, x[todo])
            for j, i in enumerate(todo):
                self._cache[keys[i]] = {k: v[j : j + 1] for k, v in fitted.items()}
                while len(self._cache) > self.cfg.cache_size:
                    self._cache.popitem(last=False)
        rows = [self._cache[k] for k in keys]
        return {i: torch.cat([r[i] for r in rows]).to(x.device) for i in indices}

    def fit(self, model, x: torch.Tensor) -> dict[int, torch.Tensor]:
        """All of x's codes: the encoder's inversion with its ID codes (``model.src_indices``) optimised."""
        cfg = self.cfg
        with torch.no_grad():
            codes, maps = model.invert(x)
            target_id = F.normalize(self.embedder(x).float(), dim=1) if cfg.id > 0 else None
        anchor = None  # the expression network's reading of the encoder's own reconstruction (set on the first step)
        # only the ID codes: the coarse toRGB codes a swap may also take from the source (model.source_torgb_max_res)
        # stay the encoder's: fitted to the source image they also copy the colour of its mouth and eyes, which
        # reads as the source's expression on the target's face
        offsets = {i: torch.zeros_like(codes[i], requires_grad=True) for i in model.id_indices}
        opt = torch.optim.Adam(offsets.values(), lr=cfg.lr)
        with torch.enable_grad():
            for _ in range(cfg.steps):
                y = model.synthesize({i: c + offsets[i] if i in offsets else c for i, c in codes.items()}, maps)
                if y.shape[-2:] != x.shape[-2:]:  # paper scale: a 1024 px generator, a 256 px input
                    y = F.interpolate(y, size=x.shape[-2:], mode="area")
                loss = cfg.l1 * (y - x).abs().mean()
                if cfg.lpips > 0:
                    loss = loss + cfg.lpips * self.lpips(y, x).mean()
                if target_id is not None:
                    loss = loss + cfg.id * (1 - (F.normalize(self.embedder(y).float(), dim=1) * target_id).sum(1)).mean()
                if cfg.exp > 0:
                    # the first step's image is the reconstruction itself (offsets still zero): what the fitted ID
                    # codes must leave as it is
                    e = self.expression(y).float()
                    anchor = e.detach() if anchor is None else anchor
                    loss = loss + cfg.exp * l2_distance(e, anchor)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
        return {i: (c + offsets[i]).detach() if i in offsets else c for i, c in codes.items()}
