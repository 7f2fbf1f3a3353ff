"""DVC stage `threedmm`: the configured 3DMM encoder (`threedmm.encoder`) over every shard sample.

Writes data/threedmm/params.parquet (key, estimate, ground truth where the synthetic set has it),
data/threedmm/stats.json beside it (mean/std of the estimate's shape and expression over the training split: the
scale L_shape / L_exp standardise DECA's FLAME coefficients with) and reports/threedmm.json (per-group error of the
estimate against the ground truth: pose MAE in degrees, shape/exp Pearson r and normalised RMSE). `threedmm.encoder: fitted` reads data/threedmm/regressor.pt, which the later
`fit_regressor` stage makes from this table: use it only with a regressor from an earlier run.

Samples are decoded in `threedmm.workers` DataLoader workers (0: in this process; auto: the usable cores). Every
encoded batch is saved at once (data/threedmm/params.parts/, not a DVC output, so DVC leaves it for the rerun): a
killed run continues from the next batch under `dvc repro` and writes the same table (mfim.data.threedmm_table).
"""

from pathlib import Path

from mfim.runtime import ensure_allocator_env

SHARDS_DIR = "data/shards"
OUT = "data/threedmm/params.parquet"
REGRESSOR = "data/threedmm/regressor.pt"
REPORT = "reports/threedmm.json"
WEIGHTS = "data/weights/threedmm.json"


def _workers(value) -> int:
    """DataLoader workers that decode the shards: 0 decodes in this process; auto: the usable cores."""
    from mfim.data.progress import resolve_workers

    return 0 if value in (0, "0") else resolve_workers(value)


def _settings(params: dict, name: str) -> dict:
    """What besides the code and shards shapes an estimate: the encoder's params and the bytes of its weights (the
    weights manifest; the fitted regressor's own hash) -- the saved batches of a killed run are kept only under the
    same values."""
    from mfim.config import lookup
    from mfim.data.progress import sha256_of

    out = {"nets.threedmm": lookup(params, "nets.threedmm")}
    if Path(WEIGHTS).is_file():
        out["weights"] = sha256_of(WEIGHTS)
    if name == "fitted":
        out["regressor"] = sha256_of(REGRESSOR)
    return out


def main(params_path: str = "params.yaml") -> dict:
    import json
    import logging

    from mfim.config import load_params, lookup
    from mfim.data.shards import SPLITS, split_pattern
    from mfim.data.threedmm_table import error_metrics, error_summary, run_precompute
    from mfim.nets.threedmm import build_threedmm_encoder
    from mfim.runtime import configure_threads, pick_device

    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    params = load_params(params_path)
    configure_threads(lookup(params, "project.threads"))
    device = pick_device(lookup(params, "project.device"))
    name = lookup(params, "threedmm.encoder")
    if name == "fitted" and not Path(REGRESSOR).is_file():
        raise SystemExit(f"threedmm: encoder 'fitted' needs {REGRESSOR} from an earlier run (fit_regressor is fitted "
                         "on this stage's table); use tddfa or deca to build the table first")
    encoder = build_threedmm_encoder(name, params, device, checkpoint=REGRESSOR if name == "fitted" else None)
    patterns = [split_pattern(SHARDS_DIR, s) for s in SPLITS if list(Path(SHARDS_DIR).glob(f"{s}-*.tar"))]
    report = run_precompute(patterns, encoder, name, OUT, int(lookup(params, "threedmm.batch_size")), device,
                            workers=_workers(lookup(params, "threedmm.workers")), settings=_settings(params, name))
    Path(REPORT).parent.mkdir(parents=True, exist_ok=True)
    Path(REPORT).write_text(json.dumps(report, indent=1))
    err = (report.get("error") or {}).get("all")
    print(f"threedmm: {report['rows']} rows with {name} in {report['seconds']:.0f} s ({error_summary(err)}) -> {OUT}, "
          f"{REPORT}")

    import mlflow

    from mfim.tracking import start_run

    with start_run("threedmm", params, ["threedmm"]):
        mlflow.log_metrics({"rows": float(report["rows"]), "seconds": float(report["seconds"])})
        if err:
            mlflow.log_metrics(error_metrics(err))
        mlflow.log_artifact(REPORT)
    return report


if __name__ == "__main__":
    ensure_allocator_env()
    from mfim.config import exit_on_params_error

    with exit_on_params_error("threedmm"):
        main()
