"""Shape / expression r of the fitted 3DMM regressor against the size of its render set (docs/EXPERIMENTS.md).

Run from the repo root after `dvc repro shard threedmm`: python docs/experiments/regressor_curve.py 200 400 800 1600
(numbers of identities, 5 renders each). Validation: held-out identities of the render set, and the eval shards.
"""

import json
import sys

from mfim.config import load_params
from mfim.data.regressor_set import RenderSetConfig, render_aligned_set
from mfim.data.synth import SynthConfig
from mfim.nets.threedmm_regressor import FitConfig, RegressorConfig, fit_from_render_set
from mfim.runtime import configure_threads

params = load_params()
configure_threads(2)
sizes = [int(a) for a in sys.argv[1:]] or [200, 400, 800, 1600]
r = params["threedmm"]["regressor"]
full = render_aligned_set(SynthConfig.from_params(params["synthesize"]),
                          RenderSetConfig(identities=max(sizes), images_per_identity=5, identity_offset=100_000))
rows = []
for n in sizes:
    keep = full["identity"] < 100_000 + n
    subset = {k: v[keep] for k, v in full.items()}
    rep = fit_from_render_set(subset, "/tmp/regressor_curve.pt", RegressorConfig(64, int(r["width"])),
                              FitConfig(epochs=int(r["epochs"]), batch_size=64, lr=float(r["lr"])),
                              "data/shards/eval-*.tar", "data/threedmm/params.parquet", log=lambda *_: None)
    e = rep["eval_split_error"]
    rows.append({"identities": n, "images": int(keep.sum()), "seconds": rep["seconds"],
                 "shape_r": e["shape"]["pearson_r"], "shape_r_first10": e["shape"]["pearson_r_first10"],
                 "exp_r": e["exp"]["pearson_r"], "pose_mae_deg": e["pose"]["mae_deg"]})
    print(json.dumps(rows[-1]))
