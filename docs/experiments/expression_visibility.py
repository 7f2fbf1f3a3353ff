"""Where the 3DMM networks lose expression r: per coefficient, against how far it moves the face (§20).

    python docs/experiments/expression_visibility.py OUT.json [--val-cache VAL.npz]

For the shipped loss network and evaluator: Pearson r per leading shape and expression coefficient on §18's 500
held-out people (identities 190,000+, 2 renders each; rendered here, or read from ``--val-cache``, an .npz of that
set: the ship runner's render cache data/ship/regressor_synth64/renders/190000_500x2.npz). For the BFM itself: each expression coefficient at 1 sampling sigma
(``synthesize.expression_sigma`` x its std) on the mean face, its largest vertex motion in pixels of the 64 px aligned
image (scale: the eye centres ~0.23 of the side apart, as the FFHQ alignment puts them), and the share of that
motion a least-squares offset of the 40 shape directions (each at ``shape_sigma`` x its std) can mimic.
"""

import argparse
import json
from pathlib import Path

import numpy as np
import torch

VAL_OFFSET, VAL_PEOPLE, VAL_RENDERS = 190_000, 500, 2  # the held-out people of configs/ship/regressor_synth64.yaml


def render(synth, first: int, people: int, renders: int, workers: int, cache: Path | None, log) -> dict:
    from mfim.data.regressor_set import RenderSetConfig, render_aligned_set

    if cache is not None and cache.is_file():
        with np.load(cache) as z:
            return {k: z[k] for k in z.files}
    return render_aligned_set(synth, RenderSetConfig(people, renders, first, 64, workers), log=log)

NETWORKS = {"loss network": "checkpoints/regressor_synth64.pt", "evaluator": "checkpoints/evaluator_synth64.pt"}


def bfm_motion(synth) -> list[dict]:
    from mfim.nets.bfm import load_bfm, tddfa_coefficient_stats

    bfm, stats = load_bfm(), tddfa_coefficient_stats()
    shape = (bfm.shape_basis.double() * torch.tensor(synth.shape_sigma * stats["shape_std"]).double())
    exp = (bfm.exp_basis.double() * torch.tensor(synth.expression_sigma * stats["exp_std"]).double())
    shape, exp = shape.reshape(-1, bfm.n_shape), exp.reshape(-1, bfm.n_exp)
    eyes = bfm.mean_shape[bfm.landmark_indices].double()
    px = 64 * 0.23 / float((eyes[36:42].mean(0) - eyes[42:48].mean(0))[:2].norm())
    residual = exp - shape @ torch.linalg.lstsq(shape, exp).solution
    rows = []
    for k in range(bfm.n_exp):
        motion = exp[:, k].reshape(-1, 3).norm(dim=1) * px
        rows.append({"coefficient": k + 1, "max_vertex_px": round(float(motion.max()), 3),
                     "mean_vertex_px": round(float(motion.mean()), 3),
                     "share_a_shape_offset_mimics": round(1 - float(residual[:, k].norm() ** 2 / exp[:, k].norm() ** 2), 3)})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--val-cache", default=None)
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args()
    from mfim.config import load_params
    from mfim.data.synth import SynthConfig
    from mfim.data.threedmm_table import pearson_per_column
    from mfim.data.regressor_fit import predict
    from mfim.nets.threedmm_regressor import load_fitted_regressor

    torch.set_num_threads(2)
    synth = SynthConfig.from_params(load_params()["synthesize"])
    val = render(synth, VAL_OFFSET, VAL_PEOPLE, VAL_RENDERS, args.workers,
                 Path(args.val_cache) if args.val_cache else None, print)
    out = {"r_per_coefficient": {}, "expression_motion": bfm_motion(synth)}
    for name, path in NETWORKS.items():
        pred = predict(load_fitted_regressor(path), val["images"])
        out["r_per_coefficient"][name] = {
            g: [round(float(r), 3) for r in pearson_per_column(pred[g][:, :10], val[g][:, :10])] for g in ("shape", "exp")}
    Path(args.out).write_text(json.dumps(out, indent=1))
    print(json.dumps(out["r_per_coefficient"]))
    for row in out["expression_motion"]:
        print(row)


if __name__ == "__main__":
    main()
