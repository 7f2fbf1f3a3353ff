"""Run the `train` stage, then the `evaluate` stage, of one experiment into its own folder.

    python docs/experiments/run_variant.py RUN_DIR [--shards DIR] [--no-eval] [-S key=value ...]

params.yaml of the checkout with the -S overrides (YAML values, dotted keys as `dvc exp run -S`) is written to
RUN_DIR/params.yaml; training goes to RUN_DIR/train (mfim.pt, and checkpoint.pt when train.keep_checkpoint), its
report and curve to RUN_DIR (train.json, plots/train_loss.csv), the evaluation to RUN_DIR/eval (metrics.json,
grids), the wall times to RUN_DIR/wall.json: the layout the former continue_swapper.py read
(git history; the pipeline's remake is configs/ship/mfim_synth64.yaml now). `--shards`
trains on another shard folder (a larger data set made with other `synthesize` params, with the same eval people);
evaluation always reads the checkout's data/evalsets and data/shards. Repo root, after `dvc repro evalsets`.
"""

import argparse
import json
import time
from pathlib import Path

import yaml

from mfim.runtime import ensure_allocator_env


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--shards", default="data/shards")
    ap.add_argument("--no-eval", action="store_true")
    ap.add_argument("-S", dest="overrides", action="append", default=[])
    args = ap.parse_args()

    ensure_allocator_env()
    from mfim.config import load_params, override
    from mfim.evaluation.evaluate import run_evaluation
    from mfim.training.presets import apply_preset
    from mfim.training.run import run_training

    params = override(load_params(), args.overrides)
    run = args.run_dir
    run.mkdir(parents=True, exist_ok=True)
    (run / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    wall = {"shards": args.shards, "overrides": args.overrides}
    t0 = time.perf_counter()
    run_training(params, out_dir=run / "train", reports_dir=run, shards_dir=args.shards)
    wall["train_seconds"] = round(time.perf_counter() - t0, 1)
    (run / "wall.json").write_text(json.dumps(wall, indent=2) + "\n")
    if not args.no_eval:
        t0 = time.perf_counter()
        run_evaluation(apply_preset(params), model_path=run / "train" / "mfim.pt", reports_dir=run / "eval")
        wall["evaluate_seconds"] = round(time.perf_counter() - t0, 1)
        (run / "wall.json").write_text(json.dumps(wall, indent=2) + "\n")


if __name__ == "__main__":
    main()
