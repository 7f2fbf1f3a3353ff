"""Bounds on network configs read from files, checked before anything is allocated.

A checkpoint's config is either stored in it (our formats) or inferred from its key names (rosinality ``noises.*``,
NVIDIA ``b<res>``). Either way it comes from the file, and a 20 KB file can name a 65,536 px generator whose noise
buffers alone need tens of GB. ``validate_network_config`` is the one gate every loader passes a config through:

* every field has the right type and lies within the limits below;
* the parameter count the config implies is within :data:`MAX_PARAMETERS`;
* given the file's tensors, they must actually hold (at least) the elements the config needs. The exact shapes are
  then checked tensor by tensor while loading; this check only has to guarantee that what gets allocated is bounded
  by what the file really contains (tensors whose storage is smaller than their shape, e.g. saved stride-0 views,
  count by their storage).

The limits are the constants below; they are far above any published StyleGAN2 (1024 px, 512 channels, 8 mapping
layers) and far below what would exhaust a machine.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

MIN_RESOLUTION = 8  # the generator needs at least one upsampling block (stylegan2._check_resolution)
MAX_RESOLUTION = 4096
MAX_CHANNELS = 4096  # channel_max, style_dim, z_dim (official networks use 512)
MAX_CHANNEL_BASE = MAX_CHANNELS * MAX_RESOLUTION
MAX_MLP = 32  # mapping layers (official: 8; 2 in the small test networks)
MAX_IMG_CHANNELS = 4
MAX_MBSTD = 64  # minibatch-std group size and channels
MAX_PARAMETERS = 2**29  # ~2 GiB of float32; FFHQ 1024 config F is ~30 M

ENCODER_MAX_INPUT = 1024
ENCODER_MAX_WIDTH = 1024
ENCODER_MAX_REFINE = 16  # encoder.refine_iterations: each is an encoder pass and a generator pass


class CheckpointError(ValueError):
    """A checkpoint file exists but is not one this loader can use (corrupt, wrong kind, unsupported variant)."""


_GENERATOR_FIELDS = {"resolution", "style_dim", "n_mlp", "channel_base", "channel_max", "z_dim", "mapping_lr_mul",
                     "w_avg_beta", "conv_clamp", "img_channels"}  # fmt: skip
_DISCRIMINATOR_FIELDS = {"resolution", "channel_base", "channel_max", "mbstd_group_size", "mbstd_channels",
                         "conv_clamp", "img_channels"}  # fmt: skip


def _int(config: Mapping, name: str, lo: int, hi: int, what: str, default: Any = None) -> int:
    v = config.get(name, default)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or v != int(v):
        raise CheckpointError(f"{what}: {name} is {v!r}, not an integer")
    v = int(v)
    if not lo <= v <= hi:
        raise CheckpointError(f"{what}: {name}={v} is outside {lo}..{hi}")
    return v


def _float(config: Mapping, name: str, what: str, default: Any = None, optional: bool = False) -> float | None:
    v = config.get(name, default)
    if v is None and optional:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise CheckpointError(f"{what}: {name} is {v!r}, not a finite number")
    return float(v)


def _channels(base: int, cmax: int, resolution: int) -> dict[int, int]:
    from mfim.models.stylegan2 import channels_at  # the networks' own rule, so the bound cannot drift from it

    return {2**i: channels_at(2**i, base, cmax) for i in range(2, int(math.log2(resolution)) + 1)}


def generator_parameters(c: Mapping) -> int:
    """A lower bound on the elements a Generator with config ``c`` holds (convs, mapping, noise buffers)."""
    ch = _channels(c["channel_base"], c["channel_max"], c["resolution"])
    w = c["style_dim"]
    n = c["z_dim"] * w + (c["n_mlp"] - 1) * w * w + ch[4] * 16 + ch[4] * ch[4] * 9 + 16
    for r in ch:
        if r > 4:
            n += (ch[r // 2] + ch[r]) * ch[r] * 9 + 2 * r * r
        n += c["img_channels"] * ch[r]
    return n


def discriminator_parameters(c: Mapping) -> int:
    ch = _channels(c["channel_base"], c["channel_max"], c["resolution"])
    n = c["img_channels"] * ch[c["resolution"]] + ch[4] * ch[4] * (9 + 16)
    for r in ch:
        if r > 4:
            n += ch[r] * ch[r] * 9 + ch[r] * ch[r // 2] * 10
    return n


def stored_elements(tensors: Mapping[str, Any]) -> int:
    """Elements the tensors really hold: each distinct storage counted once, by its size (not the views' shapes)."""
    seen: dict[tuple[str, int], int] = {}
    for t in tensors.values():
        if isinstance(t, torch.Tensor):
            s = t.untyped_storage()
            seen[(str(t.device), s.data_ptr())] = s.nbytes() // max(t.element_size(), 1)
    return sum(seen.values())


def validate_network_config(kind: str, config: Any, what: str, tensors: Mapping[str, Any] | None = None) -> dict:
    """The config, checked and normalised, or CheckpointError naming ``what`` (the file) and the inconsistency.

    ``kind``: 'generator' | 'discriminator'. ``tensors``: the file's weights for that network, when available.
    """
    if kind not in ("generator", "discriminator"):
        raise ValueError(f"kind must be 'generator' or 'discriminator', got {kind!r}")
    if not isinstance(config, Mapping):
        raise CheckpointError(f"{what}: {kind} config is a {type(config).__name__}, not a mapping")
    fields = _GENERATOR_FIELDS if kind == "generator" else _DISCRIMINATOR_FIELDS
    unknown = sorted(map(str, set(config) - fields))
    if unknown:
        raise CheckpointError(f"{what}: unknown {kind} config entries {unknown}")
    res = _int(config, "resolution", MIN_RESOLUTION, MAX_RESOLUTION, what, 1024)
    if res & (res - 1):
        raise CheckpointError(f"{what}: resolution={res} is not a power of two")
    c: dict[str, Any] = {
        "resolution": res,
        "channel_base": _int(config, "channel_base", 1, MAX_CHANNEL_BASE, what, 32768),
        "channel_max": _int(config, "channel_max", 1, MAX_CHANNELS, what, 512),
        "conv_clamp": _float(config, "conv_clamp", what, None, optional=True),
        "img_channels": _int(config, "img_channels", 1, MAX_IMG_CHANNELS, what, 3),
    }
    if c["channel_base"] < res:  # min(base // res, max) would give the top layers no channels
        raise CheckpointError(f"{what}: channel_base={c['channel_base']} gives 0 channels at {res} px")
    if kind == "generator":
        c["style_dim"] = _int(config, "style_dim", 1, MAX_CHANNELS, what, 512)
        c["n_mlp"] = _int(config, "n_mlp", 1, MAX_MLP, what, 8)
        z = config.get("z_dim")
        c["z_dim"] = c["style_dim"] if z is None else _int(config, "z_dim", 1, MAX_CHANNELS, what)
        c["mapping_lr_mul"] = _float(config, "mapping_lr_mul", what, 0.01)
        c["w_avg_beta"] = _float(config, "w_avg_beta", what, 0.995)
        need = generator_parameters(c)
    else:
        g = config.get("mbstd_group_size", 4)
        c["mbstd_group_size"] = None if g is None else _int(config, "mbstd_group_size", 1, MAX_MBSTD, what)
        c["mbstd_channels"] = _int(config, "mbstd_channels", 0, MAX_MBSTD, what, 1)
        need = discriminator_parameters(c)
    if need > MAX_PARAMETERS:
        raise CheckpointError(f"{what}: {kind} config {c} needs {need:,} parameters (limit {MAX_PARAMETERS:,})")
    if tensors is not None:
        have = stored_elements(tensors)
        if have < need:
            raise CheckpointError(
                f"{what}: {kind} config (resolution {res}, channel_max {c['channel_max']}) needs at least {need:,} "
                f"weights but the file's tensors hold {have:,}"
            )
    return c


def validate_encoder_config(config: Any, what: str, generator_resolution: int) -> dict:
    """Bounds for the swapper's encoder config (its size follows from these and the generator's layers)."""
    if not isinstance(config, Mapping):
        raise CheckpointError(f"{what}: encoder config is a {type(config).__name__}, not a mapping")
    c = dict(config)
    _int(c, "input_size", 8, ENCODER_MAX_INPUT, what, 64)
    _int(c, "width", 1, ENCODER_MAX_WIDTH, what, 32)
    for name in ("latent_channels", "code_channels"):
        if c.get(name) is not None:
            _int(c, name, 1, MAX_CHANNELS, what)
    _int(c, "style_map_channels", 0, MAX_CHANNELS, what, 1)
    _int(c, "refine_iterations", 0, ENCODER_MAX_REFINE, what, 0)
    resolutions = c.get("style_map_resolutions", ())
    if not isinstance(resolutions, (list, tuple)) or len(resolutions) > 16:
        raise CheckpointError(f"{what}: style_map_resolutions is {resolutions!r}")
    for r in resolutions:
        if isinstance(r, bool) or not isinstance(r, int) or not 4 <= r <= generator_resolution:
            raise CheckpointError(f"{what}: style map resolution {r!r} is outside 4..{generator_resolution}")
    refine_res = c.get("refine_map_resolutions")
    if refine_res is not None and (not isinstance(refine_res, (list, tuple))
                                   or not all(r in resolutions for r in refine_res)):
        raise CheckpointError(f"{what}: refine_map_resolutions {refine_res!r} is not a subset of the style map "
                              f"resolutions {list(resolutions)}")
    return c


def refuse_non_finite(net: torch.nn.Module, what: str) -> None:
    """A NaN or Inf weight or buffer makes every output NaN, which 8-bit conversion turns into a plausible black
    image; refuse the file at load instead of writing those."""
    for name, t in [*net.named_parameters(), *net.named_buffers()]:
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            bad = int((~torch.isfinite(t)).sum())
            raise CheckpointError(f"{what}: {bad} non-finite values (NaN/Inf) in {name}; the file is corrupt")


def refused_pickle_reason(e: BaseException) -> str:
    """The part of torch's weights_only refusal that names what the file tried to load -- not its advice to retry
    with weights_only=False, which would run the file's code."""
    import re

    text = str(e)
    m = re.search(r"unsupported global:? (?:GLOBAL )?([\w.]+)", text, re.IGNORECASE)
    if m:
        return f"refused pickle: it calls {m.group(1)}, which is not plain data (it is not loaded)"
    first = next((ln.strip() for ln in text.splitlines() if ln.strip() and "weights_only" not in ln), "")
    return f"refused or corrupt pickle: {first[:200]}" if first else "refused or corrupt pickle"
