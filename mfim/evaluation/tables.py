"""The paper's tables as functions of the streamed features (mfim.evaluation.features), no images involved.

Each returns per-pair (or per-triplet) values, so that every mean gets a bootstrap interval (``summarize``):
  swap_columns       Tables 2-4: Identity, ID retrieval, Shape, Expression, Pose, Pose-HN and what to read them against
  ground_truth_errors  the synthetic protocol's errors against the rendered truth, and each evaluator's own error
  identity_separation  how well the identity evaluator separates people on real (unswapped) eval images
  id_mixing          Table 5: R-ID / R-Shape of the local swap, the ID mix and the global swap
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from mfim.evaluation import metrics as M
from mfim.evaluation.evaluators import Features
from mfim.evaluation.features import MIXING_ROWS, TripletFeatures


def source_groups(pairs: pd.DataFrame) -> np.ndarray:
    """Integer source identity per pair: the label when known, else the source video / image from its key."""
    ids = pairs.source_identity.to_numpy()
    if (ids >= 0).all():
        return ids
    groups = [str(k).rsplit("/", 1)[0] if int(f) >= 0 else str(k) for k, f in
              zip(pairs.source_key, pairs.source_frame_index)]
    return pd.factorize(pd.Series(groups))[0].astype(np.int64)


def swap_columns(pairs: pd.DataFrame, src: Features, tgt: Features, swap: Features) -> dict[str, np.ndarray]:
    """Tables 2-4 per pair, with the same distances to the other image of the pair beside them."""
    # Retrieval gallery: one entry per source identity (mean feature of its images). Real-data manifests have no
    # identity labels (-1): there a source is its video (FF++: the frames of one video) or its image (CelebA-HQ).
    src_ids = source_groups(pairs)
    gallery_ids, true_index = np.unique(src_ids, return_inverse=True)
    # each identity's rows in pair order (a stable sort), so every mean is the one src.identity[src_ids == i] gives,
    # without a pass over all pairs per identity (30k x 300k comparisons on CelebA-HQ)
    order = np.argsort(true_index, kind="stable")
    starts = np.searchsorted(true_index[order], np.arange(len(gallery_ids) + 1))
    gallery = np.stack([src.identity[order[a:b]].mean(axis=0) for a, b in zip(starts[:-1], starts[1:])])
    out = {
        "identity": M.l2_distance(swap.identity, src.identity),
        "id_retrieval": M.id_retrieval(swap.identity, gallery, true_index),
        "shape": M.l2_distance(swap.shape, src.shape),
        "expression": M.l2_distance(swap.exp, tgt.exp),
        "pose": M.l2_distance(swap.pose, tgt.pose),
        "pose_hn": M.l2_distance(swap.pose_hn, tgt.pose_hn),
        # the same distances to the other image of the pair, to read the ones above against
        "identity_to_target": M.l2_distance(swap.identity, tgt.identity),
        "shape_to_target": M.l2_distance(swap.shape, tgt.shape),
        "expression_to_source": M.l2_distance(swap.exp, src.exp),
        "pose_to_source": M.l2_distance(swap.pose, src.pose),
        "pose_hn_to_source": M.l2_distance(swap.pose_hn, src.pose_hn),
        "id_similarity_source": M.cosine_similarity(swap.identity, src.identity),
        "id_similarity_target": M.cosine_similarity(swap.identity, tgt.identity),
        "train_id_similarity_source": M.cosine_similarity(swap.id_train, src.id_train),
        "train_id_similarity_target": M.cosine_similarity(swap.id_train, tgt.id_train),
        # source vs target before swapping: how far apart the pairs start
        "identity_source_target": M.l2_distance(src.identity, tgt.identity),
        "pose_source_target": M.l2_distance(src.pose, tgt.pose),
    }
    # paired margins (> 0: the right way round); one interval per pair difference is tighter than two overlapping
    # intervals of the distances, which are mostly the spread between pairs
    out["shape_margin"] = out["shape_to_target"] - out["shape"]
    out["expression_margin"] = out["expression_to_source"] - out["expression"]
    out["pose_margin"] = out["pose_to_source"] - out["pose"]
    return out


def ground_truth_errors(pairs: pd.DataFrame, tgt: Features, swap: Features,
                        gt: dict[str, dict]) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """(per-pair swap errors against the truth, each evaluator's own error on the unswapped targets); both empty
    unless every target has ground truth (synthetic protocol)."""
    per_pair: dict[str, np.ndarray] = {}
    evaluator_error: dict[str, np.ndarray] = {}
    if not (gt and all(k in gt for k in pairs.target_key)):
        return per_pair, evaluator_error
    gt_pose = np.array([[gt[k]["yaw"], gt[k]["pitch"], gt[k]["roll"]] for k in pairs.target_key])
    per_pair["pose_gt_deg"] = M.angle_error_deg(swap.pose, gt_pose)
    per_pair["pose_hn_gt_deg"] = M.l2_distance(swap.pose_hn, np.degrees(gt_pose))
    evaluator_error["threedmm_pose_deg_on_real"] = M.angle_error_deg(tgt.pose, gt_pose)
    evaluator_error["pose_hn_deg_on_real"] = M.l2_distance(tgt.pose_hn, np.degrees(gt_pose))
    # can the shape / expression evaluators see them at all? per-coefficient r against the truth on unswapped
    # targets (each target once)
    from mfim.data.threedmm_table import pearson_per_column

    _, first = np.unique(pairs.target_key.to_numpy(), return_index=True)
    keys = pairs.target_key.to_numpy()[first]
    for name, got in (("shape", tgt.shape), ("exp", tgt.exp)):
        if all(name in gt[key] and len(gt[key][name]) >= got.shape[1] for key in keys):
            truth = np.array([gt[key][name][: got.shape[1]] for key in keys], np.float64)
            evaluator_error[f"{name}_pearson_r_on_real"] = pearson_per_column(got[first], truth)
    return per_pair, evaluator_error


def identity_separation(pairs: pd.DataFrame, f_src: np.ndarray, f_tgt: np.ndarray) -> dict[str, np.ndarray]:
    """How well the evaluation embedder separates people on real eval images: distances between images of the same
    identity and of different identities, and the verification AUC (P[same-pair distance < different-pair one]).

    Quadratic in the number of distinct labelled images (the eval split, not the pairs drawn from it); distances
    are taken a row at a time, never as an images×images×features array."""
    ids = np.concatenate([pairs.source_identity.to_numpy(), pairs.target_identity.to_numpy()])
    keys = np.concatenate([pairs.source_key.to_numpy(), pairs.target_key.to_numpy()])
    feats = np.concatenate([f_src, f_tgt])
    _, first = np.unique(keys, return_index=True)
    ids, feats = ids[first], feats[first]
    if (ids < 0).any() or len(ids) < 3:
        return {}
    # upper triangle, row-major: (0,1), (0,2), ..., (1,2), ...
    dist = np.concatenate([np.linalg.norm(feats[i + 1 :] - feats[i], axis=-1) for i in range(len(ids) - 1)])
    same = np.concatenate([ids[i + 1 :] == ids[i] for i in range(len(ids) - 1)])
    out = {"identity_distance_different_people": dist[~same]}
    if same.any():
        out["identity_distance_same_person"] = dist[same]
        diff = np.sort(dist[~same])
        out["identity_verification_auc"] = 1.0 - np.searchsorted(diff, dist[same]) / max(len(diff), 1)
    return out


def id_mixing(triplets: TripletFeatures) -> dict[str, dict[str, np.ndarray]]:
    """Table 5 per triplet: R-ID and R-Shape of each result towards the global and the local source."""
    gb, lc = triplets.global_source, triplets.local_source
    out = {}
    for row in MIXING_ROWS:
        f = triplets.results[row]
        r_id_gb, r_id_lc = M.relative_distance(M.l2_distance(f.identity, gb.identity),
                                               M.l2_distance(f.identity, lc.identity))
        r_sh_gb, r_sh_lc = M.relative_distance(M.l2_distance(f.shape, gb.shape), M.l2_distance(f.shape, lc.shape))
        out[row] = {"r_id_gb": r_id_gb, "r_id_lc": r_id_lc, "r_shape_gb": r_sh_gb, "r_shape_lc": r_sh_lc}
    return out


def summarize(values: dict[str, np.ndarray], n_boot: int, seed: int) -> dict[str, dict]:
    return {k: M.bootstrap_ci(v, n_boot=n_boot, seed=seed) for k, v in values.items()}
