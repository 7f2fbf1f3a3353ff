"""The kinds of phase a schedule runs, each by the stages' own functions, in the phase's own folder (its working
directory while it runs, so the stages' relative paths -- data/shards, data/threedmm/..., reports/ -- are the
phase's). A phase returns its output file, a summary and its curve; mfim.ship.runner records them.

Resuming inside a phase is the stage's own: warmstart and train continue from their checkpoint.pt; the data stages
keep their done markers (mfim.ship.runner.prepare_dataset); regressor renders are cached per identity range; a
pretrain_generator run or a regressor fit killed midway starts that fit again (they have no checkpoints).
"""

from __future__ import annotations

import contextlib
import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from mfim.config import lookup


@dataclass
class PhaseContext:
    params: dict          # the phase's params (params.yaml + schedule overrides, repository paths absolute)
    folder: Path          # the phase's folder, its working directory while it runs
    input: Path | None    # the output of the phase it continues (None: from nothing)
    data: object          # the phase's `data` entry (a data set name, or a render list for regressor phases)
    dataset_dir: Path | None  # the prepared data set's folder (stage phases)
    renders_dir: Path     # the cache of rendered identity ranges (regressor phases)


@dataclass
class PhaseResult:
    output: Path
    summary: dict
    curve: list


def link_dataset(ctx: PhaseContext) -> None:
    """The phase folder's data/shards and data/threedmm are the prepared data set's (links, not copies)."""
    (ctx.folder / "data").mkdir(parents=True, exist_ok=True)
    for name in ("shards", "threedmm"):
        link = ctx.folder / "data" / name
        if not link.exists():
            link.symlink_to((ctx.dataset_dir / "data" / name).resolve(), target_is_directory=True)


def _write_params(ctx: PhaseContext) -> None:
    (ctx.folder / "params.yaml").write_text(yaml.safe_dump(ctx.params, sort_keys=False))


def _stage_once(ctx: PhaseContext, name: str, run):
    """``run()`` unless it finished before under the same params: a kill between a stage's end and the phase's done
    marker would otherwise retrain it (train and warmstart start over once their run is finished). Returns run()'s
    value, or the one it returned then."""
    from mfim.ship.schedule import digest

    marker = ctx.folder / f".{name}.finished.json"
    key = digest(ctx.params)
    if marker.is_file():
        done = json.loads(marker.read_text())
        if done.get("params") == key:
            return done["returned"]
    returned = run()
    marker.write_text(json.dumps({"params": key, "returned": returned}, default=str))
    return returned


def _csv_rows(path: Path) -> list:
    return path.read_text().splitlines() if path.is_file() else []


def run_pretrain_generator(ctx: PhaseContext) -> PhaseResult:
    """The `pretrain_generator` stage (training: the schedule sets pretrain_generator.shipped_checkpoint "")."""
    import pipelines.pretrain_generator as stage

    source = [k for k in ("generator.checkpoint", "pretrain_generator.shipped_checkpoint") if lookup(ctx.params, k)]
    if source:  # the stage would import that file instead of training
        raise ValueError(f"phase {ctx.folder.name}: pretrain_generator trains only with {' and '.join(source)} "
                         "set to \"\" in the schedule")
    link_dataset(ctx)
    _write_params(ctx)
    with contextlib.chdir(ctx.folder):
        summary = _stage_once(ctx, "pretrain_generator", lambda: stage.main("params.yaml"))
    return PhaseResult(ctx.folder / stage.OUT, summary, [])


def run_warmstart(ctx: PhaseContext) -> PhaseResult:
    """The `warmstart` stage: its output is data/warmstart/encoder.pt, which `train` starts from."""
    from mfim.training.warmstart import run_warmstart_stage

    link_dataset(ctx)
    out = "data/warmstart/encoder.pt"
    ctx.params.setdefault("train", {})["init_checkpoint"] = out  # what makes the stage run instead of skip
    _write_params(ctx)
    with contextlib.chdir(ctx.folder):
        summary = _stage_once(ctx, "warmstart", lambda: run_warmstart_stage(ctx.params, out_path=out))
    return PhaseResult(ctx.folder / out, summary, [])


