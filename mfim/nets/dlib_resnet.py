"""dlib's face-recognition ResNet (``dlib_face_recognition_resnet_model_v1.dat``) read into torch.

The network is the ``anet_type`` of dlib's ``tools/python/src/face_recognition.cpp``: a 7x7/2 convolution, a 3x3/2
max-pool, 3+4+3+3+1 residual blocks (32, 64, 128, 256, 256 channels; the first block of each later stage halves the
resolution), a global average and a bias-free 256->128 fully connected layer (the descriptor; dlib applies no
normalisation). Batch norm is an ``affine`` (per-channel scale and shift) at inference.

Facts of dlib's format and layers this reader relies on (dlib/serialize.h, dlib/dnn/{core,layers,input}.h,
dlib/cuda/tensor.h):

- integers: one control byte (0x80 = negative, low 4 bits = number of bytes) then the magnitude little-endian;
  strings: a length integer then the bytes; bools: the ASCII byte '1' or '0';
- floats and doubles: two integers, an int64 mantissa then an int16 exponent, value = mantissa * 2**exponent
  (exponents 32000.. mark inf / nan); tensors: version 2, four dims, then little-endian float32 values;
- a network is written outside-in: each layer writes its version, then its whole sub-network, then its own
  details, so the layers' details come innermost (the input) first; tag / skip layers write a version only;
- ``con_`` with stride 2 has no padding (3x3/1 pads 1); ``add_prev`` adds tensors of different shapes by padding
  the smaller with zeros at the end of every axis (the down-sampling blocks add a 4x4 average-pooled shortcut to a
  3x3 residual at 256 channels, and a 32-channel shortcut to a 64-channel residual);
- the input layer maps a pixel to ``(value - channel_mean) / 256`` with the means stored in the file;
- a ``bn_con`` becomes the inference affine with ``scale = gamma / sqrt(running_var + eps)``,
  ``shift = beta - scale * running_mean``.

Parity with dlib itself (``tests/test_dlib_resnet.py``) is the check that these facts are read right.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from mfim.nets.dlib_format import DlibFormatError, Reader
from mfim.nets.onnx_utils import FrozenModule

CHIP_SIZE = 150
DESCRIPTOR_DIM = 128
# (channels, blocks, first block down-samples) of dlib's alevel4 .. alevel0, input side first
STAGES = ((32, 3, False), (64, 4, True), (128, 3, True), (256, 3, True), (256, 1, True))


# --- layer details ---------------------------------------------------------------------------------------------


@dataclass
class Layer:
    """One dlib layer's details: ``kind`` (con, affine, relu, max_pool, avg_pool, add_prev, fc, tag) and arrays."""

    kind: str
    arrays: dict[str, np.ndarray] = field(default_factory=dict)
    geometry: tuple[int, ...] = ()  # (rows, cols, stride_y, stride_x, pad_y, pad_x) of con / pooling


def _multipliers(r: Reader, n: int) -> None:
    for _ in range(n):  # learning-rate / weight-decay multipliers: training only
        r.real()


def _con(r: Reader, version: str) -> Layer:
    params = r.tensor().reshape(-1)
    num_filters = r.integer()
    geometry = tuple(r.integer() for _ in range(6))  # nr, nc, stride_y, stride_x, padding_y, padding_x
    filters_shape, bias_shape = r.alias_shape(), r.alias_shape()
    _multipliers(r, 4)
    if version in ("con_5", "con_6") and not r.boolean():
        raise r.fail("con_ without bias (this network's convolutions have one)")
    if version == "con_6" and r.boolean():
        raise r.fail("con_ with a fused relu (not this network)")
    n_w = int(np.prod(filters_shape))
    if filters_shape[0] != num_filters or n_w + int(np.prod(bias_shape)) != params.size:
        raise r.fail(f"con_ parameter sizes disagree: filters {filters_shape}, bias {bias_shape}, {params.size}")
    weight = params[:n_w].reshape(filters_shape)
    return Layer("con", {"weight": weight, "bias": params[n_w:].copy()}, geometry)


