"""The `train` stage: build everything from params.yaml, train (resuming when possible), export, report.

The stage command ``python -m mfim.launch pipelines/train.py`` runs one process per GPU (torchrun; train.gpus) or
one process on CPU; each rank reads a disjoint part of every epoch and DistributedDataParallel averages gradients.
``train.batch_size`` is the global batch of a micro-step (every process together loads it; each its 1/world share),
so a run means the same with any process count; ``train.steps`` is counted at ``train.schedule_batch`` samples a step
(null: at the global batch) and becomes the same number of samples at this run's global batch.

Outputs: data/train/checkpoint.pt (resumable state while the run is under way, only resumed when the params it was
made with are the current ones; not a DVC output, and deleted once the run finished unless train.keep_checkpoint),
data/train/mfim.pt (the EMA encoder + generator for inference), reports/train.json (final losses, img/s, peak
memory), reports/plots/train_loss.csv (DVC plots), and an MLflow run with params, per-step metrics, loss shares,
sample grids and a reference to the exported model (path + sha256 tags, not a copy).
"""

from __future__ import annotations

import hashlib
import json
import os
import resource
import time
from pathlib import Path

import pandas as pd
import torch

from mfim.config import lookup
from mfim.training.presets import apply_preset
from mfim.training.speed import SPEED_KEYS

TRAIN_GROUPS = ["data", "generator", "nets", "encoder", "loss", "train"]
# do not change what is learned
BOOKKEEPING = {"log_every", "sample_every", "sample_pairs", "checkpoint_every", "workers", "keep_checkpoint",
               "sample_max_px", "gpus"} | SPEED_KEYS  # gpus: the global batch is a param, so a resume may change the count


def per_process(tr: dict, key: str, world: int) -> int:
    """Each process's share of a global per-batch count (``train.batch_size``, ``train.gt_swap_pairs``)."""
    total = int(tr[key])
    if total % world:
        raise ValueError(f"train.{key} {total} is global (all processes together) and does not split over {world} "
                         f"processes: make it a multiple of {world}, or set train.gpus")
    return total // world


