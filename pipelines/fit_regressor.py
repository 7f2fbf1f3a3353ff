"""DVC stage `fit_regressor`: the fitted 3DMM regressor (the third 3DMM option; L_shape on the embedded default).

Fits a small CNN on the train shards against the 3DMM table: the ground truth for synthetic data, the encoder's
estimates for real data (`threedmm.regressor.target`). Writes data/threedmm/regressor.pt and reports/regressor.json
(validation error per parameter group on held-out identities, the predict-the-mean baseline, and the error on the
eval split).
"""

from mfim.runtime import ensure_allocator_env

SHARDS_DIR = "data/shards"
TABLE = "data/threedmm/params.parquet"
OUT = "data/threedmm/regressor.pt"
REPORT = "reports/regressor.json"


def main(params_path: str = "params.yaml") -> dict:
    import json
    import logging
    from pathlib import Path

    from mfim.config import load_params, lookup
    from mfim.data.shards import split_pattern
    from mfim.nets.threedmm_regressor import FitConfig, RegressorConfig, fit_from_table
    from mfim.runtime import configure_threads

    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    params = load_params(params_path)
    configure_threads(lookup(params, "project.threads", None))
    r = lookup(params, "threedmm.regressor")
    has_eval = any(Path(SHARDS_DIR).glob("eval-*.tar"))
    report = fit_from_table(
        split_pattern(SHARDS_DIR, "train"),
        TABLE,
        OUT,
        r["target"],
        RegressorConfig(input_size=int(r["input_size"]), width=int(r["width"])),
        FitConfig(epochs=int(r["epochs"]), batch_size=int(r["batch_size"]), lr=float(r["lr"]),
                  val_fraction=float(r["val_fraction"]), seed=int(lookup(params, "project.seed", 0)),
                  augment=bool(r.get("augment", True))),
        eval_pattern=split_pattern(SHARDS_DIR, "eval") if has_eval else None,
    )
    Path(REPORT).parent.mkdir(parents=True, exist_ok=True)
    Path(REPORT).write_text(json.dumps(report, indent=1))
    v, b = report["val_error"], report["val_error_predict_mean"]
    print(f"fit_regressor: {report['seconds']:.0f} s; validation pose MAE {v['pose']['mae_deg']:.2f}° "
          f"(mean-only {b['pose']['mae_deg']:.2f}°), shape r {v['shape']['pearson_r']:.3f} nRMSE "
          f"{v['shape']['nrmse']:.3f}, exp r {v['exp']['pearson_r']:.3f} nRMSE {v['exp']['nrmse']:.3f} -> {OUT}")

    import mlflow

    from mfim.tracking import start_run

    with start_run("fit_regressor", params, ["threedmm"]):
        for split, err in (("val", v), ("eval", report.get("eval_split_error"))):
            if err:
                mlflow.log_metrics({f"{split}_pose_mae_deg": err["pose"]["mae_deg"],
                                    f"{split}_shape_pearson_r": err["shape"]["pearson_r"],
                                    f"{split}_shape_nrmse": err["shape"]["nrmse"],
                                    f"{split}_exp_pearson_r": err["exp"]["pearson_r"],
                                    f"{split}_exp_nrmse": err["exp"]["nrmse"]})
        for step, loss in enumerate(report["train_loss"]):
            mlflow.log_metric("train_loss", loss, step=step)
        mlflow.log_artifact(REPORT)
    return report


if __name__ == "__main__":
    ensure_allocator_env()
    main()
