"""StyleGAN2 checkpoints: load official weights safely, save and load our own format, write official layouts.

Formats, detected from the file's content (not its name):

* ``mfim``       -- ours: a ``torch.save`` zip of ``{"format": "mfim-stylegan2", "version": 1, "config": G.config,
  "g_ema": state_dict, ["d_config", "d"], ["extra"]}``, read with ``torch.load(weights_only=True)``.
* ``nvidia``     -- stylegan2-ada-pytorch / stylegan3 network pickles (``G``, ``D``, ``G_ema``, ...). Their modules
  are pickled as "persistent objects" that carry the source code of the network module and rebuild themselves by
  executing it. We never do that: a restricted unpickler resolves only an allow-list of data constructors (tensor
  and storage rebuilders, OrderedDict, numpy scalars, EasyDict); each persistent object becomes an inert record of
  its parameters, buffers, sub-modules and init kwargs, from which the tensors are read. Anything else is refused.
* ``rosinality`` -- rosinality/stylegan2-pytorch ``.pt`` (``g_ema`` [+ ``d``, ``latent_avg``]), read with
  ``torch.load(weights_only=True)``.

The official layouts store the weights in the orientation our layers use, so conversion is renaming and reshaping
only: a loaded generator reproduces the reference image (see tests/test_checkpoints.py and the parity numbers in the
models report). ``write_nvidia_pickle`` / ``write_rosinality_checkpoint`` produce those layouts from our networks
(key names, shapes, pickle structure as in the official files) so the loaders can be tested without the real files.
"""

from __future__ import annotations

import collections
import io
import math
import os
import pickle
import warnings
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mfim.atomic import atomic_torch_save
from mfim.models.layers import make_fir_kernel
from mfim.weights.limits import CheckpointError, validate_network_config
from mfim.models.stylegan2 import Discriminator, Generator, channels_at

FORMAT = "mfim-stylegan2"
FORMAT_VERSION = 1
ASSET_NAME = "stylegan2_ffhq"  # the asset-registry entry whose params key (generator.checkpoint) names user files

_TORCH_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C  # first object of a pre-zip torch.save file


# ====================================================================================================================
# Our own format
# ====================================================================================================================


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


# ====================================================================================================================
# Restricted unpickler for NVIDIA network pickles
# ====================================================================================================================


