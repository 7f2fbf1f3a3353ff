"""MLflow tracking: one local store in the repo, every run tagged with the git commit and the DVC params it ran with.

One `dvc repro` (or `dvc exp run`) is one parent run with a child run per stage. DVC runs each stage as its own
process and gives it no id of the invocation, so the stages name their pipeline after the `dvc` process above them
(host, pid, start time: what no other invocation shares, pid reuse included). The first stage that finds no parent
run with that id creates it; the others find it by the tag :data:`PIPELINE_TAG`. Nothing is written to the workspace
(an output file would change every run and rerun what depends on it), and it holds for `dvc repro <stage>` as for a
whole pipeline. A stage run outside DVC is a top-level run.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import subprocess
from pathlib import Path
from typing import Iterator

from mfim.config import flatten, load_params, lookup
from mfim.params_schema import validate, validate_groups

log = logging.getLogger(__name__)

RESUMED_FROM_TAG = "mfim.resumed_from"  # on a run that continues an interrupted one: that run's id
PIPELINE_TAG = "mfim.pipeline_id"  # on the parent run of one `dvc repro` and on each of its stage runs
# What the experiment is for, in MLflow's own tag (its UI's ExperimentKind "custom_model_development": training runs,
# not GenAI traces). MLflow 3.17's UI reads it only when its GenAI / Model training switch is off, and in the open
# source build that switch is always on: the page shown then follows the switch, whose default is GenAI and which a
# link sets with ?workflowType=machine_learning (kept in the browser afterwards). So both: the tag, and ui_url().
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"
# What counts as code for the dirty flag: the pipeline's own outputs (reports/, dvc.lock, data/) are tracked files
# that every `dvc repro` rewrites, and params.yaml is what `dvc exp run -S` changes (logged as the run's params).
CODE_PATHS = ("mfim", "pipelines", "dvc.yaml", "pyproject.toml", "requirements.lock", "Makefile")


def git_commit(cwd: str | Path = ".") -> tuple[str, bool]:
    """(commit hash or 'unknown', whether *code* differs from it: :data:`CODE_PATHS`, new files there included)."""
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, check=True
        ).stdout.strip()
        return sha, bool(dirty_code(cwd))
    except (OSError, subprocess.CalledProcessError):
        return "unknown", False


def dirty_code(cwd: str | Path = ".") -> list[str]:
    """The code files (:data:`CODE_PATHS`) that are modified, staged or new and not ignored, as `git status` says."""
    out = subprocess.run(["git", "status", "--porcelain", "--untracked-files=all", "--", *CODE_PATHS], cwd=cwd,
                         capture_output=True, text=True, check=True).stdout
    return [line[3:] for line in out.splitlines() if line.strip()]


def repo_root(cwd: str | Path = ".") -> Path:
    """The project folder whose MLflow store runs should use. `dvc exp run --queue` runs stages in a temporary copy
    under <repo>/.dvc/tmp/exps/...; a store relative to that copy would vanish with it, so anchor at <repo>."""
    here = Path(cwd).resolve()
    parts = here.parts
    for i in range(len(parts) - 2):
        if parts[i : i + 3] == (".dvc", "tmp", "exps"):
            return Path(*parts[:i])
    return here


def anchored_uri(uri: str, root: Path) -> str:
    """sqlite:///relative.db -> sqlite:////abs/root/relative.db; other URIs unchanged."""
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri.startswith(prefix + "/") and ":memory:" not in uri:
        return prefix + str(root / uri[len(prefix) :])
    return uri


def anchored_artifact_root(path: str, root: Path) -> str:
    """A relative artifact folder -> under ``root``; absolute folders and URIs (s3://...) unchanged."""
    if "://" in path or Path(path).is_absolute():
        return path
    return str(root / path)


