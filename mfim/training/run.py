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
from dataclasses import dataclass, field
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
    from mfim.training.distributed import all_gather_objects

    steps = all_gather_objects(step, dist)
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


@dataclass
class Resumed:
    """What a resumable checkpoint hands to the run that continues it (the defaults: a fresh start)."""

    resumed: bool = False
    position: dict | None = None  # rank 0's data position, for a run of ``saved_world`` processes
    gt_drawn: int = 0
    history: list = field(default_factory=list)
    mlflow_run_id: str | None = None  # the MLflow run of the interrupted run this one continues
    saved_world: int = 1
    saved_samples: int | None = None


def resume_if_possible(trainer, ck_path: Path, fingerprint: str, steps: int, dist, seed: int) -> Resumed:
    """Load ``ck_path`` into ``trainer`` when it is an unfinished run of these params and inputs; its bookkeeping.
    Each rank continues with its own saved RNG states (reseeded from ``seed``, the step and its rank when the
    process count changed)."""
    from mfim.training.checkpoint import load_resumable, remove_stale_parts

    if dist.is_main:  # leftovers of writes killed in earlier runs; only rank 0 writes these files
        remove_stale_parts(ck_path, ck_path.parent / "mfim.pt")
    out = Resumed(saved_world=dist.world)
    state = load_resumable(ck_path, map_location="cpu")  # memory-mapped: a node's ranks share one copy
    if state is not None:
        data = state.get("data") or {}
        if data.get("fingerprint") != fingerprint:
            print(f"{ck_path} was made with other params or inputs; starting over")
        elif int(state.get("step", 0)) >= steps:
            print(f"{ck_path} is a finished run; starting over")
        else:
            trainer.load_state_dict(state, seed)
            out = Resumed(True, data.get("position"), int(data.get("gt_drawn", 0)), list(data.get("history") or []),
                          data.get("mlflow_run_id"), int(data.get("world", 1)), data.get("samples"))
            print(f"resuming from {ck_path} at step {trainer.step}" + (
                f" (saved by {out.saved_world} processes, continuing with {dist.world} at the same global batch)"
                if out.saved_world != dist.world else ""))
    del state  # the memory map's pages are dropped with the last reference
    return out


def prepare_encoder(trainer, tr: dict, init_path: Path | None, resumed: bool, dist) -> None:
    """A fresh run starts its encoder from ``train.init_checkpoint``; then the speed options (after any resume
    loaded the optimisers' state), and the freed checkpoint memory goes back to the system."""
    from mfim.runtime import release_free_memory
    from mfim.training.speed import SpeedOptions, apply_speed_options

    if not resumed and init_path is not None:
        if dist.is_main:  # one read of the (3 GB at paper scale) file; the other ranks receive it
            init_encoder(trainer, init_path)
            print(f"encoder initialised from {init_path}")
        trainer.broadcast_from_main()
    apply_speed_options(trainer, SpeedOptions.from_params(tr))
    release_free_memory()  # the checkpoint / init copies just freed would stay resident under the CPU tunables


def training_batches(params: dict, shards_dir, resolution: int, batch_size: int, seed: int, dist, start: Resumed,
                     gt_pairs: int, gt_set: Path):
    """(batches, training-split size, ground-truth rows or None): this rank's share of every epoch from the saved
    position (moved to this process count), with ``gt_pairs`` rendered triples joining each batch."""
    from mfim.data.pairs import pair_batches
    from mfim.data.shards import split_pattern

    tr = params["train"]
    position = start.position if start.saved_world == dist.world else position_for_world(
        start.position, start.saved_world, dist.world, int(start.saved_samples or 0))
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
        position=position,
        resolution=resolution,
    )
    samples = pairs.source.plan.n  # the training split's size (the same when resumed: the fingerprint has it)
    if gt_pairs <= 0:
        return pairs, samples, None
    # synthetic data: rendered (source, target, exact swap) triples join every batch
    from mfim.data.gt_swaps import BatchesWithGtRows, GtSwapRows, load_gt_swap_set

    if lookup(params, "loss.gt_swap") <= 0 and not lookup(params, "loss.gt_swap_id_target"):
        raise ValueError("train.gt_swap_pairs > 0 needs loss.gt_swap > 0 or loss.gt_swap_id_target: true (what "
                         "the triples are for)")
    gt_rows = GtSwapRows(load_gt_swap_set(gt_set), gt_pairs, seed + 1000 * dist.rank, drawn=start.gt_drawn)
    return BatchesWithGtRows(pairs, gt_rows), samples, gt_rows


