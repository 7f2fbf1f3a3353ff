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
"""

from __future__ import annotations

import time
from dataclasses import dataclass, fields, replace
from pathlib import Path

import torch
import torch.nn.functional as F

from mfim.models.mfim import MFIM

FORMAT = "mfim-encoder-warmstart"
SKIPPED = "mfim-encoder-warmstart-skipped"


@dataclass(frozen=True)
class WarmStartConfig:
    """params.yaml group ``warmstart``."""

    regression_steps: int = 400
    recon_steps: int = 200
    batch_size: int = 16
    lr: float = 1e-3
    mixing_prob: float = 0.9  # share of samples drawn with style mixing
    truncation_psi: float = 1.0
    code_weight: float = 1.0  # on std-normalised S codes
    image_l1: float = 1.0  # phase 1: L1(G(predicted codes, predicted maps), sample)
    recon_l1: float = 1.0  # phase 2 (pSp: l2_lambda 1, lpips_lambda 0.8)
    recon_lpips: float = 0.8
    ema_decay: float = 0.99
    log_every: int = 20
    refine_steps: int = 0  # phase 3 (encoder.refine_iterations > 0 only)
    refine_lr: float = 3e-4
    refine_id: float = 2.0  # ID term of phase 3 (reconstruction L1/LPIPS weights: recon_l1, recon_lpips)

    @classmethod
    def from_params(cls, group: dict | None) -> "WarmStartConfig":
        group = dict(group or {})
        known = {f.name: f.type for f in fields(cls)}
        unknown = sorted(set(group) - set(known))
        if unknown:
            raise KeyError(f"warmstart: unknown params {unknown}")
        cast = {"int": int, "float": float}
        return cls(**{k: cast[known[k]](v) for k, v in group.items()})

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


def run_warmstart(model: MFIM, cfg: WarmStartConfig, real_batches=None, recon=None, device="cpu", seed: int = 0,
                  on_log=None, progress: bool = True, id_loss=None) -> tuple[dict, dict, list[dict]]:
    """The phases on ``model.encoder`` in place (phase 3 only if it has a refiner; ``id_loss`` is its ID term).
    Returns (encoder state, EMA encoder state, log rows)."""
    import copy

    torch.manual_seed(seed)
    enc = model.encoder
    if enc.refiner is None and cfg.refine_steps > 0:
        print("warmstart: encoder.refine_iterations is 0, so the refine phase has nothing to train; skipped")
        cfg = replace(cfg, refine_steps=0)
    std = style_statistics(model, seed=seed) if cfg.regression_steps > 0 else None
    ema = copy.deepcopy(enc).eval().requires_grad_(False)
    base = [p for n, p in enc.named_parameters() if not n.startswith("refiner.")]
    opt = torch.optim.Adam(base, lr=cfg.lr, betas=(0.9, 0.999))
    opt_refine = None
    model.train()
    rows: list[dict] = []
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=cfg.steps, desc="warmstart", unit="step", dynamic_ncols=True)
    window: dict[str, float] = {}
    count, t0 = 0, time.perf_counter()
    for step in range(cfg.steps):
        if step < cfg.regression_steps:
            phase = "regression"
            images, codes = sample_generator(model, cfg.batch_size, cfg.mixing_prob, cfg.truncation_psi)
            loss, logs = regression_loss(model, images, codes, std, cfg.image_l1, cfg.code_weight)
        else:
            phase = "recon" if step < cfg.regression_steps + cfg.recon_steps else "refine"
            if real_batches is None or recon is None:
                raise ValueError(f"warmstart.{phase}_steps > 0 needs real training images and a reconstruction loss")
            if phase == "refine" and opt_refine is None:  # phase 3 starts: freeze the one-pass encoder
                if cfg.regression_steps + cfg.recon_steps > 0:
                    enc.init_refiner()  # a copy of the encoder phases 1-2 trained, no correction yet
                    ema.refiner.load_state_dict(enc.refiner.state_dict())
                enc.requires_grad_(False)
                enc.refiner.requires_grad_(True)
                opt_refine = torch.optim.Adam(enc.refiner.parameters(), lr=cfg.refine_lr, betas=(0.9, 0.999))
                model.eval()  # the frozen encoder's batch-norm statistics stay as they are
                enc.refiner.train()
            batch = next(real_batches)
            x = torch.cat([batch["src"], batch["tgt"]])[: cfg.batch_size].to(device)
            refining = phase == "refine"
            loss, logs = reconstruction_loss(model, x, recon, cfg.recon_l1, cfg.recon_lpips, refine=refining,
                                             id_loss=id_loss if refining else None, id_weight=cfg.refine_id)
        if not torch.isfinite(loss):
            raise RuntimeError(f"warmstart: loss became {float(loss)} at step {step} ({phase}); lower warmstart.lr")
        optimizer = opt_refine if phase == "refine" else opt
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            for p_ema, p in zip(ema.parameters(), enc.parameters()):
                p_ema.lerp_(p.detach(), 1.0 - cfg.ema_decay)
            for b_ema, b in zip(ema.buffers(), enc.buffers()):
                b_ema.copy_(b)
        for k, v in {"loss": float(loss.detach()), **logs}.items():
            window[f"{phase}_{k}"] = window.get(f"{phase}_{k}", 0.0) + v
        count += 1
        if bar is not None:
            bar.update(1)
        if (step + 1) % cfg.log_every == 0 or step + 1 in (cfg.regression_steps, cfg.regression_steps
                                                           + cfg.recon_steps, cfg.steps):
            row = {"step": step + 1, "seconds": round(time.perf_counter() - t0, 2),
                   **{k: v / count for k, v in window.items()}}
            rows.append(row)
            if on_log is not None:
                on_log(step + 1, row)
            window, count = {}, 0
    if bar is not None:
        bar.close()
    model.eval()
    return enc.state_dict(), ema.state_dict(), rows


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


def run_warmstart_stage(params: dict, out_path="data/warmstart/encoder.pt", reports_dir="reports",
                        shards_dir="data/shards") -> dict:
    """The ``warmstart`` DVC stage: build the model as ``train`` will, run both phases, save, report, track."""
    import json

    from mfim.config import lookup
    from mfim.criteria.recon_loss import ReconLoss
    from mfim.data.pairs import pair_batches
    from mfim.data.shards import split_pattern
    from mfim.runtime import configure_threads, pick_device
    from mfim.tracking import start_run
    from mfim.training.build import build_model, load_frozen_generator

    cfg = WarmStartConfig.from_params(params.get("warmstart"))
    init = str(lookup(params, "train.init_checkpoint", "") or "")
    if Path(init) != Path(out_path):
        # train starts elsewhere (a shipped swapper, or from scratch): nothing here would be used
        why = f"train.init_checkpoint is {init!r}, not this stage's output" if init else "train.init_checkpoint is empty"
        from mfim.training.checkpoint import atomic_torch_save

        atomic_torch_save({"format": SKIPPED, "why": why}, out_path)
        Path(reports_dir).mkdir(parents=True, exist_ok=True)
        (Path(reports_dir) / "warmstart.json").write_text(json.dumps({"steps": 0, "skipped": why}, indent=2) + "\n")
        print(f"warmstart: skipped ({why})")
        return {"steps": 0, "skipped": why}
    device = pick_device(lookup(params, "project.device", "auto"))
    configure_threads(lookup(params, "project.threads", 0))
    seed = int(lookup(params, "project.seed", 0))
    torch.manual_seed(seed)
    G = load_frozen_generator(params, device)
    # maps on regardless of train.config: configuration A simply drops the M2M heads when it loads this file
    p = {**params, "encoder": {**params.get("encoder", {}), "style_maps": True}}
    model = build_model(p, G).to(device)
    resolution = int(lookup(params, "data.resolution", G.resolution))
    real, recon, id_loss = None, None, None
    if cfg.refine_steps > 0 and cfg.refine_id > 0 and model.encoder.refiner is not None:
        from mfim.criteria.id_loss import IDLoss
        from mfim.training.build import build_identity_embedder

        id_loss = IDLoss(build_identity_embedder(params, device))
    if cfg.recon_steps > 0 or cfg.refine_steps > 0:
        from mfim.nets.perceptual import load_lpips

        lp = None
        if cfg.recon_lpips > 0:
            lp = load_lpips(lookup(params, "loss.lpips_net", "alex")).to(device).eval().requires_grad_(False)
        recon = ReconLoss(lp)
        real = iter(pair_batches(split_pattern(shards_dir, "train"), None, (cfg.batch_size + 1) // 2, seed + 7,
                                 same_identity_fraction=0.0, augment=bool(lookup(params, "train.augment", True)),
                                 resolution=resolution))
    with start_run("warmstart", params, groups=["warmstart", "encoder", "generator", "project"],
                   run_name=f"warmstart {cfg.steps} steps seed {seed}"):
        import mlflow

        t0 = time.perf_counter()
        state, ema_state, rows = run_warmstart(
            model, cfg, real, recon, device=device, seed=seed, id_loss=id_loss,
            on_log=lambda step, row: mlflow.log_metrics(
                {k: float(v) for k, v in row.items() if k != "step"}, step=step),
        )
        seconds = time.perf_counter() - t0
        out = save_warmstart(out_path, state, ema_state, {"steps": cfg.steps, "seconds": seconds})
        last = {}
        for row in rows:
            last.update({k: v for k, v in row.items() if k not in ("step", "seconds")})
        summary = {"steps": cfg.steps, "seconds": round(seconds, 1), **{k: round(v, 5) for k, v in last.items()}}
        Path(reports_dir).mkdir(parents=True, exist_ok=True)
        (Path(reports_dir) / "warmstart.json").write_text(json.dumps(summary, indent=2) + "\n")
        mlflow.log_metric("warmstart_seconds", seconds)
    print(f"warmstart: {cfg.steps} steps in {seconds:.0f} s -> {out}")
    return summary

