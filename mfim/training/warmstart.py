"""Warm start of the facial attribute encoder: GAN inversion before face swapping.

A pSp-style encoder normally needs 100k+ GPU steps of the full objective to leave the generator's average face. On
two CPU cores that is out of reach, so the encoder first learns to *invert* the frozen generator, which is much
cheaper per step (no ID, 3DMM or discriminator networks) and gives MFIM training a starting point whose codes already
mean something:

1. **Latent regression on generator samples** (``regression_steps``). The frozen generator makes (image, S codes)
   pairs for free: z -> w with style mixing (a random crossover per sample, so per-layer codes are not all tied), W+
   -> S, render with random noise. The encoder regresses the S codes it came from, as offsets from the average
   style divided by each coordinate's std over the generator's distribution (so every layer counts alike), plus an
   optional image L1 between the generator's rendering of the predicted codes (with the predicted style maps) and
   the sample, which is what trains the maps in this phase.
2. **Reconstruction of real training images** (``recon_steps``): self-swap (source = target) with L1 + LPIPS, as
   pSp trains; this adapts the encoder from generator samples to the data and trains the style maps on real detail.

3. **Refinement** (``refine_steps``, only when ``encoder.refine_iterations`` > 0; not in the paper). The one-pass
   encoder is frozen and the ReStyle-style refiner (mfim.models.encoder) starts as a copy of it and learns to
   correct its inversion: self-reconstruction of real images through the refinement passes, L1 + LPIPS + an ID term
   (``refine_id``, 1 - cos of the ID network, as pSp's inversion loss). Applied to the shipped swapper it took the
   self-swap LPIPS on the held-out people from 0.19 to 0.10 in 400 steps (docs/EXPERIMENTS.md §12).

Phases 1-2 train all M2C and M2M heads, so source and target codes are meaningful before the swap objective
starts. The result is an encoder state dict plus its EMA (``save_warmstart``) that the ``train`` stage starts from.

A run saves its whole state every ``checkpoint_every`` steps (``WarmStart.save``: weights, EMA, optimisers, step, log
window, each rank's RNG states and data position) and the stage resumes it when the params and inputs are the same
(``warmstart_fingerprint``): on CPU a killed and resumed run ends bit for bit where an uninterrupted one does. Under
torchrun the encoder is wrapped in DDP, each rank drawing its own samples and images; rank 0 writes
(docs/paper-scale/warmstart.md).
"""

from __future__ import annotations

import copy
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, fields, replace
from pathlib import Path

import torch
import torch.nn.functional as F

from mfim.models.mfim import MFIM
from mfim.training.checkpoint import atomic_torch_save, rng_state, set_rng_state
from mfim.training.distributed import DistInfo, all_gather_objects, device_and_dist

FORMAT = "mfim-encoder-warmstart"
SKIPPED = "mfim-encoder-warmstart-skipped"


@dataclass(frozen=True)
class WarmStartConfig:
    """params.yaml group ``warmstart``."""

    regression_steps: int
    recon_steps: int
    batch_size: int
    lr: float
    mixing_prob: float  # share of samples drawn with style mixing
    truncation_psi: float
    code_weight: float  # on std-normalised S codes
    image_l1: float  # phase 1: L1(G(predicted codes, predicted maps), sample)
    recon_l1: float  # phase 2 (pSp: l2_lambda 1, lpips_lambda 0.8)
    recon_lpips: float
    ema_decay: float
    log_every: int
    refine_steps: int  # phase 3 (encoder.refine_iterations > 0 only)
    refine_lr: float
    refine_id: float  # ID term of phase 3 (reconstruction L1/LPIPS weights: recon_l1, recon_lpips)
    checkpoint_every: int  # resumable state every N steps (0: none)
    workers: int  # DataLoader workers reading the real images of phases 2-3 (0: the main process)
    bf16: bool  # autocast on CUDA only

    @classmethod
    def from_params(cls, group: dict) -> "WarmStartConfig":
        """From the validated ``warmstart`` group (mfim.params_schema: every key present, none unknown)."""
        cast = {"int": int, "float": float, "bool": bool}
        return cls(**{f.name: cast[f.type](group[f.name]) for f in fields(cls)})

    @property
    def steps(self) -> int:
        return self.regression_steps + self.recon_steps + self.refine_steps


