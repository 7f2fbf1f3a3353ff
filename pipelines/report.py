"""DVC stage `report`: markdown tables in the paper's layout (reports/tables.md, reports/ablation.md)."""

if __name__ == "__main__":
    from mfim.config import load_params
    from mfim.evaluation.report import write_reports

    for path in write_reports(load_params()):
        print(path)
