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

One streaming pass (mfim.evaluation.features) turns images into features a batch at a time; each table is then a
function of those features (mfim.evaluation.tables); this module wires them together and writes reports/.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pandas as pd

from mfim.config import lookup
from mfim.evaluation import tables as T
from mfim.evaluation.grids import write_grids

SWAP_METRICS = ["identity", "id_retrieval", "shape", "expression", "pose", "pose_hn"]


def run_evaluation(
    params: dict,
    model_path="data/train/mfim.pt",
    evalsets_dir="data/evalsets",
    shards_dir="data/shards",
    raw_dir="data/raw/images",
    reports_dir="reports",
) -> dict:
    from mfim.data.shards import split_pattern
    from mfim.evaluation.evaluators import Evaluators
    from mfim.evaluation.features import ImageReader, ground_truth, stream_pairs, stream_triplets
    from mfim.models.mfim import load_swapper
    from mfim.nets.fid import FrechetDistance
    from mfim.nets.perceptual import load_lpips
    from mfim.runtime import configure_threads, pick_device
    from mfim.training.build import build_source_fitter

    t0 = time.perf_counter()
    device = pick_device(lookup(params, "project.device", "auto"))
    configure_threads(lookup(params, "project.threads", 0))
    ev_cfg = params.get("evaluate", {})
    n_boot, seed = int(ev_cfg.get("bootstrap", 1000)), int(lookup(params, "project.seed", 0))
    batch = int(ev_cfg.get("batch_size", 16))
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
    fd = FrechetDistance(lookup(params, "evaluate.fid.inception_checkpoint", "") or None, device=device,
                         substitute=str(lookup(params, "evaluate.fid.substitute", "lpips_alex")),
                         resolution=int(lookup(params, "evaluate.fid.resolution", 0) or 0) or res)
    with ImageReader(pattern, res) as reader:
        pf = stream_pairs(model, pairs, reader, evaluators, lpips, fd, batch, device)
        # FF++ has no triplets (the paper's ID-mixing analysis is on CelebA-HQ): Table 5 is then left empty
        tf = stream_triplets(model, triplets, reader, evaluators, batch, device) if len(triplets) else None

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
        "protocol": protocol.get("protocol", lookup(params, "evalsets.protocol", "synthetic")),
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
    return out


def log_to_mlflow(params: dict, out: dict, grids: list[Path], reports_dir: Path) -> None:
    from mfim.config import flatten
    from mfim.training.run import train_seed
    from mfim.tracking import start_run

    with start_run("evaluate", params, groups=["evaluate", "source_fit", "evalsets", "train", "loss", "encoder"]):
        import mlflow

        mlflow.set_tags({"train.config": str(lookup(params, "train.config", "E")),
                         "train.steps": str(lookup(params, "train.steps", "")),
                         "train.seed": str(train_seed(params)),
                         # how the swaps were made: the ablation table keeps to feed-forward (0) runs
                         "source_fit.steps": str(lookup(params, "source_fit.steps", 0)),
                         # the split the ablation rows were trained with (runs before the tag: 0)
                         "encoder.source_torgb_max_res": str(lookup(params, "encoder.source_torgb_max_res", 0) or 0)})
        flat = {k: float(v) for k, v in flatten({k: out[k] for k in ("swap", "reconstruction", "id_mixing",
                                                                       "evaluators_on_real_images")}).items()}
        flat[f"fd.{out['fd']['name']}"] = out["fd"]["value"]
        mlflow.log_metrics(flat)
        for g in grids:
            mlflow.log_artifact(str(g), artifact_path="grids")
        mlflow.log_artifact(str(reports_dir / "metrics.json"))
        mlflow.log_artifact(str(reports_dir / "metrics_detail.json"))
