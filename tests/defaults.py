"""The embedded default's values (params.yaml, the one place defaults live) for tests that build a config class
directly: ``loss_weights(id=0.0)`` is params.yaml's ``loss`` group with ``id`` replaced, never a second copy of a
default. Tests that depend on a value state it as an override."""

from __future__ import annotations

import copy
import dataclasses
import functools
from pathlib import Path

from mfim.config import load_params

REPO = Path(__file__).resolve().parents[1]


@functools.cache
def _embedded() -> dict:
    return load_params(REPO / "params.yaml")


def default_params() -> dict:
    """A fresh copy of params.yaml (validated)."""
    return copy.deepcopy(_embedded())


def default_group(name: str, **overrides) -> dict:
    """A copy of params.yaml's group ``name`` (dotted for nested groups) with ``overrides`` replaced."""
    group = default_params()
    for part in name.split("."):
        group = group[part]
    unknown = set(overrides) - set(group)
    assert not unknown, f"{name} has no key {sorted(unknown)}"
    return {**group, **overrides}


def _replace(cfg, overrides: dict):
    return dataclasses.replace(cfg, **overrides)


def loss_weights(**kw):
    from mfim.training.objective import LossWeights

    return _replace(LossWeights.from_params(default_group("loss")), kw)


def train_config(**kw):
    from mfim.training.trainer import TrainConfig

    return _replace(TrainConfig.from_params(default_group("train")), kw)


def speed_options(**kw):
    from mfim.training.speed import SpeedOptions

    return _replace(SpeedOptions.from_params(default_group("train")), kw)


def warmstart_config(**kw):
    from mfim.training.warmstart import WarmStartConfig

    return _replace(WarmStartConfig.from_params(default_group("warmstart")), kw)


def encoder_config(input_size: int, **kw):
    from mfim.models.encoder import EncoderConfig

    return _replace(EncoderConfig.from_params(default_params(), input_size=input_size), kw)


def source_fit_config(**kw):
    from mfim.models.source_fit import SourceFitConfig

    return _replace(SourceFitConfig.from_params(default_group("source_fit")), kw)


def gt_swap_config(size: int = 64, **kw):
    from mfim.data.gt_swaps import GtSwapConfig

    return _replace(GtSwapConfig.from_params(default_group("gt_swaps"), size=size), kw)


def synth_config(**kw):
    from mfim.data.synth import SynthConfig

    return _replace(SynthConfig.from_params(default_group("synthesize")), kw)


# The small encoder most unit tests build: one pass (no refiner), pSp-style style-map levels and M2C blocks as wide
# as the FPN, whatever params.yaml's embedded default uses; a test overrides what it is about.
UNIT_ENCODER = dict(code_channels=None, style_map_resolutions=(16, 32, 64), refine_iterations=0,
                    refine_map_resolutions=None)


def unit_encoder(input_size: int, **kw):
    """``encoder_config`` with UNIT_ENCODER's values under ``kw``."""
    return encoder_config(input_size, **{**UNIT_ENCODER, **kw})


def params_with(*overrides: dict) -> dict:
    """params.yaml with the nested mappings ``overrides`` laid over it in turn (each key must exist there): the
    full, valid params a stage reads, changed only where a test says."""
    def merge(base: dict, over: dict, where: str) -> dict:
        out = dict(base)
        for k, v in over.items():
            assert k in base, f"params.yaml has no key {where}{k}"
            out[k] = merge(base[k], v, f"{where}{k}.") if isinstance(v, dict) and isinstance(base[k], dict) else v
        return out

    params = default_params()
    for over in overrides:
        params = merge(params, over, "")
    return params


def write_params(path: str | Path, overrides: dict | None = None) -> Path:
    """``params_with(overrides)`` written as a params.yaml at ``path``."""
    import yaml

    Path(path).write_text(yaml.safe_dump(params_with(overrides or {}), sort_keys=False))
    return Path(path)


# The evaluation most evaluation tests check: the feed-forward swap (source_fit.steps 0), 3DMM columns from
# evaluate.threedmm_encoder (no fitted evaluator file needed) over every shape coefficient.
EVAL_BASE = {"source_fit": {"steps": 0},
             "evaluate": {"shape_encoder": "", "expression_encoder": "", "shape_coefficients": 0}}


def fit_config(group: str = "regressor", **kw):
    """params.yaml's ``threedmm.<group>`` fit, on the CPU (the tests' device)."""
    from mfim.data.regressor_fit import FitConfig

    return _replace(FitConfig.from_params(default_params(), group), {"device": "cpu", **kw})