class Tracking:
    """The run's logging: loss rows (history, MLflow metrics on rank 0), sample grids of fixed evaluation pairs, and
    the bookkeeping each checkpoint saves beside the training state."""

    def __init__(self, params: dict, trainer, device, dist, reports_dir: Path, shards_dir, resolution: int,
                 seed: int, history: list, fingerprint: str):
        from mfim.data.pairs import pair_batches
        from mfim.data.shards import split_pattern

        tr = params["train"]
        self.trainer, self.device, self.reports_dir = trainer, device, reports_dir
        self.history, self.fingerprint, self.world = history, fingerprint, dist.world
        self.mlflow_on = dist.is_main
        self.max_px = int(tr["sample_max_px"])
        self.run_ids: list[str] = []  # this run's MLflow id once started, saved in checkpoints so a resume links to it
        sample = next(iter(pair_batches(split_pattern(shards_dir, "eval"), None, int(tr["sample_pairs"]),
                                        seed + 99, same_identity_fraction=0.0,
                                        resolution=resolution)))
        self.x_src, self.x_tgt = sample["src"].to(device), sample["tgt"].to(device)
        self.x_other = torch.roll(self.x_src, 1, dims=0)  # a second source for the mix column
        self.batches, self.samples, self.gt_rows = None, None, None  # set by the run once its data is open

    def on_log(self, step: int, logs: dict) -> None:
        from mfim.training.objective import loss_shares

        row = {"step": step, **logs, **loss_shares(logs, self.trainer.objective.w),
               "peak_memory_mb": peak_memory_mb(self.device)}
        self.history.append(row)
        if self.mlflow_on:
            import mlflow

            mlflow.log_metrics({k: float(v) for k, v in row.items() if k != "step"}, step=step)

    def on_sample(self, step: int) -> None:
        from mfim.evaluation.grids import save_grid

        with torch.no_grad():
            swap = self.trainer.ema.swap(self.x_src, self.x_tgt)
            mix = self.trainer.ema.mix(self.x_tgt, self.x_src, self.x_other)
        path = self.reports_dir / "grids" / "train_samples.png"
        columns = [self.x_src, self.x_tgt, swap, mix]
        save_grid(path, columns, size=grid_tile_size(columns, self.max_px))
        if self.mlflow_on:
            import mlflow

            mlflow.log_artifact(str(path), artifact_path=f"samples/step_{step:06d}")

    def data_state(self) -> dict:
        state = {"fingerprint": self.fingerprint, "position": self.batches.state_dict(), "history": self.history,
                 "world": self.world, "samples": self.samples}
        if self.gt_rows is not None:
            state["gt_drawn"] = self.gt_rows.drawn
        if self.run_ids:
            state["mlflow_run_id"] = self.run_ids[0]
        return state


def export_and_report(trainer, params: dict, out_dir: Path, reports_dir: Path, track: Tracking, last: dict,
                      seconds: float, device, global_batch: int, resolution: int) -> None:
    """Rank 0 at the end: the final sample grid, the EMA swapper (data/train/mfim.pt), reports/train.json and the
    loss CSV, MLflow's reference to the model; the training checkpoint goes unless train.keep_checkpoint."""
    import mlflow

    from mfim.models.mfim import save_swapper
    from mfim.tracking import log_file_reference

    tr = params["train"]
    track.on_sample(trainer.step)
    export = save_swapper(
        trainer.ema,
        out_dir / "mfim.pt",
        meta={
            "train_config": str(tr["config"]),
            "steps": trainer.step,
            "fingerprint": track.fingerprint,
            "align_output_size": int(lookup(params, "align.output_size")),
            "data_resolution": resolution,
        },
    )
    summary = {
        "config": str(tr["config"]),
        "steps": trainer.step,
        "seconds": round(seconds, 1),
        "world_size": track.world,
        "global_batch": global_batch,
        "device": str(device),
        **{k: float(v) for k, v in last.items()},
        "peak_memory_mb": peak_memory_mb(device),
    }
    (reports_dir / "train.json").write_text(json.dumps(summary, indent=2) + "\n")
    pd.DataFrame(track.history, columns=None if track.history else ["step", "loss"]).to_csv(
        reports_dir / "plots" / "train_loss.csv", index=False
    )
    log_file_reference(export, "model")  # the file stays the DVC output; MLflow keeps its sha256
    mlflow.log_metric("train_seconds", seconds)
    if not bool(tr["keep_checkpoint"]):
        # a finished run's training state is never resumed (run_training starts over), and at paper scale it is
        # 6.4 GB; the swapper above is what the run leaves
        (out_dir / "checkpoint.pt").unlink(missing_ok=True)


