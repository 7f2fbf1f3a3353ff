"""StyleGAN2 building blocks, written to reproduce the official networks' arithmetic.

Numerics follow NVIDIA's stylegan2-ada-pytorch (equalized learning rate, bias + leaky ReLU * sqrt(2), modulation /
demodulation with eps 1e-8, FIR-filtered resampling with the [1, 3, 3, 1] kernel), so official weights give the same
image. Every FIR filter is applied as a depthwise ``conv2d(groups=C)`` or ``conv_transpose2d(groups=C)`` with the
(flipped where needed) kernel: on CPU that is 10-25x faster than a loop-style upfirdn and gives the same numbers
(../shared/PERFORMANCE.md).

Conventions: a weight ``[out, in, k, k]`` is used as ``conv2d`` uses it (correlation), except in upsampling layers
where it is used as ``conv_transpose2d`` uses it -- the same orientation the official PyTorch ports store.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

LRELU_SLOPE = 0.2
LRELU_GAIN = math.sqrt(2.0)  # keeps the activation variance of a leaky ReLU layer at 1


# --------------------------------------------------------------------------------------------------------------------
# FIR resampling
# --------------------------------------------------------------------------------------------------------------------


def make_fir_kernel(taps: Sequence[float] = (1, 3, 3, 1)) -> torch.Tensor:
    """The 2-D low-pass kernel (outer product of ``taps``) normalised to unit DC gain, float32."""
    t = torch.as_tensor(taps, dtype=torch.float32)
    k = torch.outer(t, t) if t.ndim == 1 else t.clone()
    return k / k.sum()


def _depthwise(kernel: torch.Tensor, channels: int, dtype: torch.dtype) -> torch.Tensor:
    return kernel.to(dtype)[None, None].repeat(channels, 1, 1, 1)


def upfirdn2d(
    x: torch.Tensor,
    kernel: torch.Tensor,
    up: int = 1,
    down: int = 1,
    pad: Sequence[int] = (0, 0, 0, 0),
    gain: float = 1.0,
) -> torch.Tensor:
    """Upsample by zero insertion, pad (x0, x1, y0, y1; negative crops), convolve with ``kernel``, keep every
    ``down``-th pixel -- the official upfirdn2d semantics (true convolution, not correlation).

    With ``up > 1`` the zero insertion and the filter are one ``conv_transpose2d`` (which convolves, so the kernel is
    used as is); the official padding is then a shift of that result, applied as a pad/crop. Without upsampling the
    filter is a ``conv2d`` (which correlates, so the kernel is flipped) and ``down`` is its stride.
    """
    b, c, h, w = x.shape
    px0, px1, py0, py1 = pad
    kh, kw = kernel.shape
    k = _depthwise(kernel * gain, c, x.dtype)
    if up > 1:
        y = F.conv_transpose2d(x, k, stride=up, groups=c)
        # upfirdn output[i] = transposed[i + (k - 1 - p0)]; output length = h*up + p0 + p1 - k + 1
        out_h, out_w = h * up + py0 + py1 - kh + 1, w * up + px0 + px1 - kw + 1
        top, left = py0 - (kh - 1), px0 - (kw - 1)
        y = F.pad(y, [left, out_w - left - y.shape[3], top, out_h - top - y.shape[2]])
        return y[:, :, ::down, ::down] if down > 1 else y
    if px0 == px1 == py0 == py1 and px0 >= 0:  # let the convolution pad: saves a copy of the activations
        return F.conv2d(x, k.flip([2, 3]), stride=down, padding=px0, groups=c)
    x = F.pad(x, [px0, px1, py0, py1])
    return F.conv2d(x, k.flip([2, 3]), stride=down, groups=c)


def upsample2d(x: torch.Tensor, kernel: torch.Tensor, factor: int = 2) -> torch.Tensor:
    """Official ``upsample2d``: zero insertion + FIR, gain factor^2 to keep the DC level, output size H*factor."""
    k = kernel.shape[0]
    p0, p1 = (k + factor - 1) // 2, (k - factor) // 2
    return upfirdn2d(x, kernel, up=factor, pad=(p0, p1, p0, p1), gain=factor**2)


def downsample2d(x: torch.Tensor, kernel: torch.Tensor, factor: int = 2) -> torch.Tensor:
    """Official ``downsample2d``: FIR then keep every ``factor``-th pixel, output size H/factor."""
    k = kernel.shape[0]
    p0, p1 = (k - factor + 1) // 2, (k - factor) // 2
    return upfirdn2d(x, kernel, down=factor, pad=(p0, p1, p0, p1))


# --------------------------------------------------------------------------------------------------------------------
# Activation
# --------------------------------------------------------------------------------------------------------------------


def bias_act(
    x: torch.Tensor,
    bias: torch.Tensor | None = None,
    activation: str | None = "lrelu",
    gain: float | None = None,
    clamp: float | None = None,
) -> torch.Tensor:
    """x + bias, then the activation, then the gain, then an optional symmetric clamp (official order).

    ``gain`` defaults to sqrt(2) for 'lrelu' and 1 for a linear layer.
    """
    if bias is not None:
        x = x + bias.reshape([-1 if i == 1 else 1 for i in range(x.ndim)])
    if activation == "lrelu":
        x = F.leaky_relu(x, LRELU_SLOPE)
        gain = LRELU_GAIN if gain is None else gain
    elif activation not in (None, "linear"):
        raise ValueError(f"unknown activation {activation!r}")
    gain = 1.0 if gain is None else float(gain)
    if gain != 1:
        x = x * gain
    if clamp is not None and clamp >= 0:
        x = x.clamp(-clamp, clamp)
    return x


class PixelNorm(nn.Module):
    """Normalise each vector to unit mean square (the mapping network's input normalisation of z)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * (x.square().mean(dim=1, keepdim=True) + 1e-8).rsqrt()


# --------------------------------------------------------------------------------------------------------------------
# Equalized-learning-rate layers
# --------------------------------------------------------------------------------------------------------------------


class EqualLinear(nn.Module):
    """Fully connected layer with equalized learning rate: weights stored as N(0, 1/lr_mul^2) and scaled at run time
    by lr_mul/sqrt(fan_in), so Adam's per-parameter step is the same for every layer (and lr_mul slows the mapping
    network). ``activation``: None (linear) or 'lrelu'."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        bias_init: float = 0.0,
        lr_mul: float = 1.0,
        activation: str | None = None,
    ):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.activation = activation
        self.weight = nn.Parameter(torch.randn(out_features, in_features) / lr_mul)
        self.bias = nn.Parameter(torch.full([out_features], float(bias_init))) if bias else None
        self.weight_gain = lr_mul / math.sqrt(in_features)
        self.bias_gain = lr_mul

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight.to(x.dtype) * self.weight_gain
        b = self.bias
        if b is not None:
            b = b.to(x.dtype)
            if self.bias_gain != 1:
                b = b * self.bias_gain
        if self.activation is None and b is not None:
            return torch.addmm(b.unsqueeze(0), x, w.t())
        return bias_act(x.matmul(w.t()), b, self.activation)

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, activation={self.activation}"


class ConvLayer(nn.Module):
    """Equalized-lr convolution for the discriminator: optional FIR-blurred 2x downsampling, bias, activation.

    ``forward(x, gain)`` multiplies the activation output by ``gain`` (residual blocks use sqrt(1/2)) and clamps to
    ``conv_clamp * gain`` when a clamp is set.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        bias: bool = True,
        activation: str | None = "lrelu",
        down: bool = False,
        conv_clamp: float | None = None,
        fir_taps: Sequence[float] = (1, 3, 3, 1),
    ):
        super().__init__()
        self.in_channels, self.out_channels, self.kernel_size = in_channels, out_channels, kernel_size
        self.activation = activation
        self.down = down
        self.conv_clamp = conv_clamp
        self.padding = kernel_size // 2
        self.weight_gain = 1 / math.sqrt(in_channels * kernel_size**2)
        self.weight = nn.Parameter(torch.randn(out_channels, in_channels, kernel_size, kernel_size))
        self.bias = nn.Parameter(torch.zeros(out_channels)) if bias else None
        self.register_buffer("fir", make_fir_kernel(fir_taps), persistent=False)

    def forward(self, x: torch.Tensor, gain: float = 1.0) -> torch.Tensor:
        w = (self.weight * self.weight_gain).to(x.dtype)
        if self.down:
            f = self.fir.shape[0]
            # the official resampling conv pads (for the filter and the kernel) once, before the blur
            p0 = self.padding + (f - 1) // 2
            p1 = self.padding + (f - 2) // 2
            if self.kernel_size == 1:  # blur + decimate first, then the 1x1 conv: 4x fewer MACs
                x = upfirdn2d(x, self.fir, down=2, pad=(p0, p1, p0, p1))
                x = F.conv2d(x, w)
            else:
                x = upfirdn2d(x, self.fir, pad=(p0, p1, p0, p1))
                x = F.conv2d(x, w, stride=2)
        else:
            x = F.conv2d(x, w, padding=self.padding)
        act_gain = (LRELU_GAIN if self.activation == "lrelu" else 1.0) * gain
        clamp = self.conv_clamp * gain if self.conv_clamp is not None else None
        b = self.bias.to(x.dtype) if self.bias is not None else None
        return bias_act(x, b, self.activation, gain=act_gain, clamp=clamp)

    def extra_repr(self) -> str:
        return f"{self.in_channels}, {self.out_channels}, k={self.kernel_size}, down={self.down}"


