"""Run a schedule: its phases in order, each in data/ship/<stem>/<phase>/ with a done marker, then the file and its
record at data/ship/<output> (+ .json).

A killed run continues where it stopped: finished phases (done.json whose key and input sha256 match) are skipped,
the phase that was running resumes by its stage's own means (mfim.ship.phases). The data sets the phases train on
are made by the data stages in data/ship/_data/<name>-<hash>/ (shared by every schedule that names the same data),
each stage with its own marker. `promote` copies a remade file into checkpoints/ (refusing to overwrite unless told).
"""

from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path

import yaml

from mfim.assets import sha256_file
from mfim.atomic import atomic_copy, atomic_write
from mfim.ship.phases import KINDS, PhaseContext, PhaseResult
from mfim.ship.schedule import Phase, Schedule, digest, phase_key, phase_params

SHIP_DIR = Path("data/ship")
DATA_STAGES = ("weights", "synthesize", "align", "shard", "threedmm", "fit_regressor")
REGRESSOR_KINDS = ("regressor_fit", "regressor_continue")


def _write_json(path: Path, obj) -> None:
    atomic_write(path, lambda f: f.write((json.dumps(obj, indent=1, default=str) + "\n").encode()))


def _run_data_stage(name: str) -> None:
    if name == "weights":
        from mfim.assets.manifest import write_manifests
        from mfim.config import load_params

        write_manifests(load_params("params.yaml"))
    elif name == "synthesize":
        import pipelines.synthesize as stage

        stage.main(["--params", "params.yaml"])
    else:
        import importlib

        importlib.import_module(f"pipelines.{name}").main("params.yaml")


def prepare_dataset(folder: Path, params: dict, log=print) -> Path:
    """The data stages (synthesize -> align -> shard -> threedmm -> fit_regressor) under ``params`` in ``folder``,
    each once (a marker per stage; align and threedmm also resume inside themselves)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    for name in DATA_STAGES:
        marker = folder / f".done.{name}"
        if marker.is_file():
            continue
        log(f"ship: data set {folder.name}: stage {name}")
        with contextlib.chdir(folder):
            _run_data_stage(name)
        marker.write_text("done\n")
    return folder


def dataset_folder(root: Path, phase: Phase, params: dict) -> Path | None:
    if not isinstance(phase.data, str):
        return None
    data_groups = {k: params[k] for k in ("data", "synthesize", "align", "shard", "threedmm", "nets")}
    return root / SHIP_DIR / "_data" / f"{phase.data}-{digest(data_groups)[:10]}"


def run_phase(kind: str, ctx: PhaseContext, phase: Phase) -> PhaseResult:
    if kind in REGRESSOR_KINDS:
        from mfim.ship import regressor

        return getattr(regressor, f"run_{kind}")(ctx, group=phase.group, workers=phase.workers)
    if kind not in KINDS:
        raise ValueError(f"phase {phase.name!r}: unknown kind {kind!r} (known: {sorted(KINDS) + list(REGRESSOR_KINDS)})")
    return KINDS[kind](ctx)


def _finished(marker: Path, key: str, input_sha: str | None) -> dict | None:
    if not marker.is_file():
        return None
    done = json.loads(marker.read_text())
    if done.get("key") != key or done.get("input_sha256") != input_sha or not Path(done["output"]).is_file():
        return None
    return done


def run_schedule(sched: Schedule, root: Path = Path("."), log=print, runner=run_phase) -> dict:
    """Every phase in order (finished ones skipped); returns the record, also written beside the output."""
    root = root.resolve()
    base = root / SHIP_DIR / sched.stem
    records, previous = [], {}
    for phase in sched.phases:
        folder = base / phase.name
        folder.mkdir(parents=True, exist_ok=True)
        inp = Path(previous[phase.continues]["output"]) if phase.continues else None
        input_sha = sha256_file(inp) if inp else None
        key = phase_key(sched, phase)
        marker = folder / "done.json"
        done = _finished(marker, key, input_sha)
        if done is None:
            params = phase_params(sched, phase, root=root)
            ds = dataset_folder(root, phase, params)
            if ds is not None:
                prepare_dataset(ds, params, log)
            log(f"ship: {sched.stem}: phase {phase.name} ({phase.run})")
            ctx = PhaseContext(params, folder, inp, phase.data, ds, base / "renders")
            t0 = time.perf_counter()
            result = runner(phase.run, ctx, phase)
            done = {"phase": phase.name, "run": phase.run, "key": key, "continues": phase.continues,
                    "input": str(inp) if inp else None, "input_sha256": input_sha, "overrides": phase.params,
                    "data": sched.datasets.get(phase.data) if isinstance(phase.data, str) else phase.data,
                    "output": str(result.output), "output_sha256": sha256_file(result.output),
                    "wall_seconds": round(time.perf_counter() - t0, 1), "summary": result.summary,
                    "curve": result.curve}
            _write_json(marker, done)
        else:
            log(f"ship: {sched.stem}: phase {phase.name} done before ({done['output_sha256'][:12]})")
        previous[phase.name] = done
        records.append(done)
    out = root / SHIP_DIR / sched.output
    atomic_copy(records[-1]["output"], out)
    record = {"output": str(SHIP_DIR / sched.output), "output_sha256": sha256_file(out),
              "schedule": str(sched.source), "schedule_sha256": sha256_file(sched.source),
              "device": sched.device, "phases": records}
    _write_json(out.with_suffix(".json"), record)
    log(f"ship: {out} {record['output_sha256']}")
    return record


def promote(sched: Schedule, root: Path = Path("."), force: bool = False) -> Path:
    """data/ship/<output> (+ record) -> checkpoints/<output>; refuses to replace an existing file unless ``force``."""
    root = root.resolve()
    src = root / SHIP_DIR / sched.output
    dst = root / "checkpoints" / sched.output
    if not src.is_file():
        raise FileNotFoundError(f"{src} not found: run `dvc repro ship/dvc.yaml:{sched.stem}` first")
    if dst.exists() and not force:
        raise FileExistsError(f"{dst} exists: pass --force to replace it (its sha256 is recorded in git; "
                              "update its registry entry, docs/SHIPPING.md)")
    atomic_copy(src, dst)
    atomic_copy(src.with_suffix(".json"), dst.with_suffix(".json"))
    return dst
