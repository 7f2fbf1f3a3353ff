"""MLflow tracking: runs land in one store (also from `dvc exp run --queue` temp copies), tagged with commit + params."""

from pathlib import Path

from mfim.tracking import _anchored, repo_root, start_run


def test_repo_root_escapes_dvc_experiment_copies(tmp_path):
    exp = tmp_path / "proj" / ".dvc" / "tmp" / "exps" / "tmpab12"
    exp.mkdir(parents=True)
    assert repo_root(exp) == tmp_path / "proj"
    assert repo_root(tmp_path) == tmp_path.resolve()


def test_relative_sqlite_uri_is_anchored():
    assert _anchored("sqlite:///mlflow.db", Path("/r")) == "sqlite:////r/mlflow.db"
    assert _anchored("sqlite:////abs/m.db", Path("/r")) == "sqlite:////abs/m.db"
    assert _anchored("http://127.0.0.1:5000", Path("/r")) == "http://127.0.0.1:5000"


def test_run_is_tagged_with_commit_and_params(tmp_path, monkeypatch):
    import mlflow

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    params = {"project": {"mlflow": {"tracking_uri": "sqlite:///t.db", "experiment": "t", "artifact_root": "art"}},
              "train": {"steps": 3, "betas": [0.9, 0.99]}, "loss": {"id": 1.0}}
    with start_run("train", params, groups=["train", "loss"]) as run:
        mlflow.log_metric("x", 1.0)
    r = mlflow.get_run(run.info.run_id)
    assert r.data.params == {"train.steps": "3", "train.betas": "[0.9, 0.99]", "loss.id": "1.0"}
    assert r.data.tags["mfim.stage"] == "train" and "mlflow.source.git.commit" in r.data.tags
    assert r.data.metrics["x"] == 1.0
    assert (tmp_path / "t.db").is_file()