def configure(params: dict) -> str:
    """Point MLflow at the store params.yaml names (env MLFLOW_TRACKING_URI wins) and select the experiment."""
    import mlflow

    root = repo_root()
    uri = os.environ.get("MLFLOW_TRACKING_URI") or lookup(params, "project.mlflow.tracking_uri")
    uri = anchored_uri(uri, root)
    mlflow.set_tracking_uri(uri)
    name = lookup(params, "project.mlflow.experiment")
    artifact_root = anchored_artifact_root(lookup(params, "project.mlflow.artifact_root"), root)
    exp = mlflow.get_experiment_by_name(name)
    if exp is None:
        location = Path(artifact_root).as_uri() if "://" not in artifact_root else artifact_root
        mlflow.create_experiment(name, artifact_location=location, tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})
    elif exp.tags.get(EXPERIMENT_KIND_TAG) != EXPERIMENT_KIND:  # a store made before the tag
        mlflow.MlflowClient().set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
    mlflow.set_experiment(name)
    return uri


def ui_url(params: dict, base: str = "http://127.0.0.1:5000") -> str:
    """The MLflow UI's address of the experiment's training runs (`make ui` serves ``base``)."""
    import mlflow

    configure(params)
    exp = mlflow.get_experiment_by_name(lookup(params, "project.mlflow.experiment"))
    return f"{base.rstrip('/')}/#/experiments/{exp.experiment_id}/runs?workflowType=machine_learning"


def pipeline_id() -> str | None:
    """The id of the `dvc repro` / `dvc exp run` this process is a stage of (env MFIM_PIPELINE_ID wins); None
    outside DVC. It names the nearest ancestor process whose program is dvc, by host, pid and start time."""
    if os.environ.get("MFIM_PIPELINE_ID"):
        return os.environ["MFIM_PIPELINE_ID"]
    try:
        import psutil

        for proc in psutil.Process().parents():
            argv = proc.cmdline()[:2]
            if any(Path(a).name == "dvc" for a in argv):
                return f"{socket.gethostname()}:{proc.pid}:{int(proc.create_time())}"
    except Exception:  # noqa: BLE001 - no process table to read (psutil.Error, a sandbox): no parent run
        log.debug("no process table: stage runs are top-level", exc_info=True)
    return None


def pipeline_run(pid: str, tags: dict, experiment_id: str) -> str:
    """The id of the parent run of pipeline ``pid``, created (with ``tags``) by the first stage that asks."""
    import mlflow

    client = mlflow.MlflowClient()
    found = client.search_runs([experiment_id], filter_string=f"tags.`{PIPELINE_TAG}` = '{pid}'",
                               order_by=["attributes.start_time ASC"], max_results=1)
    if found:
        return found[0].info.run_id
    exp_name = os.environ.get("DVC_EXP_NAME")
    run = client.create_run(experiment_id, run_name=f"dvc exp run {exp_name}" if exp_name else "dvc repro",
                            tags={**tags, PIPELINE_TAG: pid, "mfim.stage": "pipeline"})
    return run.info.run_id


def close_dead_pipelines(experiment_id: str) -> list[str]:
    """Mark parent runs left RUNNING by a `dvc` process of this host that is gone (a stage killed outright never
    ends its parent) as KILLED; returns their ids."""
    import mlflow
    import psutil

    client = mlflow.MlflowClient()
    runs = client.search_runs([experiment_id], filter_string="tags.`mfim.stage` = 'pipeline' and "
                              "attributes.status = 'RUNNING'")  # fmt: skip
    closed = []
    for r in runs:
        host, pid, started = (r.data.tags.get(PIPELINE_TAG, "").rsplit(":", 2) + ["", "", ""])[:3]
        if host != socket.gethostname() or not pid.isdigit():
            continue
        try:
            alive = int(psutil.Process(int(pid)).create_time()) == int(started or -1)
        except psutil.Error:
            alive = False
        if not alive:
            client.set_terminated(r.info.run_id, status="KILLED")
            closed.append(r.info.run_id)
    return closed


def stage_inputs(stage: str, root: Path) -> dict | None:
    """The stage's deps and params as DVC hashes them for dvc.lock (md5 per dep, value per param) at stage start,
    before DVC writes the lock (it does after the command); None when DVC cannot say."""
    try:
        from dvc.repo import Repo

        with Repo(str(root)) as repo:
            (st,) = repo.stage.collect(stage)
            deps = {}
            for dep in st.deps:
                if hasattr(dep, "params") and hasattr(dep, "fill_values"):  # a params dep: its values
                    deps.update({f"params.{k}": v for k, v in dep.read_params().items()})
                else:
                    deps[dep.def_path] = dep.get_hash().value
        return deps
    except Exception:  # noqa: BLE001 - no DVC repo here, a stage not in dvc.yaml, a locked state db
        log.debug("DVC could not hash the inputs of %s", stage, exc_info=True)
        return None


