"""DVC stage `shard`: aligned faces at `data.resolution` into WebDataset tars (data/shards/{train,eval}-%06d.tar).

Reads data/aligned/ (crops), data/aligned.parquet (aligned landmarks, from `align`) and, for the synthetic source,
data/raw/ground_truth.parquet (split, identity, 3DMM ground truth). A real folder (`data.source: folder`) gets a
seeded split (`shard.eval_fraction`, default 0.1). Writes data/shards/index.json and reports/shard.json. Images are
read, resized and encoded in `shard.workers` processes (auto: the usable cores); the tars are the same bytes with any
count.
"""

from mfim.runtime import ensure_allocator_env

ALIGNED_DIR = "data/aligned"
ALIGNED_TABLE = "data/aligned.parquet"
ALIGN_REJECTS = "data/align_rejects.csv"
GROUND_TRUTH = "data/raw/ground_truth.parquet"
OUT_DIR = "data/shards"
REPORT = "reports/shard.json"


def align_table(table_path: str) -> tuple[dict, dict]:
    """key -> (68, 2) landmarks in aligned pixels, and key -> 2×3 original -> aligned transform, keyed like the
    shards (the aligned file's relative path, sanitised)."""
    from pathlib import Path

    import numpy as np
    import pandas as pd

    from mfim.data.shards import make_key

    if not Path(table_path).is_file():
        return {}, {}
    df = pd.read_parquet(table_path, columns=["output", "landmarks", "transform"])
    keys = [make_key(out) for out in df["output"]]
    landmarks = {k: np.asarray(lm, np.float32).reshape(68, 2) for k, lm in zip(keys, df["landmarks"])}
    transforms = {k: np.asarray(t, np.float64).reshape(2, 3) for k, t in zip(keys, df["transform"])}
    return landmarks, transforms


def main(params_path: str = "params.yaml") -> dict:
    import json
    import logging
    from pathlib import Path

    import pandas as pd

    from mfim.config import load_params, lookup
    from mfim.data.progress import resolve_workers
    from mfim.data.shards import ShardInputs, build_shards

    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    params = load_params(params_path)
    source = lookup(params, "data.source")
    ground_truth = None
    if source == "synthetic":
        if not Path(GROUND_TRUTH).is_file():
            raise SystemExit(f"shard: data.source is synthetic but {GROUND_TRUTH} is missing (run `dvc repro synthesize`)")
        ground_truth = pd.read_parquet(GROUND_TRUTH, columns=["key", "file", "identity", "split", "shape", "exp",
                                                                "yaw", "pitch", "roll"])
    landmarks, transforms = align_table(ALIGNED_TABLE)
    inputs = ShardInputs(
        aligned_dir=Path(ALIGNED_DIR),
        ground_truth=ground_truth,
        landmarks=landmarks,
        transforms=transforms,
        source=source,
        eval_fraction=float(lookup(params, "shard.eval_fraction")),
        seed=int(lookup(params, "shard.seed")),
    )
    report = build_shards(inputs, OUT_DIR, int(lookup(params, "data.resolution")),
                          int(lookup(params, "shard.max_shard_bytes")),
                          workers=resolve_workers(lookup(params, "shard.workers")))
    if Path(ALIGN_REJECTS).is_file():
        report["align_rejects"] = int(len(pd.read_csv(ALIGN_REJECTS)))
    Path(REPORT).parent.mkdir(parents=True, exist_ok=True)
    Path(REPORT).write_text(json.dumps(report, indent=1))
    print(f"shard: {report['counts']} samples ({report['identities']} identities) in {report['shards']} shards, "
          f"{report['rejected']} rejected, {report['seconds']:.1f} s -> {OUT_DIR}, {REPORT}")

    import mlflow

    from mfim.tracking import start_run

    with start_run("shard", params, ["data", "shard"]):
        mlflow.log_metrics({f"{k}_{s}": float(v) for k in ("counts", "identities", "shards", "bytes")
                            for s, v in report[k].items()})
        mlflow.log_metrics({"rejected": float(report["rejected"]), "seconds": float(report["seconds"])})
        mlflow.log_artifact(REPORT)
    return report


if __name__ == "__main__":
    ensure_allocator_env()
    from mfim.config import exit_on_params_error

    with exit_on_params_error("shard"):
        main()