class _EasyDict(dict):
    """Stand-in for dnnlib.util.EasyDict (a dict with attribute access): data only."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


@dataclass
class PersistentRecord:
    """What a ``torch_utils.persistence`` object is, read as data: class name, module state, init arguments. The
    pickled module source is kept only as its length."""

    class_name: str
    state: dict
    version: int | None = None
    module_src_chars: int = 0

    @property
    def init_kwargs(self) -> dict:
        return dict(self.state.get("_init_kwargs") or {})

    @property
    def init_args(self) -> tuple:
        return tuple(self.state.get("_init_args") or ())

    @property
    def modules(self) -> dict:
        return dict(self.state.get("_modules") or {})

    def attr(self, name: str, default: Any = None) -> Any:
        return self.state.get(name, default)

    def tensors(self, prefix: str = "") -> dict[str, torch.Tensor]:
        """Parameters and persistent buffers of the record tree, named as ``state_dict`` would name them."""
        out: dict[str, torch.Tensor] = {}
        skip = set(self.state.get("_non_persistent_buffers_set") or ())
        for group in ("_parameters", "_buffers"):
            for name, t in (self.state.get(group) or {}).items():
                if t is None or (group == "_buffers" and name in skip):
                    continue
                if not isinstance(t, torch.Tensor):
                    raise CheckpointError(f"{prefix}{name} is a {type(t).__name__}, not a tensor")
                out[prefix + name] = t.detach()
        for name, sub in self.modules.items():
            if sub is None:
                continue
            if not isinstance(sub, PersistentRecord):
                raise CheckpointError(f"sub-module {prefix}{name} is a {type(sub).__name__}, not a network record")
            out.update(sub.tensors(f"{prefix}{name}."))
        return out


def _reconstruct_record(meta: dict) -> PersistentRecord:
    if not isinstance(meta, dict) or meta.get("type") != "class" or not isinstance(meta.get("state"), dict):
        raise pickle.UnpicklingError("persistent object without a class record")
    src = meta.get("module_src")
    return PersistentRecord(
        class_name=str(meta.get("class_name")),
        state=meta["state"],
        version=meta.get("version"),
        module_src_chars=len(src) if isinstance(src, str) else 0,
    )


def _load_storage_from_bytes(data: bytes):
    # The bytes are a (legacy-format) torch.save of one storage: read them with torch's own weights-only unpickler.
    if not isinstance(data, (bytes, bytearray)):
        raise pickle.UnpicklingError("storage payload is not bytes")
    return torch.load(io.BytesIO(data), weights_only=True, map_location="cpu")


def _rebuild_parameter_with_state(data, requires_grad, backward_hooks, state):
    return torch._utils._rebuild_parameter(data, requires_grad, backward_hooks)


_NUMPY_SCALAR = np.float64(0).__reduce__()[0]  # numpy's own scalar reconstructor, wherever numpy keeps it

_ALLOWED_GLOBALS: dict[tuple[str, str], Callable] = {
    ("torch_utils.persistence", "_reconstruct_persistent_obj"): _reconstruct_record,
    ("dnnlib.util", "EasyDict"): _EasyDict,
    ("dnnlib", "EasyDict"): _EasyDict,
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("torch._utils", "_rebuild_tensor_v2"): torch._utils._rebuild_tensor_v2,
    ("torch._utils", "_rebuild_tensor"): torch._utils._rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): torch._utils._rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter_with_state,
    ("torch.storage", "_load_from_bytes"): _load_storage_from_bytes,
    ("numpy", "dtype"): np.dtype,
    ("numpy.core.multiarray", "scalar"): _NUMPY_SCALAR,
    ("numpy._core.multiarray", "scalar"): _NUMPY_SCALAR,
}


class RefusedGlobal:
    """Stands in for a global the allow-list does not cover: created and called with the pickled arguments, it only
    records them. Nothing named by the pickle is imported or run; an official pickle whose optional parts (training
    set kwargs, augmentation pipeline) use other types still loads, and a network built from such objects fails
    with a clear error later."""

    qualified_name = "?"

    def __init__(self, *args, **kwargs):
        self.args = args

    def __setstate__(self, state):
        self.state = state

    def __setitem__(self, key, value):
        pass

    def append(self, item):
        pass

    def extend(self, items):
        pass

    def __repr__(self) -> str:
        return f"<refused global {self.qualified_name}>"


class _RestrictedUnpickler(pickle.Unpickler):
    """Resolves only the allow-listed globals; never imports or runs code named by the pickle."""

    def __init__(self, f):
        super().__init__(f)
        self.refused: set[str] = set()

    def find_class(self, module: str, name: str):
        fn = _ALLOWED_GLOBALS.get((module, name))
        if fn is None:
            qualified = f"{module}.{name}"
            self.refused.add(qualified)
            return type("RefusedGlobal", (RefusedGlobal,), {"qualified_name": qualified})
        return fn

    def persistent_load(self, pid):
        raise pickle.UnpicklingError("persistent ids are not used by network pickles")


def _restricted_load(f) -> tuple[Any, set[str]]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TypedStorage deprecation chatter from torch
        u = _RestrictedUnpickler(f)
        return u.load(), u.refused


# ====================================================================================================================
# Format detection and raw reading
# ====================================================================================================================


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
                data, refused = _restricted_load(f)
            if isinstance(data, int) and data == _TORCH_LEGACY_MAGIC:  # pre-1.6 torch.save layout
                data = _torch_load(path)
    except CheckpointError as e:
        raise CheckpointError(f"{path}: {e}") from None
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, TypeError, KeyError, AttributeError,
            ImportError, IndexError, OSError, zipfile.BadZipFile) as e:  # fmt: skip
        raise CheckpointError(f"{path}: cannot read as a StyleGAN2 checkpoint ({type(e).__name__}: {e})") from None
    if isinstance(data, tuple) and len(data) == 3:
        raise CheckpointError(
            f"{path}: a TensorFlow-era StyleGAN2 pickle; convert it with stylegan2-ada-pytorch's legacy.py or "
            "rosinality's convert_weight.py first"
        )
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a dict at the top level, found {type(data).__name__}")
    notes = [f"ignored (not loaded) global {r}" for r in sorted(refused)]
    if data.get("format") == FORMAT:
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


# ====================================================================================================================
# Name maps between our networks and the official layouts
# ====================================================================================================================
# Each map is a list of (our key, their key, to_theirs, to_ours); the reshapes are the only transforms needed.

_Same = None


def _reshape_to(shape):
    return lambda t: t.reshape(shape)


def _synthesis_layer_names(G: Generator):
    """(res, our conv index, official layer name) for every conv, and (res, our torgb index) per block."""
    convs, rgbs = [], []
    for res, conv_ids, rgb_id in G.synthesis._plan:
        names = ["conv1"] if res == 4 else ["conv0", "conv1"]
        convs += [(res, i, n) for i, n in zip(conv_ids, names)]
        rgbs.append((res, rgb_id))
    return convs, rgbs


def nvidia_generator_keys(G: Generator) -> list[tuple[str, str, Any, Any]]:
    m: list[tuple[str, str, Any, Any]] = []
    for i in range(len(G.mapping.layers)):
        m += [(f"mapping.layers.{i}.{p}", f"mapping.fc{i}.{p}", _Same, _Same) for p in ("weight", "bias")]
    m.append(("mapping.w_avg", "mapping.w_avg", _Same, _Same))
    m.append(("synthesis.const", "synthesis.b4.const", _Same, _Same))
    convs, rgbs = _synthesis_layer_names(G)
    for res, i, name in convs:
        ours, theirs = f"synthesis.convs.{i}", f"synthesis.b{res}.{name}"
        m += [
            (f"{ours}.conv.weight", f"{theirs}.weight", _Same, _Same),
            (f"{ours}.noise.strength", f"{theirs}.noise_strength", _Same, _Same),
            (f"{ours}.bias", f"{theirs}.bias", _Same, _Same),
            (f"{ours}.noise_const", f"{theirs}.noise_const", _Same, _Same),
            (f"{ours}.affine.weight", f"{theirs}.affine.weight", _Same, _Same),
            (f"{ours}.affine.bias", f"{theirs}.affine.bias", _Same, _Same),
        ]
    for res, i in rgbs:
        ours, theirs = f"synthesis.torgbs.{i}", f"synthesis.b{res}.torgb"
        m += [
            (f"{ours}.conv.weight", f"{theirs}.weight", _Same, _Same),
            (f"{ours}.bias", f"{theirs}.bias", _Same, _Same),
            (f"{ours}.affine.weight", f"{theirs}.affine.weight", _Same, _Same),
            (f"{ours}.affine.bias", f"{theirs}.affine.bias", _Same, _Same),
        ]
    return m


def nvidia_discriminator_keys(D: Discriminator) -> list[tuple[str, str, Any, Any]]:
    m: list[tuple[str, str, Any, Any]] = []
    top = D.resolution
    m += [(f"from_rgb.{p}", f"b{top}.fromrgb.{p}", _Same, _Same) for p in ("weight", "bias")]
    for i, res in enumerate(D.block_resolutions):
        for layer in ("conv0", "conv1"):
            m += [(f"blocks.{i}.{layer}.{p}", f"b{res}.{layer}.{p}", _Same, _Same) for p in ("weight", "bias")]
        m.append((f"blocks.{i}.skip.weight", f"b{res}.skip.weight", _Same, _Same))
    m += [(f"epilogue.conv.{p}", f"b4.conv.{p}", _Same, _Same) for p in ("weight", "bias")]
    m += [(f"epilogue.fc.{p}", f"b4.fc.{p}", _Same, _Same) for p in ("weight", "bias")]
    m += [(f"epilogue.out.{p}", f"b4.out.{p}", _Same, _Same) for p in ("weight", "bias")]
    return m


def rosinality_generator_keys(G: Generator) -> list[tuple[str, str, Any, Any]]:
    """In the order rosinality's ``Generator.state_dict()`` lists them (blur kernels are written separately)."""
    m: list[tuple[str, str, Any, Any]] = []
    for i in range(len(G.mapping.layers)):
        m += [(f"mapping.layers.{i}.{p}", f"style.{i + 1}.{p}", _Same, _Same) for p in ("weight", "bias")]
    c4 = G.synthesis.const.shape[0]
    m.append(("synthesis.const", "input.input", _reshape_to((1, c4, 4, 4)), _reshape_to((c4, 4, 4))))

    def conv_entries(i: int, theirs: str):
        w = G.synthesis.convs[i].conv.weight
        return [
            (f"synthesis.convs.{i}.conv.weight", f"{theirs}.conv.weight",
             _reshape_to((1, *w.shape)), _reshape_to(tuple(w.shape))),
            (f"synthesis.convs.{i}.affine.weight", f"{theirs}.conv.modulation.weight", _Same, _Same),
            (f"synthesis.convs.{i}.affine.bias", f"{theirs}.conv.modulation.bias", _Same, _Same),
            (f"synthesis.convs.{i}.noise.strength", f"{theirs}.noise.weight", _reshape_to((1,)), _reshape_to(())),
            (f"synthesis.convs.{i}.bias", f"{theirs}.activate.bias", _Same, _Same),
        ]  # fmt: skip

    def rgb_entries(i: int, theirs: str):
        w = G.synthesis.torgbs[i].conv.weight
        c = w.shape[0]
        return [
            (f"synthesis.torgbs.{i}.bias", f"{theirs}.bias", _reshape_to((1, c, 1, 1)), _reshape_to((c,))),
            (f"synthesis.torgbs.{i}.conv.weight", f"{theirs}.conv.weight",
             _reshape_to((1, *w.shape)), _reshape_to(tuple(w.shape))),
            (f"synthesis.torgbs.{i}.affine.weight", f"{theirs}.conv.modulation.weight", _Same, _Same),
            (f"synthesis.torgbs.{i}.affine.bias", f"{theirs}.conv.modulation.bias", _Same, _Same),
        ]  # fmt: skip

    m += conv_entries(0, "conv1")
    m += rgb_entries(0, "to_rgb1")
    for i in range(1, len(G.synthesis.convs)):
        m += conv_entries(i, f"convs.{i - 1}")
    for i in range(1, len(G.synthesis.torgbs)):
        m += rgb_entries(i, f"to_rgbs.{i - 1}")
    for i, layer in enumerate(G.synthesis.convs):
        r = layer.resolution
        m.append((f"synthesis.convs.{i}.noise_const", f"noises.noise_{i}",
                  _reshape_to((1, 1, r, r)), _reshape_to((r, r))))  # fmt: skip
    return m


