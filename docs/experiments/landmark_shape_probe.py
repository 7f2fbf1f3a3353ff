"""How much BFM shape do 68 landmarks carry at 64 px? (docs/EXPERIMENTS.md §13)

    python docs/experiments/landmark_shape_probe.py       (repo root, after `dvc repro align`)

A ceiling for landmark-based shape estimators (the issue's "BFM fit to the 68 landmarks"), against which the fitted
CNN regressors of §6 (shape r 0.41-0.45 on the leading 10 coefficients) can be read. Per render of
data/raw/ground_truth.parquet: a regularised linear least-squares fit of the 40 shape + 10 expression coefficients
(std-normalised, N(0, 1) prior) to the 68 landmarks, given the render's true camera ``[s·R | t]`` (oracle pose:
the fit is linear then). Landmarks are (a) the true projected BFM landmark vertices plus Gaussian noise of 0-1 px
at the scale of a 64 px aligned crop (jaw width ~32 px), (b) the dlib 68 points the `align` stage detected on the
256 px canvas. Prints Pearson r per leading shape coefficient against the truth over all renders (no training, so
nothing is "held out" or fitted to people).
"""

import numpy as np
import pandas as pd

from mfim.nets.bfm import load_bfm, tddfa_coefficient_stats

N_LEAD = 10
CANVAS = 256.0
JAW_PX_AT_64 = 32.0  # landmarks 0 -> 16 in a 64 px FFHQ-aligned crop


def landmark_jacobian(bfm, stats, camera: np.ndarray):
    """(68×2 landmarks of the mean face, 136×50 d landmarks / d std-normalised (shape, expression)) in the image
    frame of a 3×4 camera, y up (3DDFA_V2's camera space)."""
    idx = bfm.landmark_indices
    mean = bfm.mean_shape[idx].double().numpy()
    basis = np.concatenate([bfm.shape_basis[idx].double().numpy() * stats["shape_std"],
                            bfm.exp_basis[idx].double().numpy() * stats["exp_std"]], 2)  # 68×3×50
    a = camera[:2, :3]
    return mean @ a.T + camera[:2, 3], np.einsum("ij,njk->nik", a, basis).reshape(136, -1)


def fit_shape(bfm, stats, camera: np.ndarray, points: np.ndarray, noise_px: float) -> np.ndarray:
    """MAP fit of std-normalised coefficients to 68 image points (x right, y down, canvas px); leading shape ones."""
    base, jac = landmark_jacobian(bfm, stats, camera)
    residual = (np.stack([points[:, 0], CANVAS - points[:, 1]], 1) - base).reshape(-1)
    w = 1.0 / max(noise_px, 0.05) ** 2
    coef = np.linalg.solve(w * jac.T @ jac + np.eye(jac.shape[1]), w * jac.T @ residual)
    return coef[:N_LEAD]


def pearson(est: np.ndarray, truth: np.ndarray) -> np.ndarray:
    return np.array([np.corrcoef(est[:, j], truth[:, j])[0, 1] for j in range(est.shape[1])])


def main() -> None:
    gt = pd.read_parquet("data/raw/ground_truth.parquet")
    bfm = load_bfm()
    stats = {k: v.astype(np.float64)[None, None, :] for k, v in tddfa_coefficient_stats().items()}
    shape_std = stats["shape_std"][0, 0, :N_LEAD]
    rng = np.random.default_rng(0)

    def run(rows, points_of, noise64, label):
        est, truth = [], []
        for r in rows:
            true_pts = np.asarray(r.landmarks, float).reshape(68, 2)
            to64 = JAW_PX_AT_64 / np.linalg.norm(true_pts[0] - true_pts[16])  # canvas px -> 64 px crop px
            pts = points_of(r, true_pts, noise64 / to64)
            est.append(fit_shape(bfm, stats, np.asarray(r.pose_matrix, float).reshape(3, 4), pts, max(noise64, 0.25) / to64))
            truth.append(np.asarray(r.shape, float)[:N_LEAD] / shape_std)
        r = pearson(np.stack(est), np.stack(truth))
        print(f"{label}: shape r, leading {N_LEAD}: mean {r.mean():.3f}  {np.round(r, 2).tolist()}")

    rows = list(gt.itertuples())
    for noise in (0.0, 0.25, 0.5, 1.0):
        run(rows, lambda r, p, s: p + rng.normal(0.0, s, p.shape), noise,
            f"true landmarks + {noise:.2f} px noise (64 px scale), n={len(rows)}")
    aligned = pd.read_parquet("data/aligned.parquet").set_index("key")
    detected = [r for r in rows if r.key in aligned.index]
    err = [np.linalg.norm(np.asarray(r.landmarks, float).reshape(68, 2)
                          - np.asarray(aligned.loc[r.key, "source_landmarks"], float).reshape(68, 2), axis=1).mean()
           * JAW_PX_AT_64 / np.linalg.norm(np.subtract(*np.asarray(r.landmarks, float).reshape(68, 2)[[0, 16]]))
           for r in detected]
    print(f"dlib 68 points vs the true landmarks: mean {np.mean(err):.2f} px at the 64 px scale, n={len(detected)}")
    run(detected, lambda r, p, s: np.asarray(aligned.loc[r.key, "source_landmarks"], float).reshape(68, 2), 1.0,
        "dlib 68 points (256 px canvas)")


if __name__ == "__main__":
    main()
