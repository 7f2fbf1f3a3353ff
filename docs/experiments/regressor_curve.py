"""Shape / expression r of the fitted 3DMM regressor against the size of its render set (docs/EXPERIMENTS.md).

Run from the repo root after `dvc repro shard threedmm`: python docs/experiments/regressor_curve.py 150 300 600 1200
(numbers of identities, threedmm.regressor.render_images_per_identity renders each; the largest set is rendered once
and the smaller ones are its first identities). Validation: held-out identities of the render set, and the eval
shards (the swapper's 40 evaluation people). Writes reports/regressor_curve.json.
"""

import json
import sys
from pathlib import Path

from mfim.config import load_params
from mfim.data.regressor_set import RenderSetConfig, render_aligned_set
from mfim.data.synth import SynthConfig
from mfim.data.regressor_fit import FitConfig, fit_from_render_set
from mfim.nets.threedmm_regressor import RegressorConfig
from mfim.runtime import configure_threads


def main() -> None:
    # render workers are spawned processes: they import this file, so nothing may run at import
    params = load_params()
    configure_threads(2)
    sizes = [int(a) for a in sys.argv[1:]] or [150, 300, 600, 1200]
    r = params["threedmm"]["regressor"]
    per_identity = int(r["render_images_per_identity"])
    full = render_aligned_set(SynthConfig.from_params(params["synthesize"]),
                              RenderSetConfig(identities=max(sizes), images_per_identity=per_identity,
                                              identity_offset=int(r["identity_offset"])))
    rows = []
    for n in sizes:
        keep = full["identity"] < int(r["identity_offset"]) + n
        subset = {k: v[keep] for k, v in full.items()}
        rep = fit_from_render_set(subset, "/tmp/regressor_curve.pt", RegressorConfig(64, int(r["width"])),
                                  FitConfig.from_params(params, "regressor"),
                                  "data/shards/eval-*.tar", "data/threedmm/params.parquet", log=lambda *_: None)
        e = rep["eval_split_error"]
        rows.append({"identities": n, "images": int(keep.sum()), "seconds": rep["seconds"],
                     "shape_r": e["shape"]["pearson_r"], "shape_r_first10": e["shape"]["pearson_r_first10"],
                     "exp_r": e["exp"]["pearson_r"], "pose_mae_deg": e["pose"]["mae_deg"],
                     "val_shape_r_first10": rep["val_error"]["shape"]["pearson_r_first10"],
                     "val_exp_r": rep["val_error"]["exp"]["pearson_r"]})
        print(json.dumps(rows[-1]), flush=True)
        Path("reports/regressor_curve.json").write_text(json.dumps(
            {"images_per_identity": per_identity, "width": int(r["width"]), "epochs": int(r["epochs"]),
             "validation": "eval split: the 40 evaluation people (shape_r*, exp_r, pose); val_*: held-out identities "
                           "of the render set", "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
