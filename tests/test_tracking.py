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


def _params(tmp_path):
    return {"project": {"mlflow": {"tracking_uri": f"sqlite:///{tmp_path}/t.db", "experiment": "t",
                                   "artifact_root": str(tmp_path / "art")}}, "train": {"steps": 3}}


_KILLED_RUN = """
import os, signal, sys
from mfim.tracking import start_run
params = {"project": {"mlflow": {"tracking_uri": sys.argv[1], "experiment": "t", "artifact_root": sys.argv[2]}}}
with start_run("train", params, groups=["project"], run_name="train E 3 steps seed 0") as run:
    print(run.info.run_id, flush=True)
    os.kill(os.getpid(), signal.SIGKILL)  # as a kill -9 / OOM would: MLflow is never told
"""


def test_run_of_a_killed_process_is_marked_killed_and_the_resume_links_to_it(tmp_path, monkeypatch):
    import subprocess
    import sys

    import mlflow

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    params = _params(tmp_path)
    uri = params["project"]["mlflow"]["tracking_uri"]
    r = subprocess.run([sys.executable, "-c", _KILLED_RUN, uri, str(tmp_path / "art")], capture_output=True,
                       text=True, timeout=120)
    dead = r.stdout.split()[0]
    mlflow.set_tracking_uri(uri)
    assert mlflow.get_run(dead).info.status == "RUNNING"  # what the UI showed forever before

    with start_run("warmstart", params, groups=["train"]) as other:  # another stage does not touch it
        pass
    assert mlflow.get_run(dead).info.status == "RUNNING"
    with start_run("train", params, groups=["train"], run_name="train E 3 steps seed 0 (resumed)",
                   resumed_from=dead) as run:
        assert mlflow.get_run(dead).info.status == "KILLED"
        assert mlflow.active_run().info.status == "RUNNING"  # the new run itself is not closed
    new = mlflow.get_run(run.info.run_id)
    assert new.info.status == "FINISHED" and new.data.tags["mfim.resumed_from"] == dead
    assert new.info.run_name == "train E 3 steps seed 0 (resumed)"
    assert mlflow.get_run(other.info.run_id).info.run_name == "warmstart"


def test_a_running_run_of_a_live_process_is_left_alone(tmp_path, monkeypatch):
    import mlflow

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    params = _params(tmp_path)
    with start_run("train", params, groups=["train"]) as outer:
        # the outer run stays active, as a concurrent live run of the stage would
        from mlflow.tracking import MlflowClient

        from mfim.tracking import close_dead_runs

        assert close_dead_runs("train", "t") == []
        assert MlflowClient().get_run(outer.info.run_id).info.status == "RUNNING"



def test_large_outputs_are_logged_by_reference_not_copied(tmp_path, monkeypatch):
    import hashlib
    import os

    import mlflow

    from mfim.tracking import log_file_reference

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    model = tmp_path / "data" / "train" / "mfim.pt"
    model.parent.mkdir(parents=True)
    model.write_bytes(os.urandom(1 << 21))
    params = {"project": {"mlflow": {"tracking_uri": "sqlite:///t.db", "experiment": "t", "artifact_root": "art"}}}
    with start_run("train", params, groups=[]) as run:
        ref = log_file_reference(model, "model")
    tags = mlflow.get_run(run.info.run_id).data.tags
    assert tags["model.sha256"] == hashlib.sha256(model.read_bytes()).hexdigest() == ref["sha256"]
    assert tags["model.path"] == "data/train/mfim.pt" and tags["model.bytes"] == str(1 << 21)
    stored = [p for p in (tmp_path / "art").rglob("*") if p.is_file()]
    assert [p.name for p in stored] == ["mfim.pt.ref.json"]
    assert sum(p.stat().st_size for p in stored) < 1024  # no second full copy of the model in the artifact store


def test_dvc_links_outputs_to_its_cache_instead_of_copying():
    import configparser

    config = configparser.ConfigParser()
    config.read(Path(__file__).parents[1] / ".dvc" / "config")
    kinds = [k.strip() for k in config["cache"]["type"].strip('"').split(",")]
    # links first (one copy of each output on disk), copy only where the file system allows neither
    assert kinds[-1] == "copy" and kinds[:-1] and "copy" not in kinds[:-1]
