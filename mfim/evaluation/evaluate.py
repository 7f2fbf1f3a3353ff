"""The `evaluate` stage: what §4 of the paper measures, on the configured protocol's pairs and triplets.

Per (source, target) pair, with the independent evaluation networks (mfim.evaluation.evaluators):
  identity     L2 of evaluation-embedder features, swap vs source (the paper's "Identity")
  id_retrieval top-1: the nearest source identity (cosine) is the right one (FF++ protocol; higher is better)
  shape        L2 of std-normalised 3DMM shape, swap vs source
  expression   L2 of std-normalised 3DMM expression, swap vs target
  pose         L2 of 3DMM (yaw, pitch, roll) in radians, swap vs target
  pose_hn      L2 of head-pose-network (yaw, pitch, roll) in degrees, swap vs target
and, to read them against: the same distances to the *other* image (identity to target, pose to source), the
similarity of the swap's identity to source and target, errors against ground truth where the protocol has it
(synthetic), each evaluator's own error on real (unswapped) eval images, self-swap reconstruction with and without
style maps, a Fréchet distance (FID with the official Inception weights, otherwise honestly named after the network
used), and the ID-mixing table (R-ID / R-Shape, §4.4). Every mean comes with a bootstrap 95% interval.

One streaming pass (mfim.evaluation.features) turns images into features a batch at a time, each distinct image
once, and writes them a batch at a time to ``progress_dir`` (the stage: data/evaluate/progress, no DVC output), so a
killed run continues from its last finished batch; each table is then a function of those features
(mfim.evaluation.tables); this module wires them together, writes reports/ and then removes the progress.
"""

from __future__ import annotations

import glob
import hashlib
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.distributed

from mfim.config import lookup
from mfim.evaluation import tables as T
from mfim.evaluation.grids import write_grids

SWAP_METRICS = ["identity", "id_retrieval", "shape", "expression", "pose", "pose_hn"]
# what the stored features depend on besides the input files: the stage's params (dvc.yaml) less evaluate.workers,
# which changes how fast, not what; PROGRESS_FORMAT changes when the parts' contents do
PROGRESS_PARAMS = ("evaluate", "source_fit", "nets", "loss.threedmm_encoder", "loss.jaw_pose", "train.config",
                   "train.steps", "train.seed", "project.seed")
PROGRESS_FORMAT = 2  # 2: DECA crops from landmarks; 3DDFA_V2 crops its whole-pixel roi


def progress_fingerprint(params: dict, device, inputs) -> str:
    """The resumable features must match: these params, the device type (its numbers differ in the last bits) and the
    contents of the input files (swapper, evaluator networks, eval sets and shards)."""
    from mfim.assets import sha256_file

    scoped = {k: lookup(params, k) for k in PROGRESS_PARAMS}
    scoped["evaluate"] = {k: v for k, v in (scoped["evaluate"] or {}).items() if k != "workers"}
    scoped["device"], scoped["format"] = str(getattr(device, "type", device)), PROGRESS_FORMAT
    scoped["inputs"] = {str(p): sha256_file(p) for p in inputs if Path(p).is_file()}
    return hashlib.sha256(json.dumps(scoped, sort_keys=True, default=str).encode()).hexdigest()[:16]


def join_ranks(device: torch.device):
    """Under torchrun each rank evaluates every world-th batch (mfim.evaluation.features.Streamer); alone: rank 0 of
    1."""
    from mfim.training.distributed import init_from_env

    info = init_from_env(device)
    if info.world > 1 and device.type == "cuda":
        torch.cuda.set_device(info.local_rank)
    return info


def open_store(progress_dir, fingerprint: str, rank):
    """Rank 0 opens (and, for other inputs, empties) the progress folder before the other ranks open it."""
    import torch.distributed as dist

    from mfim.evaluation.features import FeatureStore

    store = FeatureStore(progress_dir, fingerprint) if rank.is_main else None
    if rank.world > 1:
        dist.barrier()
    return store or FeatureStore(progress_dir, fingerprint, owner=False)


def finish_ranks(rank) -> bool:
    """Wait until every rank's parts are written, leave the process group; True on the rank that goes on."""
    import torch.distributed as dist

    if rank.world > 1:
        dist.barrier()
        dist.destroy_process_group()
    return rank.is_main


