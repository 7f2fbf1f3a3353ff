"""Read any supported StyleGAN2 checkpoint: tell its format from the file's content (not its name), then build
the networks through that format's module (mfim_format, nvidia, rosinality).

Every pickle that is not a torch zip goes through the restricted unpickler (nvidia.restricted_load), whatever it
turns out to be; torch files are read with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import os
import pickle
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mfim.models.stylegan2 import Discriminator, Generator
from mfim.weights import mfim_format, nvidia, rosinality
from mfim.weights.limits import CheckpointError, refuse_non_finite, refused_pickle_reason
from mfim.weights.nvidia import PersistentRecord, restricted_load

ASSET_NAME = "stylegan2_ffhq"  # the asset-registry entry whose params key (generator.checkpoint) names user files

_TORCH_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C  # first object of a pre-zip torch.save file

_FORMATS = {"mfim": mfim_format, "nvidia": nvidia, "rosinality": rosinality}  # RawCheckpoint.format -> its module


@dataclass
class RawCheckpoint:
    format: str  # 'mfim' | 'nvidia' | 'rosinality'
    data: dict
    path: Path
    notes: list[str] = field(default_factory=list)


def _torch_load(path: Path) -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return torch.load(path, weights_only=True, map_location="cpu")
        except pickle.UnpicklingError as e:
            # rosinality's training checkpoints also hold args=argparse.Namespace: plain data, allow just that.
            if "argparse.Namespace" not in str(e):
                raise
            import argparse

            with torch.serialization.safe_globals([argparse.Namespace]):
                return torch.load(path, weights_only=True, map_location="cpu")


def read_checkpoint(path: str | os.PathLike) -> RawCheckpoint:
    """Read and classify a checkpoint without building networks. Raises CheckpointError for anything unusable."""
    path = Path(path)
    refused: set[str] = set()
    try:
        if zipfile.is_zipfile(path):
            data = _torch_load(path)
        else:
            with open(path, "rb") as f:
                head = f.read(2)
                if not head or head[0] != 0x80:
                    raise CheckpointError("not a pickle or torch checkpoint (unrecognised header)")
                f.seek(0)
                data, refused = restricted_load(f)
            if isinstance(data, int) and data == _TORCH_LEGACY_MAGIC:  # pre-1.6 torch.save layout
                data = _torch_load(path)
    except CheckpointError as e:
        raise CheckpointError(f"{path}: {e}") from None
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, TypeError, KeyError, AttributeError,
            ImportError, IndexError, OSError, zipfile.BadZipFile) as e:  # fmt: skip
        if isinstance(e, pickle.UnpicklingError):
            raise CheckpointError(f"{path}: {refused_pickle_reason(e)}") from None
        raise CheckpointError(f"{path}: cannot read as a StyleGAN2 checkpoint ({type(e).__name__}: {e})") from None
    if isinstance(data, tuple) and len(data) == 3:
        raise CheckpointError(
            f"{path}: a TensorFlow-era StyleGAN2 pickle; convert it with stylegan2-ada-pytorch's legacy.py or "
            "rosinality's convert_weight.py first"
        )
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a dict at the top level, found {type(data).__name__}")
    notes = [f"ignored (not loaded) global {r}" for r in sorted(refused)]
    if data.get("format") == "mfim-swapper" and isinstance(data.get("generator"), dict):
        # the swapper (data/train/mfim.pt) stores its frozen generator in our format's two entries
        gen = data["generator"]
        data = {"format": mfim_format.FORMAT, "config": gen.get("config"), "g_ema": gen.get("state_dict")}
        return RawCheckpoint("mfim", data, path, ["the generator of an MFIM swapper checkpoint"])
    if data.get("format") == mfim_format.FORMAT:
        return RawCheckpoint("mfim", data, path)
    if isinstance(data.get("G_ema"), PersistentRecord):
        return RawCheckpoint("nvidia", data, path, notes)
    if isinstance(data.get("g_ema"), dict) and any(str(k).startswith("style.") for k in data["g_ema"]):
        return RawCheckpoint("rosinality", data, path)
    keys = ", ".join(sorted(map(str, data))[:8])
    why = f"; refused globals: {', '.join(sorted(refused))}" if refused else ""
    raise CheckpointError(f"{path}: not a StyleGAN2 checkpoint this loader knows (top-level keys: {keys}){why}")


def _resolve(path: str | os.PathLike | None) -> Path:
    from mfim.assets import resolve

    return resolve(ASSET_NAME, path, fetch_missing=False)


def _load_network(path: str | os.PathLike | None, part: str, device: str | torch.device):
    from mfim.assets.store import warn_if_not_as_recorded

    resolved = _resolve(path)
    warn_if_not_as_recorded(resolved)
    raw = read_checkpoint(resolved)
    build = getattr(_FORMATS[raw.format], f"{part}_from")
    try:
        net = build(raw.data, f"{raw.path} ({raw.format})")
    except KeyError as e:
        raise CheckpointError(f"{raw.path} ({raw.format}): missing entry {e}") from None
    refuse_non_finite(net, f"{raw.path} ({raw.format})")
    return net.eval().to(device)


def load_generator(path: str | os.PathLike | None, device: str | torch.device = "cpu") -> Generator:
    """A Generator (eval mode) from our format, an NVIDIA .pkl (``G_ema``) or a rosinality .pt (``g_ema``).

    A missing file raises ``MissingAssetError`` (naming ``generator.checkpoint``); an unusable one ``CheckpointError``.
    """
    return _load_network(path, "generator", device)


def load_discriminator(path: str | os.PathLike | None, device: str | torch.device = "cpu") -> Discriminator:
    """The discriminator stored alongside the generator (NVIDIA ``D``, rosinality ``d``, ours ``d``)."""
    return _load_network(path, "discriminator", device)


def checkpoint_format(path: str | os.PathLike) -> str:
    """'mfim' | 'nvidia' | 'rosinality' (reads the whole file)."""
    return read_checkpoint(_resolve(path)).format
