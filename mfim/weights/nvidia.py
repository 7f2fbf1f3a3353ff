"""stylegan2-ada-pytorch / stylegan3 network pickles (``G``, ``D``, ``G_ema``, ...), read as data.

Their modules are pickled as "persistent objects" that carry the source code of the network module and rebuild
themselves by executing it. We never do that: a restricted unpickler resolves only an allow-list of data constructors
(tensor and storage rebuilders, OrderedDict, numpy scalars, EasyDict); each persistent object becomes an inert record
of its parameters, buffers, sub-modules and init kwargs, from which the tensors are read. Anything else is refused.
The networks' configs are inferred from the records (block names ``b<res>``, tensor shapes, init kwargs).

Writing these pickles (for the tests: only tests need it) is tests/nvidia_writer.py.
"""

from __future__ import annotations

import collections
import io
import pickle
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from mfim.models.layers import make_fir_kernel
from mfim.models.stylegan2 import Discriminator, Generator
from mfim.weights.common import SAME, KeyMap, build_network, channel_rule, import_state
from mfim.weights.limits import CheckpointError


# ====================================================================================================================
# Restricted unpickler
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


def restricted_load(f) -> tuple[Any, set[str]]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TypedStorage deprecation chatter from torch
        u = _RestrictedUnpickler(f)
        return u.load(), u.refused


# ====================================================================================================================
# Name maps between our networks and the official layout
# ====================================================================================================================


def synthesis_layer_names(G: Generator):
    """(res, our conv index, official layer name) for every conv, and (res, our torgb index) per block."""
    convs, rgbs = [], []
    for res, conv_ids, rgb_id in G.synthesis._plan:
        names = ["conv1"] if res == 4 else ["conv0", "conv1"]
        convs += [(res, i, n) for i, n in zip(conv_ids, names)]
        rgbs.append((res, rgb_id))
    return convs, rgbs


def nvidia_generator_keys(G: Generator) -> KeyMap:
    m: KeyMap = []
    for i in range(len(G.mapping.layers)):
        m += [(f"mapping.layers.{i}.{p}", f"mapping.fc{i}.{p}", SAME, SAME) for p in ("weight", "bias")]
    m.append(("mapping.w_avg", "mapping.w_avg", SAME, SAME))
    m.append(("synthesis.const", "synthesis.b4.const", SAME, SAME))
    convs, rgbs = synthesis_layer_names(G)
    for res, i, name in convs:
        ours, theirs = f"synthesis.convs.{i}", f"synthesis.b{res}.{name}"
        m += [
            (f"{ours}.conv.weight", f"{theirs}.weight", SAME, SAME),
            (f"{ours}.noise.strength", f"{theirs}.noise_strength", SAME, SAME),
            (f"{ours}.bias", f"{theirs}.bias", SAME, SAME),
            (f"{ours}.noise_const", f"{theirs}.noise_const", SAME, SAME),
            (f"{ours}.affine.weight", f"{theirs}.affine.weight", SAME, SAME),
            (f"{ours}.affine.bias", f"{theirs}.affine.bias", SAME, SAME),
        ]
    for res, i in rgbs:
        ours, theirs = f"synthesis.torgbs.{i}", f"synthesis.b{res}.torgb"
        m += [
            (f"{ours}.conv.weight", f"{theirs}.weight", SAME, SAME),
            (f"{ours}.bias", f"{theirs}.bias", SAME, SAME),
            (f"{ours}.affine.weight", f"{theirs}.affine.weight", SAME, SAME),
            (f"{ours}.affine.bias", f"{theirs}.affine.bias", SAME, SAME),
        ]
    return m


def nvidia_discriminator_keys(D: Discriminator) -> KeyMap:
    m: KeyMap = []
    top = D.resolution
    m += [(f"from_rgb.{p}", f"b{top}.fromrgb.{p}", SAME, SAME) for p in ("weight", "bias")]
    for i, res in enumerate(D.block_resolutions):
        for layer in ("conv0", "conv1"):
            m += [(f"blocks.{i}.{layer}.{p}", f"b{res}.{layer}.{p}", SAME, SAME) for p in ("weight", "bias")]
        m.append((f"blocks.{i}.skip.weight", f"b{res}.skip.weight", SAME, SAME))
    m += [(f"epilogue.conv.{p}", f"b4.conv.{p}", SAME, SAME) for p in ("weight", "bias")]
    m += [(f"epilogue.fc.{p}", f"b4.fc.{p}", SAME, SAME) for p in ("weight", "bias")]
    m += [(f"epilogue.out.{p}", f"b4.out.{p}", SAME, SAME) for p in ("weight", "bias")]
    return m


# ====================================================================================================================
# Config inference and loading
# ====================================================================================================================


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
    channel_base, channel_max = channel_rule(channels, "generator")
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
    channel_base, channel_max = channel_rule(channels, "discriminator")
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


def generator_from(d: dict, what: str) -> Generator:
    rec = d["G_ema"]
    t = rec.tensors()
    G = build_network(Generator, _nvidia_generator_config(rec, t), what, t)
    _check_fir_buffers(t, what)
    import_state(G, t, nvidia_generator_keys(G), what, ignore=lambda k: k.endswith("resample_filter"))
    return G


def discriminator_from(d: dict, what: str) -> Discriminator:
    rec = d.get("D")
    if not isinstance(rec, PersistentRecord):
        raise CheckpointError(f"{what}: this pickle has no discriminator")
    t = rec.tensors()
    D = build_network(Discriminator, _nvidia_discriminator_config(rec, t), what, t)
    _check_fir_buffers(t, what)
    import_state(D, t, nvidia_discriminator_keys(D), what, ignore=lambda k: k.endswith("resample_filter"))
    return D
