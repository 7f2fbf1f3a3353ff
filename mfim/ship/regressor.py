"""Regressor phases: the 3DMM regressors (loss network, evaluator) fitted on the `synthesize` recipe's aligned render
sets at a scale the `fit_regressor` stage cannot afford, by the stage's own functions (mfim.data.regressor_set,
mfim.data.regressor_fit).

A phase's ``data``::

    val: {first: 190000, people: 500, renders: 2}     # held-out people (in no training set): the validation
    train:                                            # identity ranges, concatenated in order
      - {first: 100000, people: 600, renders: 4}
      - {first: 100600, people: 21520, renders: 1}

Each range is rendered once into the file's render cache (``renders/<first>_<people>x<renders>.npz``; a render is
deterministic from the synthesize params and the identity id), so a killed phase re-renders nothing it finished.
The fit's recipe is ``threedmm.<group>`` (backbone, width, epochs, batch_size, lr, shape_tail_weight, seed) plus
``group_weights`` (shape, expression, pose); ``regressor_continue`` starts from the previous phase's network (its
weights and normalisation).
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import numpy as np

from mfim.config import lookup
from mfim.ship.phases import PhaseContext, PhaseResult


def render_range(ctx: PhaseContext, first: int, people: int, renders: int, workers: int, log=print) -> dict:
    from mfim.atomic import atomic_write
    from mfim.data.regressor_set import RenderSetConfig, render_aligned_set
    from mfim.data.synth import SynthConfig

    cache = ctx.renders_dir / f"{first}_{people}x{renders}.npz"
    if cache.is_file():
        with np.load(cache) as z:
            return {k: z[k] for k in z.files}
    size = int(lookup(ctx.params, "threedmm.regressor.input_size"))
    out = render_aligned_set(SynthConfig.from_params(ctx.params["synthesize"]),
                             RenderSetConfig(people, renders, first, size, workers), log=log)
    cache.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(cache, lambda f: np.savez(f, **out))
    return out


def render_data(ctx: PhaseContext, workers: int, log=print) -> tuple[dict, dict]:
    """(training set: the train ranges concatenated, validation set)."""
    spec = ctx.data
    parts = [render_range(ctx, int(r["first"]), int(r["people"]), int(r["renders"]), workers, log)
             for r in spec["train"]]
    train = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    v = spec["val"]
    return train, render_range(ctx, int(v["first"]), int(v["people"]), int(v["renders"]), workers, log)


def _fit(ctx: PhaseContext, group: str, workers: int, init=None) -> PhaseResult:
    from mfim.atomic import temp_path, move_into_place
    from mfim.data.regressor_fit import FitConfig, fit_regressor, regressor_config
    from mfim.nets.threedmm_regressor import save_regressor

    train, val = render_data(ctx, workers)
    fit = FitConfig.from_params(ctx.params, group)
    cfg = init.config if init is not None else regressor_config(ctx.params, group)
    model, rep = fit_regressor(train["images"], train, train["identity"], cfg, fit, val=val, init=init)
    out = ctx.folder / "regressor.pt"
    recipe = {"group": group, "data": ctx.data, "fit": asdict(fit), "backbone": cfg.backbone,
              "init": str(ctx.input) if ctx.input else None, "train_loss": rep["train_loss"],
              "seconds": rep["seconds"]}
    tmp = temp_path(out)
    save_regressor(model, tmp, "ground_truth", rep["val_error"], extra={"recipe": json.dumps(recipe)})
    move_into_place(tmp, out)
    summary = {"n_train": rep["n_train"], "val_error": rep["val_error"], "seconds": rep["seconds"],
               "people": int(len(np.unique(train["identity"])))}
    return PhaseResult(out, summary, rep["train_loss"])


def run_regressor_fit(ctx: PhaseContext, group: str = "regressor", workers: int = 2) -> PhaseResult:
    """A fit from the recipe's start (mobilenet_v1: 3DDFA_V2's weights; small: from scratch)."""
    return _fit(ctx, group, workers)


def run_regressor_continue(ctx: PhaseContext, group: str = "regressor", workers: int = 2) -> PhaseResult:
    """The previous phase's network fitted further on the phase's people."""
    from mfim.nets.threedmm_regressor import load_fitted_regressor

    return _fit(ctx, group, workers, init=load_fitted_regressor(Path(ctx.input)))
