"""The MFIM training loop (§3.2): the encoder and the discriminator learn against a frozen generator.

One step = ``grad_accum`` micro-batches: the encoder update on the full objective, then the discriminator update
(non-saturating loss, lazy R1). Across torchrun ranks both are DistributedDataParallel with synchronised batch norm
(mfim.training.distributed), an EMA of the encoder is kept for sampling and export, and everything needed to continue
exactly -- weights, EMA, optimisers, step, every rank's RNG states, the data position -- goes into an atomic
checkpoint every ``checkpoint_every`` steps, written by a background thread from a CPU snapshot so training goes on
meanwhile.

Logged scalars stay on the device: each step's terms are summed there, and only a log step (``log_every``) reads
them, with one all-reduce across ranks -- no per-step host sync. The NaN/Inf check reads them at the same points
(and before every checkpoint or sample grid), naming the first bad step.

Determinism: on CPU with a deterministic batch source, resuming from step N reproduces the uninterrupted run bit for
bit (tested). A NaN/Inf in any loss stops the run with a clear message before anything is written, so the last good
checkpoint stays the newest.
"""

from __future__ import annotations

import contextlib
import copy
import math
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from mfim.training.checkpoint import atomic_torch_save, load_checkpoint, reseed, rng_state, set_rng_state
from mfim.training.distributed import (
    DistInfo,
    all_gather_objects,
    all_reduce_mean,
    broadcast_parameters,
    convert_sync_batchnorm,
    wrap_ddp,
)
from mfim.training.objective import MFIMObjective


class TrainingDiverged(RuntimeError):
    pass


@dataclass
class TrainConfig:
    """The params.yaml ``train`` keys the trainer reads (their values live in params.yaml only)."""

    steps: int
    grad_accum: int
    lr: float
    d_lr: float
    betas: tuple[float, float]  # encoder (pSp-style optimiser settings)
    d_betas: tuple[float, float]  # discriminator (StyleGAN2)
    ema_decay: float
    checkpoint_every: int
    sample_every: int
    log_every: int
    bf16: bool  # autocast on CUDA only
    # encoder.refine_iterations > 0: the refiner learns inversion in the warm start's refine phase (a reconstruction
    # objective, as ReStyle); the swap objective trains the one-pass encoder only unless this is true
    train_refiner: bool

    @staticmethod
    def from_params(train: dict) -> "TrainConfig":
        """From the validated ``train`` group (mfim.params_schema): every key is present."""
        return TrainConfig(
            steps=int(train["steps"]),
            grad_accum=int(train["grad_accum"]),
            lr=float(train["lr"]),
            d_lr=float(train["d_lr"]),
            betas=tuple(float(b) for b in train["betas"]),
            d_betas=tuple(float(b) for b in train["d_betas"]),
            ema_decay=float(train["ema_decay"]),
            checkpoint_every=int(train["checkpoint_every"]),
            sample_every=int(train["sample_every"]),
            log_every=int(train["log_every"]),
            bf16=bool(train["bf16"]),
            train_refiner=bool(train["train_refiner"]),
        )


class BatchSource:
    """What the trainer pulls micro-batches from: an iterator of dicts with 'src' and 'tgt' B×3×H×W tensors.

    Optional ``state_dict()`` / ``load_state_dict()`` make the data position part of the checkpoint.
    """

    def __iter__(self) -> Iterator[dict]:  # pragma: no cover - protocol
        raise NotImplementedError


