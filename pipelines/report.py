"""DVC stage `report`: markdown tables in the paper's layout (reports/tables.md, reports/ablation.md).

`python pipelines/report.py --export-ablation` also writes the MLflow store's ablation rows to
reports/ablation_runs.json, the file that carries them to a fresh clone.
"""

import sys

if __name__ == "__main__":
    from mfim.config import load_params
    from mfim.evaluation.report import export_ablation_runs, write_reports

    params = load_params()
    if "--export-ablation" in sys.argv[1:]:
        print(export_ablation_runs(params))
    for path in write_reports(params):
        print(path)
