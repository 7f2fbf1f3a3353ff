"""The MFIM training loop (§3.2): the encoder and the discriminator learn against a frozen generator.

One step = ``grad_accum`` micro-batches: the encoder update on the full objective, then the discriminator update
(non-saturating loss, lazy R1). Gradients are averaged across torchrun ranks (mfim.training.distributed), an EMA of
the encoder is kept for sampling and export, and everything needed to continue exactly -- weights, EMA, optimisers,
step, RNG states, the data position -- goes into an atomic checkpoint every ``checkpoint_every`` steps.

Determinism: on CPU with a deterministic batch source, resuming from step N reproduces the uninterrupted run bit for
bit (tested). A NaN/Inf in any loss stops the run with a clear message before anything is written, so the last good
checkpoint stays the newest.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from mfim.training.checkpoint import atomic_torch_save, load_checkpoint, rng_state, set_rng_state
from mfim.training.distributed import DistInfo, average_gradients, average_scalar, broadcast_parameters
from mfim.training.objective import MFIMObjective


class TrainingDiverged(RuntimeError):
    pass


@dataclass
class TrainConfig:
    steps: int = 600
    grad_accum: int = 1
    lr: float = 5e-4
    d_lr: float = 5e-4
    betas: tuple[float, float] = (0.9, 0.999)  # encoder (pSp-style optimiser settings)
    d_betas: tuple[float, float] = (0.0, 0.99)  # discriminator (StyleGAN2)
    ema_decay: float = 0.995
    checkpoint_every: int = 200
    sample_every: int = 100
    log_every: int = 10
    bf16: bool = True  # autocast on CUDA only
    # encoder.refine_iterations > 0: the refiner learns inversion in the warm start's refine phase (a reconstruction
    # objective, as ReStyle); the swap objective trains the one-pass encoder only unless this is true
    train_refiner: bool = False

    @staticmethod
    def from_params(train: dict) -> "TrainConfig":
        return TrainConfig(
            steps=int(train.get("steps", 600)),
            grad_accum=int(train.get("grad_accum", 1)),
            lr=float(train.get("lr", 5e-4)),
            d_lr=float(train.get("d_lr", 5e-4)),
            betas=tuple(float(b) for b in train.get("betas", (0.9, 0.999))),
            d_betas=tuple(float(b) for b in train.get("d_betas", (0.0, 0.99))),
            ema_decay=float(train.get("ema_decay", 0.995)),
            checkpoint_every=int(train.get("checkpoint_every", 200)),
            sample_every=int(train.get("sample_every", 100)),
            log_every=int(train.get("log_every", 10)),
            bf16=bool(train.get("bf16", True)),
            train_refiner=bool(train.get("train_refiner", False)),
        )


class BatchSource:
    """What the trainer pulls micro-batches from: an iterator of dicts with 'src' and 'tgt' B×3×H×W tensors.

    Optional ``state_dict()`` / ``load_state_dict()`` make the data position part of the checkpoint.
    """

    def __iter__(self) -> Iterator[dict]:  # pragma: no cover - protocol
        raise NotImplementedError


def _finite(name: str, value: torch.Tensor, step: int) -> None:
    if not torch.isfinite(value).all():
        raise TrainingDiverged(
            f"loss term {name!r} became {value.item()} at step {step}; stopping. The last good checkpoint is kept. "
            "Lower train.lr or the loss weights, or check the inputs."
        )


class Trainer:
    def __init__(
        self,
        model: nn.Module,  # MFIM: forward(x_src, x_tgt) -> x_swap; .encoder trainable, .generator frozen
        objective: MFIMObjective,
        cfg: TrainConfig,
        device: torch.device,
        dist_info: DistInfo | None = None,
        checkpoint_path: str | Path | None = None,
    ):
        self.model = model.to(device)
        self.objective = objective.to(device)
        self.cfg = cfg
        self.device = device
        self.dist = dist_info or DistInfo()
        self.checkpoint_path = Path(checkpoint_path) if checkpoint_path else None
        self.step = 0
        self.D = objective.discriminator
        broadcast_parameters(self.model.encoder, self.dist)
        if self.D is not None:
            broadcast_parameters(self.D, self.dist)
        self.frozen_refiner = getattr(self.model.encoder, "refiner", None) is not None and not cfg.train_refiner
        if self.frozen_refiner:
            self.model.encoder.refiner.requires_grad_(False)
        trainable = [p for p in self.model.encoder.parameters() if p.requires_grad]
        self.opt_e = torch.optim.Adam(trainable, lr=cfg.lr, betas=cfg.betas)
        self.opt_d = None
        if self.D is not None:
            # lazy regularisation: R1 runs every k steps, so lr and betas are rescaled as in StyleGAN2
            k = objective.w.r1_every
            c = k / (k + 1)
            self.opt_d = torch.optim.Adam(
                self.D.parameters(), lr=cfg.d_lr * c, betas=(cfg.d_betas[0] ** c, cfg.d_betas[1] ** c)
            )
        # EMA of the encoder, sharing the frozen generator with the live model
        self.ema = copy.deepcopy(self.model, memo={id(self.model.generator): self.model.generator}).eval()
        self.ema.requires_grad_(False)
        self.autocast = device.type == "cuda" and cfg.bf16

    # --- one step ---------------------------------------------------------------------------------------------
    def _autocast(self):
        return torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.autocast)

    def train_step(self, micro_batches: list[dict]) -> dict[str, float]:
        self.model.train()
        if self.frozen_refiner:  # frozen means its batch-norm statistics too
            self.model.encoder.refiner.eval()
        n = len(micro_batches)
        logs: dict[str, float] = {}
        swaps = []
        self.opt_e.zero_grad(set_to_none=True)
        if self.D is not None:
            self.D.requires_grad_(False)
        for batch in micro_batches:
            x_src = batch["src"].to(self.device, non_blocking=True)
            x_tgt = batch["tgt"].to(self.device, non_blocking=True)
            with self._autocast():
                x_swap = self.model(x_src, x_tgt)
                total, terms = self.objective.encoder_terms(x_swap.float(), x_src, x_tgt, batch.get("same_identity"),
                                                            batch.get("gt"), batch.get("has_gt"),
                                                            batch.get("src_landmarks"), batch.get("tgt_landmarks"))
            for k, v in terms.items():
                _finite(k, v, self.step)
                logs[k] = logs.get(k, 0.0) + v.item() / n
            _finite("total", total, self.step)
            (total / n).backward()
            logs["loss"] = logs.get("loss", 0.0) + total.item() / n
            swaps.append((x_swap.detach().float(), x_tgt))
        average_gradients(self.model.encoder.parameters(), self.dist)
        self.opt_e.step()

        if self.D is not None and self.opt_d is not None:
            self.D.requires_grad_(True)
            self.opt_d.zero_grad(set_to_none=True)
            with_r1 = self.step % self.objective.w.r1_every == 0
            for x_fake, x_real in swaps:
                d_total, d_terms = self.objective.discriminator_terms(x_real, x_fake, with_r1)
                for k, v in d_terms.items():
                    _finite(k, v, self.step)
                    logs[k] = logs.get(k, 0.0) + v.item() / n
                if d_total.requires_grad:
                    (d_total / n).backward()
            average_gradients(self.D.parameters(), self.dist)
            self.opt_d.step()
            self.D.requires_grad_(False)

        self._update_ema()
        self.step += 1
        return {k: average_scalar(v, self.dist, self.device) for k, v in logs.items()}

    @torch.no_grad()
    def _update_ema(self) -> None:
        d = self.cfg.ema_decay
        for p_ema, p in zip(self.ema.encoder.parameters(), self.model.encoder.parameters()):
            p_ema.lerp_(p.detach(), 1.0 - d)
        for b_ema, b in zip(self.ema.encoder.buffers(), self.model.encoder.buffers()):
            b_ema.copy_(b)

    # --- checkpoints ------------------------------------------------------------------------------------------
    def state_dict(self, data_state: dict | None = None) -> dict:
        return {
            "format": "mfim-train-checkpoint",
            "step": self.step,
            "encoder": self.model.encoder.state_dict(),
            "encoder_ema": self.ema.encoder.state_dict(),
            "discriminator": self.D.state_dict() if self.D is not None else None,
            "opt_e": self.opt_e.state_dict(),
            "opt_d": self.opt_d.state_dict() if self.opt_d is not None else None,
            "rng": rng_state(),
            "data": data_state,
        }

    def load_state_dict(self, state: dict) -> dict | None:
        if state.get("format") != "mfim-train-checkpoint":
            raise ValueError("not an MFIM training checkpoint")
        self.model.encoder.load_state_dict(state["encoder"])
        self.ema.encoder.load_state_dict(state["encoder_ema"])
        if self.D is not None and state.get("discriminator") is not None:
            self.D.load_state_dict(state["discriminator"])
        self.opt_e.load_state_dict(state["opt_e"])
        if self.opt_d is not None and state.get("opt_d") is not None:
            self.opt_d.load_state_dict(state["opt_d"])
        set_rng_state(state["rng"])
        self.step = int(state["step"])
        return state.get("data")

    def save(self, path: str | Path | None = None, data_state: dict | None = None) -> Path | None:
        path = Path(path) if path else self.checkpoint_path
        if path is None or not self.dist.is_main:
            return None
        return atomic_torch_save(self.state_dict(data_state), path)

    def resume(self, path: str | Path | None = None) -> dict | None:
        path = Path(path) if path else self.checkpoint_path
        if path is None or not path.is_file():
            return None
        # on CPU: RNG states must stay CPU tensors; load_state_dict moves weights to the parameters' device
        return self.load_state_dict(load_checkpoint(path, map_location="cpu"))

    # --- the loop ---------------------------------------------------------------------------------------------
    def fit(
        self,
        batches: Iterator[dict],
        steps: int | None = None,
        on_log: Callable[[int, dict], None] | None = None,
        on_sample: Callable[[int], None] | None = None,
        data_state: Callable[[], dict] | None = None,
        progress: bool = True,
    ) -> dict[str, float]:
        """Train until ``steps`` (absolute step count); returns the last logged averages."""
        steps = self.cfg.steps if steps is None else steps
        bar = None
        if progress and self.dist.is_main:
            from tqdm import tqdm

            bar = tqdm(total=steps, initial=self.step, desc="train", unit="step", dynamic_ncols=True)
        window: dict[str, float] = {}
        seen: dict[str, int] = {}  # per key: R1 is computed only every r1_every steps
        count, t0, images = 0, time.perf_counter(), 0
        last: dict[str, float] = {}
        while self.step < steps:
            micro = [next(batches) for _ in range(self.cfg.grad_accum)]
            logs = self.train_step(micro)
            images += sum(int(b["src"].shape[0]) for b in micro) * self.dist.world
            for k, v in logs.items():
                window[k] = window.get(k, 0.0) + v
                seen[k] = seen.get(k, 0) + 1
            count += 1
            if bar is not None:
                # refresh=False: a refresh here would redraw every step, bypassing tqdm's mininterval
                bar.set_postfix(loss=f"{logs.get('loss', math.nan):.3f}", refresh=False)
                bar.update(1)
            if self.step % self.cfg.log_every == 0 or self.step == steps:
                dt = time.perf_counter() - t0
                last = {k: v / seen[k] for k, v in window.items()}
                last["img_per_s"] = images / max(dt, 1e-9)
                last["s_per_step"] = dt / count
                if on_log is not None and self.dist.is_main:
                    on_log(self.step, last)
                window, seen, count, t0, images = {}, {}, 0, time.perf_counter(), 0
            if on_sample is not None and self.dist.is_main and self.step % self.cfg.sample_every == 0:
                on_sample(self.step)
            if self.checkpoint_path and (self.step % self.cfg.checkpoint_every == 0 or self.step == steps):
                self.save(data_state=data_state() if data_state else None)
        if bar is not None:
            bar.close()
        return last