def scheduled_steps(tr: dict) -> int:
    """``train.steps`` counted at ``train.schedule_batch`` samples a step, as steps of this run's global batch
    (batch_size x grad_accum): the same number of samples, rounded up. schedule_batch null: steps as given."""
    steps = int(tr["steps"])
    at = tr["schedule_batch"]
    if not at:
        return steps
    step_batch = int(tr["batch_size"]) * int(tr["grad_accum"])
    return -(-steps * int(at) // step_batch)


def position_for_world(position: dict | None, saved_world: int, world: int, samples: int) -> dict | None:
    """Rank 0's data position saved by a run of ``saved_world`` processes, for a run of ``world``.

    Rank r of W reads positions r, r + W, r + 2W, ... of each epoch's permutation (mfim.data.shards.EpochPlan), so
    when every rank is at ``offset`` the run has read the permutation's first W x offset samples. The new run
    continues after the same ones: offset' = W x offset / W' (exact when the global batch splits over both counts;
    rounded down otherwise), and an epoch's tail that W' ranks no longer split evenly starts the next epoch.
    """
    if position is None or saved_world == world:
        return position
    epoch, offset = int(position["epoch"]), int(position["offset"]) * saved_world // world
    if offset >= samples // world:
        epoch, offset = epoch + 1, 0
    return {"epoch": epoch, "offset": offset}


def train_seed(params: dict) -> int:
    """The seed of the `train` stage: train.seed, or project.seed when it is unset (null). A seed of the train
    stage alone lets `dvc exp run -S train.seed=1` repeat a configuration without re-running the upstream stages
    that depend on project.seed (regressor fit, warm start)."""
    value = lookup(params, "train.seed")
    return int(lookup(params, "project.seed") if value is None else value)


def params_fingerprint(params: dict, inputs: list[Path] = ()) -> str:
    """What a resumable checkpoint must match: the training params (without bookkeeping), the seed, and the
    contents of the input files (generator, 3DMM regressor, shard index)."""
    from mfim.assets import sha256_file

    scoped = {g: params[g] for g in TRAIN_GROUPS}
    scoped["train"] = {k: v for k, v in scoped["train"].items() if k not in BOOKKEEPING}
    scoped["seed"] = train_seed(params)
    scoped["inputs"] = {str(p): sha256_file(p) for p in inputs if Path(p).is_file()}
    return hashlib.sha256(json.dumps(scoped, sort_keys=True, default=str).encode()).hexdigest()[:16]


def same_start(dist, step: int, ck_path: Path) -> None:
    """Every rank resumed at the same step (each reads the checkpoint itself), else a one-line error: across
    machines, a rank that found no checkpoint would train from step 0 beside ranks at step N."""
    if dist.world <= 1:
        return
    import torch.distributed as tdist

    steps: list = [None] * dist.world
    tdist.all_gather_object(steps, step)
    if len(set(steps)) > 1:
        odd = next(r for r, s in enumerate(steps) if s != steps[0])
        raise RuntimeError(f"rank {odd} starts at step {steps[odd]}, rank 0 at step {steps[0]}: every machine must "
                           f"see the same {ck_path} (put {ck_path.parent} on a shared filesystem, or delete it)")


def grid_tile_size(columns: list[torch.Tensor], max_px: int, pad: int = 2) -> int | None:
    """The tile size that keeps a sample grid's longer side within ``max_px`` (mfim.evaluation.grids.image_grid's
    layout: a row per example, a column per kind, ``pad`` px between); None (native size) when it fits or max_px
    is 0. A 1024 px generator's 6 x 4 grid is 6,158 px tall and ~76 MB as PNG; at 2,048 px about a ninth of that."""
    native = max(int(c.shape[-1]) for c in columns)
    n = max(len(columns), int(columns[0].shape[0]))
    if max_px <= 0 or n * native + (n + 1) * pad <= max_px:
        return None
    return max(1, (max_px - (n + 1) * pad) // n)


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def init_encoder(trainer, path: str | Path) -> None:
    """Start the encoder and its EMA from a warm start or a swapper. Heads the file has and this configuration
    lacks (style maps for configuration A) are dropped; anything the configuration needs and the file lacks is an
    error, so a mismatched file never half-initialises the encoder silently."""
    from mfim.training.warmstart import load_encoder_init

    encoder_state, ema_state, d_state = load_encoder_init(path)
    own = trainer.model.encoder.state_dict()
    droppable = ("m2m.", "map_gain.", "refiner.")  # configuration A has no maps; refine_iterations 0 no refiner
    for module, state in ((trainer.model.encoder, encoder_state), (trainer.ema.encoder, ema_state)):
        extra = [k for k in state if k not in own]
        if any(not k.startswith(droppable) for k in extra):
            raise ValueError(f"{path}: encoder keys this configuration does not have, e.g. {extra[0]}")
        missing = [k for k in own if k not in state]
        if missing and not all(k.startswith("refiner.") for k in missing):
            raise ValueError(f"{path}: lacks {len(missing)} encoder tensors this configuration needs, e.g. "
                             f"{missing[0]} (made with other encoder params?)")
        # a one-pass encoder continues with refinement: the refiner starts as a copy of it
        module.load_state_starting_refiner({k: v for k, v in state.items() if k in own})
    dropped = sorted({".".join(k.split(".")[:2]) for k in encoder_state if k not in own})
    if dropped:  # e.g. configuration A, or a refiner file whose 16 px map heads refine_map_resolutions leaves out
        print(f"init: {path}: this configuration has no {', '.join(dropped)}; those {len(dropped)} heads are not loaded")
    if any(k.startswith("refiner.") for k in own) and not any(k.startswith("refiner.") for k in encoder_state):
        print(f"init: {path} has no refiner; encoder.refine_iterations starts one from its encoder (no correction)")
    if d_state is not None and trainer.D is not None:
        own_d = trainer.D.state_dict()
        if set(d_state) == set(own_d) and all(own_d[k].shape == v.shape for k, v in d_state.items()):
            trainer.D.load_state_dict(d_state)  # a shipped swapper carries the D it was trained against


def run_training(raw_params: dict, out_dir="data/train", reports_dir="reports", shards_dir="data/shards",
                 gt_swaps_path="data/gt_swaps/triples.npz") -> dict:
    from mfim.data.pairs import pair_batches
    from mfim.data.shards import split_pattern
    from mfim.evaluation.grids import save_grid
    from mfim.models.mfim import save_swapper
    from mfim.training.build import (
        FITTED_REGRESSOR,
        THREEDMM_STATS,
        build_model,
        build_objective,
        generator_path,
        load_frozen_generator,
    )
    from mfim.training.distributed import device_and_dist
    from mfim.training.objective import loss_shares
    from mfim.training.trainer import TrainConfig, Trainer

    params = apply_preset(raw_params)
    tr = params["train"]
    device, dist = device_and_dist(params)
    seed = train_seed(params)
    torch.manual_seed(seed + dist.rank)

    out_dir, reports_dir = Path(out_dir), Path(reports_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (reports_dir / "plots").mkdir(parents=True, exist_ok=True)
    (reports_dir / "grids").mkdir(parents=True, exist_ok=True)

    G = load_frozen_generator(params, device)
    model = build_model(params, G).to(device)
    objective = build_objective(params, G, device)
    cfg = TrainConfig.from_params(tr)
    cfg.steps = scheduled_steps(tr)
    batch_size = per_process(tr, "batch_size", dist.world)
    ck_path = out_dir / "checkpoint.pt"
    trainer = Trainer(model, objective, cfg, device, dist, checkpoint_path=ck_path)
    init = str(tr["init_checkpoint"])
    init_path = Path(init) if init else None
    gt_pairs = per_process(tr, "gt_swap_pairs", dist.world)  # rows of each batch that are ground-truth triples
    gt_set = Path(gt_swaps_path)
    fingerprint = params_fingerprint(
        params, [generator_path(params), FITTED_REGRESSOR, THREEDMM_STATS, Path(shards_dir) / "index.json"]
        + ([init_path] if init_path else []) + ([gt_set] if gt_pairs else [])
    )

    position = None
    gt_drawn = 0
    history: list[dict] = []
    resumed = False
    resumed_run = None  # the MLflow run of the interrupted run this one continues
    from mfim.training.checkpoint import load_resumable, remove_stale_parts

    if dist.is_main:  # leftovers of writes killed in earlier runs; only rank 0 writes these files
        remove_stale_parts(ck_path, out_dir / "mfim.pt")
    saved_world, saved_samples = dist.world, None
    state = load_resumable(ck_path, map_location="cpu")  # memory-mapped: a node's ranks share one copy
    if state is not None:
        data = state.get("data") or {}
        if data.get("fingerprint") != fingerprint:
            print(f"{ck_path} was made with other params or inputs; starting over")
        elif int(state.get("step", 0)) >= cfg.steps:
            print(f"{ck_path} is a finished run; starting over")
        else:
            trainer.load_state_dict(state)
            position = data.get("position")
            gt_drawn = int(data.get("gt_drawn", 0))
            history = list(data.get("history") or [])
            resumed_run = data.get("mlflow_run_id")
            saved_world, saved_samples = int(data.get("world", 1)), data.get("samples")
            resumed = True
            print(f"resuming from {ck_path} at step {trainer.step}" + (
                f" (saved by {saved_world} processes, continuing with {dist.world} at the same global batch)"
                if saved_world != dist.world else ""))
    del state  # the memory map's pages are dropped with the last reference
    same_start(dist, trainer.step, ck_path)
    if not resumed and init_path is not None:
        if dist.is_main:  # one read of the (3 GB at paper scale) file; the other ranks receive it
            init_encoder(trainer, init_path)
            print(f"encoder initialised from {init_path}")
        trainer.broadcast_from_main()
    from mfim.training.speed import SpeedOptions, apply_speed_options

    apply_speed_options(trainer, SpeedOptions.from_params(tr))  # after any resume loaded the optimisers' state
    from mfim.runtime import release_free_memory

    release_free_memory()  # the checkpoint / init copies just freed would stay resident under the CPU tunables

    pairs = pair_batches(
        split_pattern(shards_dir, "train"),
        None,
        batch_size,
        seed,
        rank=dist.rank,
        world=dist.world,
        same_identity_fraction=float(tr["same_identity_fraction"]),
        self_pair_fraction=float(tr["self_pair_fraction"]),
        augment=bool(tr["augment"]),
        workers=int(tr["workers"]),
        position=position if saved_world == dist.world else position_for_world(
            position, saved_world, dist.world, int(saved_samples or 0)),
        resolution=int(lookup(params, "data.resolution")),
    )
    samples = pairs.source.plan.n  # the training split's size (the same when resumed: the fingerprint has it)
    batches = pairs
    if gt_pairs > 0:  # synthetic data: rendered (source, target, exact swap) triples join every batch
        from mfim.data.gt_swaps import BatchesWithGtRows, GtSwapRows, load_gt_swap_set

        if lookup(params, "loss.gt_swap") <= 0 and not lookup(params, "loss.gt_swap_id_target"):
            raise ValueError("train.gt_swap_pairs > 0 needs loss.gt_swap > 0 or loss.gt_swap_id_target: true (what "
                             "the triples are for)")
        gt_rows = GtSwapRows(load_gt_swap_set(gt_set), gt_pairs, seed + 1000 * dist.rank, drawn=gt_drawn)
        batches = BatchesWithGtRows(pairs, gt_rows)
    sample = next(
        iter(
            pair_batches(split_pattern(shards_dir, "eval"), None, int(tr["sample_pairs"]), seed + 99,
                         same_identity_fraction=0.0,
                         resolution=int(lookup(params, "data.resolution")))
        )
    )
    x_src, x_tgt = sample["src"].to(device), sample["tgt"].to(device)
    x_other = torch.roll(x_src, 1, dims=0)  # a second source for the mix column

    mlflow_on = dist.is_main

    def on_log(step: int, logs: dict) -> None:
        row = {"step": step, **logs, **loss_shares(logs, objective.w), "peak_memory_mb": peak_memory_mb(device)}
        history.append(row)
        if mlflow_on:
            import mlflow

            mlflow.log_metrics({k: float(v) for k, v in row.items() if k != "step"}, step=step)

    max_px = int(tr["sample_max_px"])

    def on_sample(step: int) -> None:
        with torch.no_grad():
            swap = trainer.ema.swap(x_src, x_tgt)
            mix = trainer.ema.mix(x_tgt, x_src, x_other)
        path = reports_dir / "grids" / "train_samples.png"
        columns = [x_src, x_tgt, swap, mix]
        save_grid(path, columns, size=grid_tile_size(columns, max_px))
        if mlflow_on:
            import mlflow

            mlflow.log_artifact(str(path), artifact_path=f"samples/step_{step:06d}")

    run_ids: list[str] = []  # this run's MLflow id once started, saved in checkpoints so a resume can link to it

    def data_state() -> dict:
        state = {"fingerprint": fingerprint, "position": batches.state_dict(), "history": history,
                 "world": dist.world, "samples": samples}
        if gt_pairs > 0:
            state["gt_drawn"] = gt_rows.drawn
        if run_ids:
            state["mlflow_run_id"] = run_ids[0]
        return state

    from contextlib import nullcontext

    from mfim.tracking import log_file_reference, start_run

    run_name = f"train {tr['config']} {cfg.steps} steps seed {seed}" + (" (resumed)" if resumed else "")
    ctx = (start_run("train", params, groups=TRAIN_GROUPS + ["project"], run_name=run_name,
                     resumed_from=resumed_run) if mlflow_on else nullcontext())  # fmt: skip
    t0 = time.perf_counter()
    with ctx as active:
        if mlflow_on:
            import mlflow

            run_ids.append(active.info.run_id)

            mlflow.set_tags({"train.config": str(tr["config"]), "params.fingerprint": fingerprint,
                             "train.world_size": dist.world, "train.steps_run": cfg.steps,
                             "train.global_batch": batch_size * dist.world * cfg.grad_accum})
        last = trainer.fit(batches, on_log=on_log, on_sample=on_sample, data_state=data_state)
        seconds = time.perf_counter() - t0
        if dist.is_main:
            on_sample(trainer.step)
            export = save_swapper(
                trainer.ema,
                out_dir / "mfim.pt",
                meta={
                    "train_config": str(tr["config"]),
                    "steps": trainer.step,
                    "fingerprint": fingerprint,
                    "align_output_size": int(lookup(params, "align.output_size")),
                    "data_resolution": int(lookup(params, "data.resolution")),
                },
            )
            summary = {
                "config": str(tr["config"]),
                "steps": trainer.step,
                "seconds": round(seconds, 1),
                "world_size": dist.world,
                "global_batch": batch_size * dist.world * cfg.grad_accum,
                "device": str(device),
                **{k: float(v) for k, v in last.items()},
                "peak_memory_mb": peak_memory_mb(device),
            }
            (reports_dir / "train.json").write_text(json.dumps(summary, indent=2) + "\n")
            pd.DataFrame(history, columns=None if history else ["step", "loss"]).to_csv(
                reports_dir / "plots" / "train_loss.csv", index=False
            )
            import mlflow

            log_file_reference(export, "model")  # the file stays the DVC output; MLflow keeps its sha256
            mlflow.log_metric("train_seconds", seconds)
            if not bool(tr["keep_checkpoint"]):
                # a finished run's training state is never resumed (run_training starts over), and at paper scale
                # it is 6.4 GB; the swapper above is what the run leaves
                ck_path.unlink(missing_ok=True)
    if dist.world > 1:
        import torch.distributed as tdist

        tdist.barrier()
        tdist.destroy_process_group()
    return {"steps": trainer.step, **(last or {})}


if __name__ == "__main__":  # pragma: no cover
    from mfim.config import exit_on_params_error, load_params

    with exit_on_params_error("train"):
        params = load_params(os.environ.get("MFIM_PARAMS", "params.yaml"))
    run_training(params)