def log_progress(step: int, metrics: dict, prefix: str = "") -> None:
    """Metrics of a stage under way at ``step`` (e.g. batches done, partial means), in the active run; nothing
    without one. An array value is logged as its mean. A failing store is logged, not raised: a day of evaluation
    is not lost to a tracking hiccup."""
    import mlflow
    import numpy as np

    if mlflow.active_run() is None:
        return
    try:
        mlflow.log_metrics({f"{prefix}{k}": float(np.mean(v)) for k, v in metrics.items()}, step=int(step))
    except Exception:  # noqa: BLE001
        log.warning("MLflow: could not log progress at step %s", step, exc_info=True)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def close_dead_runs(stage: str, experiment: str) -> list[str]:
    """Mark this stage's runs that are still RUNNING but whose process is gone as KILLED; returns their ids.

    A process killed outright (SIGKILL, OOM, power) never tells MLflow, so its run would show RUNNING forever.
    Runs record the host and pid that made them; one from this host whose pid is no longer alive is dead. Runs from
    other hosts are left alone (we cannot tell); runs without those tags predate them and, found RUNNING when the
    stage starts again, are taken to be dead too.
    """
    import mlflow
    from mlflow.tracking import MlflowClient

    exp = mlflow.get_experiment_by_name(experiment)
    if exp is None:
        return []
    client = MlflowClient()
    runs = client.search_runs([exp.experiment_id], filter_string=f"tags.`mfim.stage` = '{stage}' and "
                              "attributes.status = 'RUNNING'")  # fmt: skip
    host = socket.gethostname()
    closed = []
    for r in runs:
        tags = r.data.tags
        pid = tags.get("mfim.pid")
        if pid is not None and (tags.get("mfim.host") != host or _process_alive(int(pid))):
            continue
        client.set_terminated(r.info.run_id, status="KILLED")
        log.warning("MLflow run %s (%s) was left RUNNING by a process that is gone; marked KILLED",
                    r.info.run_id, r.info.run_name)
        closed.append(r.info.run_id)
    return closed


def log_file_reference(path: str | Path, name: str = "model") -> dict:
    """Record a large output in the active run by reference instead of copying it into the artifact store: tags
    ``<name>.path`` / ``.sha256`` / ``.bytes`` and a small ``<name>/<file>.ref.json``. The file itself is a DVC
    output (workspace + DVC cache); a third full copy under mlartifacts/ was 1.65 GB per paper-scale run, and the
    sha256 still names exactly which bytes the run made (`dvc exp` / the DVC cache give them back)."""
    import mlflow

    from mfim.assets import sha256_file

    path = Path(path)
    root = repo_root()
    try:
        shown = str(path.resolve().relative_to(root))
    except ValueError:
        shown = str(path.resolve())
    ref = {"path": shown, "sha256": sha256_file(path), "bytes": path.stat().st_size}
    mlflow.set_tags({f"{name}.{k}": str(v) for k, v in ref.items()})
    mlflow.log_dict(ref, f"{name}/{path.name}.ref.json")
    return ref


def _run_tags(stage: str, params: dict, groups: list[str] | None) -> tuple[dict, dict]:
    """(tags, flat params) of a stage run: commit, code-dirty flag, the DVC experiment, host and pid."""
    sha, dirty = git_commit()
    scoped = {g: params[g] for g in (groups or params.keys()) if g in params}
    tags = {
        "mfim.stage": stage,
        "mlflow.source.git.commit": sha,
        "git.dirty": str(dirty).lower(),  # code only (CODE_PATHS): the pipeline's outputs are tracked files too
        "dvc.params_groups": ",".join(scoped.keys()),
        "mfim.host": socket.gethostname(),
        "mfim.pid": str(os.getpid()),
    }
    exp_name = os.environ.get("DVC_EXP_NAME")
    if exp_name:
        tags["dvc.experiment"] = exp_name
    return tags, {k: str(v) for k, v in flatten(scoped).items()}


