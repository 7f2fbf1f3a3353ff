"""The quick check of a schedule: its first phase for a few steps at the phase's settings, on a small render set of
the phase's `synthesize` recipe (no data/ needed), its loss curve compared with a reference recorded by this code
(configs/ship/<stem>.reference.json).

Why a fresh reference and not the shipped record's curve: the shipped files were made by older code (and, for the
swapper, on a data set this check does not render), so their curves are not bit-reproducible. The reference pins
today's code instead: the same seeds and settings on a CPU give the same first steps up to float summation order
(thread count, vector instructions, torch version), which stays far below TOLERANCE over a few steps; a change
to the recipe, the seeds or the losses moves them by much more.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from mfim.config import lookup
from mfim.ship.schedule import Schedule, phase_params

TOLERANCE = 0.02  # relative, per logged value (see the module's note)
CHECK_PEOPLE = 4   # people in the check's render set (the generator's and the regressors' check)


def _render(params: dict, first: int, people: int, renders: int, size: int) -> dict:
    from mfim.data.regressor_set import RenderSetConfig, render_aligned_set
    from mfim.data.synth import SynthConfig

    return render_aligned_set(SynthConfig.from_params(params["synthesize"]),
                              RenderSetConfig(people, renders, first, size, 1), log=lambda *_: None)


def check_pretrain_generator(params: dict, steps: int) -> list[dict]:
    from mfim.models.stylegan2 import discriminator_for, generator_from_params
    from mfim.training.pretrain import pretrain

    pg = params["pretrain_generator"]
    seed = int(lookup(params, "project.seed"))
    torch.manual_seed(seed)
    G = generator_from_params(params["generator"])
    D = discriminator_for(G)
    images = _render(params, 0, CHECK_PEOPLE, 2, G.resolution)["images"]
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1
    b = int(pg["batch_size"])

    def batches():
        i = 0
        while True:
            yield x[torch.arange(i, i + b) % len(x)]
            i += b

    rows = []
    cfg = dict(pg, seed=seed, device="cpu", iterations=steps, log_every=1, sample_every=0, progress=False)
    with tempfile.TemporaryDirectory() as tmp:
        pretrain(G, D, batches(), cfg, tmp, log_fn=lambda step, m, a=None: rows.append(
            {"step": step, "loss_G": m["loss_G"], "loss_D": m["loss_D"]}) if "loss_G" in m else None)
    return rows


def check_warmstart(params: dict, steps: int) -> list[dict]:
    """The warm start's first phase (latent regression on the generator's own samples: no data set needed)."""
    from mfim.training.build import build_model, load_frozen_generator
    from mfim.training.warmstart import WarmStartConfig, run_warmstart

    seed = int(lookup(params, "project.seed"))
    torch.manual_seed(seed)
    G = load_frozen_generator(params, "cpu")
    model = build_model({**params, "encoder": {**params["encoder"], "style_maps": True}}, G)
    cfg = replace(WarmStartConfig.from_params(params["warmstart"]), regression_steps=steps, recon_steps=0,
                  refine_steps=0, log_every=1)
    _, _, rows = run_warmstart(model, cfg, None, None, device="cpu", seed=seed)
    return [{k: v for k, v in r.items() if k != "seconds"} for r in rows]


def check_regressor(params: dict, steps: int, group: str) -> list[dict]:
    from mfim.data.regressor_fit import FitConfig, fit_regressor, regressor_config

    r = params["threedmm"][group]
    size = int(r["input_size"])
    fit = FitConfig.from_params(params, group)  # on the CPU: first_phase_curve sets project.device
    # a few people's renders repeated to `steps` full batches of one epoch: rendering, not fitting, is the check's cost
    few = _render(params, int(r["identity_offset"]), CHECK_PEOPLE, 2, size)
    reps = -(-steps * fit.batch_size // len(few["images"]))
    train = {k: np.concatenate([v] * reps) for k, v in few.items()}
    val = _render(params, 190_000, 2, 1, size)
    rows = []

    def hook(step: int, loss: float) -> bool:
        rows.append({"step": step, "loss": loss})
        return step >= steps

    fit_regressor(train["images"], train, train["identity"], regressor_config(params, group), replace(fit, workers=0),
                  log=lambda *_: None, val=val, step_hook=hook)
    return rows


def first_phase_curve(sched: Schedule, steps: int, root: Path = Path(".")) -> dict:
    phase = sched.phases[0]
    params = phase_params(sched, phase, root=root)
    params["project"]["device"] = "cpu"
    if phase.run == "pretrain_generator":
        rows = check_pretrain_generator(params, steps)
    elif phase.run == "warmstart":
        rows = check_warmstart(params, steps)
    elif phase.run in ("regressor_fit", "regressor_continue"):
        rows = check_regressor(params, steps, phase.group)
    else:
        raise ValueError(f"{sched.source}: no quick check for a first phase of kind {phase.run!r}")
    return {"schedule": str(sched.source), "phase": phase.name, "run": phase.run, "steps": steps, "curve": rows}


def reference_path(sched: Schedule) -> Path:
    return sched.source.with_name(f"{sched.stem}.reference.json")


def compare(curve: list[dict], reference: list[dict], tolerance: float = TOLERANCE) -> dict:
    """Largest relative difference over the steps both curves have; ok when it is within ``tolerance``."""
    ref = {r["step"]: r for r in reference}
    worst, where = 0.0, None
    compared = 0
    for row in curve:
        if row["step"] not in ref:
            continue
        compared += 1
        for k, v in row.items():
            if k == "step" or k not in ref[row["step"]]:
                continue
            r = float(ref[row["step"]][k])
            diff = abs(float(v) - r) / max(abs(r), 1e-8)
            if not np.isfinite(diff) or diff > worst:
                worst, where = diff if np.isfinite(diff) else float("inf"), (row["step"], k, float(v), r)
    if compared == 0:
        raise ValueError("the curve and the reference share no step")
    return {"ok": worst <= tolerance, "max_rel_diff": worst, "worst": where, "tolerance": tolerance,
            "steps_compared": compared}


def check_first_phase(sched: Schedule, steps: int, root: Path = Path("."), record: bool = False) -> dict:
    """Run the check; compare with the reference (``record``: write the reference instead)."""
    got = first_phase_curve(sched, steps, root)
    path = reference_path(sched)
    if record:
        path.write_text(json.dumps({**got, "note": "recorded by `python pipelines/ship.py "
                                    f"{sched.source} --check-first-phase {steps} --record-reference`"},
                                   indent=1) + "\n")
        return {**got, "recorded": str(path)}
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no reference curve; record one with --record-reference")
    ref = json.loads(path.read_text())
    return {**got, **compare(got["curve"], ref["curve"])}
