"""A shipped file's schedule (configs/ship/<file>.yaml) as data: its phases, their params and data.

Layout of the YAML file::

    output: mfim_synth64.pt          # the file's name under data/ship/ (the remake) and checkpoints/ (the shipped one)
    record: checkpoints/mfim_synth64.json   # the shipped file's record the schedule transcribes
    device: auto                     # auto | cpu | cuda: where every phase runs (`pipelines/ship.py --device` wins)
    datasets:                        # data sets by name: params.yaml overrides of the data stages (synthesize ...)
      people320: {}
    common: {key: value}             # overrides of every phase
    phases:                          # in order
      - name: warmstart              # its folder: data/ship/<output stem>/<name>/
        run: warmstart               # the kind (mfim.ship.phases.KINDS)
        data: people320              # a dataset name (stage phases) or a render list (regressor phases)
        continues: null              # the phase whose output this one starts from (null: from nothing)
        params: {key: value}         # dotted params.yaml overrides, on top of `common`
        group: regressor             # regressor phases only: which threedmm.<group> recipe (regressor | evaluator)
        workers: 2                   # regressor phases only: render processes
        note: why / what the record says about this phase

Paths in values that start with ``checkpoints/`` or ``data/ship/`` are the repository's and are made absolute (a
phase runs in its own folder).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from mfim.config import load_params, override_values
from mfim.tracking import anchored_artifact_root, anchored_uri

REPO_PATH_PREFIXES = ("checkpoints/", "data/ship/")


@dataclass
class Phase:
    name: str
    run: str
    data: object = None
    continues: str | None = None
    params: dict = field(default_factory=dict)
    group: str = "regressor"  # regressor phases: threedmm.<group> is the recipe (regressor | evaluator)
    workers: int = 2          # regressor phases: render processes
    note: str = ""


@dataclass
class Schedule:
    output: str
    record: str
    device: str
    datasets: dict
    common: dict
    phases: list[Phase]
    source: Path

    @property
    def stem(self) -> str:
        return Path(self.output).stem

    def phase(self, name: str) -> Phase:
        for p in self.phases:
            if p.name == name:
                return p
        raise KeyError(f"{self.source}: no phase {name!r}")


def load_schedule(path: str | Path) -> Schedule:
    path = Path(path)
    raw = yaml.safe_load(path.read_text()) or {}
    missing = [k for k in ("output", "phases") if k not in raw]
    if missing:
        raise ValueError(f"{path}: missing {', '.join(missing)}")
    phases = [Phase(**p) for p in raw["phases"]]
    names = [p.name for p in phases]
    if len(set(names)) != len(names):
        raise ValueError(f"{path}: phase names repeat: {names}")
    for i, p in enumerate(phases):
        if p.continues is not None and p.continues not in names[:i]:
            raise ValueError(f"{path}: phase {p.name!r} continues {p.continues!r}, which is not an earlier phase")
    sched = Schedule(output=raw["output"], record=raw.get("record", ""), device=str(raw.get("device", "auto")),
                     datasets=raw.get("datasets") or {}, common=raw.get("common") or {}, phases=phases, source=path)
    for p in phases:
        if isinstance(p.data, str) and p.data not in sched.datasets:
            raise ValueError(f"{path}: phase {p.name!r} uses data set {p.data!r}, which `datasets` does not define")
    return sched


def absolute_repo_paths(value, root: Path):
    """Strings naming a repository file (``checkpoints/...``, ``data/ship/...``) made absolute, recursively."""
    if isinstance(value, str) and value.startswith(REPO_PATH_PREFIXES):
        return str((root / value).resolve())
    if isinstance(value, dict):
        return {k: absolute_repo_paths(v, root) for k, v in value.items()}
    if isinstance(value, list):
        return [absolute_repo_paths(v, root) for v in value]
    return value


def phase_params(sched: Schedule, phase: Phase, root: Path = Path(".")) -> dict:
    """params.yaml + the phase's data set + `common` + the phase's own overrides, repository paths absolute. The
    device option becomes project.device."""
    data = sched.datasets.get(phase.data, {}) if isinstance(phase.data, str) else {}
    params = override_values(load_params(root / "params.yaml"), {**data, **sched.common, **phase.params},
                             where=f"{sched.source} phase {phase.name}")
    params["project"]["device"] = sched.device
    # the project's MLflow store, not one in the phase's folder
    mlflow, here = params["project"]["mlflow"], root.resolve()
    mlflow["tracking_uri"] = anchored_uri(str(mlflow["tracking_uri"]), here)
    if mlflow["artifact_root"]:
        mlflow["artifact_root"] = anchored_artifact_root(mlflow["artifact_root"], here)
    return absolute_repo_paths(params, root)


def digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def phase_key(sched: Schedule, phase: Phase) -> str:
    """What decides a phase's result besides its input file: its kind, data and overrides (a changed schedule
    reruns the phase; the record keeps this key)."""
    data = sched.datasets.get(phase.data) if isinstance(phase.data, str) else phase.data
    return digest({"run": phase.run, "data": data, "common": sched.common, "params": phase.params,
                   "continues": phase.continues})