@torch.no_grad()
def style_statistics(model: MFIM, n: int = 2048, batch: int = 256, seed: int = 0) -> dict[int, torch.Tensor]:
    """Per-coordinate std of every S-space entry over the generator's distribution (z ~ N(0, I), no truncation)."""
    G = model.generator
    gen = torch.Generator().manual_seed(seed)
    sums: dict[int, torch.Tensor] = {}
    squares: dict[int, torch.Tensor] = {}
    done = 0
    device = model.average_style(model.generator.style_layers[0].index).device
    while done < n:
        b = min(batch, n - done)
        z = torch.randn(b, G.z_dim, generator=gen).to(device)
        ws = G.mapping(z, truncation_cutoff=G.num_ws, update_w_avg=False)
        for rec, s in zip(G.style_layers, G.styles_from_ws(ws)):
            sums[rec.index] = sums.get(rec.index, 0) + s.sum(0)
            squares[rec.index] = squares.get(rec.index, 0) + s.square().sum(0)
        done += b
    return {i: (squares[i] / n - (sums[i] / n).square()).clamp_min(1e-8).sqrt() for i in sums}


@torch.no_grad()
def sample_generator(model: MFIM, batch: int, mixing_prob: float, truncation_psi: float = 1.0):
    """(images, {S index: code}) from the frozen generator with style mixing and random noise."""
    G = model.generator
    device = model.average_style(G.style_layers[0].index).device
    z = torch.randn(2, batch, G.z_dim, device=device)
    w1 = G.mapping(z[0], truncation_psi=truncation_psi, update_w_avg=False)
    w2 = G.mapping(z[1], truncation_psi=truncation_psi, update_w_avg=False)
    cut = torch.randint(1, G.num_ws, (batch, 1), device=device)
    mix = torch.rand(batch, 1, device=device) < mixing_prob
    cut = torch.where(mix, cut, torch.full_like(cut, G.num_ws))
    layer = torch.arange(G.num_ws, device=device).unsqueeze(0)
    ws = torch.where((layer < cut).unsqueeze(-1), w1.unsqueeze(1), w2.unsqueeze(1))
    styles = G.styles_from_ws(ws)
    images = G.synthesize(styles, noise_mode="random")
    return images, {rec.index: s for rec, s in zip(G.style_layers, styles)}


def regression_loss(model: MFIM, images: torch.Tensor, codes: dict[int, torch.Tensor],
                    std: dict[int, torch.Tensor], image_l1: float = 0.0,
                    code_weight: float = 1.0) -> tuple[torch.Tensor, dict[str, float]]:
    """Mean squared error of the std-normalised S offsets over all entries (+ optional image L1 through G)."""
    out = model.encoder(images, with_maps=image_l1 > 0)
    errs = [((d - (codes[i] - model.average_style(i))) / std[i]).square().mean() for i, d in out.codes.items()]
    code_loss = torch.stack(errs).mean()
    logs = {"code": float(code_loss.detach())}
    total = code_weight * code_loss
    if image_l1 > 0:
        pred = {i: model.average_style(i) + d for i, d in out.codes.items()}
        l1 = F.l1_loss(model.synthesize(pred, out.maps), images)
        logs["image_l1"] = float(l1.detach())
        total = total + image_l1 * l1
    return total, logs


def reconstruction_loss(model: MFIM, x: torch.Tensor, recon, l1_weight: float, lpips_weight: float,
                        refine: bool = False, id_loss=None, id_weight: float = 0.0):
    """Self-swap of real images: L1 + LPIPS (+ ID) against the input (both halves of the code split see the same
    x); ``refine``: through the refinement passes."""
    y = model.reconstruct(x, refine=refine)
    rec = recon(y, x)
    total = l1_weight * rec["l1"] + (lpips_weight * rec["lpips"] if "lpips" in rec else 0.0)
    if id_loss is not None and id_weight > 0:
        rec["id"] = id_loss(y, x)
        total = total + id_weight * rec["id"]
    return total, {k: float(v.detach()) for k, v in rec.items()}