def run_train(ctx: PhaseContext) -> PhaseResult:
    """The `train` stage from the previous phase's file; the output is its swapper plus the discriminator it
    trained against (train.keep_checkpoint keeps it), so the next phase continues against the same D."""
    from mfim.atomic import atomic_torch_save
    from mfim.training.run import run_training

    link_dataset(ctx)
    tr = ctx.params.setdefault("train", {})
    tr["init_checkpoint"] = str(ctx.input) if ctx.input else ""
    tr["keep_checkpoint"] = True
    _write_params(ctx)
    with contextlib.chdir(ctx.folder):
        summary = _stage_once(ctx, "train", lambda: run_training(ctx.params))
    swapper = torch.load(ctx.folder / "data/train/mfim.pt", map_location="cpu", weights_only=True)
    state = torch.load(ctx.folder / "data/train/checkpoint.pt", map_location="cpu", weights_only=True)
    swapper["discriminator"] = state["discriminator"]
    out = atomic_torch_save(swapper, ctx.folder / "swapper.pt")
    report = json.loads((ctx.folder / "reports/train.json").read_text())
    return PhaseResult(out, {**report, "returned": summary}, _csv_rows(ctx.folder / "reports/plots/train_loss.csv"))


def run_refine(ctx: PhaseContext) -> PhaseResult:
    """The `warmstart` stage's refine phase (phase 3) on the previous phase's swapper: its encoder frozen, a refiner
    started as a copy of it learns warmstart.refine_steps steps of self-reconstruction (L1 + LPIPS + refine_id x
    ID); the generator and discriminator are kept."""
    from dataclasses import replace

    from mfim.criteria.id_loss import IDLoss
    from mfim.criteria.recon_loss import ReconLoss
    from mfim.data.pairs import pair_batches
    from mfim.data.shards import split_pattern
    from mfim.models.encoder import FacialAttributeEncoder
    from mfim.models.mfim import load_swapper, save_swapper
    from mfim.nets.perceptual import load_lpips
    from mfim.runtime import configure_threads, pick_device
    from mfim.training.build import build_identity_embedder
    from mfim.training.warmstart import WarmStartConfig, run_warmstart

    link_dataset(ctx)
    _write_params(ctx)
    params = ctx.params
    configure_threads(lookup(params, "project.threads"))
    device = pick_device(str(lookup(params, "project.device")))
    seed = int(lookup(params, "project.seed"))
    cfg = replace(WarmStartConfig.from_params(params["warmstart"]), regression_steps=0, recon_steps=0)
    model, _ = load_swapper(ctx.input)
    G = model.generator
    if model.encoder.refiner is None:
        res = lookup(params, "encoder.refine_map_resolutions")
        enc = FacialAttributeEncoder(replace(model.encoder.cfg,
                                             refine_iterations=max(1, int(lookup(params, "encoder.refine_iterations"))),
                                             refine_map_resolutions=None if res is None else tuple(res)),
                                     G.style_layers, G.noise_layers)
        if not enc.load_state_starting_refiner(model.encoder.state_dict()):
            raise ValueError(f"{ctx.input}: its encoder does not load into the refiner's encoder")
        model.encoder = enc
    model = model.to(device)
    lp = load_lpips(lookup(params, "loss.lpips_net")).to(device).eval().requires_grad_(False)
    with contextlib.chdir(ctx.folder):
        real = iter(pair_batches(split_pattern("data/shards", "train"), None, (cfg.batch_size + 1) // 2, seed + 7,
                                 same_identity_fraction=0.0, augment=bool(lookup(params, "train.augment")),
                                 resolution=G.resolution))
        t0 = time.perf_counter()
        _, ema_state, rows = run_warmstart(model, cfg, real, ReconLoss(lp), device=device, seed=seed,
                                           id_loss=IDLoss(build_identity_embedder(params, device)))
    seconds = time.perf_counter() - t0
    source = torch.load(ctx.input, map_location="cpu", weights_only=True)
    extra = {"discriminator": source["discriminator"]} if "discriminator" in source else None
    out = ctx.folder / "refined.pt"
    save_swapper(model.cpu(), out, encoder_state=ema_state, meta={"refine_steps": cfg.refine_steps}, extra=extra)
    return PhaseResult(out, {"steps": cfg.refine_steps, "seconds": round(seconds, 1)}, rows)


KINDS = {
    "pretrain_generator": run_pretrain_generator,
    "warmstart": run_warmstart,
    "train": run_train,
    "refine": run_refine,
}
