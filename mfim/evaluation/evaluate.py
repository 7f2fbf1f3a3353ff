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
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from mfim.config import lookup
from mfim.evaluation import metrics as M
from mfim.evaluation.grids import from_uint8, save_grid

SWAP_METRICS = ["identity", "id_retrieval", "shape", "expression", "pose", "pose_hn"]


def _batched(fn, *tensors, batch: int = 16) -> torch.Tensor:
    outs = []
    with torch.no_grad():
        for i in range(0, len(tensors[0]), batch):
            outs.append(fn(*(t[i : i + batch] for t in tensors)).float().cpu())
    return torch.cat(outs)


def load_images(keys, paths, shard_pattern: str, resolution: int) -> dict[str, np.ndarray]:
    """uint8 images by key: from the shards when they hold the key, else from the aligned PNG path."""
    from mfim.data.shards import ShardIndex, resize_square
    from mfim.imageio import read_rgb

    out: dict[str, np.ndarray] = {}
    index = None
    try:
        index = ShardIndex(shard_pattern)
    except (FileNotFoundError, ValueError):
        index = None
    try:
        for k, p in zip(keys, paths):
            if k in out:
                continue
            if index is not None and k in index.position_of:
                out[k] = index.read(index.position_of[k], resolution).image
            else:
                out[k] = resize_square(read_rgb(p), resolution)
    finally:
        if index is not None:
            index.close()
    return out


def ground_truth(shard_pattern: str) -> dict[str, dict]:
    """key -> ground-truth 3DMM of synthetic eval images (pose radians, exp), when the shards carry it."""
    from mfim.data.shards import ShardIndex

    try:
        index = ShardIndex(shard_pattern)
    except (FileNotFoundError, ValueError):
        return {}
    gt = {}
    for k, meta in zip(index.keys, index.metas):
        g = meta.get("ground_truth") or meta.get("gt")
        if isinstance(g, dict) and all(n in g for n in ("yaw", "pitch", "roll")):
            gt[k] = g
    index.close()
    return gt


def source_groups(pairs: pd.DataFrame) -> np.ndarray:
    """Integer source identity per pair: the label when known, else the source video / image from its key."""
    ids = pairs.source_identity.to_numpy()
    if (ids >= 0).all():
        return ids
    groups = [str(k).rsplit("/", 1)[0] if int(f) >= 0 else str(k) for k, f in
              zip(pairs.source_key, pairs.source_frame_index)]
    return pd.factorize(pd.Series(groups))[0].astype(np.int64)


def identity_separation(pairs: pd.DataFrame, f_src: np.ndarray, f_tgt: np.ndarray) -> dict[str, np.ndarray]:
    """How well the evaluation embedder separates people on real eval images: distances between images of the same
    identity and of different identities, and the verification AUC (P[same-pair distance < different-pair one])."""
    ids = np.concatenate([pairs.source_identity.to_numpy(), pairs.target_identity.to_numpy()])
    keys = np.concatenate([pairs.source_key.to_numpy(), pairs.target_key.to_numpy()])
    feats = np.concatenate([f_src, f_tgt])
    _, first = np.unique(keys, return_index=True)
    ids, feats = ids[first], feats[first]
    if (ids < 0).any() or len(ids) < 3:
        return {}
    d = np.linalg.norm(feats[:, None] - feats[None], axis=-1)
    iu = np.triu_indices(len(ids), 1)
    same = (ids[:, None] == ids[None])[iu]
    dist = d[iu]
    out = {"identity_distance_different_people": dist[~same]}
    if same.any():
        out["identity_distance_same_person"] = dist[same]
        diff = np.sort(dist[~same])
        out["identity_verification_auc"] = 1.0 - np.searchsorted(diff, dist[same]) / max(len(diff), 1)
    return out


def summarize(values: dict[str, np.ndarray], n_boot: int, seed: int) -> dict[str, dict]:
    return {k: M.bootstrap_ci(v, n_boot=n_boot, seed=seed) for k, v in values.items()}


