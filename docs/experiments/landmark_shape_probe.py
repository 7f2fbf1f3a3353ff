"""How much BFM shape and expression do 68 landmarks carry at 64 px, and can a network see them? (EXPERIMENTS §13)

    python docs/experiments/landmark_shape_probe.py ceiling                 (repo root, after `dvc repro align`)
    python docs/experiments/landmark_shape_probe.py network [PEOPLE] [EPOCHS]

A route to the issue's regressor bar (shape and expression r >= 0.8 on the leading 10 coefficients of held-out
people) other than §6's CNN regressors (r 0.41-0.45): landmarks, then a fit of BFM to them.

``ceiling``: per render of data/raw/ground_truth.parquet, a MAP fit of BFM's 40 shape + 10 expression coefficients
(std-normalised, prior N(0, synthesize.shape_sigma²) / N(0, expression_sigma²), the renders' own) to its 68
landmarks, (a) given the render's true camera (the fit is linear then), (b) with a scaled-orthographic camera fitted
too (alternation from the mean face, then a joint Levenberg-Marquardt refinement). Landmarks: the true projected BFM
landmark vertices plus Gaussian noise of 0-1 px at the scale of a 64 px aligned crop (jaw width ~32 px), and the
dlib 68 points the `align` stage detected on the 256 px canvas. Nothing is trained, so no person is "seen".

``network``: a render set of PEOPLE people (threedmm.regressor's offset and images per person) with their exact
aligned landmarks; a small U-Net with soft-argmax heatmaps (integral regression) learns the 68 points on 90 % of
the people; then (b)'s fit on its predictions, for the held-out 10 % and for the pipeline's 190-odd eval images
(dlib-aligned, as the evaluation sees them).
"""

import sys
import time

import cv2
import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from mfim.config import load_params
from mfim.data.threedmm_table import pearson_per_column as pearson
from mfim.nets.bfm import load_bfm, tddfa_coefficient_stats

N_LEAD = 10
JAW_PX_AT_64 = 32.0  # landmarks 0 -> 16 in a 64 px FFHQ-aligned crop


# --- BFM landmark fit ----------------------------------------------------------------------------------------------

def landmark_model():
    """68×3 mean landmark vertices and their 68×3×50 basis per 1σ of (shape 40 | expression 10)."""
    bfm, st = load_bfm(), tddfa_coefficient_stats()
    idx = bfm.landmark_indices
    basis = np.concatenate([bfm.shape_basis[idx].double().numpy() * st["shape_std"],
                            bfm.exp_basis[idx].double().numpy() * st["exp_std"]], 2)
    return bfm.mean_shape[idx].double().numpy(), basis


def coefficient_prior(params: dict) -> np.ndarray:
    s = params["synthesize"]
    return np.r_[np.full(40, float(s["shape_sigma"])), np.full(10, float(s["expression_sigma"]))]


def _y_up(points: np.ndarray) -> np.ndarray:
    p = np.asarray(points, np.float64).copy()
    p[..., 1] = -p[..., 1]
    return p


def fit_known_camera(model, prior, camera: np.ndarray, points: np.ndarray, noise_px: float, height: float):
    """Coefficients from 68 image points (x right, y down) through a known 3×4 ``[s·R | t]`` (3DDFA_V2 layout)."""
    mean, basis = model
    a = camera[:2, :3]
    jac = np.einsum("ij,njk->nik", a, basis).reshape(136, -1)
    pts = np.stack([points[:, 0], height - points[:, 1]], 1)
    residual = (pts - mean @ a.T - camera[:2, 3]).reshape(-1)
    w = 1.0 / noise_px**2
    return np.linalg.solve(w * jac.T @ jac + np.diag(prior**-2.0), w * jac.T @ residual)