# --------------------------------------------------------------------------------------------------------------------
# Modulated convolution and the synthesis layers
# --------------------------------------------------------------------------------------------------------------------


def modulated_conv2d(
    x: torch.Tensor,
    weight: torch.Tensor,
    styles: torch.Tensor,
    demodulate: bool = True,
    up: bool = False,
    fir: torch.Tensor | None = None,
    fused: bool = True,
) -> torch.Tensor:
    """StyleGAN2 modulated convolution of ``x`` (B×I×H×W) with ``weight`` (O×I×k×k) scaled per sample by
    ``styles`` (B×I), optionally demodulated (each output channel renormalised to unit expected variance) and
    optionally 2x upsampled (transposed conv, then the FIR blur).

    ``fused``: one grouped convolution with a per-sample weight (the official inference path); otherwise scale the
    activations before and after a shared convolution (the official training path, cheaper to differentiate).
    """
    batch = x.shape[0]
    out_ch, in_ch, kh, kw = weight.shape
    wsample = dcoefs = None
    if demodulate or fused:
        wsample = weight.unsqueeze(0) * styles.reshape(batch, 1, -1, 1, 1)  # B×O×I×k×k
    if demodulate:
        dcoefs = (wsample.square().sum(dim=[2, 3, 4]) + 1e-8).rsqrt()  # B×O
    if demodulate and fused:
        wsample = wsample * dcoefs.reshape(batch, -1, 1, 1, 1)

    if fused:
        xg = x.reshape(1, -1, *x.shape[2:])
        if up:
            # conv_transpose2d wants I×O per group: B×O×I×k×k -> (B·I)×O×k×k
            wg = wsample.transpose(1, 2).reshape(batch * in_ch, out_ch, kh, kw)
        else:
            wg = wsample.reshape(batch * out_ch, in_ch, kh, kw)
        y = _conv_maybe_up(xg, wg, up, kh, fir, groups=batch)
        return y.reshape(batch, out_ch, *y.shape[2:])

    x = x * styles.to(x.dtype).reshape(batch, -1, 1, 1)
    y = _conv_maybe_up(x, weight.transpose(0, 1) if up else weight, up, kh, fir, groups=1)
    if demodulate:
        y = y * dcoefs.to(y.dtype).reshape(batch, -1, 1, 1)
    return y


