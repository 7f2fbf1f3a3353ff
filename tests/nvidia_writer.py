"""Write our networks as stylegan2-ada-pytorch / stylegan3 network pickles: the key names, shapes and pickle
structure (persistent-object records, protocol 4) the official snapshots have, so the reader (nvidia.py) can be
tested without the real files, and a file written with the real network source loads in the reference code itself.

``torch_utils`` and ``dnnlib`` are not importable here (nor wanted): the globals the official pickles name are
written as references only (``_GlobalRef``) by a pickler that knows how to emit them.
"""

from __future__ import annotations

import collections
import io
import math
import os
import pickle
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mfim.models.layers import make_fir_kernel
from mfim.models.stylegan2 import Discriminator, Generator
from mfim.weights.common import export_state
from mfim.weights.nvidia import nvidia_discriminator_keys, nvidia_generator_keys, synthesis_layer_names

PLACEHOLDER_MODULE_SRC = "# network source omitted: written by mfim.weights.nvidia_writer.write_nvidia_pickle\n"


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
    theirs = export_state(G, nvidia_generator_keys(G))
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
    convs, rgbs = synthesis_layer_names(G)
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
    theirs = export_state(D, nvidia_discriminator_keys(D))
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
