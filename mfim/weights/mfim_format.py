"""Our own StyleGAN2 checkpoint format: a ``torch.save`` zip of ``{"format": "mfim-stylegan2", "version": 1,
"config": G.config, "g_ema": state_dict, ["d_config", "d"], ["extra"]}``, read with ``torch.load(weights_only=True)``.

The config is stored, not inferred, but it still comes from the file, so it passes the same bounds as the foreign
formats' inferred configs (common.build_network) before the network is allocated.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from mfim.atomic import atomic_torch_save
from mfim.models.stylegan2 import Discriminator, Generator
from mfim.weights.common import build_network, tensor_dict
from mfim.weights.limits import CheckpointError

FORMAT = "mfim-stylegan2"
FORMAT_VERSION = 1


def checkpoint_dict(G: Generator, D: Discriminator | None = None, extra: dict | None = None) -> dict:
    ckpt: dict[str, Any] = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "config": G.config,
        "g_ema": {k: v.detach().cpu().clone() for k, v in G.state_dict().items()},
    }
    if D is not None:
        ckpt["d_config"] = D.config
        ckpt["d"] = {k: v.detach().cpu().clone() for k, v in D.state_dict().items()}
    if extra:
        ckpt["extra"] = extra
    return ckpt


def save_checkpoint(
    path: str | os.PathLike, G: Generator, D: Discriminator | None = None, extra: dict | None = None
) -> Path:
    """Write our format atomically (temp file in the same folder, fsync, rename). ``extra`` must hold only what
    ``torch.load(weights_only=True)`` accepts (tensors, numbers, strings, lists, dicts)."""
    path = Path(path)
    atomic_torch_save(checkpoint_dict(G, D, extra), path)
    return path


def generator_from(d: dict, what: str) -> Generator:
    G = build_network(Generator, d.get("config") or {}, what, tensor_dict(d.get("g_ema"), what))
    try:
        G.load_state_dict(d["g_ema"], strict=True)
    except (KeyError, RuntimeError) as e:
        raise CheckpointError(f"{what}: generator weights do not fit the config ({e})") from None
    return G


def discriminator_from(d: dict, what: str) -> Discriminator:
    if "d" not in d:
        raise CheckpointError(f"{what}: this checkpoint has no discriminator")
    D = build_network(Discriminator, d.get("d_config") or {}, what, tensor_dict(d["d"], what))
    try:
        D.load_state_dict(d["d"], strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"{what}: discriminator weights do not fit the config ({e})") from None
    return D