CHECKPOINT_FORMAT = "mfim-warmstart-checkpoint"
# keys of the warmstart group that do not change what is learned: left out of the resume fingerprint
BOOKKEEPING = ("log_every", "checkpoint_every", "workers")


@dataclass
class Checkpointing:
    """Where ``run_warmstart`` saves its resumable state every ``every`` steps (0: never), the fingerprint a saved
    state carries (only a state of the same fingerprint is resumed, see ``warmstart_fingerprint``), and ``extra``:
    more to keep in it (the MLflow run id)."""

    path: Path
    every: int
    fingerprint: str = ""
    extra: Callable[[], dict] = dict


class _PhaseLoss(torch.nn.Module):
    """A phase's loss as a module whose one registered child is the encoder: under DDP (world > 1) the encoder's
    gradients are reduced, while the frozen generator and loss networks stay outside the wrapper (never broadcast)."""

    def __init__(self, encoder: torch.nn.Module, fn: Callable):
        super().__init__()
        self.encoder = encoder
        self.fn = fn

    def forward(self, *args):
        return self.fn(*args)


class WarmStart:
    """The phases' training state (encoder, EMA, optimisers, step, log window) and one step of them; everything a
    resumed run needs besides the RNG and data position is in ``state_dict``."""

    def __init__(self, model: MFIM, cfg: WarmStartConfig, real_batches=None, recon=None, device="cpu",
                 seed: int = 0, id_loss=None, dist: DistInfo | None = None):
        self.model, self.cfg, self.real, self.recon, self.id_loss = model, cfg, real_batches, recon, id_loss
        self.device, self.dist = torch.device(device), dist or DistInfo()
        self.enc = enc = model.encoder
        self.std = style_statistics(model, seed=seed) if cfg.regression_steps > 0 else None
        self.ema = copy.deepcopy(enc).eval().requires_grad_(False)
        if enc.refiner is not None:  # trained in phase 3 only; frozen before, so DDP's phase 1-2 wrapper leaves it out
            enc.refiner.requires_grad_(False)
        base = [p for n, p in enc.named_parameters() if not n.startswith("refiner.")]
        self.opt = torch.optim.Adam(base, lr=cfg.lr, betas=(0.9, 0.999))
        self.opt_refine = None
        self.step = 0
        self.rows: list[dict] = []
        self.window: dict[str, float] = {}
        self.count = 0
        self.autocast = self.device.type == "cuda" and cfg.bf16
        self.loss_fn = self._wrap()

    def phase(self, step: int) -> str:
        if step < self.cfg.regression_steps:
            return "regression"
        return "recon" if step < self.cfg.regression_steps + self.cfg.recon_steps else "refine"

    def _wrap(self):
        module = _PhaseLoss(self.enc, self._loss)
        if self.dist.world <= 1:
            return module
        from torch.nn.parallel import DistributedDataParallel

        ids = [self.device.index] if self.device.type == "cuda" else None
        # unused parameters: phase 1 without image_l1 leaves out the map heads
        return DistributedDataParallel(module, device_ids=ids, find_unused_parameters=True)

    def _enter_refine(self, fresh: bool) -> None:
        """Phase 3: the one-pass encoder frozen, its refiner trained (``fresh``: started as a copy of the encoder
        phases 1-2 trained, no correction yet; a resumed run loads the refiner's state instead)."""
        cfg, enc = self.cfg, self.enc
        if fresh and cfg.regression_steps + cfg.recon_steps > 0:
            enc.init_refiner()
            self.ema.refiner.load_state_dict(enc.refiner.state_dict())
        enc.requires_grad_(False)
        enc.refiner.requires_grad_(True)
        self.opt_refine = torch.optim.Adam(enc.refiner.parameters(), lr=cfg.refine_lr, betas=(0.9, 0.999))
        self.loss_fn = self._wrap()

    def _loss(self, phase: str, *args):
        cfg = self.cfg
        if phase == "regression":
            images, codes = args
            return regression_loss(self.model, images, codes, self.std, cfg.image_l1, cfg.code_weight)
        refining = phase == "refine"
        return reconstruction_loss(self.model, args[0], self.recon, cfg.recon_l1, cfg.recon_lpips, refine=refining,
                                   id_loss=self.id_loss if refining else None, id_weight=cfg.refine_id)

    def _inputs(self, phase: str) -> tuple:
        cfg = self.cfg
        if phase == "regression":
            return sample_generator(self.model, cfg.batch_size, cfg.mixing_prob, cfg.truncation_psi)
        if self.real is None or self.recon is None:
            raise ValueError(f"warmstart.{phase}_steps > 0 needs real training images and a reconstruction loss")
        batch = next(self.real)
        return (torch.cat([batch["src"], batch["tgt"]])[: cfg.batch_size].to(self.device),)

    def train_step(self) -> None:
        phase = self.phase(self.step)
        if phase == "refine" and self.opt_refine is None:
            self._enter_refine(fresh=True)
        if phase == "refine":
            self.model.eval()  # the frozen encoder's batch-norm statistics stay as they are
            self.enc.refiner.train()
        else:
            self.model.train()
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.autocast):
            loss, logs = self.loss_fn(phase, *self._inputs(phase))
        self._check_finite(loss, phase)
        optimizer = self.opt_refine if phase == "refine" else self.opt
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            for p_ema, p in zip(self.ema.parameters(), self.enc.parameters()):
                p_ema.lerp_(p.detach(), 1.0 - self.cfg.ema_decay)
            for b_ema, b in zip(self.ema.buffers(), self.enc.buffers()):
                b_ema.copy_(b)
        for k, v in {"loss": float(loss.detach()), **logs}.items():
            self.window[f"{phase}_{k}"] = self.window.get(f"{phase}_{k}", 0.0) + v
        self.count += 1
        self.step += 1

    def _check_finite(self, loss: torch.Tensor, phase: str) -> None:
        finite = torch.isfinite(loss.detach()).float()
        if self.dist.world > 1:  # every rank stops together, none waits in the next all-reduce
            torch.distributed.all_reduce(finite, op=torch.distributed.ReduceOp.MIN)
        if not bool(finite):
            raise RuntimeError(f"warmstart: loss became {float(loss)} at step {self.step} ({phase}) on some rank; "
                               "lower warmstart.lr")

    def log_due(self) -> bool:
        c = self.cfg
        return self.step % c.log_every == 0 or self.step in (c.regression_steps, c.regression_steps + c.recon_steps,
                                                             c.steps)

    def take_row(self, seconds: float) -> dict:
        """The log window's averages (over ranks too), appended to ``rows``; the window starts again."""
        keys = sorted(self.window)
        values = [self.window[k] / self.count for k in keys]
        if self.dist.world > 1:
            t = torch.tensor(values, dtype=torch.float64, device=self.device)
            torch.distributed.all_reduce(t)
            values = (t / self.dist.world).tolist()
        row = {"step": self.step, "seconds": round(seconds, 2), **dict(zip(keys, values))}
        self.rows.append(row)
        self.window, self.count = {}, 0
        return row

    def state_dict(self) -> dict:
        return {"format": CHECKPOINT_FORMAT, "step": self.step, "encoder": self.enc.state_dict(),
                "encoder_ema": self.ema.state_dict(), "opt": self.opt.state_dict(),
                "opt_refine": None if self.opt_refine is None else self.opt_refine.state_dict(),
                "rows": self.rows, "window": self.window, "count": self.count}

    def load_state_dict(self, state: dict) -> None:
        if state.get("format") != CHECKPOINT_FORMAT:
            raise ValueError("not a warm-start checkpoint")
        self.enc.load_state_dict(state["encoder"])
        self.ema.load_state_dict(state["encoder_ema"])
        self.opt.load_state_dict(state["opt"])
        if state["opt_refine"] is not None:
            self._enter_refine(fresh=False)
            self.opt_refine.load_state_dict(state["opt_refine"])
        self.step = int(state["step"])
        self.rows, self.window, self.count = list(state["rows"]), dict(state["window"]), int(state["count"])

    def save(self, checkpoint: Checkpointing) -> None:
        """Rank 0 writes the state with every rank's RNG states and data position (all ranks must call this)."""
        own = {"rng": rng_state(), "position": self.real.state_dict() if hasattr(self.real, "state_dict") else None}
        ranks = all_gather_objects(own, self.dist)
        if self.dist.is_main:
            state = {**self.state_dict(), "ranks": ranks, "fingerprint": checkpoint.fingerprint,
                     "extra": checkpoint.extra()}
            atomic_torch_save(state, checkpoint.path)