def _snapshot(obj):
    """A CPU copy of a nested state: a background write must not see the tensors (or lists) later steps change."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: _snapshot(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_snapshot(v) for v in obj)
    return obj


class _FiniteWatch:
    """Each step's summed loss terms, kept on the device until ``check`` reads them all at once (one host sync, and
    one all-reduce so that every rank stops together when any rank saw a NaN/Inf)."""

    def __init__(self, info: DistInfo):
        self.info = info
        self.pending: list[tuple[int, list[str], torch.Tensor]] = []

    def add(self, step: int, terms: dict[str, torch.Tensor]) -> None:
        self.pending.append((step, list(terms), torch.stack([v.reshape(()) for v in terms.values()])))

    def check(self) -> None:
        if not self.pending:
            return
        pending, self.pending = self.pending, []
        bad = torch.stack([(~torch.isfinite(v)).any() for _, _, v in pending]).to(torch.int32)
        if self.info.world > 1:
            import torch.distributed as tdist

            tdist.all_reduce(bad, op=tdist.ReduceOp.MAX)
        bad = bad.cpu()
        if not bool(bad.any()):
            return
        step, names, values = pending[int(bad.nonzero()[0])]
        values = values.cpu()
        where = [j for j, v in enumerate(values.tolist()) if not math.isfinite(v)]
        what = (f"loss term {names[where[0]]!r} became {values[where[0]].item()}" if where
                else "a loss term of another rank")
        raise TrainingDiverged(
            f"{what} at step {step}; stopping. The last good checkpoint is kept. "
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
        self.frozen_refiner = getattr(self.model.encoder, "refiner", None) is not None and not cfg.train_refiner
        if self.frozen_refiner:
            self.model.encoder.refiner.requires_grad_(False)
        # EMA of the encoder, sharing the frozen generator with the live model (plain batch norm: it only evaluates)
        self.ema = copy.deepcopy(self.model, memo={id(self.model.generator): self.model.generator}).eval()
        self.ema.requires_grad_(False)
        if self.dist.world > 1:
            convert_sync_batchnorm(self.model.encoder, device)
        # DDP over the whole swapper: both encoder passes (source, target) are one forward; its construction
        # broadcasts rank 0's weights, and the EMA follows them. Static graph: a configuration's unused encoder
        # parameters (configuration A's map lateral) are found once
        self.swapper = wrap_ddp(self.model, device, self.dist, static_graph=True)
        broadcast_parameters(self.ema.encoder, self.dist)
        self.d_parallel = wrap_ddp(self.D, device, self.dist) if self.D is not None else None
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
        self.autocast = device.type == "cuda" and cfg.bf16
        self.finite = _FiniteWatch(self.dist)
        self._writer: threading.Thread | None = None
        self._write_error: BaseException | None = None

    def broadcast_from_main(self) -> None:
        """Rank 0's encoder, EMA and D to every rank: after rank 0 alone read a warm start (one read, not one per
        process)."""
        broadcast_parameters(self.model.encoder, self.dist)
        broadcast_parameters(self.ema.encoder, self.dist)
        if self.D is not None:
            broadcast_parameters(self.D, self.dist)

    # --- one step ---------------------------------------------------------------------------------------------
    def _autocast(self):
        return torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.autocast)

    @staticmethod
    def _sync_unless_accumulating(module: nn.Module, last: bool):
        """DDP's all-reduce on the last micro-batch only; the others accumulate locally (DDP's no_sync)."""
        return module.no_sync() if not last and hasattr(module, "no_sync") else contextlib.nullcontext()

    def train_step(self, micro_batches: list[dict]) -> dict[str, torch.Tensor]:
        """One step; returns this rank's loss terms as 0-d float64 tensors on the device (no host sync)."""
        self.model.train()
        if self.frozen_refiner:  # frozen means its batch-norm statistics too
            self.model.encoder.refiner.eval()
        n = len(micro_batches)
        logs: dict[str, torch.Tensor] = {}

        def add(terms: dict[str, torch.Tensor]) -> None:
            for k, v in terms.items():
                v = v.detach().double() / n
                logs[k] = logs[k] + v if k in logs else v

        swaps = []
        self.opt_e.zero_grad(set_to_none=True)
        if self.D is not None:
            self.D.requires_grad_(False)
        for i, batch in enumerate(micro_batches):
            x_src = batch["src"].to(self.device, non_blocking=True)
            x_tgt = batch["tgt"].to(self.device, non_blocking=True)
            # the swapper's DDP has a static graph, which allows no no_sync in its first step, so it all-reduces every
            # micro-batch (the same sum of averages; grad_accum is 1 at paper scale)
            with self._autocast():
                x_swap = self.swapper(x_src, x_tgt)
                total, terms = self.objective.encoder_terms(x_swap.float(), x_src, x_tgt, batch.get("same_identity"),
                                                            batch.get("gt"), batch.get("has_gt"),
                                                            batch.get("src_landmarks"), batch.get("tgt_landmarks"))
            (total / n).backward()
            add({**terms, "loss": total})
            swaps.append((x_swap.detach().float(), x_tgt))
        self.opt_e.step()

        if self.D is not None and self.opt_d is not None:
            self.D.requires_grad_(True)
            self.opt_d.zero_grad(set_to_none=True)
            with_r1 = self.step % self.objective.w.r1_every == 0
            for i, (x_fake, x_real) in enumerate(swaps):
                with self._sync_unless_accumulating(self.d_parallel, i == n - 1):
                    d_total, d_terms = self.objective.discriminator_terms(x_real, x_fake, with_r1,
                                                                          discriminator=self.d_parallel)
                    if d_total.requires_grad:
                        (d_total / n).backward()
                add(d_terms)
            self.opt_d.step()
            self.D.requires_grad_(False)

        self.finite.add(self.step, logs)
        self._update_ema()
        self.step += 1
        return logs

    def check_finite(self) -> None:
        """Raise TrainingDiverged naming the first NaN/Inf loss term since the last check (on every rank)."""
        self.finite.check()

    @torch.no_grad()
    def _update_ema(self) -> None:
        d = self.cfg.ema_decay
        for p_ema, p in zip(self.ema.encoder.parameters(), self.model.encoder.parameters()):
            p_ema.lerp_(p.detach(), 1.0 - d)
        for b_ema, b in zip(self.ema.encoder.buffers(), self.model.encoder.buffers()):
            b_ema.copy_(b)

    # --- checkpoints ------------------------------------------------------------------------------------------
    def state_dict(self, data_state: dict | None = None, rng_ranks: list[dict] | None = None) -> dict:
        """The training state; ``rng_ranks``: every rank's RNG states (``gather_rng``), else this process's."""
        return {
            "format": "mfim-train-checkpoint",
            "step": self.step,
            "encoder": self.model.encoder.state_dict(),
            "encoder_ema": self.ema.encoder.state_dict(),
            "discriminator": self.D.state_dict() if self.D is not None else None,
            "opt_e": self.opt_e.state_dict(),
            "opt_d": self.opt_d.state_dict() if self.opt_d is not None else None,
            "rng_ranks": rng_ranks if rng_ranks is not None else [rng_state()],
            "data": data_state,
        }

    def gather_rng(self) -> list[dict]:
        """Every rank's RNG states, in rank order (collective: all ranks call it)."""
        return all_gather_objects(rng_state(), self.dist)

    def restore_rng(self, state: dict, seed: int = 0) -> None:
        """This rank's own RNG states when the checkpoint was saved by as many processes; else (another process
        count) every rank reseeded from (seed, step, rank), and the log says so."""
        ranks = state.get("rng_ranks") or [state["rng"]]  # "rng": checkpoints that kept rank 0's states only
        if len(ranks) == self.dist.world:
            set_rng_state(ranks[self.dist.rank])
            return
        step = int(state["step"])
        reseed(seed, step, self.dist.rank)
        if self.dist.is_main:
            print(f"resume: the checkpoint has the RNG states of {len(ranks)} processes, this run has "
                  f"{self.dist.world}: each rank's RNGs are reseeded from (seed {seed}, step {step}, rank)")

    def load_state_dict(self, state: dict, seed: int = 0) -> dict | None:
        """Load a checkpoint (every rank reads it); ``seed``: the run's, for ``restore_rng``."""
        if state.get("format") != "mfim-train-checkpoint":
            raise ValueError("not an MFIM training checkpoint")
        self.model.encoder.load_state_dict(state["encoder"])
        self.ema.encoder.load_state_dict(state["encoder_ema"])
        if self.D is not None and state.get("discriminator") is not None:
            self.D.load_state_dict(state["discriminator"])
        self.opt_e.load_state_dict(state["opt_e"])
        if self.opt_d is not None and state.get("opt_d") is not None:
            self.opt_d.load_state_dict(state["opt_d"])
        self.restore_rng(state, seed)
        self.step = int(state["step"])
        return state.get("data")

    def save(self, path: str | Path | None = None, data_state: dict | None = None,
             background: bool = False) -> Path | None:
        """Write the checkpoint (rank 0 only; atomic). ``background``: snapshot the state to CPU memory now and write
        it from a thread while training goes on; the next save or :meth:`wait_for_save` waits for it. Every rank
        calls it: the checkpoint holds each rank's RNG states."""
        path = Path(path) if path else self.checkpoint_path
        if path is None:
            return None
        rng_ranks = self.gather_rng()
        if not self.dist.is_main:
            return None
        self.wait_for_save()
        if not background:
            return atomic_torch_save(self.state_dict(data_state, rng_ranks), path)
        state = _snapshot(self.state_dict(data_state, rng_ranks))

        def write() -> None:
            try:
                atomic_torch_save(state, path)
            except BaseException as e:  # re-raised in the training thread by wait_for_save
                self._write_error = e

        self._writer = threading.Thread(target=write, name="checkpoint-writer", daemon=True)
        self._writer.start()
        return path

    def wait_for_save(self) -> None:
        """Block until a background checkpoint write finished; raise what it raised."""
        if self._writer is not None:
            self._writer.join()
            self._writer = None
        if self._write_error is not None:
            error, self._write_error = self._write_error, None
            raise error

    def resume(self, path: str | Path | None = None, seed: int = 0) -> dict | None:
        path = Path(path) if path else self.checkpoint_path
        if path is None or not path.is_file():
            return None
        # on CPU: RNG states must stay CPU tensors; load_state_dict moves weights to the parameters' device
        return self.load_state_dict(load_checkpoint(path, map_location="cpu"), seed)

    # --- the loop ---------------------------------------------------------------------------------------------
    def _reduce_window(self, window: dict[str, torch.Tensor], seen: dict[str, int]) -> dict[str, float]:
        """Per-term means over the window's steps and all ranks: one all-reduce and one host read. Ranks may lack a
        term in a window (e.g. no cross pair in their batches), so the key lists are gathered first."""
        keys = list(window)
        if self.dist.world > 1:
            keys = list(dict.fromkeys(k for ks in all_gather_objects(keys, self.dist) for k in ks))
        if not keys:
            return {}
        zero = torch.zeros((), dtype=torch.float64, device=self.device)
        sums = torch.stack([window.get(k, zero) for k in keys])
        counts = torch.tensor([float(seen.get(k, 0)) for k in keys], dtype=torch.float64, device=self.device)
        if self.dist.world > 1:
            both = all_reduce_mean(torch.cat([sums, counts]), self.dist)  # mean / mean = sum / sum
            sums, counts = both[: len(keys)], both[len(keys) :]
        return dict(zip(keys, (sums / counts.clamp(min=1e-12)).tolist()))

    def fit(
        self,
        batches: Iterator[dict],
        steps: int | None = None,
        on_log: Callable[[int, dict], None] | None = None,
        on_sample: Callable[[int], None] | None = None,
        data_state: Callable[[], dict] | None = None,
        progress: bool = True,
    ) -> dict[str, float]:
        """Train until ``steps`` (absolute step count); returns the last logged averages. ``on_sample`` and
        checkpoints run on rank 0 only; pass the same callables on every rank (the NaN check before them is
        collective)."""
        steps = self.cfg.steps if steps is None else steps
        bar = None
        if progress and self.dist.is_main:
            from tqdm import tqdm

            bar = tqdm(total=steps, initial=self.step, desc="train", unit="step", dynamic_ncols=True)
        window: dict[str, torch.Tensor] = {}
        seen: dict[str, int] = {}  # per key: R1 is computed only every r1_every steps
        count, t0, images = 0, time.perf_counter(), 0
        last: dict[str, float] = {}
        try:
            while self.step < steps:
                micro = [next(batches) for _ in range(self.cfg.grad_accum)]
                logs = self.train_step(micro)
                images += sum(int(b["src"].shape[0]) for b in micro) * self.dist.world
                for k, v in logs.items():
                    window[k] = window[k] + v if k in window else v
                    seen[k] = seen.get(k, 0) + 1
                count += 1
                if bar is not None:
                    bar.update(1)
                log_now = self.step % self.cfg.log_every == 0 or self.step == steps
                sample_now = on_sample is not None and self.step % self.cfg.sample_every == 0
                save_now = bool(self.checkpoint_path) and (self.step % self.cfg.checkpoint_every == 0
                                                           or self.step == steps)
                if log_now or sample_now or save_now:
                    self.check_finite()  # before anything is logged or written
                if log_now:
                    dt = time.perf_counter() - t0
                    last = self._reduce_window(window, seen)
                    last["img_per_s"] = images / max(dt, 1e-9)
                    last["s_per_step"] = dt / count
                    if bar is not None:
                        # refresh=False: a refresh here would redraw every step, bypassing tqdm's mininterval
                        bar.set_postfix(loss=f"{last.get('loss', math.nan):.3f}", refresh=False)
                    if on_log is not None and self.dist.is_main:
                        on_log(self.step, last)
                    window, seen, count, t0, images = {}, {}, 0, time.perf_counter(), 0
                if sample_now and self.dist.is_main:
                    on_sample(self.step)
                if save_now:
                    self.save(data_state=data_state() if data_state else None, background=True)
            self.check_finite()
        finally:
            self.wait_for_save()  # a diverged run still leaves its last good checkpoint complete
            if bar is not None:
                bar.close()
        return last