def rosinality_discriminator_keys(D: Discriminator) -> list[tuple[str, str, Any, Any]]:
    m: list[tuple[str, str, Any, Any]] = [
        ("from_rgb.weight", "convs.0.0.weight", _Same, _Same),
        ("from_rgb.bias", "convs.0.1.bias", _Same, _Same),
    ]
    for i in range(len(D.blocks)):
        j = i + 1
        m += [
            (f"blocks.{i}.conv0.weight", f"convs.{j}.conv1.0.weight", _Same, _Same),
            (f"blocks.{i}.conv0.bias", f"convs.{j}.conv1.1.bias", _Same, _Same),
            (f"blocks.{i}.conv1.weight", f"convs.{j}.conv2.1.weight", _Same, _Same),
            (f"blocks.{i}.conv1.bias", f"convs.{j}.conv2.2.bias", _Same, _Same),
            (f"blocks.{i}.skip.weight", f"convs.{j}.skip.1.weight", _Same, _Same),
        ]
    m += [
        ("epilogue.conv.weight", "final_conv.0.weight", _Same, _Same),
        ("epilogue.conv.bias", "final_conv.1.bias", _Same, _Same),
        ("epilogue.fc.weight", "final_linear.0.weight", _Same, _Same),
        ("epilogue.fc.bias", "final_linear.0.bias", _Same, _Same),
        ("epilogue.out.weight", "final_linear.1.weight", _Same, _Same),
        ("epilogue.out.bias", "final_linear.1.bias", _Same, _Same),
    ]
    return m


def _import_state(
    net: torch.nn.Module, theirs: dict[str, torch.Tensor], keymap, what: str, ignore: Callable[[str], bool]
) -> None:
    """Fill ``net`` from an official state dict through ``keymap``; every key must match in name and shape."""
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


def _export_state(net: torch.nn.Module, keymap) -> dict[str, torch.Tensor]:
    sd = net.state_dict()
    out = {}
    for our_key, their_key, to_theirs, _ in keymap:
        t = sd[our_key].detach().clone()
        out[their_key] = to_theirs(t) if to_theirs is not None else t
    return out


# ====================================================================================================================
# Config inference
# ====================================================================================================================


def _channel_rule(channels: dict[int, int], what: str) -> tuple[int, int]:
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


def _nvidia_generator_config(rec: PersistentRecord, t: dict[str, torch.Tensor]) -> dict:
    if rec.class_name != "Generator":
        raise CheckpointError(f"G_ema is a {rec.class_name}, not a StyleGAN2 Generator")
    if int(rec.attr("c_dim", 0) or 0) > 0:
        raise CheckpointError("conditional generators (c_dim > 0) are not supported")
    syn = rec.modules.get("synthesis")
    mapping = rec.modules.get("mapping")
    if not isinstance(syn, PersistentRecord) or not isinstance(mapping, PersistentRecord):
        raise CheckpointError("G_ema has no synthesis/mapping networks")
    if syn.class_name != "SynthesisNetwork" or "b4" not in syn.modules:
        raise CheckpointError(
            f"G_ema.synthesis is a {syn.class_name} without 4x4 block: StyleGAN3 (alias-free) and other generators "
            "are not supported, MFIM needs a StyleGAN2 generator"
        )
    res = [int(k[1:]) for k in syn.modules if k.startswith("b") and k[1:].isdigit()]
    resolution = max(res)
    conv_clamp = None
    for name, blk in syn.modules.items():
        arch = blk.attr("architecture", "skip")
        if arch != "skip":
            raise CheckpointError(f"synthesis architecture {arch!r} is not supported (config F uses 'skip')")
        for sub in ("conv0", "conv1", "torgb"):
            layer = blk.modules.get(sub)
            if isinstance(layer, PersistentRecord) and layer.attr("conv_clamp") is not None:
                conv_clamp = float(layer.attr("conv_clamp"))
    channels = {r: int(t[f"synthesis.b{r}.conv1.weight"].shape[0]) for r in res}
    channel_base, channel_max = _channel_rule(channels, "generator")
    n_mlp = len([k for k in mapping.modules if k.startswith("fc")])
    fc0 = mapping.modules["fc0"]
    lr_mul = float(fc0.attr("bias_gain", 0.01))
    return dict(
        resolution=resolution,
        style_dim=int(t[f"mapping.fc{n_mlp - 1}.weight"].shape[0]),
        n_mlp=n_mlp,
        channel_base=channel_base,
        channel_max=channel_max,
        z_dim=int(t["mapping.fc0.weight"].shape[1]),
        mapping_lr_mul=lr_mul,
        w_avg_beta=float(mapping.attr("w_avg_beta", 0.995) or 0.995),
        conv_clamp=conv_clamp,
        img_channels=int(t[f"synthesis.b{resolution}.torgb.weight"].shape[0]),
    )