def resume_position(state: dict | None, rank: int = 0):
    """The data position rank ``rank`` had when ``state`` (a warm-start checkpoint) was saved, or None."""
    return None if state is None else state["ranks"][rank]["position"]


def run_warmstart(model: MFIM, cfg: WarmStartConfig, real_batches=None, recon=None, device="cpu", seed: int = 0,
                  on_log=None, progress: bool = True, id_loss=None, checkpoint: Checkpointing | None = None,
                  resume: dict | None = None, dist: DistInfo | None = None) -> tuple[dict, dict, list[dict]]:
    """The phases on ``model.encoder`` in place (phase 3 only if it has a refiner; ``id_loss`` is its ID term).
    ``checkpoint``: save a resumable state every ``checkpoint.every`` steps; ``resume``: such a state to continue
    from (``real_batches`` must then start at its ``resume_position``). Under torchrun (``dist.world`` > 1) the
    encoder is wrapped in DDP and each rank draws its own generator samples (seed + rank).
    Returns (encoder state, EMA encoder state, log rows)."""
    dist = dist or DistInfo()
    torch.manual_seed(seed + dist.rank)
    if model.encoder.refiner is None and cfg.refine_steps > 0:
        print("warmstart: encoder.refine_iterations is 0, so the refine phase has nothing to train; skipped")
        cfg = replace(cfg, refine_steps=0)
    loop = WarmStart(model, cfg, real_batches, recon, device, seed, id_loss, dist)
    if resume is not None:
        loop.load_state_dict(resume)
        set_rng_state(resume["ranks"][dist.rank]["rng"])
    bar = None
    if progress and dist.is_main:
        from tqdm import tqdm

        bar = tqdm(total=cfg.steps, initial=loop.step, desc="warmstart", unit="step", dynamic_ncols=True)
    t0 = time.perf_counter()
    while loop.step < cfg.steps:
        loop.train_step()
        if bar is not None:
            bar.update(1)
        if loop.log_due():
            row = loop.take_row(time.perf_counter() - t0)
            if on_log is not None and dist.is_main:
                on_log(loop.step, row)
        if checkpoint is not None and checkpoint.every > 0 and loop.step % checkpoint.every == 0 \
                and loop.step < cfg.steps:
            loop.save(checkpoint)
    if bar is not None:
        bar.close()
    model.eval()
    return loop.enc.state_dict(), loop.ema.state_dict(), loop.rows


