"""MLflow tracking: one local store in the repo, every run tagged with the git commit and the DVC params it ran with."""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import subprocess
from pathlib import Path
from typing import Iterator

from mfim.config import flatten, lookup

log = logging.getLogger(__name__)

RESUMED_FROM_TAG = "mfim.resumed_from"  # on a run that continues an interrupted one: that run's id


def git_commit(cwd: str | Path = ".") -> tuple[str, bool]:
    """(commit hash or 'unknown', dirty flag)."""
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = bool(
            subprocess.run(
                ["git", "status", "--porcelain", "--untracked-files=no"],
                cwd=cwd,
                capture_output=True,
                text=True,
                check=True,
            ).stdout.strip()
        )
        return sha, dirty
    except (OSError, subprocess.CalledProcessError):
        return "unknown", False


def repo_root(cwd: str | Path = ".") -> Path:
    """The project folder whose MLflow store runs should use. `dvc exp run --queue` runs stages in a temporary copy
    under <repo>/.dvc/tmp/exps/...; a store relative to that copy would vanish with it, so anchor at <repo>."""
    here = Path(cwd).resolve()
    parts = here.parts
    for i in range(len(parts) - 2):
        if parts[i : i + 3] == (".dvc", "tmp", "exps"):
            return Path(*parts[:i])
    return here


def _anchored(uri: str, root: Path) -> str:
    """sqlite:///relative.db -> sqlite:////abs/root/relative.db; other URIs unchanged."""
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri.startswith(prefix + "/") and ":memory:" not in uri:
        return prefix + str(root / uri[len(prefix) :])
    return uri


def configure(params: dict) -> str:
    """Point MLflow at the store params.yaml names (env MLFLOW_TRACKING_URI wins) and select the experiment."""
    import mlflow

    root = repo_root()
    uri = os.environ.get("MLFLOW_TRACKING_URI") or lookup(params, "project.mlflow.tracking_uri", "sqlite:///mlflow.db")
    uri = _anchored(uri, root)
    mlflow.set_tracking_uri(uri)
    name = lookup(params, "project.mlflow.experiment", "mfim")
    artifact_root = lookup(params, "project.mlflow.artifact_root", "mlartifacts")
    if "://" not in artifact_root and not Path(artifact_root).is_absolute():
        artifact_root = str(root / artifact_root)
    if mlflow.get_experiment_by_name(name) is None:
        location = Path(artifact_root).as_uri() if "://" not in artifact_root else artifact_root
        mlflow.create_experiment(name, artifact_location=location)
    mlflow.set_experiment(name)
    return uri


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


@contextlib.contextmanager
def start_run(stage: str, params: dict, groups: list[str] | None = None, run_name: str | None = None,
              resumed_from: str | None = None) -> Iterator:
    """An MLflow run for a pipeline stage: logs the stage's params groups, tags commit, dirty flag, DVC params.

    ``run_name`` says what the run is (default: the stage name), e.g. "train E 100 steps seed 0"; a DVC experiment
    name is appended. ``resumed_from``: the id of the interrupted run this one continues, tagged as
    :data:`RESUMED_FROM_TAG`. Earlier runs of the stage left RUNNING by a dead process are marked KILLED first.
    A run nested inside an active one (e.g. `dvc exp run` queue) is not assumed; each stage is its own run.
    """
    import mlflow

    configure(params)
    close_dead_runs(stage, lookup(params, "project.mlflow.experiment", "mfim"))
    sha, dirty = git_commit()
    scoped = {g: params[g] for g in (groups or params.keys()) if g in params}
    flat = {k: str(v) for k, v in flatten(scoped).items()}
    tags = {
        "mfim.stage": stage,
        "mlflow.source.git.commit": sha,
        "git.dirty": str(dirty).lower(),
        "dvc.params_groups": ",".join(scoped.keys()),
        "mfim.host": socket.gethostname(),
        "mfim.pid": str(os.getpid()),
    }
    if resumed_from:
        tags[RESUMED_FROM_TAG] = resumed_from
    exp_name = os.environ.get("DVC_EXP_NAME")
    if exp_name:
        tags["dvc.experiment"] = exp_name
    name = run_name or stage
    with mlflow.start_run(run_name=f"{name} ({exp_name})" if exp_name else name, tags=tags) as run:
        # MLflow limits one log_params batch to 100 entries.
        items = list(flat.items())
        for i in range(0, len(items), 100):
            mlflow.log_params(dict(items[i : i + 100]))
        yield run
