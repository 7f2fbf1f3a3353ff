"""MLflow tracking: runs land in one store (also from `dvc exp run --queue` temp copies), tagged with commit + params."""

from pathlib import Path

from mfim.config import flatten
from mfim.tracking import anchored_uri, repo_root, start_run
from tests.defaults import params_with


def test_repo_root_escapes_dvc_experiment_copies(tmp_path):
    exp = tmp_path / "proj" / ".dvc" / "tmp" / "exps" / "tmpab12"
    exp.mkdir(parents=True)
    assert repo_root(exp) == tmp_path / "proj"
    assert repo_root(tmp_path) == tmp_path.resolve()


def test_relative_sqlite_uri_isanchored_uri():
    assert anchored_uri("sqlite:///mlflow.db", Path("/r")) == "sqlite:////r/mlflow.db"
    assert anchored_uri("sqlite:////abs/m.db", Path("/r")) == "sqlite:////abs/m.db"
    assert anchored_uri("http://127.0.0.1:5000", Path("/r")) == "http://127.0.0.1:5000"


def test_run_is_tagged_with_commit_and_params(tmp_path, monkeypatch):
    import mlflow

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    params = params_with({"project": {"mlflow": {"tracking_uri": "sqlite:///t.db", "experiment": "t",
                                                 "artifact_root": "art"}},
                          "train": {"steps": 3, "betas": [0.9, 0.99]}, "loss": {"id": 1.0}})
    with start_run("train", params, groups=["train", "loss"]) as run:
        mlflow.log_metric("x", 1.0)
    r = mlflow.get_run(run.info.run_id)
    assert {k: r.data.params[k] for k in ("train.steps", "train.betas", "loss.id")} == {
        "train.steps": "3", "train.betas": "[0.9, 0.99]", "loss.id": "1.0"}
    assert set(r.data.params) == {k for k in flatten(params) if k.split(".")[0] in ("train", "loss")}  # those groups
    assert r.data.tags["mfim.stage"] == "train" and "mlflow.source.git.commit" in r.data.tags
    assert r.data.metrics["x"] == 1.0
    assert (tmp_path / "t.db").is_file()


def _params(tmp_path):
    return params_with({"project": {"mlflow": {"tracking_uri": f"sqlite:///{tmp_path}/t.db", "experiment": "t",
                                               "artifact_root": str(tmp_path / "art")}}, "train": {"steps": 3}})


_KILLED_RUN = """
import os, signal, sys
from mfim.tracking import start_run
from tests.defaults import params_with
params = params_with({"project": {"mlflow": {"tracking_uri": sys.argv[1], "experiment": "t",
                                             "artifact_root": sys.argv[2]}}})
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
    params = params_with({"project": {"mlflow": {"tracking_uri": "sqlite:///t.db", "experiment": "t",
                                                 "artifact_root": "art"}}})
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


def test_experiment_declares_model_training_kind_on_create_and_on_an_old_store(tmp_path, monkeypatch):
    """The MLflow 3 UI opens an experiment on its runs only when tagged mlflow.experimentKind =
    custom_model_development (its ExperimentKind enum); otherwise it opens on the GenAI traces overview."""
    import mlflow

    from mfim.tracking import configure

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    params = _params(tmp_path)
    configure(params)
    assert mlflow.get_experiment_by_name("t").tags["mlflow.experimentKind"] == "custom_model_development"
    old = mlflow.create_experiment("old", artifact_location=(tmp_path / "o").as_uri())  # a store from before
    assert "mlflow.experimentKind" not in mlflow.get_experiment(old).tags
    params["project"]["mlflow"]["experiment"] = "old"
    configure(params)
    assert mlflow.get_experiment(old).tags["mlflow.experimentKind"] == "custom_model_development"


def _git(cwd, *args):
    import subprocess

    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=cwd, check=True,
                   capture_output=True)


def test_dirty_flag_counts_code_not_pipeline_outputs(tmp_path):
    from mfim.tracking import dirty_code, git_commit

    for f in ("mfim/a.py", "reports/metrics.json", "dvc.lock", "params.yaml"):
        (tmp_path / f).parent.mkdir(exist_ok=True)
        (tmp_path / f).write_text("0\n")
    _git(tmp_path, "init", "-q")
    _git(tmp_path, "add", ".")
    _git(tmp_path, "commit", "-qm", "c")
    for f in ("reports/metrics.json", "dvc.lock", "params.yaml"):  # what `dvc repro` / `dvc exp run -S` rewrite
        (tmp_path / f).write_text("1\n")
    assert git_commit(tmp_path)[1] is False and dirty_code(tmp_path) == []
    (tmp_path / "pipelines").mkdir()
    (tmp_path / "pipelines" / "new.py").write_text("x = 1\n")  # a new, uncommitted code file counts
    assert dirty_code(tmp_path) == ["pipelines/new.py"]
    (tmp_path / "mfim" / "a.py").write_text("1\n")
    assert git_commit(tmp_path)[1] is True and sorted(dirty_code(tmp_path)) == ["mfim/a.py", "pipelines/new.py"]


_STAGE = """
import os, sys, time
import mlflow
from mfim.tracking import log_progress, start_run
from tests.defaults import params_with
params = params_with({"project": {"mlflow": {"tracking_uri": sys.argv[1], "experiment": "t",
                                             "artifact_root": sys.argv[2]}}})