def save_warmstart(path: str | Path, encoder_state: dict, ema_state: dict, meta: dict) -> Path:
    from mfim.training.checkpoint import atomic_torch_save

    return atomic_torch_save({"format": FORMAT, "encoder": encoder_state, "encoder_ema": ema_state,
                              "meta": meta}, path)


def load_encoder_init(path: str | Path) -> tuple[dict, dict, dict | None]:
    """(encoder state, EMA state, discriminator state or None) to start MFIM training from: a warm-start file or a
    shipped swapper (it holds the EMA encoder only, and may carry the D it was trained against)."""
    from mfim.models.mfim import SWAPPER_FORMAT

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"train.init_checkpoint: {path} not found")
    state = torch.load(path, map_location="cpu", weights_only=True)
    fmt = state.get("format") if isinstance(state, dict) else None
    d_state = state.get("discriminator") if fmt is not None else None
    d_state = d_state if isinstance(d_state, dict) else None
    if fmt == FORMAT:
        return state["encoder"], state["encoder_ema"], d_state
    if fmt == SKIPPED:
        raise ValueError(f"{path}: the warmstart stage was skipped ({state.get('why')}); run it with "
                         "train.init_checkpoint pointing at its output")
    if fmt == SWAPPER_FORMAT:
        return state["encoder"], state["encoder"], d_state
    raise ValueError(f"{path}: neither an encoder warm start ({FORMAT!r}) nor an MFIM swapper ({SWAPPER_FORMAT!r})")


