"""DVC stage `gt_swaps`: rendered (source, target, exact swap) triples of the training people (synthetic data only).

Reads params.yaml groups `gt_swaps` and `synthesize` (and `data.resolution`); writes data/gt_swaps/triples.npz,
reports/gt_swaps.json and reports/grids/gt_swaps.png (source | target | ground-truth swap). The `train` stage
appends `train.gt_swap_pairs` of them to every batch under the `loss.gt_swap` term (mfim.data.gt_swaps). With real
photos, or `gt_swaps.pairs: 0`, the set is empty and the train stage refuses `train.gt_swap_pairs` > 0.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from mfim.runtime import ensure_allocator_env


def main(argv: list[str] | None = None) -> None:
    import numpy as np

    from mfim.config import load_params, lookup
    from mfim.data.gt_swaps import GtSwapConfig, empty_gt_swap_set, render_gt_swap_set, save_gt_swap_set
    from mfim.data.synth import SynthConfig
    from mfim.evaluation.grids import from_uint8, save_grid

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--out", default="data/gt_swaps/triples.npz")
    parser.add_argument("--report", default="reports/gt_swaps.json")
    parser.add_argument("--grid", default="reports/grids/gt_swaps.png")
    args = parser.parse_args(argv)
    params = load_params(args.params)
    cfg = GtSwapConfig.from_params(lookup(params, "gt_swaps"),
                                   size=int(lookup(params, "data.resolution")))
    synthetic = lookup(params, "data.source") == "synthetic"
    t0 = time.perf_counter()
    if synthetic and cfg.pairs > 0:
        data = render_gt_swap_set(SynthConfig.from_params(lookup(params, "synthesize")), cfg)
    else:  # keep the stage's output so the DAG stays whole; train refuses gt_swap_pairs > 0 on an empty set
        data = empty_gt_swap_set(cfg.size)
        print("gt_swaps: nothing rendered (" + ("gt_swaps.pairs is 0" if synthetic else
                                                 "data.source is not 'synthetic': real photos have no ground truth")
              + ")")
    save_gt_swap_set(data, args.out)
    n = len(data["src"])
    # source | target | ground-truth swap; an empty set leaves one grey row (the output must exist for DVC)
    rows = slice(0, min(8, n)) if n else slice(0, 1)
    images = data if n else {k: np.full((1, cfg.size, cfg.size, 3), 128, np.uint8) for k in ("src", "tgt", "gt")}
    save_grid(args.grid, [from_uint8(images[k][rows]) for k in ("src", "tgt", "gt")])
    report = {"triples": n, "people": int(len(set(data["source_identity"]) | set(data["target_identity"]))),
              "size": cfg.size, "seconds": round(time.perf_counter() - t0, 1),
              "config": {k: getattr(cfg, k) for k in cfg.__dataclass_fields__}}
    Path(args.report).parent.mkdir(parents=True, exist_ok=True)
    Path(args.report).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    ensure_allocator_env()  # the render workers are spawned from this process and inherit it (see synthesize)
    from mfim.config import exit_on_params_error

    with exit_on_params_error("gt_swaps"):
        main()
