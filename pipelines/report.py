"""DVC stage `report`: markdown tables in the paper's layout (reports/tables.md, reports/ablation.md), the data of
`dvc plots` (reports/plots/) and the paper's columns for `dvc metrics diff` (reports/paper_metrics.json); then the
trained swapper is registered as a version of the MLflow model `mfim`, and alias `champion` moves to it when the
quality checks of reports/metrics.json hold (mfim.mlflow_model).

`python pipelines/report.py --export-ablation` also writes the MLflow store's ablation rows to
reports/ablation_runs.json, the file that carries them to a fresh clone.
"""

import sys
from pathlib import Path

MODEL = Path("data/train/mfim.pt")


def register(params: dict, metrics_path: Path = Path("reports/metrics.json")) -> None:
    """One run of stage `report` that registers MODEL and moves `champion` when every check in metrics.json holds."""
    import json

    import mlflow

    from mfim.mlflow_model import register_swapper, set_champion
    from mfim.tracking import start_run

    checks = json.loads(metrics_path.read_text()).get("checks", {})
    holds = bool(checks) and all(checks.values())
    with start_run("report", params, groups=["train"]):
        mlflow.log_metrics({f"checks.{k}": float(v) for k, v in checks.items()})
        version = register_swapper(MODEL, tags={"train.config": str(params["train"]["config"])})
        set_champion(version, holds)
        failed = [k for k, v in checks.items() if not v]
        print(f"registered: models:/mfim/{version.version}"
              + (" -> alias champion" if holds else f" (champion unchanged: {', '.join(failed) or 'no checks'})"))


if __name__ == "__main__":
    from mfim.config import exit_on_params_error, load_params
    from mfim.evaluation.report import export_ablation_runs, write_plot_data, write_reports

    with exit_on_params_error("report"):
        params = load_params()
    if "--export-ablation" in sys.argv[1:]:
        print(export_ablation_runs(params))
    for path in write_reports(params) + write_plot_data(params):
        print(path)
    if MODEL.is_file():
        register(params)
    from mfim.tracking import ui_url

    print(f"MLflow training runs (`make ui`): {ui_url(params)}")
