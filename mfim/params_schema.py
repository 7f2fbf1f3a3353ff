"""The schema of params.yaml: every key's type and allowed values, never a default.

params.yaml (the embedded default) is the one place a value is set; configs/paper.yaml is params.yaml plus
configs/paper.overlay.yaml (``python -m mfim.config compose``). ``validate`` checks a whole params mapping against
SCHEMA and raises one ParamsError whose message is a single line: the file, the dotted key, the value and what is
allowed (for an unknown key: the nearest valid names). A new key is one line in params.yaml and one line here.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass
from typing import Any


class ParamsError(ValueError):
    """A params mapping that does not fit SCHEMA; str(exc) is the one line to show (stage scripts exit with 2)."""


@dataclass(frozen=True)
class Spec:
    """One leaf: ``kind`` int | float | bool | str | enum | list | auto_int; bounds inclusive; ``null``: None too."""

    kind: str
    lo: float | None = None
    hi: float | None = None
    null: bool = False
    choices: tuple = ()
    elem: Spec | None = None
    length: int | None = None
    pow2: bool = False
    pattern: str | None = None

    def allowed(self) -> str:
        if self.kind == "enum":
            text = "one of " + " | ".join(map(str, self.choices))
        elif self.kind == "list":
            text = (f"a list of {self.length} " if self.length is not None else "a list of ") + self.elem.allowed()
        elif self.kind == "auto_int":
            text = f"auto or {_number('an int', self.lo, self.hi)}"
        elif self.kind in ("int", "float"):
            text = _number("a power of two" if self.pow2 else f"a{'n' if self.kind == 'int' else ''} {self.kind}",
                           self.lo, self.hi)
        elif self.kind == "str" and self.pattern:
            text = f"a string matching {self.pattern}"
        else:
            text = f"a {self.kind}"
        return text + (" or null" if self.null else "")

    def fits(self, v: Any) -> bool:
        if v is None:
            return self.null
        if self.kind == "enum":
            return isinstance(v, (str, int, float)) and not isinstance(v, bool) and v in self.choices
        if self.kind == "list":
            return (isinstance(v, list) and (self.length is None or len(v) == self.length)
                    and all(self.elem.fits(x) for x in v))
        if self.kind == "auto_int":
            return v == "auto" or _in_range(v, int, self.lo, self.hi)
        if self.kind == "int":
            return _in_range(v, int, self.lo, self.hi) and (not self.pow2 or (v > 0 and v & (v - 1) == 0))
        if self.kind == "float":
            return _in_range(v, (int, float), self.lo, self.hi)
        if self.kind == "bool":
            return isinstance(v, bool)
        return isinstance(v, str) and (self.pattern is None or re.fullmatch(self.pattern, v) is not None)


def _number(what: str, lo, hi) -> str:
    if lo is not None and hi is not None:
        return f"{what} in [{lo}, {hi}]"
    return what + (f" >= {lo}" if lo is not None else "") + (f" <= {hi}" if hi is not None else "")


def _in_range(v, types, lo, hi) -> bool:
    if isinstance(v, bool) or not isinstance(v, types) or v != v:  # bool is an int subclass; NaN fits no bound
        return False
    return (lo is None or v >= lo) and (hi is None or v <= hi)


# --- compact constructors: one line per key below
def Int(lo=None, hi=None, null=False, pow2=False) -> Spec:  # noqa: N802 - read as type names in SCHEMA
    return Spec("int", lo, hi, null, pow2=pow2)


def Float(lo=None, hi=None, null=False) -> Spec:  # noqa: N802
    return Spec("float", lo, hi, null)


def Bool() -> Spec:  # noqa: N802
    return Spec("bool")


def Str(pattern: str | None = None) -> Spec:  # noqa: N802 - a path or free text ("" where the key is optional)
    return Spec("str", pattern=pattern)


def Enum(*choices, null=False) -> Spec:  # noqa: N802
    return Spec("enum", null=null, choices=choices)


def List(elem: Spec, length: int | None = None, null=False) -> Spec:  # noqa: N802
    return Spec("list", null=null, elem=elem, length=length)


def AutoInt(lo=None) -> Spec:  # noqa: N802 - "auto" (the usable cores / every GPU) or a count
    return Spec("auto_int", lo)


Prob = Float(0, 1)
Weight = Float(0)
Res = Int(4, 4096, pow2=True)          # a generator / encoder resolution in px
Shipped = Str()                         # a shipped checkpoint path; "" means: fit / train it here
THREEDMM = ("fitted", "tddfa", "deca")


def _fit_group(evaluator: bool) -> dict:
    """threedmm.regressor and threedmm.evaluator share their keys but for ``seed`` (the loss network's is
    project.seed)."""
    own = {"seed": Int(0)} if evaluator else {}
    return {"target": Enum("ground_truth", "estimate"), "shipped_checkpoint": Shipped, "render_identities": Int(0),
            "render_images_per_identity": Int(1), "identity_offset": Int(0), "input_size": Res,
            "backbone": Enum("small", "mobilenet_v1"), "width": Int(1), **own, "epochs": Int(1),
            "batch_size": Int(1), "lr": Float(0), "val_fraction": Float(0, 1),
            "shape_tail_weight": Weight, "group_weights": List(Weight, length=3), "workers": Int(0)}


SCHEMA: dict = {
    "project": {
        "seed": Int(0), "device": Str(r"auto|cpu|cuda(:\d+)?|mps"), "threads": Int(0),
        "mlflow": {"tracking_uri": Str(), "artifact_root": Str(), "experiment": Str(r".+")},
    },
    "data": {"source": Enum("synthetic", "folder"), "resolution": Res},
    "synthesize": {
        "seed": Int(0), "identities_train": Int(1), "identities_eval": Int(0),
        "eval_identity_offset": Int(0, null=True), "images_per_identity": Int(1), "canvas": Int(16), "face_size": List(Float(0.01, 1), 2),
        "shape_sigma": Float(0), "expression_sigma": Float(0), "yaw_deg": Float(0, 90), "pitch_deg": Float(0, 90),
        "roll_deg": Float(0, 180), "supersample": Int(1), "render_workers": Int(1),
    },
    "align": {
        "input_dir": Str(), "output_size": Int(16), "detector": Enum("hog", "cnn"), "upsample": Int(0),
        "transform_size": Int(16), "enable_padding": Bool(), "workers": AutoInt(1),
    },
    "shard": {
        "max_shard_bytes": Int(1), "eval_fraction": Float(0, 1), "image_format": Enum("png"),
        "seed": Int(0), "workers": AutoInt(1),
    },
    "threedmm": {
        "encoder": Enum(*THREEDMM), "batch_size": Int(1), "workers": AutoInt(0),
        "regressor": _fit_group(evaluator=False), "evaluator": _fit_group(evaluator=True),
    },
    "evalsets": {
        "protocol": Enum("synthetic", "ffpp", "celebahq"), "seed": Int(0), "pairs": Int(0), "triplets": Int(0),
        "ffpp": {"root": Str(), "compression": Enum("raw", "c23", "c40"), "frames_per_video": Int(1),
                 "splits_json": Str()},
        "celebahq": {"root": Str(), "pairs_per_target": Int(1)},
    },
    "gt_swaps": {"pairs": Int(0), "first_index": Int(0), "seed": Int(0), "workers": Int(1)},
    "nets": {
        "identity": {"iresnet_checkpoint": Str()},
        "threedmm": {"deca_checkpoint": Str()},
        "headpose": {"hopenet_checkpoint": Str()},
    },
    "generator": {
        "checkpoint": Str(), "resolution": Res, "style_dim": Int(1), "n_mlp": Int(1), "channel_base": Int(1),
        "channel_max": Int(1), "noise_mode": Enum("const", "random", "none"),
    },
    "pretrain_generator": {
        "shipped_checkpoint": Shipped, "iterations": Int(0), "batch_size": Int(1), "lr": Float(0), "r1_gamma": Weight,
        "r1_every": Int(1), "ema_half_life_kimg": Float(0), "sample_every": Int(1), "mixing_prob": Prob,
        "pl_weight": Weight, "ema_rampup": Float(0, null=True),
    },
    "encoder": {
        "backbone": Enum("small", "ir_se50"), "backbone_checkpoint": Str(), "width": Int(1),
        "latent_channels": Int(1, null=True), "code_channels": Int(1), "coarse_max_res": Res,
        "source_torgb_max_res": Int(0), "style_maps": Bool(), "style_map_resolutions": List(Res),
        "style_map_channels": Int(0), "style_map_injection": Enum("direct", "strength"), "style_map_gain": Float(),
        "mix_global_res": List(Res), "refine_iterations": Int(0), "refine_map_resolutions": List(Res, null=True),
    },
    "warmstart": {
        "regression_steps": Int(0), "recon_steps": Int(0), "batch_size": Int(1), "lr": Float(0), "mixing_prob": Prob,
        "truncation_psi": Float(0), "code_weight": Weight, "image_l1": Weight, "recon_l1": Weight,
        "recon_lpips": Weight, "ema_decay": Prob, "log_every": Int(1), "refine_steps": Int(0), "refine_lr": Float(0),
        "refine_id": Weight, "checkpoint_every": Int(0), "workers": Int(0), "bf16": Bool(),
    },
    "loss": {
        "id": Weight, "id_views": Int(0),
        "id_jitter": {"scale": Float(0, 1), "shift": Float(0, 1), "rotate_deg": Float(0, 180), "flip": Bool()},
        "l1": Weight, "lpips": Weight, "lpips_net": Enum("alex", "vgg", "squeeze"), "adv": Weight, "r1": Weight,
        "r1_every": Int(1), "d_init": Enum("pretrained", "scratch"), "shape": Weight, "pose": Weight, "exp": Weight,
        "shape_coefficients": Int(0), "recon_cross_identity": Weight, "background_l1": Weight, "gt_swap": Weight,
        "gt_swap_region": Enum("image", "face"), "gt_swap_id_target": Bool(), "threedmm_encoder": Enum(*THREEDMM),
        "jaw_pose": Bool(),
    },
    "train": {
        "config": Enum("A", "B", "C", "D", "E"), "seed": Int(0, null=True), "init_checkpoint": Str(),
        "steps": Int(1), "gpus": AutoInt(1), "batch_size": Int(1), "grad_accum": Int(1),
        "schedule_batch": Int(1, null=True), "lr": Float(0), "d_lr": Float(0), "betas": List(Prob, 2),
        "d_betas": List(Prob, 2), "ema_decay": Prob, "self_pair_fraction": Prob, "same_identity_fraction": Prob,
        "gt_swap_pairs": Int(0), "checkpoint_every": Int(1), "train_refiner": Bool(), "keep_checkpoint": Bool(),
        "sample_every": Int(1), "sample_pairs": Int(1), "sample_max_px": Int(0), "log_every": Int(1),
        "workers": Int(0), "augment": Bool(), "bf16": Bool(), "channels_last": Bool(),
        "compile": List(Enum("encoder", "generator", "discriminator")), "compile_mode": Str(r".+"),
        "compile_backend": Str(r".+"), "fused_adam": Bool(), "cudnn_benchmark": Bool(), "tf32": Bool(),
    },
    "source_fit": {"steps": Int(0), "lr": Float(0), "l1": Weight, "lpips": Weight, "id": Weight, "exp": Weight},
    "evaluate": {
        "batch_size": Int(1), "workers": Int(0), "bootstrap": Int(1),
        "identity_embedder": Enum("dlib", "mobilefacenet"),
        "threedmm_encoder": Enum(*THREEDMM), "shape_encoder": Enum("", "evaluator", *THREEDMM),
        "expression_encoder": Enum("", "evaluator", *THREEDMM), "shape_coefficients": Int(0), "jaw_pose": Bool(),
        "fid": {"inception_checkpoint": Str(), "substitute": Enum("lpips_alex"), "resolution": Int(0)},
    },
}


def leaf_keys(tree: dict, prefix: str = "") -> list[str]:
    """Dotted names of every leaf of a nested mapping (a schema or a params mapping)."""
    out: list[str] = []
    for k, v in tree.items():
        if isinstance(v, dict):
            out += leaf_keys(v, f"{prefix}{k}.")
        else:
            out.append(f"{prefix}{k}")
    return out


def _show(value: Any) -> str:
    text = repr(value) if isinstance(value, str) else str(value).replace("\n", " ")
    return text if len(text) <= 80 else text[:77] + "..."


def _nearest(key: str, names, prefix: str = "") -> str:
    """The valid names of the same group nearest to ``key`` (the best and any almost as near), else all of them."""
    score = {n: difflib.SequenceMatcher(None, key, n).ratio() for n in names}
    best = max(score.values(), default=0.0)
    near = [f"{prefix}{n}" for n, r in sorted(score.items(), key=lambda kv: -kv[1]) if r >= max(0.6, best - 0.1)]
    return f"; did you mean {' or '.join(near)}?" if near else f"; valid keys here: {', '.join(names)}"


def _check(node: Any, schema: dict, prefix: str, where: str) -> None:
    if not isinstance(node, dict):
        raise ParamsError(f"{where}: {prefix.rstrip('.') or 'the top level'} is {_show(node)}, expected a group "
                          f"(a mapping of {', '.join(schema)})")
    for k in node:
        if k not in schema:
            raise ParamsError(f"{where}: unknown key {prefix}{k} (value {_show(node[k])}){_nearest(k, schema, prefix)}")
    for k, spec in schema.items():
        name = f"{prefix}{k}"
        if k not in node:
            what = "group" if isinstance(spec, dict) else "key"
            allowed = f"a group of {', '.join(spec)}" if isinstance(spec, dict) else spec.allowed()
            raise ParamsError(f"{where}: missing {what} {name} (no value in code falls back for it: set {allowed}; "
                              "params.yaml holds the default)")
        if isinstance(spec, dict):
            _check(node[k], spec, f"{name}.", where)
        elif not spec.fits(node[k]):
            raise ParamsError(f"{where}: {name} is {_show(node[k])}, allowed: {spec.allowed()}")


def validate_groups(params: Any, groups, where: str = "params") -> dict:
    """``params`` if each of the top-level ``groups`` fits SCHEMA (what a stage logs to MLflow), else ParamsError."""
    if not isinstance(params, dict):
        raise ParamsError(f"{where}: the top level is {_show(params)}, expected a mapping of {', '.join(SCHEMA)}")
    _check({g: params[g] for g in groups if g in params}, {g: SCHEMA[g] for g in groups if g in SCHEMA}, "", where)
    unknown = [g for g in groups if g not in SCHEMA]
    if unknown:
        raise ParamsError(f"{where}: unknown group {unknown[0]}{_nearest(unknown[0], SCHEMA)}")
    return params


def validate(params: Any, where: str = "params") -> dict:
    """``params`` if it fits SCHEMA exactly (every key present, none unknown, each value allowed), else ParamsError
    with one line naming ``where`` (the file), the dotted key, the value and what is allowed."""
    _check(params, SCHEMA, "", where)
    return params