def fit_free_camera(model, prior, points: np.ndarray, noise_px: float, init_iters: int = 15) -> np.ndarray:
    """Coefficients from 68 image points with a scaled-orthographic camera fitted as well."""
    from scipy.optimize import least_squares
    from scipy.spatial.transform import Rotation

    mean, basis = model
    pts = _y_up(points)
    coef = np.zeros(basis.shape[2])
    for _ in range(init_iters):  # alternate: affine camera by least squares (made a similarity), then coefficients
        shape = mean + basis @ coef
        aff, *_ = np.linalg.lstsq(np.c_[shape, np.ones(68)], pts, rcond=None)
        u, s, vt = np.linalg.svd(aff[:3].T, full_matrices=False)
        m, shift = s.mean() * u @ vt, aff[3]
        jac = np.einsum("ij,njk->nik", m, basis).reshape(136, -1)
        w = 1.0 / noise_px**2
        coef = np.linalg.solve(w * jac.T @ jac + np.diag(prior**-2.0), w * jac.T @ (pts - mean @ m.T - shift).ravel())
    r3 = np.vstack([u @ vt, np.cross(*(u @ vt))])

    def residuals(p):
        rot = Rotation.from_rotvec(p[:3]).as_matrix()[:2]
        proj = (mean + basis @ p[6:]) @ rot.T * np.exp(p[3]) + p[4:6]
        return np.r_[((proj - pts) / noise_px).ravel(), p[6:] / prior]

    x0 = np.r_[Rotation.from_matrix(r3).as_rotvec(), np.log(s.mean()), shift, coef]
    return least_squares(residuals, x0, method="lm").x[6:]


def report(label: str, coef: np.ndarray, shape: np.ndarray, exp: np.ndarray) -> None:
    st = tddfa_coefficient_stats()
    rs = pearson(coef[:, :N_LEAD], shape[:, :N_LEAD] / st["shape_std"][:N_LEAD])
    re = pearson(coef[:, 40:40 + N_LEAD], exp[:, :N_LEAD] / st["exp_std"][:N_LEAD])
    print(f"{label}: shape r (leading {N_LEAD}) {rs.mean():.3f} {np.round(rs, 2).tolist()}; expression r "
          f"{re.mean():.3f}", flush=True)


# --- ceiling --------------------------------------------------------------------------------------------------------

def ceiling(params: dict) -> None:
    gt = pd.read_parquet("data/raw/ground_truth.parquet")
    model, prior = landmark_model(), coefficient_prior(params)
    canvas = float(params["synthesize"]["canvas"])
    rng = np.random.default_rng(0)
    true = np.stack([np.asarray(p, float).reshape(68, 2) for p in gt.landmarks])
    to64 = JAW_PX_AT_64 / np.linalg.norm(true[:, 0] - true[:, 16], axis=1)
    cams = [np.asarray(c, float).reshape(3, 4) for c in gt.pose_matrix]
    shape, exp = np.stack(gt["shape"].map(np.asarray)), np.stack(gt["exp"].map(np.asarray))
    for noise in (0.0, 0.25, 0.5, 1.0):
        pts = true + rng.normal(0.0, 1.0, true.shape) * (noise / to64)[:, None, None]
        sd = max(noise, 0.1)
        known = np.stack([fit_known_camera(model, prior, c, p, sd / k, canvas) for c, p, k in zip(cams, pts, to64)])
        report(f"true landmarks + {noise:.2f} px, true camera (n={len(gt)})", known, shape, exp)
        free = np.stack([fit_free_camera(model, prior, p * k, sd) for p, k in zip(pts, to64)])
        report(f"true landmarks + {noise:.2f} px, fitted camera", free, shape, exp)
    aligned = pd.read_parquet("data/aligned.parquet").set_index("key")
    keep = gt.key.isin(aligned.index).to_numpy()
    dlib = np.stack([np.asarray(aligned.loc[k, "source_landmarks"], float).reshape(68, 2) for k in gt.key[keep]])
    err = (np.linalg.norm(dlib - true[keep], axis=2).mean(1) * to64[keep]).mean()
    print(f"dlib 68 points vs the true landmarks: mean {err:.2f} px at the 64 px scale (n={keep.sum()})")
    known = np.stack([fit_known_camera(model, prior, c, p, 1.0 / k, canvas)
                      for c, p, k in zip(np.array(cams)[keep], dlib, to64[keep])])
    report("dlib 68 points, true camera", known, shape[keep], exp[keep])


# --- network --------------------------------------------------------------------------------------------------------

def _block(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.SiLU(inplace=True))