def _nvidia_discriminator_config(rec: PersistentRecord, t: dict[str, torch.Tensor]) -> dict:
    if rec.class_name != "Discriminator":
        raise CheckpointError(f"D is a {rec.class_name}, not a StyleGAN2 Discriminator")
    if int(rec.attr("c_dim", 0) or 0) > 0:
        raise CheckpointError("conditional discriminators (c_dim > 0) are not supported")
    res = [int(k[1:]) for k in rec.modules if k.startswith("b") and k[1:].isdigit()]
    resolution = max(res)
    conv_clamp = None
    for r in res:
        blk = rec.modules[f"b{r}"]
        if r > 4 and blk.attr("architecture", "resnet") != "resnet":
            raise CheckpointError(f"discriminator architecture {blk.attr('architecture')!r} is not supported")
        for layer in blk.modules.values():
            if isinstance(layer, PersistentRecord) and layer.attr("conv_clamp") is not None:
                conv_clamp = float(layer.attr("conv_clamp"))
    channels = {r: int(t[f"b{r}.conv0.weight"].shape[0]) for r in res if r > 4}
    channels[4] = int(t["b4.conv.weight"].shape[0])
    channel_base, channel_max = _channel_rule(channels, "discriminator")
    epi = rec.modules["b4"]
    if int(epi.attr("cmap_dim", 0) or 0) > 0:
        raise CheckpointError("conditional discriminators are not supported")
    mbstd = epi.modules.get("mbstd")
    group = mbstd.attr("group_size", 4) if isinstance(mbstd, PersistentRecord) else 4
    mb_ch = int(mbstd.attr("num_channels", 1)) if isinstance(mbstd, PersistentRecord) else 0
    return dict(
        resolution=resolution,
        channel_base=channel_base,
        channel_max=channel_max,
        mbstd_group_size=None if group is None else int(group),
        mbstd_channels=mb_ch,
        conv_clamp=conv_clamp,
        img_channels=int(t[f"b{resolution}.fromrgb.weight"].shape[1]),
    )


def _check_fir_buffers(t: dict[str, torch.Tensor], what: str) -> None:
    ref = make_fir_kernel()
    for k, v in t.items():
        if k.endswith("resample_filter") and not torch.allclose(v.to(torch.float32), ref, atol=1e-7):
            raise CheckpointError(f"{what}: resampling filter {k} is not [1,3,3,1]; not supported")