def _log_inputs(stage: str) -> None:
    """Tag the stage run with the sha256 of its dvc.lock-style inputs and keep them as dvc_inputs.json."""
    import hashlib
    import json

    import mlflow

    inputs = stage_inputs(stage, Path.cwd())  # a `dvc exp run --queue` copy hashes its own files
    if inputs is None:
        return
    text = json.dumps(inputs, sort_keys=True, default=str)
    mlflow.set_tag("dvc.inputs_sha256", hashlib.sha256(text.encode()).hexdigest())
    mlflow.log_dict(json.loads(text), "dvc_inputs.json")


@contextlib.contextmanager
def start_run(stage: str, params: dict, groups: list[str] | None = None, run_name: str | None = None,
              resumed_from: str | None = None) -> Iterator:
    """An MLflow run for a pipeline stage: logs the stage's params groups, tags commit, dirty flag, DVC params.

    ``run_name`` says what the run is (default: the stage name), e.g. "train E 100 steps seed 0"; a DVC experiment
    name is appended. ``resumed_from``: the id of the interrupted run this one continues, tagged as
    :data:`RESUMED_FROM_TAG`. Earlier runs of the stage left RUNNING by a dead process are marked KILLED first.
    Under `dvc repro` the run is a child of the pipeline's parent run (module docstring), which shows RUNNING
    while one of its stages runs and ends with the status of the last one. Open it when the stage starts (for
    :func:`log_progress` to show the work under way); a nested ``start_run`` of the same stage, e.g. the one that
    logs the final metrics, reuses the open run.
    """
    import mlflow

    # what MLflow records as the run's params must be what the stage could read: refused keys never reach it
    if groups:
        validate_groups(params, groups, where=f"{stage} params")
    else:  # every group is logged
        validate(params, where=f"{stage} params")
    active = mlflow.active_run()
    if active is not None and active.data.tags.get("mfim.stage") == stage:
        _, flat = _run_tags(stage, params, groups)
        _log_params(flat)
        yield active
        return
    configure(params)
    experiment = lookup(params, "project.mlflow.experiment")
    close_dead_runs(stage, experiment)
    tags, flat = _run_tags(stage, params, groups)
    if resumed_from:
        tags[RESUMED_FROM_TAG] = resumed_from
    parent = None
    pid = pipeline_id()
    if pid:
        parent_tags = {k: v for k, v in tags.items() if k not in ("mfim.stage", "dvc.params_groups", "mfim.pid")}
        experiment_id = mlflow.get_experiment_by_name(experiment).experiment_id
        close_dead_pipelines(experiment_id)
        parent = pipeline_run(pid, parent_tags, experiment_id)
        tags[PIPELINE_TAG] = pid
        mlflow.MlflowClient().update_run(parent, status="RUNNING")
    name = run_name or stage
    exp_name = tags.get("dvc.experiment")
    status = "FAILED"
    try:
        with mlflow.start_run(run_name=f"{name} ({exp_name})" if exp_name else name, tags=tags,
                              parent_run_id=parent, nested=parent is not None) as run:
            _log_params(flat)
            _log_inputs(stage)
            yield run
        status = "FINISHED"
    finally:
        if parent is not None:  # the parent's end: the latest stage's end and status
            mlflow.MlflowClient().set_terminated(parent, status=status)


def _log_params(flat: dict) -> None:
    import mlflow

    items = list(flat.items())
    for i in range(0, len(items), 100):  # MLflow limits one log_params batch to 100 entries
        mlflow.log_params(dict(items[i : i + 100]))


def resolve_checkpoint(uri: str) -> Path:
    """The local checkpoint file of a model URI (``models:/mfim@champion``, ``models:/mfim/3``, ``runs:/...``),
    downloaded through MLflow (the store params.yaml names unless MLFLOW_TRACKING_URI is set)."""
    import mlflow

    if not os.environ.get("MLFLOW_TRACKING_URI") and Path("params.yaml").is_file():
        uri_store = lookup(load_params(), "project.mlflow.tracking_uri")
        mlflow.set_tracking_uri(anchored_uri(uri_store, repo_root()))
    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri))
    found = sorted((local / "artifacts").glob("*.pt"))
    if not found:
        raise FileNotFoundError(f"{uri}: no checkpoint (*.pt) among the model's artifacts")
    return found[0]
