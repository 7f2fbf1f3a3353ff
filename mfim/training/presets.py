"""The paper's ablation configurations (Table 4) as named presets: `dvc exp run -S train.config=C`.

A: style codes only; B: + style maps; C: + L_shape; D: + L_pose; E: + L_exp (the full model). A preset only switches
parts off: the effective weight is the params.yaml λ times the preset's switch, so `-S loss.shape=0` still works on
top of any preset.
"""

from __future__ import annotations

import copy

PRESETS: dict[str, dict[str, bool]] = {
    "A": {"style_maps": False, "shape": False, "pose": False, "exp": False},
    "B": {"style_maps": True, "shape": False, "pose": False, "exp": False},
    "C": {"style_maps": True, "shape": True, "pose": False, "exp": False},
    "D": {"style_maps": True, "shape": True, "pose": True, "exp": False},
    "E": {"style_maps": True, "shape": True, "pose": True, "exp": True},
}


def apply_preset(params: dict) -> dict:
    """A copy of ``params`` with train.config's switches applied to encoder.style_maps and loss.{shape,pose,exp}."""
    name = str(params["train"]["config"]).upper()
    if name not in PRESETS:
        raise ValueError(f"train.config must be one of {', '.join(PRESETS)}, not {name!r}")
    out = copy.deepcopy(params)
    switches = PRESETS[name]
    out["encoder"]["style_maps"] = bool(out["encoder"]["style_maps"]) and switches["style_maps"]
    loss = out["loss"]
    for term in ("shape", "pose", "exp"):
        loss[term] = float(loss[term]) if switches[term] else 0.0
    return out
