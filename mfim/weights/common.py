"""What every format's reader and writer share: key-map transfer between our networks and a foreign state dict,
the channel rule behind inferred configs, and building a network from a config read from a file.

A key map is a list of ``(our key, their key, to_theirs, to_ours)``; the official layouts store the weights in the
orientation our layers use, so a reshape (or nothing, :data:`SAME`) is the only transform a map needs.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from mfim.models.stylegan2 import Generator, channels_at
from mfim.weights.limits import CheckpointError, validate_network_config

KeyMap = list[tuple[str, str, Any, Any]]

SAME = None  # no transform: the tensor has the same shape in both layouts


def reshape_to(shape):
    return lambda t: t.reshape(shape)


def import_state(
    net: torch.nn.Module, theirs: dict[str, torch.Tensor], keymap, what: str, ignore: Callable[[str], bool]
) -> None:
    """Fill ``net`` from an official state dict through ``keymap``; every key must match in name and shape.
    ``ignore(key)``: their tensors with no counterpart in ours (fixed resampling kernels) that may be left over."""
    ours = net.state_dict()
    new: dict[str, torch.Tensor] = {}
    missing, bad_shape = [], []
    used = set()
    for our_key, their_key, _to_theirs, to_ours in keymap:
        if their_key not in theirs:
            if our_key == "mapping.w_avg":
                continue  # optional in the rosinality layout; filled by the caller
            missing.append(their_key)
            continue
        used.add(their_key)
        t = theirs[their_key]
        if to_ours is not None:
            if t.numel() != ours[our_key].numel():
                bad_shape.append(f"{their_key} {tuple(t.shape)}")
                continue
            t = to_ours(t)
        if tuple(t.shape) != tuple(ours[our_key].shape):
            bad_shape.append(f"{their_key} {tuple(theirs[their_key].shape)} (expected {tuple(ours[our_key].shape)})")
            continue
        new[our_key] = t.to(torch.float32)
    unexpected = [k for k in theirs if k not in used and not ignore(k)]
    if missing or bad_shape or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} tensors (e.g. {', '.join(missing[:3])})")
        if bad_shape:
            parts.append(f"wrong shapes: {', '.join(bad_shape[:3])}")
        if unexpected:
            parts.append(f"unexpected tensors (e.g. {', '.join(unexpected[:3])})")
        raise CheckpointError(f"{what}: " + "; ".join(parts))
    with torch.no_grad():
        for k, v in new.items():
            ours[k].copy_(v)


def export_state(net: torch.nn.Module, keymap) -> dict[str, torch.Tensor]:
    """``net``'s weights under their names and shapes (copies)."""
    sd = net.state_dict()
    out = {}
    for our_key, their_key, to_theirs, _ in keymap:
        t = sd[our_key].detach().clone()
        out[their_key] = to_theirs(t) if to_theirs is not None else t
    return out


def channel_rule(channels: dict[int, int], what: str) -> tuple[int, int]:
    """(channel_base, channel_max) reproducing ``channels`` {res: C} under min(base/res, max)."""
    top = max(channels)
    channel_max = max(channels.values())
    base_candidates = [channels[r] * r for r in channels if channels[r] < channel_max] or [channel_max * top]
    channel_base = max(base_candidates)
    if any(channels_at(r, channel_base, channel_max) != c for r, c in channels.items()):
        raise CheckpointError(
            f"{what}: channel counts {dict(sorted(channels.items()))} do not follow min(base/res, max)"
        )
    return channel_base, channel_max


def build_network(cls, config: dict, what: str, tensors: dict | None = None):
    # Every config, stored or inferred from key names, passes the bounds before a single tensor is allocated.
    kind = "generator" if cls is Generator else "discriminator"
    config = validate_network_config(kind, config, what, tensors)
    try:
        return cls(**config)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{what}: unusable config {config} ({e})") from None


def tensor_dict(state: Any, what: str) -> dict:
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{what}: the weights are not a dict of tensors")
    return state
