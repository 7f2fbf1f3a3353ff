"""Pretraining a small StyleGAN2 (the embedded default's generator), independent of where the images come from.

The StyleGAN2 recipe (Karras et al. 2020, config F as in stylegan2-ada-pytorch):

* non-saturating logistic loss: D minimises softplus(D(fake)) + softplus(-D(real)), G minimises softplus(-D(fake));
* lazy R1 on reals every ``r1_every`` iterations, weighted gamma/2 and scaled by the interval;
* optional path-length regularisation every ``pl_every`` iterations (off by default at 64 px: ``pl_weight: 0``);
* style mixing with probability ``mixing_prob`` (second w from a cutoff layer on);
* Adam(betas 0, 0.99) with the lazy-regularisation correction (lr * c, beta ** c with c = interval/(interval+1));
* an exponential moving average of G with a half-life of ``ema_half_life_kimg`` thousand images;
* random noise inputs while training, w_avg tracked by the mapping network for truncation.

``pretrain(G, D, batches, cfg, out_dir)`` runs it, logs scalars / sample grids through ``log_fn``, calls ``eval_fn``
on the EMA generator, and writes ``out_dir/generator.pt`` (our checkpoint format, atomically) at the end.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from mfim.models.stylegan2 import Discriminator, Generator
from mfim.weights import save_checkpoint


@dataclass
class PretrainConfig:
    iterations: int = 900
    batch_size: int = 8  # the number of fakes per step; reals come in the batches given
    lr: float = 0.002
    betas: tuple[float, float] = (0.0, 0.99)
    r1_gamma: float = 0.1
    r1_every: int = 16
    pl_weight: float = 0.0  # 2.0 in config F; off by default at 64 px
    pl_every: int = 4
    pl_decay: float = 0.01
    pl_batch_shrink: int = 2
    ema_half_life_kimg: float = 2.0
    ema_rampup: float | None = None  # e.g. 0.05: half-life <= 5% of the images seen so far
    mixing_prob: float = 0.9
    sample_every: int = 150  # sample grid + eval_fn every N iterations (and at the start and the end)
    log_every: int = 10
    grid_size: int = 16
    seed: int = 0
    device: str = "cpu"
    progress: bool = True
    checkpoint_name: str = "generator.pt"

    @classmethod
    def from_dict(cls, cfg: dict | PretrainConfig | None) -> PretrainConfig:
        """From a params.yaml group: known keys are used, others (e.g. shipped_checkpoint) ignored."""
        if isinstance(cfg, PretrainConfig):
            return cfg
        names = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in (cfg or {}).items() if k in names}
        if "betas" in kw:
            kw["betas"] = tuple(float(b) for b in kw["betas"])
        return cls(**kw)

    def as_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["betas"] = list(d["betas"])
        return d


def lazy_regularization_adam(params, lr: float, betas: tuple[float, float], reg_every: int | None):
    """Adam with the lazy-regularisation correction: the regulariser runs every ``reg_every`` steps on its own
    optimizer step, so the effective number of steps is (reg_every+1)/reg_every per iteration."""
    ratio = reg_every / (reg_every + 1) if reg_every else 1.0
    return torch.optim.Adam(params, lr=lr * ratio, betas=(betas[0] ** ratio, betas[1] ** ratio), eps=1e-8)


def ema_beta(batch_size: int, half_life_kimg: float, images_seen: int = 0, rampup: float | None = None) -> float:
    """Per-step decay so that the EMA weights halve every ``half_life_kimg`` thousand images."""
    ema_nimg = half_life_kimg * 1000
    if rampup is not None:
        ema_nimg = min(ema_nimg, images_seen * rampup)
    return 0.5 ** (batch_size / max(ema_nimg, 1e-8))


class StyleGAN2Trainer:
    """The four official phases (G main, G path length, D main, D R1) and the EMA update, one call each."""

    def __init__(self, G: Generator, D: Discriminator, cfg: PretrainConfig | dict):
        self.cfg = PretrainConfig.from_dict(cfg)
        c = self.cfg
        self.device = torch.device(c.device)
        self.G = G.to(self.device).train()
        self.D = D.to(self.device).train()
        self.G_ema = copy.deepcopy(G).eval().requires_grad_(False)
        self.opt_G = lazy_regularization_adam(G.parameters(), c.lr, c.betas, c.pl_every if c.pl_weight > 0 else None)
        self.opt_D = lazy_regularization_adam(D.parameters(), c.lr, c.betas, c.r1_every if c.r1_gamma > 0 else None)
        self.rng = torch.Generator().manual_seed(int(c.seed))
        self.pl_mean = torch.zeros([], device=self.device)
        self.step = 0
        self.images_seen = 0

    # --- sampling -------------------------------------------------------------------------------------------------
    def _randn(self, *shape) -> torch.Tensor:
        return torch.randn(*shape, generator=self.rng).to(self.device)

    def sample_z(self, n: int) -> torch.Tensor:
        return self._randn(n, self.G.z_dim)

    def run_G(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Fakes with style mixing (the same cutoff for the batch, as the official loop) and their W+."""
        G = self.G
        ws = G.broadcast(G.mapping(z))
        if self.cfg.mixing_prob > 0 and torch.rand([], generator=self.rng).item() < self.cfg.mixing_prob:
            cutoff = int(torch.randint(1, G.num_ws, [], generator=self.rng))
            ws2 = G.broadcast(G.mapping(self.sample_z(z.shape[0]), update_w_avg=False))
            ws = torch.cat([ws[:, :cutoff], ws2[:, cutoff:]], dim=1)
        return G.synthesize(G.styles_from_ws(ws), noise_mode="random"), ws

    # --- phases ---------------------------------------------------------------------------------------------------
    def g_main_step(self) -> dict:
        self.G.requires_grad_(True)
        self.D.requires_grad_(False)
        fake, _ = self.run_G(self.sample_z(self.cfg.batch_size))
        logits = self.D(fake)
        loss = F.softplus(-logits).mean()
        self.opt_G.zero_grad(set_to_none=True)
        loss.backward()
        self.opt_G.step()
        return {"loss_G": loss.item(), "score_fake_G": logits.mean().item()}

    def g_path_length_step(self) -> dict:
        c = self.cfg
        self.G.requires_grad_(True)
        n = max(c.batch_size // c.pl_batch_shrink, 1)
        fake, ws = self.run_G(self.sample_z(n))
        noise = torch.randn(fake.shape, generator=self.rng).to(self.device) / math.sqrt(fake.shape[2] * fake.shape[3])
        (grads,) = torch.autograd.grad((fake * noise).sum(), ws, create_graph=True)
        lengths = grads.square().sum(2).mean(1).sqrt()
        pl_mean = self.pl_mean.lerp(lengths.mean(), c.pl_decay)
        self.pl_mean.copy_(pl_mean.detach())
        penalty = (lengths - pl_mean).square()
        loss = (penalty * c.pl_weight).mean() * c.pl_every
        self.opt_G.zero_grad(set_to_none=True)
        loss.backward()
        self.opt_G.step()
        return {"pl_penalty": penalty.mean().item(), "pl_mean": pl_mean.item()}

    def d_main_step(self, real: torch.Tensor) -> dict:
        self.G.requires_grad_(False)
        self.D.requires_grad_(True)
        with torch.no_grad():
            fake, _ = self.run_G(self.sample_z(self.cfg.batch_size))
        fake_logits = self.D(fake)
        real_logits = self.D(real)
        loss = F.softplus(fake_logits).mean() + F.softplus(-real_logits).mean()
        self.opt_D.zero_grad(set_to_none=True)
        loss.backward()
        self.opt_D.step()
        return {"loss_D": loss.item(), "score_real": real_logits.mean().item(), "score_fake": fake_logits.mean().item()}

    def d_r1_step(self, real: torch.Tensor) -> dict:
        c = self.cfg
        self.D.requires_grad_(True)
        real = real.detach().requires_grad_(True)
        logits = self.D(real)
        (grads,) = torch.autograd.grad(logits.sum(), real, create_graph=True)
        penalty = grads.square().sum(dim=[1, 2, 3])
        loss = (penalty * (c.r1_gamma / 2)).mean() * c.r1_every
        self.opt_D.zero_grad(set_to_none=True)
        loss.backward()
        self.opt_D.step()
        return {"r1_penalty": penalty.mean().item()}

    @torch.no_grad()
    def ema_update(self, batch_size: int) -> float:
        beta = ema_beta(batch_size, self.cfg.ema_half_life_kimg, self.images_seen, self.cfg.ema_rampup)
        for p_ema, p in zip(self.G_ema.parameters(), self.G.parameters()):
            p_ema.copy_(p.detach().lerp(p_ema, beta))
        for b_ema, b in zip(self.G_ema.buffers(), self.G.buffers()):
            b_ema.copy_(b)
        return beta

    def train_step(self, real: torch.Tensor) -> dict:
        """One iteration in the official phase order; ``real`` is B×3×H×W in [-1, 1]."""
        c = self.cfg
        real = real.to(self.device, torch.float32)
        stats = self.g_main_step()
        if c.pl_weight > 0 and self.step % c.pl_every == 0:
            stats.update(self.g_path_length_step())
        stats.update(self.d_main_step(real))
        if c.r1_gamma > 0 and self.step % c.r1_every == 0:
            stats.update(self.d_r1_step(real))
        self.images_seen += c.batch_size
        stats["ema_beta"] = self.ema_update(c.batch_size)
        self.step += 1
        return stats


# --------------------------------------------------------------------------------------------------------------------
# Sample grids and a cheap image-statistics metric (its Fréchet distance: pytorch-fid's, as FID's)
# --------------------------------------------------------------------------------------------------------------------


def image_grid(images: torch.Tensor, nrow: int | None = None) -> np.ndarray:
    """B×3×H×W in [-1, 1] -> one H'×W'×3 uint8 grid (row-major), official 8-bit conversion."""
    from mfim.nets.face_crops import to_uint8

    b, c, h, w = images.shape
    nrow = nrow or int(math.ceil(math.sqrt(b)))
    ncol = int(math.ceil(b / nrow))
    u8 = to_uint8(images.cpu(), stylegan=True)
    grid = np.zeros((ncol * h, nrow * w, 3), dtype=np.uint8)
    for i in range(b):
        r, q = divmod(i, nrow)
        grid[r * h : (r + 1) * h, q * w : (q + 1) * w] = u8[i]
    return grid


def write_sample_grid(G: Generator, z: torch.Tensor, path: str | Path, record: dict) -> Path:
    """G's images for the latents ``z`` (one at a time, so the grid does not depend on a batch size; constant noise)
    as one row-major grid PNG carrying the provenance ``record``."""
    from mfim.provenance import save_image

    device = next(G.parameters()).device
    with torch.no_grad():
        imgs = torch.cat([G(zi[None].to(device), noise_mode="const") for zi in z])
    return save_image(path, image_grid(imgs), record)


def sample_checkpoint(checkpoint: str | Path, path: str | Path, device, n: int = 16, seed: int = 0) -> Path:
    """A sample grid of a generator checkpoint (e.g. an imported one) from fixed latents, marked synthetic."""
    from mfim.assets import sha256_file
    from mfim.weights import load_generator
    from mfim.provenance import provenance_record

    G = load_generator(checkpoint, device=device).eval()
    z = torch.randn(n, G.z_dim, generator=torch.Generator().manual_seed(seed))
    return write_sample_grid(G, z, path, provenance_record("synthetic", checkpoint_sha256=sha256_file(checkpoint)))


def pixel_features(images: torch.Tensor, size: int = 8) -> np.ndarray:
    """Images averaged down to size×size×3 (192 numbers at 8): a crude feature space for a Fréchet distance that
    tracks colour/layout statistics over training. Not FID; no pretrained network involved."""
    x = F.adaptive_avg_pool2d(images.detach().cpu().to(torch.float32), size)
    return x.flatten(1).double().numpy()


def gaussian_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return features.mean(0), np.cov(features, rowvar=False)


# --------------------------------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------------------------------


LogFn = Callable[..., None]  # log_fn(step: int, metrics: dict[str, float], artifacts: list[Path] | None = None)
EvalFn = Callable[[Generator, int], dict]  # eval_fn(G_ema, step) -> {name: value}


def pretrain(
    G: Generator,
    D: Discriminator,
    batches: Iterator[torch.Tensor],
    cfg: dict | PretrainConfig,
    out_dir: str | Path,
    log_fn: LogFn | None = None,
    eval_fn: EvalFn | None = None,
) -> dict:
    """Train ``G``/``D`` for ``cfg.iterations`` on ``batches`` (B×3×H×W in [-1, 1], any source), then write
    ``out_dir/<checkpoint_name>``: the EMA generator, D, and (in ``extra``) the raw G, counters and the config.

    Returns a summary: iterations, images seen, training seconds and img/s (sample grids and evaluation excluded),
    the mean of each loss over the last 10% of iterations, the last eval metrics, the checkpoint path and the sample
    grid paths -- all JSON-able -- plus ``networks``: {"G_ema", "G", "D"} (the trained modules, not JSON-able).
    """
    c = PretrainConfig.from_dict(cfg)
    out_dir = Path(out_dir)
    (out_dir / "samples").mkdir(parents=True, exist_ok=True)
    trainer = StyleGAN2Trainer(G, D, c)
    snapshots = Snapshots(trainer, c, out_dir / "samples", log_fn, eval_fn)
    snapshots(0)
    history, train_seconds, exhausted = train_loop(trainer, batches, c, log_fn, snapshots)
    if trainer.step:
        snapshots(trainer.step)
    ckpt = save_checkpoint(
        out_dir / c.checkpoint_name,
        trainer.G_ema,
        trainer.D,
        extra={
            "g": {k: v.detach().cpu().clone() for k, v in trainer.G.state_dict().items()},
            "iterations": trainer.step,
            "images_seen": trainer.images_seen,
            "pl_mean": float(trainer.pl_mean),
            "pretrain_config": c.as_dict(),
        },
    )
    return {
        "iterations": trainer.step,
        "images_seen": trainer.images_seen,
        "train_seconds": train_seconds,
        "img_per_s": trainer.images_seen / max(train_seconds, 1e-9),
        "final": last_tenth_means(history),
        "eval": snapshots.last_eval,
        "data_exhausted": exhausted,
        "checkpoint": str(ckpt),
        "sample_grids": snapshots.grids,
        "networks": {"G_ema": trainer.G_ema, "G": trainer.G, "D": trainer.D},
    }


class Snapshots:
    """``snapshots(step)``: the EMA generator's grid of fixed latents, the evaluation metrics, both to ``log_fn``."""

    def __init__(self, trainer: StyleGAN2Trainer, c: PretrainConfig, folder: Path, log_fn: LogFn | None,
                 eval_fn: EvalFn | None):
        self.trainer, self.folder, self.log_fn, self.eval_fn = trainer, folder, log_fn, eval_fn
        self.z = torch.randn(c.grid_size, trainer.G.z_dim, generator=torch.Generator().manual_seed(c.seed + 12345))
        self.grids: list[str] = []
        self.last_eval: dict = {}

    def __call__(self, step: int) -> None:
        from mfim.provenance import provenance_record

        path = self.folder / f"grid_{step:06d}.png"
        rec = provenance_record("synthetic", generator="stylegan2-pretrain", iteration=step)
        write_sample_grid(self.trainer.G_ema, self.z, path, rec)
        self.grids.append(str(path))
        metrics = dict(self.eval_fn(self.trainer.G_ema, step)) if self.eval_fn is not None else {}
        if metrics:
            self.last_eval = {k: float(v) for k, v in metrics.items()}
        if self.log_fn is not None:
            self.log_fn(step, self.last_eval if metrics else {}, [path])


def train_loop(trainer: StyleGAN2Trainer, batches: Iterator[torch.Tensor], c: PretrainConfig, log_fn: LogFn | None,
               snapshots: Snapshots) -> tuple[list[dict], float, bool]:
    """Up to ``c.iterations`` steps: (each step's stats, seconds in the steps alone, whether the data ran out)."""
    from tqdm import tqdm

    history: list[dict] = []
    train_seconds = 0.0
    exhausted = False
    bar = tqdm(total=c.iterations, desc="pretrain G", disable=not c.progress, dynamic_ncols=True)
    for it in range(c.iterations):
        try:
            real = next(batches)
        except StopIteration:
            exhausted = True
            break
        t0 = time.perf_counter()
        stats = trainer.train_step(real)
        train_seconds += time.perf_counter() - t0
        history.append(stats)
        step = it + 1
        if step % c.log_every == 0 or step == c.iterations:
            rate = trainer.images_seen / max(train_seconds, 1e-9)
            stats = dict(stats, img_per_s=rate, kimg=trainer.images_seen / 1e3)
            if log_fn is not None:
                log_fn(step, {k: float(v) for k, v in stats.items()})
            bar.set_postfix(loss_G=f"{stats['loss_G']:.3f}", loss_D=f"{stats['loss_D']:.3f}",
                            img_s=f"{stats['img_per_s']:.1f}", refresh=False)  # fmt: skip
        bar.update(1)
        if c.sample_every and step % c.sample_every == 0 and step != c.iterations:
            snapshots(step)
    bar.close()
    return history, train_seconds, exhausted


def last_tenth_means(history: list[dict]) -> dict[str, float]:
    """Each loss's mean over the last 10 % of the steps that logged it."""
    final = {}
    for k in sorted({k for h in history for k in h}):
        vals = [h[k] for h in history if k in h]
        final[k] = float(np.mean(vals[-max(1, len(vals) // 10) :]))
    return final


__all__ = [
    "PretrainConfig",
    "StyleGAN2Trainer",
    "lazy_regularization_adam",
    "ema_beta",
    "image_grid",
    "pixel_features",
    "gaussian_stats",
    "pretrain",
]