def swap_without_style_maps(model, x_src, x_tgt):
    codes, _ = model.encode_target(x_tgt)
    codes.update(model.encode_codes(x_src, model.src_indices))
    return model.synthesize(codes, {})


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
    from mfim.models.mfim import load_swapper
    from mfim.runtime import configure_threads, pick_device

    t0 = time.perf_counter()
    device = pick_device(lookup(params, "project.device", "auto"))
    configure_threads(lookup(params, "project.threads", 0))
    ev_cfg = params.get("evaluate", {})
    n_boot, seed = int(ev_cfg.get("bootstrap", 1000)), int(lookup(params, "project.seed", 0))
    batch = int(ev_cfg.get("batch_size", 16))
    reports_dir = Path(reports_dir)
    (reports_dir / "grids").mkdir(parents=True, exist_ok=True)

    model, meta = load_swapper(model_path, device=device)
    res = int(meta.get("data_resolution", model.encoder.cfg.input_size))
    pairs = pd.read_parquet(Path(evalsets_dir) / "pairs.parquet")
    triplets = pd.read_parquet(Path(evalsets_dir) / "triplets.parquet")
    protocol = json.loads((Path(evalsets_dir) / "protocol.json").read_text())
    pattern = split_pattern(shards_dir, "eval")
    keys = list(pairs.target_key) + list(pairs.source_key)
    paths = list(pairs.target_path) + list(pairs.source_path)
    for c in ("target", "global", "local"):
        keys += list(triplets[f"{c}_key"])
        paths += list(triplets[f"{c}_path"])
    images = load_images(keys, paths, pattern, res)
    stack = lambda ks: from_uint8(np.stack([images[k] for k in ks]))  # noqa: E731

    evaluators = Evaluators(params, device=device, batch_size=batch)
    x_src, x_tgt = stack(pairs.source_key), stack(pairs.target_key)
    x_swap = _batched(model.swap, x_src.to(device), x_tgt.to(device), batch=batch)
    f_swap, f_src, f_tgt = (evaluators.features(x) for x in (x_swap, x_src, x_tgt))

    # --- swap metrics (Tables 2-4 columns) ---------------------------------------------------------------------
    # Retrieval gallery: one entry per source identity (mean feature of its images). Real-data manifests have no
    # identity labels (-1): there a source is its video (FF++: the frames of one video) or its image (CelebA-HQ).
    src_ids = source_groups(pairs)
    gallery_ids = np.unique(src_ids)
    gallery = np.stack([f_src.identity[src_ids == i].mean(axis=0) for i in gallery_ids])
    true_index = np.searchsorted(gallery_ids, src_ids)
    per_pair = {
        "identity": M.l2_distance(f_swap.identity, f_src.identity),
        "id_retrieval": M.id_retrieval(f_swap.identity, gallery, true_index),
        "shape": M.l2_distance(f_swap.shape, f_src.shape),
        "expression": M.l2_distance(f_swap.exp, f_tgt.exp),
        "pose": M.l2_distance(f_swap.pose, f_tgt.pose),
        "pose_hn": M.l2_distance(f_swap.pose_hn, f_tgt.pose_hn),
        # the same distances to the other image of the pair, to read the ones above against
        "identity_to_target": M.l2_distance(f_swap.identity, f_tgt.identity),
        "shape_to_target": M.l2_distance(f_swap.shape, f_tgt.shape),
        "expression_to_source": M.l2_distance(f_swap.exp, f_src.exp),
        "pose_to_source": M.l2_distance(f_swap.pose, f_src.pose),
        "pose_hn_to_source": M.l2_distance(f_swap.pose_hn, f_src.pose_hn),
        "id_similarity_source": M.cosine_similarity(f_swap.identity, f_src.identity),
        "id_similarity_target": M.cosine_similarity(f_swap.identity, f_tgt.identity),
        "train_id_similarity_source": M.cosine_similarity(f_swap.id_train, f_src.id_train),
        "train_id_similarity_target": M.cosine_similarity(f_swap.id_train, f_tgt.id_train),
        # source vs target before swapping: how far apart the pairs start
        "identity_source_target": M.l2_distance(f_src.identity, f_tgt.identity),
        "pose_source_target": M.l2_distance(f_src.pose, f_tgt.pose),
    }

    # --- ground truth (synthetic protocol) and each evaluator's own error on real images -----------------------
    gt = ground_truth(pattern)
    evaluator_error: dict[str, np.ndarray] = {}
    if gt and all(k in gt for k in pairs.target_key):
        gt_pose = np.array([[gt[k]["yaw"], gt[k]["pitch"], gt[k]["roll"]] for k in pairs.target_key])
        per_pair["pose_gt_deg"] = M.angle_error_deg(f_swap.pose, gt_pose)
        per_pair["pose_hn_gt_deg"] = M.l2_distance(f_swap.pose_hn, np.degrees(gt_pose))
        evaluator_error["threedmm_pose_deg_on_real"] = M.angle_error_deg(f_tgt.pose, gt_pose)
        evaluator_error["pose_hn_deg_on_real"] = M.l2_distance(f_tgt.pose_hn, np.degrees(gt_pose))
        if all("shape" in gt[k] for k in pairs.target_key):
            # can the shape evaluator see shape at all? per-coefficient r against the truth on unswapped targets
            _, first = np.unique(pairs.target_key.to_numpy(), return_index=True)
            k = f_tgt.shape.shape[1]
            truth = np.array([gt[key]["shape"][:k] for key in pairs.target_key.to_numpy()[first]], np.float64)
            from mfim.data.threedmm_table import pearson_per_column

            evaluator_error["shape_pearson_r_on_real"] = pearson_per_column(f_tgt.shape[first], truth)
    evaluator_error.update(identity_separation(pairs, f_src.identity, f_tgt.identity))

    # --- reconstruction: self-swap, with and without style maps ------------------------------------------------
    from mfim.nets.perceptual import load_lpips

    lp = load_lpips("alex").to(device).eval()
    x_rec = _batched(model.reconstruct, x_tgt.to(device), batch=batch)
    x_rec_nomaps = _batched(lambda a: swap_without_style_maps(model, a, a), x_tgt.to(device), batch=batch)
    small = lambda x: torch.nn.functional.interpolate(x, size=(res, res), mode="area") if x.shape[-1] != res else x  # noqa: E731
    recon = {
        "self_swap_l1": (small(x_rec) - x_tgt).abs().flatten(1).mean(1).numpy(),
        "self_swap_lpips": _batched(lambda a, b: lp(small(a), b).flatten(), x_rec.to(device), x_tgt.to(device)).numpy(),
        "self_swap_l1_without_style_maps": (small(x_rec_nomaps) - x_tgt).abs().flatten(1).mean(1).numpy(),
        "self_swap_lpips_without_style_maps": _batched(
            lambda a, b: lp(small(a), b).flatten(), x_rec_nomaps.to(device), x_tgt.to(device)
        ).numpy(),
    }

    # --- Fréchet distance --------------------------------------------------------------------------------------
    from mfim.nets.fid import compute_fd

    fd = compute_fd(
        x_tgt, x_swap, inception_checkpoint=lookup(params, "evaluate.fid.inception_checkpoint", "") or None,
        batch_size=batch, device=device, substitute=str(lookup(params, "evaluate.fid.substitute", "lpips_alex")),
    )

    # --- ID mixing (Table 5) -----------------------------------------------------------------------------------
    t_tgt, t_gb, t_lc = (stack(triplets[f"{c}_key"]) for c in ("target", "global", "local"))
    x_mix = _batched(model.mix, t_tgt.to(device), t_gb.to(device), t_lc.to(device), batch=batch)
    x_local = _batched(model.swap, t_lc.to(device), t_tgt.to(device), batch=batch)
    x_global = _batched(model.swap, t_gb.to(device), t_tgt.to(device), batch=batch)
    f_gb, f_lc = evaluators.features(t_gb), evaluators.features(t_lc)
    mixing = {}
    for row, x in (("local", x_local), ("id_mixing", x_mix), ("global", x_global)):
        f = evaluators.features(x)
        r_id_gb, r_id_lc = M.relative_distance(M.l2_distance(f.identity, f_gb.identity),
                                               M.l2_distance(f.identity, f_lc.identity))
        r_sh_gb, r_sh_lc = M.relative_distance(M.l2_distance(f.shape, f_gb.shape), M.l2_distance(f.shape, f_lc.shape))
        mixing[row] = summarize(
            {"r_id_gb": r_id_gb, "r_id_lc": r_id_lc, "r_shape_gb": r_sh_gb, "r_shape_lc": r_sh_lc}, n_boot, seed
        )

    # --- grids -------------------------------------------------------------------------------------------------
    grids = write_grids(model, meta, reports_dir / "grids", x_src, x_tgt, x_swap, pairs, t_gb, t_lc, t_tgt, x_mix,
                        x_rec, x_rec_nomaps, raw_dir, device)

    # --- write --------------------------------------------------------------------------------------------------
    swap_summary = summarize(per_pair, n_boot, seed)
    out = {
        "protocol": protocol.get("protocol", lookup(params, "evalsets.protocol", "synthetic")),
        "n_pairs": int(len(pairs)),
        "n_triplets": int(len(triplets)),
        "swap": {k: v["mean"] for k, v in swap_summary.items()},
        "fd": {"name": fd["name"], "value": float(fd["value"])},
        "reconstruction": {k: float(np.mean(v)) for k, v in recon.items()},
        "id_mixing": {row: {k: v["mean"] for k, v in d.items()} for row, d in mixing.items()},
        "evaluators_on_real_images": {k: float(np.mean(v)) for k, v in evaluator_error.items()},
        "checks": {
            "id_closer_to_source_than_target": bool(
                swap_summary["id_similarity_source"]["mean"] > swap_summary["id_similarity_target"]["mean"]
            ),
            "pose_closer_to_target_than_source": bool(
                swap_summary["pose"]["mean"] < swap_summary["pose_to_source"]["mean"]
            ),
        },
    }
    detail = {
        "swap": swap_summary,
        "reconstruction": summarize(recon, n_boot, seed),
        "id_mixing": mixing,
        "evaluators_on_real_images": summarize(evaluator_error, n_boot, seed),
        "fd": fd,
        "evaluators": evaluators.describe(),
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


def write_grids(model, meta: dict, out_dir: Path, x_src, x_tgt, x_swap, pairs, t_gb, t_lc, t_tgt, x_mix, x_rec,
                x_rec_nomaps, raw_dir, device, n: int = 8) -> list[Path]:
    """source | target | swap | E+ (ROI-only) ; global | local | target | mix ; target | self-swap | without maps;
    and raw target photo | E+ pasted back into it."""
    paths = []
    n = min(n, len(x_src))
    roi = roi_swaps(x_swap[:n], x_tgt[:n])
    paths.append(save_grid(out_dir / "swaps.png", [x_src[:n], x_tgt[:n], x_swap[:n], roi]))
    m = min(n, len(x_mix))
    paths.append(save_grid(out_dir / "id_mixing.png", [t_gb[:m], t_lc[:m], t_tgt[:m], x_mix[:m]]))
    paths.append(save_grid(out_dir / "style_maps.png", [x_tgt[:n], x_rec[:n], x_rec_nomaps[:n]]))
    paths.append(paste_back_examples(model, meta, pairs.head(4), raw_dir, device, out_dir / "paste_back.png", roi))
    return paths


def roi_swaps(x_swap: torch.Tensor, x_tgt: torch.Tensor) -> torch.Tensor:
    """E+ in aligned space, with the canonical FFHQ face mask (the aligned target's own landmarks are used when
    pasting into photos, see paste_back_examples)."""
    from mfim.models.roi import roi_blend, roi_masks
    from mfim.nets.align import canonical_landmarks

    size = x_swap.shape[-1]
    masks = roi_masks(np.repeat(canonical_landmarks(size)[None], len(x_swap), axis=0), size)
    return roi_blend(x_swap, x_tgt, masks)


def paste_back_examples(model, meta: dict, pairs: pd.DataFrame, raw_dir, device, out_path: Path,
                        roi_aligned: torch.Tensor) -> Path:
    """E+ on the unaligned raw photos: detect + align the raw target and source, swap, paste back; one row per pair
    (raw target | result). Without raw photos (real-data protocols keep only aligned frames) the aligned-space E+
    column stands in, so the file always exists."""
    from mfim.imageio import ImageRejected, read_rgb
    from mfim.inference import FaceSwapper
    from mfim.provenance import provenance_record, save_image

    raw_dir = Path(raw_dir)
    rows = []
    if raw_dir.is_dir():
        swapper = FaceSwapper(model, meta, checkpoint_sha256="", device=device)
        for _, r in pairs.iterrows():
            src_p, tgt_p = raw_dir / f"{r.source_key}.png", raw_dir / f"{r.target_key}.png"
            try:
                src, tgt = swapper.prepare(read_rgb(src_p)), swapper.prepare(read_rgb(tgt_p))
            except (ImageRejected, FileNotFoundError):
                continue
            rows.append(np.concatenate([tgt.photo, swapper.swap(src, tgt, roi=True)], axis=1))
    if not rows:
        return save_grid(out_path, [roi_aligned[:4]])
    w = max(r.shape[1] for r in rows)
    rows = [np.pad(r, ((0, 0), (0, w - r.shape[1]), (0, 0)), constant_values=255) for r in rows]
    return save_image(out_path, np.concatenate(rows, axis=0), provenance_record("synthetic"))


def log_to_mlflow(params: dict, out: dict, grids: list[Path], reports_dir: Path) -> None:
    from mfim.config import flatten
    from mfim.tracking import start_run

    with start_run("evaluate", params, groups=["evaluate", "evalsets", "train", "loss", "encoder"]):
        import mlflow

        mlflow.set_tags({"train.config": str(lookup(params, "train.config", "E")),
                         "train.steps": str(lookup(params, "train.steps", ""))})
        flat = {k: float(v) for k, v in flatten({k: out[k] for k in ("swap", "reconstruction", "id_mixing",
                                                                       "evaluators_on_real_images")}).items()}
        flat[f"fd.{out['fd']['name']}"] = out["fd"]["value"]
        mlflow.log_metrics(flat)
        for g in grids:
            mlflow.log_artifact(str(g), artifact_path="grids")
        mlflow.log_artifact(str(reports_dir / "metrics.json"))
        mlflow.log_artifact(str(reports_dir / "metrics_detail.json"))