def _conv_maybe_up(x, w, up: bool, k: int, fir: torch.Tensor | None, groups: int) -> torch.Tensor:
    """'same' convolution, or the official 2x upsampling convolution: stride-2 transposed conv, then the FIR blur
    (gain 4) with the padding that centres the result (1 px each side for a 3x3 kernel and the 4-tap filter)."""
    padding = k // 2
    if not up:
        return F.conv2d(x, w, padding=padding, groups=groups)
    f = fir.shape[0]
    p0 = padding + (f + 1) // 2 - (k - 1)
    p1 = padding + (f - 2) // 2 - (k - 2)
    pt = max(min(-p0, -p1), 0)  # part of the padding the transposed conv can absorb (0 for k=3, f=4)
    y = F.conv_transpose2d(x, w, stride=2, padding=pt, groups=groups)
    return upfirdn2d(y, fir, pad=(p0 + pt, p1 + pt, p0 + pt, p1 + pt), gain=4)


class ModulatedConv2d(nn.Module):
    """The weight of a modulated convolution (N(0,1); demodulation makes its scale irrelevant) and how to apply it."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        demodulate: bool = True,
        up: bool = False,
        fir_taps: Sequence[float] = (1, 3, 3, 1),
    ):
        super().__init__()
        self.in_channels, self.out_channels, self.kernel_size = in_channels, out_channels, kernel_size
        self.demodulate, self.up = demodulate, up
        self.weight = nn.Parameter(torch.randn(out_channels, in_channels, kernel_size, kernel_size))
        self.register_buffer("fir", make_fir_kernel(fir_taps), persistent=False)

    def forward(self, x: torch.Tensor, styles: torch.Tensor, fused: bool = True) -> torch.Tensor:
        return modulated_conv2d(
            x, self.weight.to(x.dtype), styles, demodulate=self.demodulate, up=self.up, fir=self.fir, fused=fused
        )

    def extra_repr(self) -> str:
        return f"{self.in_channels}, {self.out_channels}, k={self.kernel_size}, up={self.up}, demod={self.demodulate}"


class NoiseInjection(nn.Module):
    """Adds ``strength * noise`` (learned scalar strength, 0 at init). ``noise`` broadcasts against the activations:
    B×1×H×W (StyleGAN noise, one map shared by all channels), B×C×H×W (per-channel style maps) or H×W."""

    def __init__(self):
        super().__init__()
        self.strength = nn.Parameter(torch.zeros([]))

    def forward(self, x: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        return x + noise.to(x.dtype) * self.strength


NOISE_MODES = ("const", "random", "none")


class StyledConv(nn.Module):
    """One synthesis conv layer: affine (w -> style, bias init 1), modulated 3x3 conv (2x upsampling in the first
    layer of a block), noise injection, bias + leaky ReLU. ``noise_const`` is the fixed noise map of noise_mode
    'const'.

    ``forward`` takes the style vector (the S-space entry), not w: ``affine`` is applied by the caller, which is what
    lets the synthesis run from S space directly.
    """

    def __init__(
        self,
        w_dim: int,
        in_channels: int,
        out_channels: int,
        resolution: int,
        up: bool = False,
        conv_clamp: float | None = None,
        fir_taps: Sequence[float] = (1, 3, 3, 1),
    ):
        super().__init__()
        self.resolution = resolution
        self.conv_clamp = conv_clamp
        self.affine = EqualLinear(w_dim, in_channels, bias_init=1.0)
        self.conv = ModulatedConv2d(in_channels, out_channels, 3, demodulate=True, up=up, fir_taps=fir_taps)
        self.noise = NoiseInjection()
        self.bias = nn.Parameter(torch.zeros(out_channels))
        self.register_buffer("noise_const", torch.randn(resolution, resolution))

    def forward(
        self,
        x: torch.Tensor,
        style: torch.Tensor,
        noise: torch.Tensor | None = None,
        noise_mode: str = "const",
        fused: bool = True,
        gain: float = 1.0,
        style_map: torch.Tensor | None = None,
    ) -> torch.Tensor:
        x = self.conv(x, style, fused=fused)
        if style_map is not None:
            # MFIM style map on its own path: added to the activations at their scale, in place of the noise, so
            # neither its effect nor its gradient is multiplied by the frozen (tiny) noise strength.
            x = x + style_map.to(x.dtype)
        elif noise is None:
            if noise_mode == "const":
                noise = self.noise_const
            elif noise_mode == "random":
                noise = torch.randn(x.shape[0], 1, self.resolution, self.resolution, device=x.device, dtype=x.dtype)
            elif noise_mode != "none":
                raise ValueError(f"noise_mode must be one of {NOISE_MODES}, got {noise_mode!r}")
        if noise is not None and style_map is None:  # a style map takes the place of the noise
            x = self.noise(x, noise)
        clamp = self.conv_clamp * gain if self.conv_clamp is not None else None
        return bias_act(x, self.bias.to(x.dtype), "lrelu", gain=LRELU_GAIN * gain, clamp=clamp)


class ToRGB(nn.Module):
    """1x1 modulated conv to RGB without demodulation (style scaled by 1/sqrt(fan_in)), plus bias."""

    def __init__(self, w_dim: int, in_channels: int, img_channels: int = 3, conv_clamp: float | None = None):
        super().__init__()
        self.conv_clamp = conv_clamp
        self.affine = EqualLinear(w_dim, in_channels, bias_init=1.0)
        self.conv = ModulatedConv2d(in_channels, img_channels, 1, demodulate=False)
        self.bias = nn.Parameter(torch.zeros(img_channels))
        self.weight_gain = 1 / math.sqrt(in_channels)

    def forward(self, x: torch.Tensor, style: torch.Tensor, fused: bool = True) -> torch.Tensor:
        x = self.conv(x, style * self.weight_gain, fused=fused)
        return bias_act(x, self.bias.to(x.dtype), None, clamp=self.conv_clamp)


class MinibatchStd(nn.Module):
    """Appends the average (over features and pixels) standard deviation across groups of ``group_size`` samples as
    ``num_channels`` extra feature maps, so the discriminator can see a lack of variety."""

    def __init__(self, group_size: int | None = 4, num_channels: int = 1):
        super().__init__()
        self.group_size, self.num_channels = group_size, num_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        g = min(self.group_size, n) if self.group_size is not None else n
        if n % g:
            raise ValueError(f"minibatch std: batch {n} is not a multiple of the group size {g}")
        f = self.num_channels
        y = x.reshape(g, -1, f, c // f, h, w)
        y = y - y.mean(dim=0)
        y = y.square().mean(dim=0)
        y = (y + 1e-8).sqrt()
        y = y.mean(dim=[2, 3, 4])
        y = y.reshape(-1, f, 1, 1).repeat(g, 1, h, w)
        return torch.cat([x, y], dim=1)


__all__ = [
    "make_fir_kernel",
    "upfirdn2d",
    "upsample2d",
    "downsample2d",
    "bias_act",
    "PixelNorm",
    "EqualLinear",
    "ConvLayer",
    "modulated_conv2d",
    "ModulatedConv2d",
    "NoiseInjection",
    "StyledConv",
    "ToRGB",
    "MinibatchStd",
    "NOISE_MODES",
]