class LandmarkNet(nn.Module):
    """64 px aligned face in [-1, 1] -> 68×2 points in aligned pixels: a small U-Net to 32×32 heatmaps, whose
    softmax expectation (integral regression, Sun et al. 2018) gives sub-pixel, differentiable coordinates."""

    def __init__(self, width: int = 32, n_points: int = 68, size: int = 64):
        super().__init__()
        w, self.size = width, size
        self.e1 = nn.Sequential(_block(3, w), _block(w, w))
        self.e2 = nn.Sequential(_block(w, 2 * w, 2), _block(2 * w, 2 * w))
        self.e3 = nn.Sequential(_block(2 * w, 4 * w, 2), _block(4 * w, 4 * w))
        self.e4 = nn.Sequential(_block(4 * w, 4 * w, 2), _block(4 * w, 4 * w), _block(4 * w, 4 * w))
        self.d3 = _block(8 * w, 4 * w)
        self.d2 = nn.Sequential(_block(6 * w, 4 * w), _block(4 * w, 4 * w))
        self.head = nn.Conv2d(4 * w, n_points, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        up = lambda t: F.interpolate(t, scale_factor=2, mode="bilinear", align_corners=False)  # noqa: E731
        x2 = self.e2(self.e1(x))
        x3 = self.e3(x2)
        y = self.d3(torch.cat([up(self.e4(x3)), x3], 1))
        h = self.head(self.d2(torch.cat([up(y), x2], 1)))
        b, n, hh, ww = h.shape
        p = F.softmax(h.flatten(2), -1).view(b, n, hh, ww)
        grid = (torch.arange(ww, dtype=h.dtype, device=h.device) + 0.5) * (self.size / ww) - 0.5
        return torch.stack([(p.sum(2) * grid).sum(-1), (p.sum(3) * grid).sum(-1)], -1)


def _tensor(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def network(params: dict, people: int, epochs: int) -> None:
    from mfim.data.regressor_set import RenderSetConfig, render_aligned_set
    from mfim.data.synth import SynthConfig

    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    r = params["threedmm"]["regressor"]
    data = render_aligned_set(SynthConfig.from_params(params["synthesize"]),
                              RenderSetConfig(identities=people, images_per_identity=int(r["render_images_per_identity"]),
                                              identity_offset=int(r["identity_offset"])))
    x, y = _tensor(data["images"]), torch.from_numpy(data["landmarks"])
    ids = np.unique(data["identity"])
    val = np.isin(data["identity"], rng.choice(ids, max(1, len(ids) // 10), replace=False))
    train = np.flatnonzero(~val)
    net, batch = LandmarkNet(), 32
    opt = torch.optim.AdamW(net.parameters(), 2e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, 2e-3, total_steps=int(epochs * (len(train) // batch)))
    t0 = time.perf_counter()
    for epoch in range(epochs):
        net.train()
        order = rng.permutation(train)
        for b in range(len(order) // batch):
            i = order[b * batch:(b + 1) * batch]
            loss = (net(x[i]) - y[i]).abs().mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        net.eval()
        with torch.no_grad():
            pred = torch.cat([net(x[val][j:j + 256]) for j in range(0, int(val.sum()), 256)])
        err = (pred - y[val]).norm(dim=-1).mean().item()
        print(f"epoch {epoch}: train L1 {loss.item():.3f}, held-out people {err:.3f} px ({time.perf_counter() - t0:.0f} s)",
              flush=True)
    model, prior = landmark_model(), coefficient_prior(params)
    # aligned 64 px crops are the scale the noise is stated at (jaw ~32 px)
    fit = lambda pts: np.stack([fit_free_camera(model, prior, p, 0.5) for p in pts])  # noqa: E731
    report("held-out render-set people, predicted landmarks", fit(pred.numpy()), data["shape"][val], data["exp"][val])
    report("held-out render-set people, true landmarks", fit(y[val].numpy()), data["shape"][val], data["exp"][val])
    gt = pd.read_parquet("data/raw/ground_truth.parquet").set_index("key")
    al = pd.read_parquet("data/aligned.parquet")
    al = al[al.key.str.startswith("eval/") & (al.note == "")]
    images = np.stack([cv2.resize(cv2.cvtColor(cv2.imread(f"data/aligned/{o}"), cv2.COLOR_BGR2RGB), (64, 64),
                                  interpolation=cv2.INTER_AREA) for o in al.output])
    with torch.no_grad():
        pred = net(_tensor(images)).numpy()
    report(f"pipeline eval images (n={len(al)}), predicted landmarks", fit(pred),
           np.stack([gt.loc[k, "shape"] for k in al.key]), np.stack([gt.loc[k, "exp"] for k in al.key]))


def main() -> None:
    params = load_params()
    torch.set_num_threads(int(params["project"].get("threads", 2)))
    if sys.argv[1:2] == ["ceiling"]:
        ceiling(params)
    elif sys.argv[1:2] == ["network"]:
        network(params, int(sys.argv[2]) if len(sys.argv) > 2 else 600, int(sys.argv[3]) if len(sys.argv) > 3 else 25)
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main()
