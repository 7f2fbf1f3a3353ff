"""The loss network's render set with more people, fitted with 3DDFA_V2's network (docs/EXPERIMENTS.md §15).

    python docs/experiments/regressor_backbone.py EXTRA_PEOPLE [EPOCHS] [BACKBONE]     (repo root, after `dvc repro shard`)

The pipeline's loss-network render set (threedmm.regressor: 600 people x 4 renders from identity 100,000) plus
EXTRA_PEOPLE more people x 2 renders (identities after them, still below the evaluator's 200,000), fitted with
``backbone`` (default mobilenet_v1), lr 1e-3 and ``shape_tail_weight`` 0.1. Validation as the `fit_regressor`
stage: held-out people of the set (10 %, all drawn from the first 600 when EXTRA_PEOPLE is 0) and the eval shards
(the swapper's 40 evaluation people). Prints one JSON row; the fitted file goes to /tmp/regressor_backbone.pt.
"""

import json
import sys
from dataclasses import replace

import numpy as np

from mfim.config import load_params
from mfim.data.regressor_set import RenderSetConfig, render_aligned_set
from mfim.data.synth import SynthConfig
from mfim.data.regressor_fit import FitConfig, fit_from_render_set
from mfim.nets.threedmm_regressor import RegressorConfig
from mfim.runtime import configure_threads


def main() -> None:
    # render workers are spawned processes: they import this file, so nothing may run at import
    extra = int(sys.argv[1]) if len(sys.argv) > 1 else 0
    epochs = int(sys.argv[2]) if len(sys.argv) > 2 else 10
    backbone = sys.argv[3] if len(sys.argv) > 3 else "mobilenet_v1"
    params = load_params()
    configure_threads(2)
    r = params["threedmm"]["regressor"]
    synth = SynthConfig.from_params(params["synthesize"])
    offset, people = int(r["identity_offset"]), int(r["render_identities"])
    sets = [render_aligned_set(synth, RenderSetConfig(identities=people, identity_offset=offset,
                                                      images_per_identity=int(r["render_images_per_identity"])))]
    if extra:
        sets.append(render_aligned_set(synth, RenderSetConfig(identities=extra, identity_offset=offset + people,
                                                              images_per_identity=2)))
    render = {k: np.concatenate([s[k] for s in sets]) for k in ("images", "shape", "exp", "pose", "identity")}
    rep = fit_from_render_set(render, "/tmp/regressor_backbone.pt", RegressorConfig(64, int(r["width"]),
                                                                                    backbone=backbone),
                              replace(FitConfig.from_params(params, "regressor"), epochs=epochs, lr=1e-3,
                                      shape_tail_weight=0.1),
                              "data/shards/eval-*.tar", "data/threedmm/params.parquet", log=lambda *_: None)
    val, ev = rep["val_error"], rep["eval_split_error"]
    print(json.dumps({"people": people + extra, "images": int(len(render["images"])), "backbone": backbone,
                      "epochs": epochs, "seconds": rep["seconds"],
                      "val_shape_r_first10": val["shape"]["pearson_r_first10"], "val_exp_r": val["exp"]["pearson_r"],
                      "eval_shape_r_first10": ev["shape"]["pearson_r_first10"], "eval_exp_r": ev["exp"]["pearson_r"],
                      "eval_pose_mae_deg": ev["pose"]["mae_deg"]}))


if __name__ == "__main__":
    main()