def _affine(r: Reader, version: str) -> Layer:
    if version == "bn_con2":
        params = r.tensor().reshape(-1)
        r.alias_shape(), r.alias_shape()  # gamma, beta views of params
        for _ in range(2):  # batch means / inverse stds of the last training batch
            r.tensor()
        mean, var = r.tensor().reshape(-1), r.tensor().reshape(-1)
        r.integer(), r.integer()  # num_updates, running_stats_window_size
        _multipliers(r, 4)
        eps = r.real()
        k = mean.size
        gamma, beta = params[:k].astype(np.float64), params[k:].astype(np.float64)
        scale = gamma / np.sqrt(var.astype(np.float64) + eps)
        shift = beta - scale * mean
        return Layer("affine", {"scale": scale.astype(np.float32), "shift": shift.astype(np.float32)})
    if version not in ("affine_", "affine_2"):
        raise r.fail(f"unexpected affine layer '{version}'")
    params = r.tensor().reshape(-1)
    r.alias_shape(), r.alias_shape()
    mode = r.integer()
    if mode != 0:
        raise r.fail(f"affine_ mode {mode} (expected CONV_MODE = 0, per channel)")
    if version == "affine_2" and r.boolean():
        raise r.fail("disabled affine_ layer")
    k = params.size // 2
    return Layer("affine", {"scale": params[:k].copy(), "shift": params[k:].copy()})


def _pool(kind: str):
    def read(r: Reader, version: str) -> Layer:
        return Layer(kind, geometry=tuple(r.integer() for _ in range(6)))

    return read


def _relu(r: Reader, version: str) -> Layer:
    if version == "relu_2" and r.boolean():
        raise r.fail("disabled relu layer")
    return Layer("relu")


def _fc(r: Reader, version: str) -> Layer:
    num_outputs, num_inputs = r.integer(), r.integer()
    params = r.tensor().reshape(-1)
    weights_shape, _ = r.alias_shape(), r.alias_shape()
    bias_mode = r.integer()
    _multipliers(r, 4)
    if version == "fc_3":
        r.boolean()
    if bias_mode != 1 or params.size != num_inputs * num_outputs:  # FC_NO_BIAS = 1
        raise r.fail(f"fc layer with bias mode {bias_mode} / {params.size} parameters (expected fc_no_bias)")
    # dlib computes output = input (N x num_inputs) @ weights (num_inputs x num_outputs)
    return Layer("fc", {"weight": params.reshape(num_inputs, num_outputs).T.copy()})


_LAYERS = {
    "con_4": _con, "con_5": _con, "con_6": _con,
    "bn_con2": _affine, "affine_": _affine, "affine_2": _affine,
    "relu_": _relu, "relu_2": _relu,
    "max_pool_2": _pool("max_pool"), "avg_pool_2": _pool("avg_pool"),
    "add_prev_": lambda r, v: Layer("add_prev"),
    "fc_2": _fc, "fc_3": _fc,
}  # fmt: skip


def _layer_details(r: Reader, add_layer_version: int, wraps_input: bool = False) -> Layer:
    version = r.string()
    if version not in _LAYERS:
        raise r.fail(f"unexpected layer '{version}'")
    layer = _LAYERS[version](r, version)
    for _ in range(3):  # setup called, gradient stale, gradient disabled
        r.boolean()
    # training buffers: x_grad, cached_output, then params_grad (version 2) or, above the input, grad_final
    for _ in range(3 if add_layer_version >= 2 else 2):
        r.tensor()
    if wraps_input and add_layer_version == 3:
        r.integer()  # sample expansion factor
    return layer


def _input_layer(r: Reader) -> tuple[np.ndarray, Layer]:
    """The innermost add_layer: version, the input layer (channel means), then its own layer details."""
    version = r.integer()
    if version not in (2, 3):
        raise r.fail(f"input add_layer version {version}")
    name = r.string()
    if name != "input_rgb_image_sized":
        raise r.fail(f"input layer '{name}' (expected input_rgb_image_sized)")
    means = np.array([r.real() for _ in range(3)], np.float32)
    rows, cols = r.integer(), r.integer()
    if (rows, cols) != (CHIP_SIZE, CHIP_SIZE):
        raise r.fail(f"input size {rows}x{cols} (expected {CHIP_SIZE})")
    return means, _layer_details(r, version, wraps_input=True)