def _rosinality_generator_config(sd: dict[str, torch.Tensor]) -> dict:
    n_mlp = len({k.split(".")[1] for k in sd if k.startswith("style.") and k.endswith(".weight")})
    n_noise = len([k for k in sd if k.startswith("noises.noise_")])
    if n_mlp == 0 or n_noise == 0 or "input.input" not in sd:
        raise CheckpointError("g_ema is not a rosinality StyleGAN2 generator state dict")
    log_res = (n_noise + 3) // 2
    resolution = 2**log_res
    channels = {4: int(sd["conv1.conv.weight"].shape[1])}
    for i in range(n_noise - 1):
        r = 2 ** (3 + i // 2)
        channels[r] = int(sd[f"convs.{i}.conv.weight"].shape[1])
    style_dim = int(sd["style.1.weight"].shape[0])
    channel_base, channel_max = _channel_rule(channels, "generator")
    return dict(
        resolution=resolution,
        style_dim=style_dim,
        n_mlp=n_mlp,
        channel_base=channel_base,
        channel_max=channel_max,
        z_dim=int(sd["style.1.weight"].shape[1]),
        mapping_lr_mul=0.01,
        w_avg_beta=0.995,
        conv_clamp=None,
        img_channels=int(sd["to_rgb1.conv.weight"].shape[1]),
    )


def _rosinality_discriminator_config(sd: dict[str, torch.Tensor]) -> dict:
    n_blocks = len({k.split(".")[1] for k in sd if k.startswith("convs.") and ".conv1." in k})
    resolution = 2 ** (n_blocks + 2)
    channels = {resolution: int(sd["convs.0.0.weight"].shape[0]), 4: int(sd["final_conv.0.weight"].shape[0])}
    for j in range(1, n_blocks + 1):
        channels[resolution // 2 ** (j - 1)] = int(sd[f"convs.{j}.conv1.0.weight"].shape[0])
    channel_base, channel_max = _channel_rule(channels, "discriminator")
    return dict(resolution=resolution, channel_base=channel_base, channel_max=channel_max, mbstd_group_size=4,
                mbstd_channels=1, conv_clamp=None, img_channels=int(sd["convs.0.0.weight"].shape[1]))  # fmt: skip


# ====================================================================================================================
# Public loaders
# ====================================================================================================================


def _build(cls, config: dict, what: str, tensors: dict | None = None):
    # Every config, stored or inferred from key names, passes the bounds before a single tensor is allocated.
    kind = "generator" if cls is Generator else "discriminator"
    config = validate_network_config(kind, config, what, tensors)
    try:
        return cls(**config)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{what}: unusable config {config} ({e})") from None


def _tensor_dict(state: Any, what: str) -> dict:
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{what}: the weights are not a dict of tensors")
    return state


def _estimate_w_avg(G: Generator, n: int = 4096, seed: int = 0) -> torch.Tensor:
    """Mean of w over ``n`` fixed-seed z (rosinality files without latent_avg do the same for truncation)."""
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(n, G.z_dim, generator=gen)
    with torch.no_grad():
        return G.mapping(z, update_w_avg=False).mean(0)


def _generator_from_raw(raw: RawCheckpoint) -> Generator:
    what = f"{raw.path} ({raw.format})"
    d = raw.data
    if raw.format == "mfim":
        G = _build(Generator, d.get("config") or {}, what, _tensor_dict(d.get("g_ema"), what))
        try:
            G.load_state_dict(d["g_ema"], strict=True)
        except (KeyError, RuntimeError) as e:
            raise CheckpointError(f"{what}: generator weights do not fit the config ({e})") from None
        return G
    if raw.format == "nvidia":
        rec = d["G_ema"]
        t = rec.tensors()
        G = _build(Generator, _nvidia_generator_config(rec, t), what, t)
        _check_fir_buffers(t, what)
        _import_state(G, t, nvidia_generator_keys(G), what, ignore=lambda k: k.endswith("resample_filter"))
        return G
    sd = d["g_ema"]
    G = _build(Generator, _rosinality_generator_config(_tensor_dict(sd, what)), what, sd)
    _import_state(G, sd, rosinality_generator_keys(G), what, ignore=lambda k: k.endswith("kernel"))
    latent_avg = d.get("latent_avg")
    with torch.no_grad():
        if isinstance(latent_avg, torch.Tensor) and latent_avg.shape[-1] == G.w_dim:
            G.mapping.w_avg.copy_(latent_avg.reshape(-1, G.w_dim)[0].float())
        else:
            G.mapping.w_avg.copy_(_estimate_w_avg(G))
    return G


def _discriminator_from_raw(raw: RawCheckpoint) -> Discriminator:
    what = f"{raw.path} ({raw.format})"
    d = raw.data
    if raw.format == "mfim":
        if "d" not in d:
            raise CheckpointError(f"{what}: this checkpoint has no discriminator")
        D = _build(Discriminator, d.get("d_config") or {}, what, _tensor_dict(d["d"], what))
        try:
            D.load_state_dict(d["d"], strict=True)
        except RuntimeError as e:
            raise CheckpointError(f"{what}: discriminator weights do not fit the config ({e})") from None
        return D
    if raw.format == "nvidia":
        rec = d.get("D")
        if not isinstance(rec, PersistentRecord):
            raise CheckpointError(f"{what}: this pickle has no discriminator")
        t = rec.tensors()
        D = _build(Discriminator, _nvidia_discriminator_config(rec, t), what, t)
        _check_fir_buffers(t, what)
        _import_state(D, t, nvidia_discriminator_keys(D), what, ignore=lambda k: k.endswith("resample_filter"))
        return D
    sd = d.get("d")
    if not isinstance(sd, dict):
        raise CheckpointError(f"{what}: this checkpoint has no discriminator ('d')")
    D = _build(Discriminator, _rosinality_discriminator_config(_tensor_dict(sd, what)), what, sd)
    _import_state(D, sd, rosinality_discriminator_keys(D), what, ignore=lambda k: k.endswith("kernel"))
    return D


def load_generator(path: str | os.PathLike | None, device: str | torch.device = "cpu") -> Generator:
    """A Generator (eval mode) from our format, an NVIDIA .pkl (``G_ema``) or a rosinality .pt (``g_ema``).

    A missing file raises ``MissingAssetError`` (naming ``generator.checkpoint``); an unusable one ``CheckpointError``.
    """
    raw = read_checkpoint(_resolve(path))
    try:
        G = _generator_from_raw(raw)
    except KeyError as e:
        raise CheckpointError(f"{raw.path} ({raw.format}): missing entry {e}") from None
    return G.eval().to(device)


def load_discriminator(path: str | os.PathLike | None, device: str | torch.device = "cpu") -> Discriminator:
    """The discriminator stored alongside the generator (NVIDIA ``D``, rosinality ``d``, ours ``d``)."""
    raw = read_checkpoint(_resolve(path))
    try:
        D = _discriminator_from_raw(raw)
    except KeyError as e:
        raise CheckpointError(f"{raw.path} ({raw.format}): missing entry {e}") from None
    return D.eval().to(device)


def checkpoint_format(path: str | os.PathLike) -> str:
    """'mfim' | 'nvidia' | 'rosinality' (reads the whole file)."""
    return read_checkpoint(_resolve(path)).format


# ====================================================================================================================
# Writers for the official layouts
# ====================================================================================================================

PLACEHOLDER_MODULE_SRC = "# network source omitted: written by mfim.models.checkpoints.write_nvidia_pickle\n"


class _GlobalRef:
    """A module-level name to write into a pickle without importing it (``torch_utils``/``dnnlib`` are not ours)."""

    _cache: dict[tuple[str, str], _GlobalRef] = {}

    def __init__(self, module: str, name: str):
        self.module, self.qualname = module, name

    @classmethod
    def of(cls, module: str, name: str) -> _GlobalRef:
        return cls._cache.setdefault((module, name), cls(module, name))

    def __call__(self, *args):  # pickle requires reduce callables to be callable
        raise TypeError("placeholder")


class _EasyDictOut(dict):
    """Marks a dict to be written as dnnlib.util.EasyDict."""


class _Reduce:
    def __init__(self, func, args: tuple):
        self.func, self.args = func, args


class _OfficialPickler(pickle._Pickler):  # the pure-Python pickler lets us add the two write rules below
    dispatch = dict(pickle._Pickler.dispatch)

    def _save_global_ref(self, obj: _GlobalRef) -> None:
        if self.proto >= 4:
            self.save(obj.module)
            self.save(obj.qualname)
            self.write(pickle.STACK_GLOBAL)
        else:
            self.write(pickle.GLOBAL + f"{obj.module}\n{obj.qualname}\n".encode())
        self.memoize(obj)

    dispatch[_GlobalRef] = _save_global_ref

    def reducer_override(self, obj):
        if isinstance(obj, _EasyDictOut):
            return (_GlobalRef.of("dnnlib.util", "EasyDict"), (), None, None, iter(dict(obj).items()))
        if isinstance(obj, _Reduce):
            return (obj.func, obj.args)
        if isinstance(obj, (np.floating,)):
            return (_GlobalRef.of("numpy.core.multiarray", "scalar"), (obj.dtype, obj.tobytes()))
        return NotImplemented


_MODULE_INTERNALS = ("_backward_hooks", "_forward_hooks", "_forward_pre_hooks", "_state_dict_hooks",
                     "_load_state_dict_pre_hooks")  # fmt: skip


def _param(t: torch.Tensor) -> torch.nn.Parameter:
    return torch.nn.Parameter(t.detach().clone().to(torch.float32), requires_grad=False)


def _module_record(
    class_name: str,
    module_src: str,
    params: dict | None = None,
    buffers: dict | None = None,
    modules: dict | None = None,
    attrs: dict | None = None,
    init_args: tuple = (),
    init_kwargs: dict | None = None,
) -> _Reduce:
    """A persistent-object reconstruction record as torch_utils.persistence writes it (nn.Module state)."""
    state: dict[str, Any] = {"training": False}
    state["_parameters"] = collections.OrderedDict(
        (k, None if v is None else _param(v)) for k, v in (params or {}).items()
    )
    state["_buffers"] = collections.OrderedDict((k, v.detach().clone()) for k, v in (buffers or {}).items())
    state["_non_persistent_buffers_set"] = set()
    for k in _MODULE_INTERNALS:
        state[k] = collections.OrderedDict()
    state["_modules"] = collections.OrderedDict(modules or {})
    state.update(attrs or {})
    state["_init_args"] = tuple(init_args)
    state["_init_kwargs"] = dict(init_kwargs or {})
    meta = dict(type="class", version=6, module_src=module_src, class_name=class_name, state=state)
    return _Reduce(_GlobalRef.of("torch_utils.persistence", "_reconstruct_persistent_obj"), (meta,))


def _f64(x: float) -> np.float64:
    return np.float64(x)


def _nvidia_generator_record(G: Generator, src: str, s3: bool = False) -> _Reduce:
    """``s3``: the stylegan3 repository's networks_stylegan2 flavour (extra size attributes, flat synthesis kwargs)."""
    c = G.config
    theirs = _export_state(G, nvidia_generator_keys(G))
    fir = make_fir_kernel()
    w_dim, clamp = c["style_dim"], c["conv_clamp"]
    syn = G.synthesis

    def fc(prefix, in_f, out_f, activation="linear", lr_mul=1, bias_init=None):
        kwargs: dict[str, Any] = {}
        if bias_init is not None:
            kwargs["bias_init"] = bias_init
        if activation != "linear":
            kwargs["activation"] = activation
        if lr_mul != 1:
            kwargs["lr_multiplier"] = lr_mul
        return _module_record(
            "FullyConnectedLayer", src,
            params={"weight": theirs[f"{prefix}.weight"], "bias": theirs[f"{prefix}.bias"]},
            attrs={**({"in_features": in_f, "out_features": out_f} if s3 else {}),
                   "activation": activation, "weight_gain": _f64(lr_mul / np.sqrt(in_f)), "bias_gain": lr_mul},
            init_args=(in_f, out_f), init_kwargs=kwargs,
        )  # fmt: skip

    blocks = collections.OrderedDict()
    convs, rgbs = _synthesis_layer_names(G)
    for res, conv_ids, rgb_id in syn._plan:
        in_ch = 0 if res == 4 else syn.convs[conv_ids[0]].conv.in_channels
        out_ch = syn.convs[conv_ids[-1]].conv.out_channels
        subs = collections.OrderedDict()
        names = ["conv1"] if res == 4 else ["conv0", "conv1"]
        for i, name in zip(conv_ids, names):
            layer = syn.convs[i]
            p = f"synthesis.b{res}.{name}"
            kw: dict[str, Any] = {"w_dim": w_dim, "resolution": res}
            if name == "conv0":
                kw.update(up=2, resample_filter=[1, 3, 3, 1])
            kw.update(conv_clamp=clamp, channels_last=False)
            subs[name] = _module_record(
                "SynthesisLayer", src,
                params={"weight": theirs[f"{p}.weight"], "noise_strength": theirs[f"{p}.noise_strength"],
                        "bias": theirs[f"{p}.bias"]},
                buffers={"resample_filter": fir, "noise_const": theirs[f"{p}.noise_const"]},
                modules={"affine": fc(f"{p}.affine", w_dim, layer.conv.in_channels, bias_init=1)},
                attrs={**({"in_channels": layer.conv.in_channels, "out_channels": layer.conv.out_channels,
                           "w_dim": w_dim} if s3 else {}),
                       "resolution": res, "up": 2 if name == "conv0" else 1, "use_noise": True, "activation": "lrelu",
                       "conv_clamp": clamp, "padding": 1, "act_gain": _f64(np.sqrt(2))},
                init_args=(layer.conv.in_channels, layer.conv.out_channels), init_kwargs=kw,
            )  # fmt: skip
        p = f"synthesis.b{res}.torgb"
        rgb = syn.torgbs[rgb_id]
        subs["torgb"] = _module_record(
            "ToRGBLayer", src,
            params={"weight": theirs[f"{p}.weight"], "bias": theirs[f"{p}.bias"]},
            modules={"affine": fc(f"{p}.affine", w_dim, rgb.conv.in_channels, bias_init=1)},
            attrs={**({"in_channels": rgb.conv.in_channels, "out_channels": c["img_channels"], "w_dim": w_dim}
                      if s3 else {}),
                   "conv_clamp": clamp, "weight_gain": _f64(1 / np.sqrt(rgb.conv.in_channels * 1))},
            init_args=(rgb.conv.in_channels, c["img_channels"]),
            init_kwargs={"w_dim": w_dim, "conv_clamp": clamp, "channels_last": False},
        )  # fmt: skip
        is_last = res == G.resolution
        blocks[f"b{res}"] = _module_record(
            "SynthesisBlock", src,
            params={"const": theirs["synthesis.b4.const"]} if res == 4 else {},
            buffers={"resample_filter": fir}, modules=subs,
            attrs={"in_channels": in_ch, "w_dim": w_dim, "resolution": res, "img_channels": c["img_channels"],
                   "is_last": is_last, "architecture": "skip", "use_fp16": False, "channels_last": False,
                   **({"fused_modconv_default": True} if s3 else {}), "num_conv": len(conv_ids), "num_torgb": 1},
            init_args=(in_ch, out_ch),
            init_kwargs={"w_dim": w_dim, "resolution": res, "img_channels": c["img_channels"], "is_last": is_last,
                         "use_fp16": False, "conv_clamp": clamp},
        )  # fmt: skip
    log2 = int(math.log2(G.resolution))
    synthesis = _module_record(
        "SynthesisNetwork", src, modules=blocks,
        attrs={"w_dim": w_dim, "img_resolution": G.resolution, "img_resolution_log2": log2,
               "img_channels": c["img_channels"], "block_resolutions": [2**i for i in range(2, log2 + 1)],
               "num_ws": G.num_ws, **({"num_fp16_res": 0} if s3 else {})},
        init_kwargs={"w_dim": w_dim, "img_resolution": G.resolution, "img_channels": c["img_channels"],
                     "channel_base": c["channel_base"], "channel_max": c["channel_max"], "num_fp16_res": 0,
                     "conv_clamp": clamp},
    )  # fmt: skip
    n_mlp, lr = c["n_mlp"], c["mapping_lr_mul"]
    dims = [c["z_dim"]] + [w_dim] * n_mlp
    fcs = collections.OrderedDict(
        (f"fc{i}", fc(f"mapping.fc{i}", dims[i], dims[i + 1], activation="lrelu", lr_mul=lr)) for i in range(n_mlp)
    )
    map_kwargs = {"z_dim": c["z_dim"], "c_dim": 0, "w_dim": w_dim, "num_ws": G.num_ws, "num_layers": n_mlp}
    if lr != 0.01:
        map_kwargs["lr_multiplier"] = lr
    mapping = _module_record(
        "MappingNetwork", src, buffers={"w_avg": theirs["mapping.w_avg"]}, modules=fcs,
        attrs={"z_dim": c["z_dim"], "c_dim": 0, "w_dim": w_dim, "num_ws": G.num_ws, "num_layers": n_mlp,
               "w_avg_beta": c["w_avg_beta"]},
        init_kwargs=map_kwargs,
    )  # fmt: skip
    mapping_kwargs = _EasyDictOut(num_layers=n_mlp)
    if lr != 0.01:
        mapping_kwargs["lr_multiplier"] = lr
    synthesis_kwargs = dict(channel_base=c["channel_base"], channel_max=c["channel_max"], num_fp16_res=0,
                            conv_clamp=clamp)  # fmt: skip
    init_kwargs = {"z_dim": c["z_dim"], "c_dim": 0, "w_dim": w_dim, "img_resolution": G.resolution,
                   "img_channels": c["img_channels"], "mapping_kwargs": mapping_kwargs}  # fmt: skip
    if s3:  # stylegan3's Generator takes the synthesis kwargs flat
        init_kwargs.update(synthesis_kwargs, fused_modconv_default=True)
    else:
        init_kwargs["synthesis_kwargs"] = _EasyDictOut(synthesis_kwargs)
    return _module_record(
        "Generator", src, modules=collections.OrderedDict(synthesis=synthesis, mapping=mapping),
        attrs={"z_dim": c["z_dim"], "c_dim": 0, "w_dim": w_dim, "img_resolution": G.resolution,
               "img_channels": c["img_channels"], "num_ws": G.num_ws},
        init_kwargs=init_kwargs,
    )  # fmt: skip


def _nvidia_discriminator_record(D: Discriminator, src: str, s3: bool = False) -> _Reduce:
    c = D.config
    theirs = _export_state(D, nvidia_discriminator_keys(D))
    fir = make_fir_kernel()
    clamp = c["conv_clamp"]

    def conv(prefix, in_ch, out_ch, k, init_kwargs, activation="lrelu", down=1, bias=True, layer_clamp=clamp):
        attrs: dict[str, Any] = {**({"in_channels": in_ch, "out_channels": out_ch} if s3 else {}),
                                 "activation": activation, "up": 1, "down": down, "conv_clamp": layer_clamp,
                                 "padding": k // 2, "weight_gain": _f64(1 / np.sqrt(in_ch * k**2)),
                                 "act_gain": _f64(np.sqrt(2)) if activation == "lrelu" else 1}  # fmt: skip
        params = {"weight": theirs[f"{prefix}.weight"]}
        if bias:
            params["bias"] = theirs[f"{prefix}.bias"]
        else:
            attrs["bias"] = None  # official layers keep a plain `bias = None` attribute
        return _module_record("Conv2dLayer", src, params=params, buffers={"resample_filter": fir}, attrs=attrs,
                              init_args=(in_ch, out_ch), init_kwargs=init_kwargs)  # fmt: skip

    fir_taps = [1, 3, 3, 1]
    conv_kw = dict(trainable=True, conv_clamp=clamp, channels_last=False)

    def fc(prefix, in_f, out_f, activation="linear"):
        return _module_record(
            "FullyConnectedLayer", src,
            params={"weight": theirs[f"{prefix}.weight"], "bias": theirs[f"{prefix}.bias"]},
            attrs={**({"in_features": in_f, "out_features": out_f} if s3 else {}),
                   "activation": activation, "weight_gain": _f64(1 / np.sqrt(in_f)), "bias_gain": 1},
            init_args=(in_f, out_f), init_kwargs={"activation": activation} if activation != "linear" else {},
        )  # fmt: skip

    mods = collections.OrderedDict()
    layer_idx = 0
    top = D.resolution
    for i, res in enumerate(D.block_resolutions):
        blk = D.blocks[i]
        tmp, out = blk.conv0.in_channels, blk.conv1.out_channels
        in_ch = 0 if res == top else tmp
        subs = collections.OrderedDict()
        if res == top:
            kw = dict(kernel_size=1, activation="lrelu", **conv_kw)
            subs["fromrgb"] = conv(f"b{res}.fromrgb", c["img_channels"], tmp, 1, kw)
        subs["conv0"] = conv(f"b{res}.conv0", tmp, tmp, 3, dict(kernel_size=3, activation="lrelu", **conv_kw))
        kw = dict(kernel_size=3, activation="lrelu", down=2, trainable=True, resample_filter=fir_taps,
                  conv_clamp=clamp, channels_last=False)  # fmt: skip
        subs["conv1"] = conv(f"b{res}.conv1", tmp, out, 3, kw, down=2)
        kw = dict(kernel_size=1, bias=False, down=2, trainable=True, resample_filter=fir_taps, channels_last=False)
        subs["skip"] = conv(f"b{res}.skip", tmp, out, 1, kw, activation="linear", down=2, bias=False, layer_clamp=None)
        mods[f"b{res}"] = _module_record(
            "DiscriminatorBlock", src, buffers={"resample_filter": fir}, modules=subs,
            attrs={"in_channels": in_ch, "resolution": res, "img_channels": c["img_channels"],
                   "first_layer_idx": layer_idx, "architecture": "resnet", "use_fp16": False, "channels_last": False,
                   "num_layers": len(subs)},
            init_args=(in_ch, tmp, out),
            init_kwargs={"resolution": res, "first_layer_idx": layer_idx, "use_fp16": False,
                         "img_channels": c["img_channels"], "architecture": "resnet", "conv_clamp": clamp},
        )  # fmt: skip
        layer_idx += len(subs)
    ch4 = D.epilogue.out.in_features
    mb_ch, group = c["mbstd_channels"], c["mbstd_group_size"]
    epi_mods = collections.OrderedDict()
    if mb_ch > 0:
        epi_mods["mbstd"] = _module_record(
            "MinibatchStdLayer", src, attrs={"group_size": group, "num_channels": mb_ch},
            init_kwargs={"group_size": group, "num_channels": mb_ch},
        )  # fmt: skip
    kw = dict(kernel_size=3, activation="lrelu", conv_clamp=clamp)
    epi_mods["conv"] = conv("b4.conv", ch4 + mb_ch, ch4, 3, kw)
    epi_mods["fc"] = fc("b4.fc", ch4 * 16, ch4, activation="lrelu")
    epi_mods["out"] = fc("b4.out", ch4, 1)
    epi_attrs = {"in_channels": ch4, "cmap_dim": 0, "resolution": 4, "img_channels": c["img_channels"],
                 "architecture": "resnet"}  # fmt: skip
    mods["b4"] = _module_record(
        "DiscriminatorEpilogue", src, modules=epi_mods, attrs=epi_attrs, init_args=(ch4,),
        init_kwargs={"cmap_dim": 0, "resolution": 4, "mbstd_group_size": group,
                     **({"mbstd_num_channels": mb_ch} if mb_ch != 1 else {}),
                     "img_channels": c["img_channels"], "architecture": "resnet", "conv_clamp": clamp},
    )  # fmt: skip
    log2 = int(math.log2(top))
    return _module_record(
        "Discriminator", src, modules=mods,
        attrs={"c_dim": 0, "img_resolution": top, "img_resolution_log2": log2, "img_channels": c["img_channels"],
               "block_resolutions": list(D.block_resolutions)},
        init_kwargs={"c_dim": 0, "img_resolution": top, "img_channels": c["img_channels"], "architecture": "resnet",
                     "channel_base": c["channel_base"], "channel_max": c["channel_max"], "num_fp16_res": 0,
                     "conv_clamp": clamp, "block_kwargs": _EasyDictOut(), "mapping_kwargs": _EasyDictOut(),
                     "epilogue_kwargs": _EasyDictOut(mbstd_group_size=group,
                                                     **({"mbstd_num_channels": mb_ch} if mb_ch != 1 else {}))},
    )  # fmt: skip


def write_nvidia_pickle(
    path: str | os.PathLike,
    G: Generator,
    D: Discriminator | None = None,
    G_train: Generator | None = None,
    module_src: str = PLACEHOLDER_MODULE_SRC,
    flavor: str = "stylegan2-ada",
) -> Path:
    """Write ``{training_set_kwargs, G, D, G_ema, augment_pipe}`` as stylegan2-ada-pytorch's network snapshots are
    laid out (persistent-object records, protocol 4). ``G`` is written as ``G_ema`` (and as ``G`` unless
    ``G_train`` is given); without ``D`` a freshly initialised matching discriminator is written.

    ``module_src`` is the network source the records carry; the default is a placeholder (our loader never reads
    it). Passing the real training/networks.py text makes the file loadable by the reference code itself.
    ``flavor``: 'stylegan2-ada' (training/networks.py records) or 'stylegan3' (the stylegan3 repository's
    training/networks_stylegan2.py records).
    """
    if flavor not in ("stylegan2-ada", "stylegan3"):
        raise ValueError(f"flavor must be 'stylegan2-ada' or 'stylegan3', got {flavor!r}")
    s3 = flavor == "stylegan3"
    if D is None:
        from mfim.models.stylegan2 import discriminator_for

        D = discriminator_for(G)
    data = {
        "training_set_kwargs": None,
        "G": _nvidia_generator_record(G_train if G_train is not None else G, module_src, s3),
        "D": _nvidia_discriminator_record(D, module_src, s3),
        "G_ema": _nvidia_generator_record(G, module_src, s3),
        "augment_pipe": None,
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _OfficialPickler(buf, protocol=4).dump(data)
    path.write_bytes(buf.getvalue())
    return path


def write_rosinality_checkpoint(
    path: str | os.PathLike, G: Generator, D: Discriminator | None = None, latent_avg: bool = True
) -> Path:
    """Write ``{"g_ema": ..., "latent_avg": ..., ["d": ...]}`` as rosinality's convert_weight.py does, with the state
    dict names, shapes and order of its ``Generator`` / ``Discriminator`` (blur kernels included)."""
    theirs = _export_state(G, rosinality_generator_keys(G))
    up_kernel = make_fir_kernel() * 4  # rosinality folds the upsampling gain into its Blur/Upsample kernels
    g: dict[str, torch.Tensor] = {}
    # reproduce rosinality's registration order: mapping, input, conv1, to_rgb1, convs, to_rgbs, noises
    order = [k for k in theirs if k.startswith("style.")] + ["input.input"]
    order += [k for k in theirs if k.startswith("conv1.")] + [k for k in theirs if k.startswith("to_rgb1.")]
    for k in order:
        g[k] = theirs[k]
    n_convs = len(G.synthesis.convs) - 1
    for j in range(n_convs):
        p = f"convs.{j}"
        g[f"{p}.conv.weight"] = theirs[f"{p}.conv.weight"]
        if j % 2 == 0:
            g[f"{p}.conv.blur.kernel"] = up_kernel.clone()
        for s in ("conv.modulation.weight", "conv.modulation.bias", "noise.weight", "activate.bias"):
            g[f"{p}.{s}"] = theirs[f"{p}.{s}"]
    for j in range(len(G.synthesis.torgbs) - 1):
        p = f"to_rgbs.{j}"
        g[f"{p}.bias"] = theirs[f"{p}.bias"]
        g[f"{p}.upsample.kernel"] = up_kernel.clone()
        for s in ("conv.weight", "conv.modulation.weight", "conv.modulation.bias"):
            g[f"{p}.{s}"] = theirs[f"{p}.{s}"]
    for i in range(len(G.synthesis.convs)):
        g[f"noises.noise_{i}"] = theirs[f"noises.noise_{i}"]
    assert set(g) == set(theirs) | {k for k in g if k.endswith("kernel")}
    ckpt: dict[str, Any] = {"g_ema": g}
    if latent_avg:
        ckpt["latent_avg"] = G.mapping.w_avg.detach().clone()
    if D is not None:
        dt = _export_state(D, rosinality_discriminator_keys(D))
        blur = make_fir_kernel()
        d: dict[str, torch.Tensor] = {k: dt[k] for k in ("convs.0.0.weight", "convs.0.1.bias")}
        for j in range(1, len(D.blocks) + 1):
            p = f"convs.{j}"
            d[f"{p}.conv1.0.weight"] = dt[f"{p}.conv1.0.weight"]
            d[f"{p}.conv1.1.bias"] = dt[f"{p}.conv1.1.bias"]
            d[f"{p}.conv2.0.kernel"] = blur.clone()
            d[f"{p}.conv2.1.weight"] = dt[f"{p}.conv2.1.weight"]
            d[f"{p}.conv2.2.bias"] = dt[f"{p}.conv2.2.bias"]
            d[f"{p}.skip.0.kernel"] = blur.clone()
            d[f"{p}.skip.1.weight"] = dt[f"{p}.skip.1.weight"]
        for k in ("final_conv.0.weight", "final_conv.1.bias", "final_linear.0.weight", "final_linear.0.bias",
                  "final_linear.1.weight", "final_linear.1.bias"):  # fmt: skip
            d[k] = dt[k]
        ckpt["d"] = d
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(ckpt, path)
    return path


__all__ = [
    "FORMAT",
    "CheckpointError",
    "PersistentRecord",
    "RawCheckpoint",
    "save_checkpoint",
    "checkpoint_dict",
    "read_checkpoint",
    "checkpoint_format",
    "load_generator",
    "load_discriminator",
    "write_nvidia_pickle",
    "write_rosinality_checkpoint",
    "nvidia_generator_keys",
    "nvidia_discriminator_keys",
    "rosinality_generator_keys",
    "rosinality_discriminator_keys",
]
