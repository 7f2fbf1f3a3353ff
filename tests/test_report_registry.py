"""The report stage: `dvc plots` data (ablation per seed, evaluator accuracy, intervals), the paper's columns for
`dvc metrics diff`, and alias `champion` moved only when the quality checks of metrics.json hold."""

import json

import pandas as pd
import torch
from tests.defaults import params_with, unit_encoder


def _checkpoint(path, seed):
    from mfim.models.mfim import MFIM, save_swapper
    from mfim.models.stylegan2 import Generator

    torch.manual_seed(seed)
    G = Generator(resolution=64, style_dim=32, n_mlp=2, channel_base=1024, channel_max=16)
    save_swapper(MFIM(G, unit_encoder(input_size=64, width=8, code_channels=16), coarse_max_res=16), path,
                 meta={"align_output_size": 128, "data_resolution": 64})
    return path


def test_champion_moves_only_when_the_checks_hold(tmp_path, monkeypatch):
    import mlflow

    import pipelines.report as stage

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MFIM_PIPELINE_ID", raising=False)
    params = params_with({"project": {"mlflow": {"tracking_uri": "sqlite:///t.db", "experiment": "t",
                                                 "artifact_root": "art"}}, "train": {"config": "E"}})
    metrics = tmp_path / "metrics.json"
    for seed, checks in ((0, {"a": True, "b": True}), (1, {"a": True, "b": False}), (2, {"a": True, "b": True})):
        monkeypatch.setattr(stage, "MODEL", _checkpoint(tmp_path / f"m{seed}.pt", seed))
        metrics.write_text(json.dumps({"checks": checks}))
        stage.register(params, metrics)
        champion = mlflow.MlflowClient().get_model_version_by_alias("mfim", "champion")
        assert str(champion.version) == {0: "1", 1: "1", 2: "3"}[seed]  # v2 failed check b: champion stays on v1
    v2 = mlflow.MlflowClient().get_model_version("mfim", "2")
    assert v2.tags["mfim.checks_hold"] == "false"
    stage.register(params, metrics)  # the same checkpoint again: no new version
    assert len(mlflow.MlflowClient().search_model_versions("name = 'mfim'")) == 3


def test_plot_data_and_paper_columns(tmp_path, monkeypatch):
    from mfim.evaluation import report

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(report, "ablation_rows_from_mlflow", lambda params: {})  # only the exported rows
    rows = {"A": [{"identity": 0.5, "shape": 2.0, "seed": "0"}, {"identity": 0.7, "shape": 2.2, "seed": "1"}],
            "E": [{"identity": 0.4, "shape": 1.8, "seed": "0"}]}
    (tmp_path / "reports").mkdir()
    (tmp_path / "reports" / "ablation_runs.json").write_text(json.dumps({"train_steps": 100, "rows": rows}))
    metrics = {"swap": {"identity": 0.4, "shape": 1.8, "expression": 3.0, "pose": 0.2, "pose_hn": 13.0,
                        "id_retrieval": 0.75}, "fd": {"name": "fid", "value": 5.0},
               "reconstruction": {"self_swap_lpips": 0.1}, "evaluators_on_real_images": {"auc": 0.98}}
    detail = {"swap": {"identity": {"mean": 0.4, "ci_low": 0.39, "ci_high": 0.41, "n": 9}}}
    report.write_plot_data({"train": {"steps": 100}}, tmp_path / "reports", metrics, detail)
    ablation = pd.read_csv(tmp_path / "reports" / "plots" / "ablation.csv", dtype={"seed": str})
    assert ablation[["config", "seed", "identity"]].values.tolist() == [["A", "0", 0.5], ["A", "1", 0.7],
                                                                       ["E", "0", 0.4]]
    acc = pd.read_csv(tmp_path / "reports" / "plots" / "evaluator_accuracy.csv")
    assert acc.values.tolist() == [["auc", 0.98]]
    ci = pd.read_csv(tmp_path / "reports" / "plots" / "metric_intervals.csv")
    assert ci.values.tolist() == [["identity", 0.4, 0.39, 0.41]]
    paper = json.loads((tmp_path / "reports" / "paper_metrics.json").read_text())
    assert list(paper) == ["Identity", "Shape", "Expression", "Pose", "Pose-HN", "ID retrieval", "FID",
                           "Self-swap LPIPS"]  # Table 2-3's columns in its order, then ours
    assert paper["FID"] == 5.0 and paper["Pose-HN"] == 13.0


def test_dvc_plots_name_the_report_files():
    """Every file a top-level plot draws is an output of a stage (dvc can show it in experiments too)."""
    from pathlib import Path

    import yaml

    dvc = yaml.safe_load((Path(__file__).parents[1] / "dvc.yaml").read_text())
    outs = {next(iter(o)) if isinstance(o, dict) else o for st in dvc["stages"].values()
            for key in ("outs", "plots", "metrics") for o in st.get(key, [])}
    drawn = set()
    for plot in dvc["plots"]:
        (pid, spec), = plot.items()
        drawn |= set(spec["y"]) if isinstance(spec.get("y"), dict) else {pid}
    assert drawn == {"reports/plots/train_loss.csv", "reports/plots/ablation.csv",
                     "reports/plots/evaluator_accuracy.csv", "reports/plots/metric_intervals.csv"}
    assert drawn <= outs