with start_run(sys.argv[3], params, groups=[]) as run:
    log_progress(1, {"done": 0.5})
    with start_run(sys.argv[3], params, groups=[]) as again:  # the end-of-stage logging reuses the open run
        assert again.info.run_id == run.info.run_id
    if sys.argv[3] == "evaluate":
        raise SystemExit(3)
"""


def test_stages_of_one_dvc_repro_are_children_of_one_parent_run(tmp_path, monkeypatch):
    """Stages are separate processes; the pipeline id (here set as the `dvc` ancestor would give it) joins them."""
    import os
    import subprocess
    import sys

    import mlflow

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    uri = f"sqlite:///{tmp_path}/t.db"
    env = {**os.environ, "MFIM_PIPELINE_ID": "host:123:456"}
    codes = [subprocess.run([sys.executable, "-c", _STAGE, uri, str(tmp_path / "art"), stage], env=env,
                            timeout=120, capture_output=True, text=True).returncode
             for stage in ("weights", "train", "evaluate")]
    assert codes == [0, 0, 3]
    mlflow.set_tracking_uri(uri)
    runs = mlflow.search_runs(experiment_names=["t"], output_format="list")
    parents = [r for r in runs if r.data.tags["mfim.stage"] == "pipeline"]
    assert len(parents) == 1 and parents[0].data.tags["mfim.pipeline_id"] == "host:123:456"
    children = {r.data.tags["mfim.stage"]: r for r in runs if r.data.tags.get("mlflow.parentRunId")}
    assert set(children) == {"weights", "train", "evaluate"}
    assert {r.data.tags["mlflow.parentRunId"] for r in children.values()} == {parents[0].info.run_id}
    assert children["evaluate"].info.status == "FAILED" and children["train"].info.status == "FINISHED"
    assert parents[0].info.status == "FAILED"  # the last stage failed: so did the pipeline
    assert parents[0].info.end_time >= children["evaluate"].info.start_time
    hist = mlflow.MlflowClient().get_metric_history(children["train"].info.run_id, "done")
    assert [(m.step, m.value) for m in hist] == [(1, 0.5)]


_DVC = """#!{python}
import subprocess, sys, os
# stands in for the dvc program: its stage command, two processes down (dvc -> sh -> python)
print(os.getpid(), flush=True)
subprocess.run(["sh", "-c", sys.executable + " -c 'from mfim.tracking import pipeline_id; print(pipeline_id())'; true"])
"""


def test_pipeline_id_names_the_dvc_process_above_the_stage(tmp_path, monkeypatch):
    import os
    import socket
    import subprocess
    import sys

    fake = tmp_path / "dvc"
    fake.write_text(_DVC.format(python=sys.executable))
    fake.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k != "MFIM_PIPELINE_ID"}
    out = subprocess.run([str(fake), "repro"], env=env, capture_output=True, text=True, timeout=60).stdout.split()
    pid, pipeline = int(out[0]), out[1]
    host, got_pid, _ = pipeline.rsplit(":", 2)
    assert host == socket.gethostname() and int(got_pid) == pid


def test_stage_run_is_tagged_with_its_dvc_lock_inputs(tmp_path, monkeypatch):
    """The inputs hash is taken from what DVC itself writes into dvc.lock (md5 per dep, params' values)."""
    import hashlib
    import json
    import subprocess

    import mlflow

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    (tmp_path / "in.txt").write_text("abc\n")
    (tmp_path / "params.yaml").write_text("p:\n  a: 1\n")
    (tmp_path / "dvc.yaml").write_text("stages:\n  s:\n    cmd: cp in.txt out.txt\n    deps: [in.txt]\n"
                                       "    params: [p.a]\n    outs: [out.txt]\n")
    _git(tmp_path, "init", "-q")
    subprocess.run(["dvc", "init", "-q"], cwd=tmp_path, check=True, capture_output=True)
    params = params_with({"project": {"mlflow": {"tracking_uri": "sqlite:///t.db", "experiment": "t",
                                                 "artifact_root": "art"}}})
    with start_run("s", params, groups=[]) as run:
        pass
    subprocess.run(["dvc", "repro", "-q"], cwd=tmp_path, check=True, capture_output=True)
    import yaml

    lock = yaml.safe_load((tmp_path / "dvc.lock").read_text())["stages"]["s"]
    expected = {d["path"]: d["md5"] for d in lock["deps"]}
    expected |= {f"params.{k}": v for k, v in lock["params"]["params.yaml"].items()}
    tags = mlflow.get_run(run.info.run_id).data.tags
    assert tags["dvc.inputs_sha256"] == hashlib.sha256(json.dumps(expected, sort_keys=True).encode()).hexdigest()


def test_a_parent_run_whose_dvc_process_is_gone_is_marked_killed(tmp_path, monkeypatch):
    import socket
    import subprocess
    import sys

    import mlflow

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    params = _params(tmp_path)
    monkeypatch.setenv("MFIM_PIPELINE_ID", f"{socket.gethostname()}:{gone.pid}:1")
    with start_run("train", params, groups=[]) as first:
        old_parent = first.data.tags["mlflow.parentRunId"]
        mlflow.MlflowClient().update_run(old_parent, status="RUNNING")
    mlflow.MlflowClient().update_run(old_parent, status="RUNNING")  # as a SIGKILLed stage leaves it
    monkeypatch.setenv("MFIM_PIPELINE_ID", "otherhost:1:1")  # the next `dvc repro`
    with start_run("train", params, groups=[]) as second:
        assert second.data.tags["mlflow.parentRunId"] != old_parent
    assert mlflow.get_run(old_parent).info.status == "KILLED"


_TOY_STAGE = """
import sys
from mfim.tracking import log_progress, start_run
from tests.defaults import params_with
params = params_with({"project": {"mlflow": {"tracking_uri": sys.argv[1], "experiment": "t",
                                             "artifact_root": sys.argv[2]}}})
with start_run(sys.argv[3], params, groups=[]):
    log_progress(1, {"x": 1.0})
open(sys.argv[3] + ".out", "w").write("done")
"""


def test_a_real_dvc_repro_makes_one_parent_with_its_stages_as_children(tmp_path, monkeypatch):
    """The real process tree (dvc -> stage command) and DVC's lock held while the stages hash their inputs."""
    import json
    import os
    import subprocess
    import sys

    import mlflow
    import yaml

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    (tmp_path / "stage.py").write_text(_TOY_STAGE)
    uri, art = f"sqlite:///{tmp_path}/t.db", str(tmp_path / "art")
    cmd = f"{sys.executable} stage.py {uri} {art}"
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump({"stages": {
        "first": {"cmd": f"{cmd} first", "deps": ["stage.py"], "outs": ["first.out"]},
        "second": {"cmd": f"{cmd} second", "deps": ["stage.py", "first.out"], "outs": ["second.out"]}}}))
    _git(tmp_path, "init", "-q")
    env = {k: v for k, v in os.environ.items() if k != "MFIM_PIPELINE_ID"}
    env["PYTHONPATH"] = str(Path(__file__).parents[1]) + os.pathsep + env.get("PYTHONPATH", "")
    subprocess.run(["dvc", "init", "-q"], cwd=tmp_path, check=True, capture_output=True)
    r = subprocess.run(["dvc", "repro"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    mlflow.set_tracking_uri(uri)
    runs = mlflow.search_runs(experiment_names=["t"], output_format="list")
    parents = [x for x in runs if x.data.tags["mfim.stage"] == "pipeline"]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    parent_id = parents[0].info.run_id
    kids = {x.data.tags["mfim.stage"]: x for x in runs if x.data.tags.get("mlflow.parentRunId") == parent_id}
    assert set(kids) == {"first", "second"}
    lock = yaml.safe_load((tmp_path / "dvc.lock").read_text())["stages"]["second"]
    logged = json.loads(Path(mlflow.artifacts.download_artifacts(
        run_id=kids["second"].info.run_id, artifact_path="dvc_inputs.json")).read_text())
    assert logged == {d["path"]: d["md5"] for d in lock["deps"]}  # what DVC then wrote into dvc.lock
    r = subprocess.run(["dvc", "repro", "-f"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0
    parents = [x for x in mlflow.search_runs(experiment_names=["t"], output_format="list")
               if x.data.tags["mfim.stage"] == "pipeline"]
    assert len(parents) == 2  # another `dvc repro`, another parent