# the params groups (and keys) a warm start's result depends on: what a resumable checkpoint must match
FINGERPRINT_PARAMS = ["warmstart", "encoder", "data", "generator", "loss.lpips_net", "train.augment", "project.seed",
                      "project.device"]


def warmstart_fingerprint(params: dict, inputs: list[Path], world: int = 1) -> str:
    """Params the result depends on (bookkeeping keys left out), the torchrun world size (it splits the data and
    the samples), and the contents of the input files (generator, shard index, backbone weights)."""
    import hashlib
    import json

    from mfim.assets import sha256_file
    from mfim.config import lookup

    scoped = {name: lookup(params, name) for name in FINGERPRINT_PARAMS}
    scoped["warmstart"] = {k: v for k, v in (scoped["warmstart"] or {}).items() if k not in BOOKKEEPING}
    scoped["world"] = int(world)
    scoped["inputs"] = {str(p): sha256_file(p) for p in inputs if Path(p).is_file()}
    return hashlib.sha256(json.dumps(scoped, sort_keys=True, default=str).encode()).hexdigest()[:16]


def load_warmstart_checkpoint(path: Path, fingerprint: str, steps: int) -> dict | None:
    """The resumable state at ``path`` when it was made with this fingerprint, else None (and why, printed)."""
    from mfim.training.checkpoint import load_resumable

    state = load_resumable(path, map_location="cpu")
    if state is None:
        return None
    if state.get("format") != CHECKPOINT_FORMAT or state.get("fingerprint") != fingerprint:
        print(f"warmstart: {path} was made with other params or inputs; starting over")
        return None
    print(f"warmstart: resuming from {path} at step {int(state['step'])} of {steps}")
    return state


def _skip_stage(why: str, out_path, reports_dir) -> dict:
    import json

    if int(os.environ.get("RANK", "0")) == 0:
        atomic_torch_save({"format": SKIPPED, "why": why}, out_path)
        Path(reports_dir).mkdir(parents=True, exist_ok=True)
        (Path(reports_dir) / "warmstart.json").write_text(json.dumps({"steps": 0, "skipped": why}, indent=2) + "\n")
        print(f"warmstart: skipped ({why})")
    return {"steps": 0, "skipped": why}


def _losses(params: dict, cfg: WarmStartConfig, model: MFIM, device):
    """(reconstruction loss, ID loss) of phases 2-3, None where no phase needs one."""
    from mfim.config import lookup
    from mfim.criteria.recon_loss import ReconLoss

    recon, id_loss = None, None
    if cfg.refine_steps > 0 and cfg.refine_id > 0 and model.encoder.refiner is not None:
        from mfim.criteria.id_loss import IDLoss
        from mfim.training.build import build_identity_embedder

        id_loss = IDLoss(build_identity_embedder(params, device))
    if cfg.recon_steps > 0 or cfg.refine_steps > 0:
        from mfim.nets.perceptual import load_lpips

        lp = None
        if cfg.recon_lpips > 0:
            lp = load_lpips(lookup(params, "loss.lpips_net")).to(device).eval().requires_grad_(False)
        recon = ReconLoss(lp)
    return recon, id_loss


