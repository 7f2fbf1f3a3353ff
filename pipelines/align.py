"""DVC stage `align`: FFHQ-align `align.input_dir` (the synthetic raws by default, or any folder of photos).

Writes data/aligned/ (crops), data/aligned.parquet (landmarks in aligned pixels, transforms, face counts),
data/align_rejects.csv (+ .parquet) (file, reason) and reports/align.json (counts; on the synthetic set the landmark
error against ground truth). Logs the report's numbers to MLflow.

Resumable: data/aligned.journal.jsonl (not a DVC output) records each finished photo; the outputs are `persist` in
dvc.yaml, so a killed run continues under `dvc repro` (mfim.data.align_folder explains what is kept). `align.workers`:
worker processes, or auto (the usable cores).
"""

from mfim.runtime import ensure_allocator_env

OUT_DIR = "data/aligned"
TABLE = "data/aligned.parquet"
REJECTS = "data/align_rejects.csv"
REPORT = "reports/align.json"


def _metrics(summary: dict) -> dict:
    """The numeric part of the report, flattened for MLflow."""
    out = {k: float(v) for k, v in summary.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    gt = summary.get("ground_truth") or {}
    if gt.get("detection_rate") is not None:
        out["gt_detection_rate"] = gt["detection_rate"]
    for name in ("nme_iod", "nme_iod_inner51", "nme_iod_five_points"):
        for stat, value in (gt.get(name) or {}).items():
            out[f"gt_{name}_{stat}"] = value
    return out


def main(params_path: str = "params.yaml") -> dict:
    import logging

    from mfim.config import load_params
    from mfim.data.align_folder import align_folder

    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    params = load_params(params_path)
    a = params["align"]
    summary = align_folder(
        a["input_dir"],
        OUT_DIR,
        size=a["output_size"],
        detector=a["detector"],
        workers=a["workers"],
        upsample=a["upsample"],
        transform_size=a["transform_size"],
        enable_padding=a["enable_padding"],
        table_path=TABLE,
        rejects_path=REJECTS,
        report_path=REPORT,
    )
    print(
        f"align: {summary['n_aligned']} aligned, {summary['n_rejected']} rejected of {summary['n_files']} files "
        f"in {summary['seconds']:.0f} s -> {OUT_DIR}, {REPORT}"
    )

    import mlflow

    from mfim.tracking import start_run

    with start_run("align", params, ["data", "align"]):
        mlflow.log_metrics(_metrics(summary))
        mlflow.log_artifact(REPORT)
        mlflow.log_artifact(REJECTS)
    return summary


if __name__ == "__main__":
    ensure_allocator_env()
    from mfim.config import exit_on_params_error

    with exit_on_params_error("align"):
        main()
