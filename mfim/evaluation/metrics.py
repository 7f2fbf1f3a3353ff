"""The paper's metrics (§4.1, §4.4) as plain functions of embeddings / parameters, with bootstrap intervals.

All distances are per pair (one value per evaluated image) so that the mean and its bootstrap confidence interval
can be reported; lower is better unless the name says otherwise.
"""

from __future__ import annotations

import numpy as np

ArrayLike = np.ndarray
BOOTSTRAP_BLOCK = 1 << 22  # resampled values held at once by bootstrap_ci (32 MB of indices)


def _as2d(x) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return x.reshape(len(x), -1)


def l2_distance(a, b) -> np.ndarray:
    """Row-wise Euclidean distance: the paper's Identity (embedder features), Shape / Expression / Pose (3DMM
    parameters) and Pose-HN (Hopenet yaw/pitch/roll in degrees)."""
    a, b = _as2d(a), _as2d(b)
    if a.shape != b.shape:
        raise ValueError(f"shape mismatch {a.shape} vs {b.shape}")
    return np.linalg.norm(a - b, axis=1)


def cosine_similarity(a, b) -> np.ndarray:
    a, b = _as2d(a), _as2d(b)
    a = a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)
    b = b / np.maximum(np.linalg.norm(b, axis=1, keepdims=True), 1e-12)
    return np.sum(a * b, axis=1)


RETRIEVAL_CHUNK = 4096  # swaps scored against the gallery at once: chunk x gallery float32 (0.5 GB at 30k identities)
NEAR_TIE = 1e-5  # float32 cosine margins below this are re-decided in float64


def _unit_rows(x: np.ndarray, dtype) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64).reshape(len(x), -1)
    return (x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)).astype(dtype, copy=False)


def id_retrieval(swap_emb, gallery_emb, true_index, chunk: int = RETRIEVAL_CHUNK) -> np.ndarray:
    """Top-1 ID retrieval (FF++ protocol): for each swap, the nearest gallery identity by cosine similarity is
    correct when it is the swap's source. Returns a 0/1 array (its mean is the accuracy, higher is better).

    ``gallery_emb``: G×D, one row per source identity; ``true_index``: the gallery row of each swap's source.
    Scored ``chunk`` swaps at a time in float32, so memory is chunk×G whatever the number of swaps (CelebA-HQ's
    300k swaps against 30k sources were one 72 GB float64 matrix). A swap whose best and second-best similarity
    differ by less than NEAR_TIE is decided again in float64, so the answer is the float64 one.
    """
    s32, g32 = _unit_rows(swap_emb, np.float32), _unit_rows(gallery_emb, np.float32)
    g64 = _unit_rows(gallery_emb, np.float64)
    nearest = np.empty(len(s32), np.int64)
    for i in range(0, len(s32), chunk):
        sim = s32[i : i + chunk] @ g32.T
        nearest[i : i + chunk] = np.argmax(sim, axis=1)
        if sim.shape[1] > 1:
            top2 = np.partition(sim, sim.shape[1] - 2, axis=1)[:, -2:]
            close = np.flatnonzero(top2[:, 1] - top2[:, 0] < NEAR_TIE)
            if close.size:
                exact = _unit_rows(np.asarray(swap_emb)[i + close], np.float64) @ g64.T
                nearest[i + close] = np.argmax(exact, axis=1)
    return (nearest == np.asarray(true_index)).astype(np.float64)


def relative_distance(d_global, d_local) -> tuple[np.ndarray, np.ndarray]:
    """R(gb) = d_gb / (d_gb + d_lc), R(lc) = d_lc / (d_gb + d_lc) (paper §4.4, after SmoothSwap); they sum to 1.

    Smaller R(gb) means the mixed face is closer to the global source than to the local one.
    """
    d_global = np.asarray(d_global, dtype=np.float64)
    d_local = np.asarray(d_local, dtype=np.float64)
    total = d_global + d_local
    safe = np.where(total > 0, total, 1.0)
    r_gb = np.where(total > 0, d_global / safe, 0.5)
    return r_gb, 1.0 - r_gb


def bootstrap_ci(values, n_boot: int = 1000, seed: int = 0, alpha: float = 0.05) -> dict:
    """Mean and percentile bootstrap (1-alpha) interval over the evaluated pairs."""
    v = np.asarray(values, dtype=np.float64).ravel()
    v = v[np.isfinite(v)]
    if v.size == 0:
        return {"mean": float("nan"), "ci_low": float("nan"), "ci_high": float("nan"), "n": 0}
    rng = np.random.default_rng(seed)
    # Resample a block of replicates at a time so memory stays ~BOOTSTRAP_BLOCK values whatever the number of
    # pairs (one (n_boot, n) draw is 16 GB of indices at CelebA-HQ's 300k swaps). Generator.integers continues the
    # same stream across calls, so the interval is the one a single draw gives (tests/test_metrics.py checks).
    rows = max(1, BOOTSTRAP_BLOCK // v.size)
    means = np.concatenate([v[rng.integers(0, v.size, size=(min(rows, n_boot - i), v.size))].mean(axis=1)
                            for i in range(0, n_boot, rows)])
    lo, hi = np.quantile(means, [alpha / 2, 1 - alpha / 2])
    return {"mean": float(v.mean()), "ci_low": float(lo), "ci_high": float(hi), "n": int(v.size)}


def angle_error_deg(a_rad, b_rad) -> np.ndarray:
    """Per-row L2 of angle differences in degrees, with differences wrapped to (-180, 180]."""
    d = np.degrees(np.asarray(a_rad, dtype=np.float64) - np.asarray(b_rad, dtype=np.float64))
    d = (d + 180.0) % 360.0 - 180.0
    return np.linalg.norm(d.reshape(len(d), -1), axis=1)