def run_warmstart_stage(params: dict, out_path="data/warmstart/encoder.pt", reports_dir="reports",
                        shards_dir="data/shards") -> dict:
    """The ``warmstart`` DVC stage: build the model as ``train`` will, run the phases (resuming from
    ``<out dir>/checkpoint.pt`` when it was made with the same params and inputs), save, report, track.
    Under torchrun every rank trains (DDP); rank 0 writes."""
    from contextlib import nullcontext

    from mfim.config import lookup
    from mfim.data.pairs import pair_batches
    from mfim.data.shards import split_pattern
    from mfim.runtime import release_free_memory
    from mfim.tracking import start_run
    from mfim.training.build import build_model, generator_path, load_frozen_generator
    from mfim.training.checkpoint import remove_stale_parts

    cfg = WarmStartConfig.from_params(params["warmstart"])
    init = str(lookup(params, "train.init_checkpoint"))
    if Path(init) != Path(out_path):
        # train starts elsewhere (a shipped swapper, or from scratch): nothing here would be used
        why = f"train.init_checkpoint is {init!r}, not this stage's output" if init else "train.init_checkpoint is empty"
        return _skip_stage(why, out_path, reports_dir)
    device, dist = device_and_dist(params)
    seed = int(lookup(params, "project.seed"))
    ck_path = Path(out_path).parent / "checkpoint.pt"
    backbone = lookup(params, "encoder.backbone_checkpoint") or ""
    fingerprint = warmstart_fingerprint(
        params, [generator_path(params), Path(shards_dir) / "index.json"] + ([Path(backbone)] if backbone else []),
        dist.world)
    if dist.is_main:  # leftovers of writes killed in earlier runs
        remove_stale_parts(ck_path, Path(out_path))
    resume = load_warmstart_checkpoint(ck_path, fingerprint, cfg.steps)
    torch.manual_seed(seed)
    G = load_frozen_generator(params, device)
    # maps on regardless of train.config: configuration A simply drops the M2M heads when it loads this file
    p = {**params, "encoder": {**params["encoder"], "style_maps": True}}
    model = build_model(p, G).to(device)
    recon, id_loss = _losses(params, cfg, model, device)
    # the loading copies of the networks are freed now; under GLIBC_TUNABLES glibc would keep them resident for good
    release_free_memory()
    real = None
    if recon is not None:
        # workers start in a fresh process (mfim.data.shards), so they hold none of the models built above
        real = pair_batches(split_pattern(shards_dir, "train"), None, (cfg.batch_size + 1) // 2, seed + 7,
                            rank=dist.rank, world=dist.world, same_identity_fraction=0.0,
                            augment=bool(lookup(params, "train.augment")), workers=cfg.workers,
                            position=resume_position(resume, dist.rank),
                            resolution=int(lookup(params, "data.resolution")))
    extra = dict((resume or {}).get("extra") or {})
    earlier = float(extra.get("seconds", 0.0))  # time the interrupted runs spent
    ctx = start_run("warmstart", params, groups=["warmstart", "encoder", "generator", "project"],
                    run_name=f"warmstart {cfg.steps} steps seed {seed}" + (" (resumed)" if resume else ""),
                    resumed_from=extra.get("mlflow_run_id")) if dist.is_main else nullcontext()
    t0 = time.perf_counter()
    with ctx as active:
        run_id = active.info.run_id if dist.is_main else None
        checkpoint = Checkpointing(ck_path, cfg.checkpoint_every, fingerprint, lambda: {
            "mlflow_run_id": run_id, "seconds": earlier + time.perf_counter() - t0})

        def on_log(step: int, row: dict) -> None:
            import mlflow

            mlflow.log_metrics({k: float(v) for k, v in row.items() if k != "step"}, step=step)

        state, ema_state, rows = run_warmstart(model, cfg, real, recon, device=device, seed=seed, id_loss=id_loss,
                                               on_log=on_log, checkpoint=checkpoint, resume=resume, dist=dist)
        seconds = earlier + time.perf_counter() - t0
        summary = {"steps": cfg.steps, "seconds": round(seconds, 1)}
        if dist.is_main:
            summary = _finish(out_path, reports_dir, state, ema_state, rows, summary, dist.world)
            ck_path.unlink(missing_ok=True)  # a finished run's state is never resumed
    if dist.world > 1:
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    return summary


def _finish(out_path, reports_dir, state: dict, ema_state: dict, rows: list[dict], summary: dict, world: int) -> dict:
    """Rank 0: the output file, reports/warmstart.json (the last logged value of every loss) and MLflow's total."""
    import json

    import mlflow

    out = save_warmstart(out_path, state, ema_state, {**summary, "world_size": world})
    last = {}
    for row in rows:
        last.update({k: v for k, v in row.items() if k not in ("step", "seconds")})
    summary = {**summary, **{k: round(v, 5) for k, v in last.items()}}
    Path(reports_dir).mkdir(parents=True, exist_ok=True)
    (Path(reports_dir) / "warmstart.json").write_text(json.dumps(summary, indent=2) + "\n")
    mlflow.log_metric("warmstart_seconds", summary["seconds"])
    print(f"warmstart: {summary['steps']} steps in {summary['seconds']:.0f} s -> {out}")
    return summary