def _at_input_layer(r: Reader) -> bool:
    """Whether the input add_layer starts here: a version, then the string 'input_...'."""
    start = r.pos
    try:
        r.integer()
        return r.string().startswith("input_")
    except DlibFormatError:
        return False
    finally:
        r.pos = start


def read_dlib_resnet(path: str | os.PathLike) -> tuple[np.ndarray, list[Layer]]:
    """(per-channel input means RGB, layers input side first) of a dlib ``loss_metric`` network file."""
    with open(path, "rb") as f:
        r = Reader(f.read(), os.fspath(path))
    r.expect(1, "add_loss_layer version")
    loss = r.string()
    if loss not in ("loss_metric_", "loss_metric_2"):
        raise r.fail(f"loss '{loss}' (expected loss_metric)")
    r.real(), r.real()  # margin, distance threshold
    headers = []
    while not _at_input_layer(r):
        headers.append(r.integer())
        if headers[-1] not in (1, 2) or len(headers) > 1000:
            raise r.fail(f"layer header {headers[-1]} (add_layer 2, tag/skip 1)")
    means, first = _input_layer(r)
    layers = [first] + [Layer("tag") if v == 1 else _layer_details(r, v) for v in reversed(headers)]
    if r.pos != len(r.data):
        raise r.fail(f"{len(r.data) - r.pos} bytes left after the network")
    return means, layers


# --- the torch network -----------------------------------------------------------------------------------------