def run_evaluation(
    params: dict,
    model_path="data/train/mfim.pt",
    evalsets_dir="data/evalsets",
    shards_dir="data/shards",
    raw_dir="data/raw/images",
    reports_dir="reports",
    progress_dir=None,
) -> dict | None:
    """``progress_dir``: where the finished batches are kept until the reports are written (None: a temporary
    folder of this process, nothing to resume from; torchrun needs a shared one). Under torchrun the ranks split the batches and rank 0 writes the reports (the
    others return None)."""
    if progress_dir is None:
        with tempfile.TemporaryDirectory(prefix="evaluate-progress-") as tmp:
            return _run_evaluation(params, model_path, evalsets_dir, shards_dir, raw_dir, reports_dir, tmp)
    return _run_evaluation(params, model_path, evalsets_dir, shards_dir, raw_dir, reports_dir, progress_dir)


# long: the evaluate stage in order (set-up, the streaming pass of features.py, the tables of tables.py, the two
# report files written side by side so their keys stay in step); the computing is in those modules.
def _run_evaluation(params: dict, model_path, evalsets_dir, shards_dir, raw_dir, reports_dir, progress_dir) -> dict:
    from mfim.data.shards import split_pattern
    from mfim.evaluation.evaluators import Evaluators
    from mfim.evaluation.features import Streamer, ground_truth
    from mfim.models.mfim import load_swapper
    from mfim.nets.fid import FrechetDistance
    from mfim.nets.perceptual import load_lpips
    from mfim.runtime import configure_threads, pick_device
    from mfim.training.build import build_source_fitter

    t0 = time.perf_counter()
    device = pick_device(lookup(params, "project.device"))
    rank = join_ranks(device)  # under torchrun: this process's rank, world size and GPU
    device = torch.device("cuda", rank.local_rank) if device.type == "cuda" and rank.world > 1 else device
    configure_threads(lookup(params, "project.threads"))
    ev_cfg = params["evaluate"]
    n_boot, seed = int(ev_cfg["bootstrap"]), int(lookup(params, "project.seed"))
    batch = int(ev_cfg["batch_size"])
    workers = int(ev_cfg["workers"])
    workers = max(1, workers // rank.world) if workers else 0  # evaluate.workers: the machine's, shared by the ranks
    reports_dir = Path(reports_dir)
    (reports_dir / "grids").mkdir(parents=True, exist_ok=True)

    model, meta = load_swapper(model_path, device=device)
    model.source_fitter = build_source_fitter(params, device)  # None: the paper's feed-forward swap
    res = int(meta.get("data_resolution", model.encoder.cfg.input_size))
    pairs = pd.read_parquet(Path(evalsets_dir) / "pairs.parquet")
    triplets = pd.read_parquet(Path(evalsets_dir) / "triplets.parquet")
    protocol = json.loads((Path(evalsets_dir) / "protocol.json").read_text())
    pattern = split_pattern(shards_dir, "eval")

    evaluators = Evaluators(params, device=device, batch_size=batch)
    lpips = load_lpips("alex").to(device).eval()
    # FID at one resolution: the real images' (data.resolution) unless evaluate.fid.resolution says otherwise;
    # swaps at the generator's resolution are area-downsampled to it (mfim.nets.fid.FrechetDistance).
    fd = FrechetDistance(lookup(params, "evaluate.fid.inception_checkpoint") or None, device=device,
                         substitute=str(lookup(params, "evaluate.fid.substitute")),
                         resolution=int(lookup(params, "evaluate.fid.resolution") or 0) or res)
    inputs = [model_path, "data/threedmm/regressor.pt", "data/threedmm/evaluator.pt", "data/threedmm/stats.json",
              "data/weights/evaluate.json", *(Path(evalsets_dir) / n for n in ("pairs.parquet", "triplets.parquet",
                                                                                 "protocol.json")),
              *sorted(glob.glob(pattern))]
    store = open_store(progress_dir, progress_fingerprint(params, device, inputs), rank)
    streamer = Streamer(model, pairs, triplets, pattern, res, evaluators, lpips, fd, batch, device, store, workers,
                        rank=rank.rank, world=rank.world)
    if rank.world > 1:  # every rank has listed the missing batches before any rank writes one
        torch.distributed.barrier()
    streamer.run()
    if not finish_ranks(rank):  # every rank wrote its batches' parts; rank 0 alone collects them into the reports
        return None
    # FF++ has no triplets (the paper's ID-mixing analysis is on CelebA-HQ): Table 5 is then left empty
    pf, tf = streamer.collect()

    # --- tables from the features -------------------------------------------------------------------------------
    per_pair = T.swap_columns(pairs, pf.source, pf.target, pf.swap)
    gt_errors, evaluator_error = T.ground_truth_errors(pairs, pf.target, pf.swap, ground_truth(pattern))
    per_pair.update(gt_errors)
    evaluator_error.update(T.identity_separation(pairs, pf.source.identity, pf.target.identity))
    mixing = {row: T.summarize(v, n_boot, seed) for row, v in T.id_mixing(tf).items()} if tf else {}
    grids = write_grids(model, meta, reports_dir / "grids", pf.grid, tf.grid if tf else None, pairs, raw_dir, device,
                        protocol=protocol.get("protocol", ""))

    # --- write --------------------------------------------------------------------------------------------------
    swap_summary = T.summarize(per_pair, n_boot, seed)
    fd_report = pf.fd
    out = {
        "protocol": protocol.get("protocol", lookup(params, "evalsets.protocol")),
        "n_pairs": int(len(pairs)),
        "n_triplets": int(len(triplets)),
        "swap": {k: v["mean"] for k, v in swap_summary.items()},
        "fd": {"name": fd_report["name"], "value": float(fd_report["value"])},
        "reconstruction": {k: float(np.mean(v)) for k, v in pf.reconstruction.items()},
        "id_mixing": {row: {k: v["mean"] for k, v in d.items()} for row, d in mixing.items()},
        "evaluators_on_real_images": {k: float(np.mean(v)) for k, v in evaluator_error.items()},
        "checks": {
            "id_closer_to_source_than_target": bool(
                swap_summary["id_similarity_source"]["mean"] > swap_summary["id_similarity_target"]["mean"]
            ),
            "pose_closer_to_target_than_source": bool(
                swap_summary["pose"]["mean"] < swap_summary["pose_to_source"]["mean"]
            ),
            "shape_closer_to_source_than_target": bool(swap_summary["shape_margin"]["mean"] > 0),
            "expression_closer_to_target_than_source": bool(swap_summary["expression_margin"]["mean"] > 0),
        },
    }
    detail = {
        "swap": swap_summary,
        "reconstruction": T.summarize(pf.reconstruction, n_boot, seed),
        "id_mixing": mixing,
        "evaluators_on_real_images": T.summarize(evaluator_error, n_boot, seed),
        "fd": fd_report,
        "evaluators": evaluators.describe(),
        # how the swaps were made: source_fit.steps 0 = the paper's feed-forward encoder (mfim.models.source_fit)
        "source_fit": vars(model.source_fitter.cfg) if model.source_fitter is not None else {"steps": 0},
        # the code split the swapper was trained with: coarse layers from the target, toRGB up to
        # source_torgb_max_res from the source (0: the paper's split)
        "split": {"coarse_max_res": model.coarse_max_res, "source_torgb_max_res": model.source_torgb_max_res},
        "protocol": protocol,
        "model": {"path": str(model_path), **{k: v for k, v in meta.items() if isinstance(v, (str, int, float))}},
        "grids": [str(g) for g in grids],
        "seconds": round(time.perf_counter() - t0, 1),
    }
    (reports_dir / "metrics.json").write_text(json.dumps(out, indent=2) + "\n")
    (reports_dir / "metrics_detail.json").write_text(json.dumps(detail, indent=2, default=str) + "\n")
    table = pairs[["pair_id", "source_key", "target_key"]].copy()
    for k, v in per_pair.items():
        table[k] = v
    table.to_csv(reports_dir / "eval_pairs.csv", index=False)
    log_to_mlflow(params, out, grids, reports_dir)
    store.remove()  # the reports are written: nothing left to resume
    return out


def log_to_mlflow(params: dict, out: dict, grids: list[Path], reports_dir: Path) -> None:
    from mfim.config import flatten
    from mfim.training.run import train_seed
    from mfim.tracking import start_run

    with start_run("evaluate", params, groups=["evaluate", "source_fit", "evalsets", "train", "loss", "encoder"]):
        import mlflow

        mlflow.set_tags({"train.config": str(lookup(params, "train.config")),
                         "train.steps": str(lookup(params, "train.steps")),
                         "train.seed": str(train_seed(params)),
                         # how the swaps were made: the ablation table keeps to feed-forward (0) runs
                         "source_fit.steps": str(lookup(params, "source_fit.steps")),
                         # the split the ablation rows were trained with (runs before the tag: 0)
                         "encoder.source_torgb_max_res": str(lookup(params, "encoder.source_torgb_max_res") or 0)})
        flat = {k: float(v) for k, v in flatten({k: out[k] for k in ("swap", "reconstruction", "id_mixing",
                                                                       "evaluators_on_real_images")}).items()}
        flat[f"fd.{out['fd']['name']}"] = out["fd"]["value"]
        mlflow.log_metrics(flat)
        for g in grids:
            mlflow.log_artifact(str(g), artifact_path="grids")
        mlflow.log_artifact(str(reports_dir / "metrics.json"))
        mlflow.log_artifact(str(reports_dir / "metrics_detail.json"))