def end_process_group(dist) -> None:
    if dist.world > 1:
        import torch.distributed as tdist

        tdist.barrier()
        tdist.destroy_process_group()


def run_training(raw_params: dict, out_dir="data/train", reports_dir="reports", shards_dir="data/shards",
                 gt_swaps_path="data/gt_swaps/triples.npz") -> dict:
    from contextlib import nullcontext

    from mfim.tracking import start_run
    from mfim.training.build import FITTED_REGRESSOR, THREEDMM_STATS, build_model, build_objective, generator_path
    from mfim.training.build import load_frozen_generator
    from mfim.training.distributed import device_and_dist
    from mfim.training.trainer import TrainConfig, Trainer

    params = apply_preset(raw_params)
    tr = params["train"]
    device, dist = device_and_dist(params)
    seed = train_seed(params)
    torch.manual_seed(seed + dist.rank)
    out_dir, reports_dir = Path(out_dir), Path(reports_dir)
    for d in (out_dir, reports_dir / "plots", reports_dir / "grids"):
        d.mkdir(parents=True, exist_ok=True)

    G = load_frozen_generator(params, device)
    resolution = int(lookup(params, "data.resolution"))
    model = build_model(params, G).to(device)
    objective = build_objective(params, G, device)
    cfg = TrainConfig.from_params(tr)
    cfg.steps = scheduled_steps(tr)
    batch_size = per_process(tr, "batch_size", dist.world)
    ck_path = out_dir / "checkpoint.pt"
    trainer = Trainer(model, objective, cfg, device, dist, checkpoint_path=ck_path)
    init_path = Path(tr["init_checkpoint"]) if tr["init_checkpoint"] else None
    gt_pairs = per_process(tr, "gt_swap_pairs", dist.world)  # rows of each batch that are ground-truth triples
    gt_set = Path(gt_swaps_path)
    fingerprint = params_fingerprint(
        params, [generator_path(params), FITTED_REGRESSOR, THREEDMM_STATS, Path(shards_dir) / "index.json"]
        + ([init_path] if init_path else []) + ([gt_set] if gt_pairs else [])
    )

    start = resume_if_possible(trainer, ck_path, fingerprint, cfg.steps, dist, seed)
    same_start(dist, trainer.step, ck_path)
    prepare_encoder(trainer, tr, init_path, start.resumed, dist)
    batches, samples, gt_rows = training_batches(params, shards_dir, resolution, batch_size, seed, dist, start,
                                                 gt_pairs, gt_set)
    track = Tracking(params, trainer, device, dist, reports_dir, shards_dir, resolution, seed, start.history,
                     fingerprint)
    track.batches, track.samples, track.gt_rows = batches, samples, gt_rows

    run_name = f"train {tr['config']} {cfg.steps} steps seed {seed}" + (" (resumed)" if start.resumed else "")
    ctx = (start_run("train", params, groups=TRAIN_GROUPS + ["project"], run_name=run_name,
                     resumed_from=start.mlflow_run_id) if dist.is_main else nullcontext())  # fmt: skip
    global_batch = batch_size * dist.world * cfg.grad_accum
    t0 = time.perf_counter()
    with ctx as active:
        if dist.is_main:
            import mlflow

            track.run_ids.append(active.info.run_id)
            mlflow.set_tags({"train.config": str(tr["config"]), "params.fingerprint": fingerprint,
                             "train.world_size": dist.world, "train.steps_run": cfg.steps,
                             "train.global_batch": global_batch})
        last = trainer.fit(batches, on_log=track.on_log, on_sample=track.on_sample, data_state=track.data_state)
        if dist.is_main:
            export_and_report(trainer, params, out_dir, reports_dir, track, last, time.perf_counter() - t0, device,
                              global_batch, resolution)
    end_process_group(dist)
    return {"steps": trainer.step, **(last or {})}


if __name__ == "__main__":  # pragma: no cover
    from mfim.config import exit_on_params_error, load_params

    with exit_on_params_error("train"):
        params = load_params(os.environ.get("MFIM_PARAMS", "params.yaml"))
    run_training(params)