class _ConvAffine(nn.Module):
    """dlib ``affine<con<...>>``: a biased convolution, then a per-channel scale and shift (inference batch norm)."""

    def __init__(self, con: Layer, affine: Layer):
        super().__init__()
        rows, cols, sy, sx, py, px = con.geometry
        self.stride, self.padding = (sy, sx), (py, px)
        self.weight = nn.Parameter(torch.from_numpy(con.arrays["weight"].copy()), requires_grad=False)
        self.bias = nn.Parameter(torch.from_numpy(con.arrays["bias"]), requires_grad=False)
        self.scale = nn.Parameter(torch.from_numpy(affine.arrays["scale"]).view(1, -1, 1, 1), requires_grad=False)
        self.shift = nn.Parameter(torch.from_numpy(affine.arrays["shift"]).view(1, -1, 1, 1), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.conv2d(x, self.weight, self.bias, self.stride, self.padding)
        return y * self.scale + self.shift


def _add_zero_padded(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """dlib's ``add_prev``: shapes may differ; each tensor is padded with zeros at the end of C, H and W."""
    c, h, w = (max(a.shape[i], b.shape[i]) for i in (1, 2, 3))

    def pad(t):
        return F.pad(t, (0, w - t.shape[3], 0, h - t.shape[2], 0, c - t.shape[1]))

    return pad(a) + pad(b)


class _Residual(nn.Module):
    """dlib's ``ares`` / ``ares_down``: relu(block(x) + x), the shortcut 2x2-average-pooled when down-sampling."""

    def __init__(self, first: _ConvAffine, second: _ConvAffine, down: bool):
        super().__init__()
        self.first, self.second, self.down = first, second, down

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.second(F.relu(self.first(x)))
        shortcut = F.avg_pool2d(x, 2, 2) if self.down else x
        return F.relu(_add_zero_padded(y, shortcut))


class _LayerStream:
    """The parsed layers, consumed in order with a check of each kind (the file must hold exactly anet_type)."""

    def __init__(self, layers: list[Layer]):
        self.layers, self.i = layers, 0

    def next(self, kind: str, geometry: tuple[int, ...] | None = None) -> Layer:
        if self.i >= len(self.layers):
            raise DlibFormatError(f"network ends at layer {self.i}, expected a {kind}")
        layer = self.layers[self.i]
        if layer.kind != kind or (geometry is not None and layer.geometry[: len(geometry)] != geometry):
            raise DlibFormatError(
                f"layer {self.i}: found {layer.kind}{layer.geometry or ''}, expected {kind}{geometry or ''}"
            )
        self.i += 1
        return layer

    def conv_affine(self, channels: int, size: int, stride: int) -> _ConvAffine:
        pad = 0 if stride != 1 else size // 2
        con = self.next("con", (size, size, stride, stride, pad, pad))
        if con.arrays["weight"].shape[0] != channels:
            raise DlibFormatError(f"layer {self.i - 1}: {con.arrays['weight'].shape[0]} filters, expected {channels}")
        return _ConvAffine(con, self.next("affine"))

    def residual(self, channels: int, down: bool) -> _Residual:
        self.next("tag")  # tag1: the block's input
        first = self.conv_affine(channels, 3, 2 if down else 1)
        self.next("relu")
        second = self.conv_affine(channels, 3, 1)
        if down:
            self.next("tag"), self.next("tag")  # tag2 on the block's output, skip1 back to its input
            self.next("avg_pool", (2, 2, 2, 2, 0, 0))
        self.next("add_prev"), self.next("relu")
        return _Residual(first, second, down)


class DlibFaceResNet(FrozenModule):
    """dlib's face-recognition ResNet in torch: ``describe`` (N×150×150×3 uint8 RGB chips) -> N×128 descriptors."""

    def __init__(self, path: str | os.PathLike | None = None):
        super().__init__()
        from mfim.assets import resolve

        means, layers = read_dlib_resnet(resolve("dlib_face_recognition", path))
        self.register_buffer("means", torch.from_numpy(means).view(1, 3, 1, 1))
        stream = _LayerStream(layers)
        self.stem = stream.conv_affine(32, 7, 2)
        stream.next("relu"), stream.next("max_pool", (3, 3, 2, 2, 0, 0))
        blocks = []
        for channels, count, down in STAGES:
            blocks += [stream.residual(channels, down and i == 0) for i in range(count)]
        self.blocks = nn.Sequential(*blocks)
        stream.next("avg_pool", (0, 0, 1, 1, 0, 0))  # avg_pool_everything
        fc = stream.next("fc").arrays["weight"]
        if fc.shape != (DESCRIPTOR_DIM, 256) or stream.i != len(layers):
            raise DlibFormatError(f"head: fc {fc.shape}, {len(layers) - stream.i} layers left over")
        self.fc = nn.Parameter(torch.from_numpy(fc), requires_grad=False)
        self.freeze()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """N×3×150×150 float RGB pixel values 0..255 -> N×128 descriptors."""
        x = (x - self.means) / 256.0
        x = F.max_pool2d(F.relu(self.stem(x)), 3, 2)
        x = self.blocks(x).mean(dim=(2, 3))
        return x @ self.fc.T

    @torch.no_grad()
    def describe(self, chips, batch_size: int = 64) -> np.ndarray:
        """N×150×150×3 uint8 RGB chips (array or list) -> N×128 float32 descriptors, as dlib computes them.

        Batched on the module's device with torch's threads: the fastest, but the last bits (~1e-7) depend on the
        batch composition and the thread count (oneDNN picks its kernels by shape). ``describe_each`` does not.
        """
        chips = np.asarray(chips, dtype=np.uint8).reshape(-1, CHIP_SIZE, CHIP_SIZE, 3)
        device = self.fc.device
        out = []
        for i in range(0, len(chips), batch_size):
            x = torch.from_numpy(chips[i : i + batch_size]).to(device).permute(0, 3, 1, 2).float()
            out.append(self(x).cpu())
        return torch.cat(out).numpy() if out else np.zeros((0, DESCRIPTOR_DIM), np.float32)

    def describe_each(self, chips) -> np.ndarray:
        """``describe`` one chip at a time on one CPU thread: each chip's descriptor is the same bits whatever batch
        it arrives in, whatever thread count the caller set and in any process (the evaluation's workers split
        batches differently from its main process). ~1.5x the CPU time of a batched pass."""
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            chips = np.asarray(chips, dtype=np.uint8).reshape(-1, CHIP_SIZE, CHIP_SIZE, 3)
            return self.describe(chips, batch_size=1)
        finally:
            torch.set_num_threads(threads)


__all__ = ["DlibFaceResNet", "DlibFormatError", "read_dlib_resnet", "CHIP_SIZE", "DESCRIPTOR_DIM"]
