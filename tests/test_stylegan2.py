"""StyleGAN2 networks: S-space contract, fast FIR ops against a naive loop implementation, and the whole generator /
discriminator against an independent slow path (per-sample, non-fused, explicit zero insertion, loop-style FIR)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from mfim.models.layers import downsample2d, make_fir_kernel, upfirdn2d, upsample2d
from mfim.models.stylegan2 import Discriminator, Generator, channels_at

# ----------------------------------------------------------------------------------------------------------------
# Independent slow reference: written from the StyleGAN2 definitions, sharing no code with mfim.models.layers.
# ----------------------------------------------------------------------------------------------------------------


def naive_upfirdn(x, f, up=1, down=1, pad=(0, 0, 0, 0), gain=1.0):
    """Zero insertion by indexing, pad/crop, true convolution as a loop over filter taps, decimation by slicing."""
    b, c, h, w = x.shape
    px0, px1, py0, py1 = pad
    z = x.new_zeros(b, c, h * up, w * up)
    z[:, :, ::up, ::up] = x
    z = F.pad(z, [max(px0, 0), max(px1, 0), max(py0, 0), max(py1, 0)])
    z = z[:, :, max(-py0, 0) : z.shape[2] - max(-py1, 0), max(-px0, 0) : z.shape[3] - max(-px1, 0)]
    kh, kw = f.shape
    oh, ow = z.shape[2] - kh + 1, z.shape[3] - kw + 1
    out = x.new_zeros(b, c, oh, ow)
    for i in range(kh):
        for j in range(kw):  # convolution: output[y] = sum_t input[y + t] * f[K-1-t]
            out += f[kh - 1 - i, kw - 1 - j] * gain * z[:, :, i : i + oh, j : j + ow]
    return out[:, :, ::down, ::down]


def naive_lrelu(x, bias, gain=math.sqrt(2), clamp=None):
    x = F.leaky_relu(x + bias.reshape(1, -1, 1, 1), 0.2) * gain
    return x.clamp(-clamp, clamp) if clamp is not None else x


def naive_generator(G: Generator, ws: torch.Tensor, noise: list[torch.Tensor]) -> torch.Tensor:
    """One sample at a time; modulated weights built explicitly; the upsampling conv as zero insertion + full
    correlation with the spatially flipped kernel, then the blur."""
    f = make_fir_kernel()
    syn = G.synthesis
    outs = []
    for b in range(ws.shape[0]):
        x = syn.const[None]
        img = None
        for res, conv_ids, rgb_id in syn._plan:
            for i in conv_ids:
                layer = syn.convs[i]
                rec = next(r for r in G.style_layers if r.kind == "conv" and r.name == G.noise_layers[i].name)
                w_in = ws[b : b + 1, rec.w_index]
                a = layer.affine
                s = w_in @ (a.weight * a.weight_gain).t() + a.bias * a.bias_gain  # 1×I
                wt = layer.conv.weight * s.reshape(1, -1, 1, 1)  # O×I×3×3
                wt = wt / torch.sqrt((wt**2).sum(dim=[1, 2, 3], keepdim=True) + 1e-8)
                if layer.conv.up:
                    h = x.shape[2]
                    zi = x.new_zeros(1, x.shape[1], 2 * h - 1, 2 * h - 1)
                    zi[:, :, ::2, ::2] = x
                    y = F.conv2d(F.pad(zi, [2, 2, 2, 2]), wt.flip([2, 3]))  # == stride-2 transposed conv
                    y = naive_upfirdn(y, f, pad=(1, 1, 1, 1), gain=4)
                else:
                    y = F.conv2d(x, wt, padding=1)
                y = y + layer.noise.strength * noise[i][b : b + 1]
                x = naive_lrelu(y, layer.bias, clamp=layer.conv_clamp)
            rgb = syn.torgbs[rgb_id]
            rec = [r for r in G.style_layers if r.kind == "torgb"][rgb_id]
            a = rgb.affine
            s = ws[b : b + 1, rec.w_index] @ (a.weight * a.weight_gain).t() + a.bias * a.bias_gain
            wt = rgb.conv.weight * (s / math.sqrt(x.shape[1])).reshape(1, -1, 1, 1)
            y = F.conv2d(x, wt) + rgb.bias.reshape(1, -1, 1, 1)
            if rgb.conv_clamp is not None:
                y = y.clamp(-rgb.conv_clamp, rgb.conv_clamp)
            img = y if img is None else naive_upfirdn(img, f, up=2, pad=(2, 1, 2, 1), gain=4) + y
        outs.append(img)
    return torch.cat(outs)


def naive_discriminator(D: Discriminator, img: torch.Tensor) -> torch.Tensor:
    f = make_fir_kernel()

    def conv(layer, x, gain=1.0):
        wt = layer.weight / math.sqrt(layer.weight[0].numel())
        if layer.down:
            k = layer.kernel_size
            p = k // 2 + 1
            x = naive_upfirdn(x, f, pad=(p, p, p, p))
            x = F.conv2d(x, wt)[:, :, ::2, ::2]
        else:
            x = F.conv2d(x, wt, padding=layer.kernel_size // 2)
        if layer.activation == "lrelu":
            return naive_lrelu(x, layer.bias, gain=math.sqrt(2) * gain)
        return x * gain

    x = conv(D.from_rgb, img)
    for blk in D.blocks:
        x = conv(blk.skip, x, math.sqrt(0.5)) + conv(blk.conv1, conv(blk.conv0, x), math.sqrt(0.5))
    n = x.shape[0]
    g = min(4, n)
    y = x.reshape(g, -1, 1, x.shape[1], 4, 4)
    sd = torch.sqrt(y.var(dim=0, unbiased=False) + 1e-8).mean(dim=[2, 3, 4]).reshape(-1, 1, 1, 1)
    x = torch.cat([x, sd.repeat(g, 1, 4, 4)], 1)
    x = conv(D.epilogue.conv, x)
    fc, out = D.epilogue.fc, D.epilogue.out
    x = F.leaky_relu(x.flatten(1) @ (fc.weight * fc.weight_gain).t() + fc.bias, 0.2) * math.sqrt(2)
    return x @ (out.weight * out.weight_gain).t() + out.bias


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny networks (fixture in conftest.py)


def small_generator(seed=0, resolution=32, **kw) -> Generator:
    torch.manual_seed(seed)
    G = Generator(resolution=resolution, style_dim=32, n_mlp=2, channel_base=256, channel_max=16, **kw)
    with torch.no_grad():  # give every path a nonzero contribution
        for n, p in G.named_parameters():
            if n.endswith("noise.strength") or (n.endswith(".bias") and "affine" not in n and "mapping" not in n):
                p.normal_(0, 0.3)
        G.mapping.w_avg.normal_()
    return G.eval()


# ----------------------------------------------------------------------------------------------------------------
# S-space contract
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("resolution,n_styles,n_conv", [(64, 14, 9), (256, 20, 13), (1024, 26, 17)])
def test_style_and_noise_layers(resolution, n_styles, n_conv):
    base, cmax = (32768, 512) if resolution == 1024 else (2048, 64)
    G = Generator(resolution=resolution, style_dim=64, n_mlp=2, channel_base=base, channel_max=cmax)
    layers = G.style_layers
    assert len(layers) == n_styles
    assert sum(r.kind == "conv" for r in layers) == n_conv
    assert sum(r.kind == "torgb" for r in layers) == int(math.log2(resolution)) - 1
    assert [r.index for r in layers] == list(range(n_styles))
    assert G.num_ws == n_conv + 1 == 2 * int(math.log2(resolution)) - 2
    assert len(G.noise_layers) == n_conv
    # synthesis order: per resolution conv0 (upsampling), conv1, torgb; channels = input channels of the layer
    assert [r.name for r in layers[:5]] == ["b4.conv1", "b4.torgb", "b8.conv0", "b8.conv1", "b8.torgb"]
    assert [r.w_index for r in layers[:5]] == [0, 1, 1, 2, 3]
    assert layers[-1].name == f"b{resolution}.torgb" and layers[-1].w_index == G.num_ws - 1
    for r in layers:
        ch_here = channels_at(r.resolution, base, cmax)
        ch_in = channels_at(max(r.resolution // 2, 4), base, cmax) if r.name.endswith("conv0") else ch_here
        assert r.channels == ch_in
    assert [n.resolution for n in G.noise_layers] == [r.resolution for r in layers if r.kind == "conv"]
    assert all(n.channels == channels_at(n.resolution, base, cmax) for n in G.noise_layers)
    styles = G.styles_from_ws(torch.randn(2, G.num_ws, G.w_dim))
    assert [tuple(s.shape) for s in styles] == [(2, r.channels) for r in layers]
    if resolution == 1024:
        assert [r.channels for r in layers if r.kind == "torgb"] == [512, 512, 512, 512, 512, 256, 128, 64, 32]


def test_official_config_1024_builds_and_runs():
    """Size and output only; its speed (one forward under 30 s on CPU) is benchmarks/bench_generator_1024.py."""
    torch.set_num_threads(2)  # a real workload (restored by the fixture)
    torch.manual_seed(0)
    G = Generator(resolution=1024, style_dim=512, n_mlp=8, channel_base=32768, channel_max=512).eval()
    n_params = sum(p.numel() for p in G.parameters())
    assert 30.3e6 < n_params < 30.5e6  # official config F: 30.37 M
    with torch.no_grad():
        img = G(torch.randn(1, 512))
    assert img.shape == (1, 3, 1024, 1024) and torch.isfinite(img).all()


def test_s_space_forward_equals_w_plus_forward():
    G = small_generator()
    ws = torch.randn(3, G.num_ws, G.w_dim)  # a different w per layer (W+)
    with torch.no_grad():
        via_ws = G(ws=ws)
        via_s = G.synthesize(G.styles_from_ws(ws))
        via_styles_kw = G(styles=G.styles_from_ws(ws))
    assert torch.equal(via_ws, via_s) and torch.equal(via_s, via_styles_kw)
    # w and z paths are the W+ path with broadcast ws
    z = torch.randn(2, G.z_dim)
    with torch.no_grad():
        w = G.mapping(z)
        assert torch.equal(G(z), G(w=w))
        assert torch.equal(G(w=w), G(ws=w[:, None].repeat(1, G.num_ws, 1)))


def test_s_space_edit_of_last_torgb_is_linear_in_its_channel():
    G = small_generator()
    ws = torch.randn(1, G.num_ws, G.w_dim)
    with torch.no_grad():
        styles = G.styles_from_ws(ws)
        base = G.synthesize(styles)
        edited = [s.clone() for s in styles]
        last = G.style_layers[-1]
        edited[last.index][:, 0] += 5.0  # the final ToRGB only adds its own term at full resolution
        out = G.synthesize(edited)
    assert not torch.equal(out, base)
    rgb = G.synthesis.torgbs[-1]
    delta = rgb.conv.weight[:, 0, 0, 0] * rgb.weight_gain * 5.0
    x_hidden = out - base  # linear in the style: the change is weight * gain * x_channel0
    assert x_hidden.abs().max() > 0
    assert torch.allclose(x_hidden[0, :, 3, 3] / delta, x_hidden[0, 0, 3, 3].expand(3) / delta[0], atol=1e-4)


def test_forward_argument_checks():
    G = small_generator()
    with pytest.raises(ValueError, match="exactly one"):
        G(torch.randn(1, G.z_dim), w=torch.randn(1, G.w_dim))
    with pytest.raises(ValueError, match="style vectors"):
        G.synthesize(G.styles_from_ws(torch.randn(1, G.num_ws, G.w_dim))[:-1])
    with pytest.raises(ValueError, match="ws must be"):
        G.styles_from_ws(torch.randn(1, G.num_ws + 1, G.w_dim))
    with pytest.raises(ValueError, match="noise_mode"):
        G(torch.randn(1, G.z_dim), noise_mode="loud")


# ----------------------------------------------------------------------------------------------------------------
# FIR ops
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "up,down,pad",
    [(1, 1, (1, 1, 1, 1)), (2, 1, (2, 1, 2, 1)), (1, 2, (1, 1, 1, 1)), (2, 1, (1, 3, 0, 2)), (1, 2, (2, 0, 1, 2)),
     (2, 2, (1, 1, 2, 2)), (2, 1, (-1, 2, 3, -1))],
)  # fmt: skip
def test_upfirdn_matches_loop_reference(up, down, pad):
    torch.manual_seed(0)
    x = torch.randn(2, 5, 9, 7)
    f = torch.rand(4, 4) + 0.1  # asymmetric: catches flips
    fast = upfirdn2d(x, f, up=up, down=down, pad=pad, gain=1.7)
    ref = naive_upfirdn(x, f, up=up, down=down, pad=pad, gain=1.7)
    assert fast.shape == ref.shape
    assert (fast - ref).abs().max() < 2e-6


def test_up_and_down_sampling_keep_dc_and_size():
    x = torch.full((1, 2, 8, 8), 0.7)
    k = make_fir_kernel()
    up = upsample2d(x, k)
    down = downsample2d(x, k)
    assert up.shape == (1, 2, 16, 16) and down.shape == (1, 2, 4, 4)
    assert torch.allclose(up[:, :, 2:-2, 2:-2], torch.tensor(0.7), atol=1e-6)  # interior keeps the DC level
    assert torch.allclose(down[:, :, 1:-1, 1:-1], torch.tensor(0.7), atol=1e-6)


# ----------------------------------------------------------------------------------------------------------------
# Whole networks against the slow path
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("clamp", [None, 0.5])
def test_generator_matches_independent_slow_path(fused, clamp):
    G = small_generator(conv_clamp=clamp)
    G.fused_modconv = fused
    torch.manual_seed(3)
    ws = torch.randn(2, G.num_ws, G.w_dim)
    # B×1×H×W noise for some layers, per-channel B×C×H×W style maps for others
    noise = []
    for n in G.noise_layers:
        c = n.channels if n.index % 2 else 1
        noise.append(torch.randn(2, c, n.resolution, n.resolution))
    with torch.no_grad():
        ours = G(ws=ws, noise=noise)
        ref = naive_generator(G, ws, noise)
    assert ours.shape == (2, 3, 32, 32)
    assert ref.abs().max() > 0.5  # not a degenerate comparison
    assert (ours - ref).abs().max() < 2e-5


def test_noise_modes_and_per_channel_maps():
    G = small_generator()
    z = torch.randn(2, G.z_dim)
    with torch.no_grad():
        const1, const2 = G(z, noise_mode="const"), G(z, noise_mode="const")
        rand1, rand2 = G(z, noise_mode="random"), G(z, noise_mode="random")
        none = G(z, noise_mode="none")
        zeros = G(z, noise=[torch.zeros(1, 1, n.resolution, n.resolution) for n in G.noise_layers])
        consts = G(z, noise=[G.synthesis.convs[n.index].noise_const[None, None] for n in G.noise_layers])
        last = G.noise_layers[-1]
        maps = [None] * (len(G.noise_layers) - 1) + [torch.zeros(2, last.channels, 32, 32)]
        mixed = G(z, noise=maps, noise_mode="const")
    assert torch.equal(const1, const2) and not torch.equal(rand1, rand2)
    assert torch.equal(none, zeros) and torch.equal(consts, const1)
    assert not torch.equal(mixed, const1) and not torch.equal(mixed, none)


def test_truncation_and_w_avg_tracking():
    G = small_generator()
    z = torch.randn(4, G.z_dim)
    with torch.no_grad():
        w = G.mapping(z)
        assert torch.allclose(G.mapping(z, truncation_psi=0.0), G.mapping.w_avg.expand(4, -1))
        half = G.mapping(z, truncation_psi=0.5)
        assert torch.allclose(half, G.mapping.w_avg + 0.5 * (w - G.mapping.w_avg), atol=1e-6)
        ws = G.mapping(z, truncation_psi=0.0, truncation_cutoff=3)
        assert ws.shape == (4, G.num_ws, G.w_dim)
        assert torch.equal(ws[:, 3:], w[:, None].expand(-1, G.num_ws - 3, -1))
        assert torch.allclose(ws[:, :3], G.mapping.w_avg.expand(4, 3, -1))
    before = G.mapping.w_avg.clone()
    G.eval()(z)
    assert torch.equal(G.mapping.w_avg, before)  # no update in eval mode
    G.train()(z)
    expected = w.mean(0).lerp(before, 0.995)
    assert torch.allclose(G.mapping.w_avg, expected, atol=1e-6)


def test_discriminator_matches_independent_slow_path():
    torch.manual_seed(5)
    D = Discriminator(resolution=32, channel_base=256, channel_max=16)
    with torch.no_grad():
        for n, p in D.named_parameters():
            if n.endswith("bias"):
                p.normal_(0, 0.3)
    img = torch.randn(8, 3, 32, 32)
    with torch.no_grad():
        ours, ref = D(img), naive_discriminator(D, img)
    assert ours.shape == (8, 1)
    assert ref.abs().max() > 0.05
    assert (ours - ref).abs().max() < 1e-5
    assert [b.conv0.in_channels for b in D.blocks] == [8, 16, 16]  # min(256/res, 16) at 32, 16, 8


def test_generator_gradients_reach_every_parameter():
    G = small_generator().train()
    img = G(torch.randn(2, G.z_dim), noise_mode="random")
    img.square().mean().backward()
    missing = [n for n, p in G.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing


def test_discriminator_at_a_lower_resolution_keeps_the_lower_blocks_and_epilogue():
    from mfim.models.stylegan2 import Discriminator, discriminator_at

    torch.manual_seed(0)
    D = Discriminator(64, channel_base=256, channel_max=16)
    small = discriminator_at(D, 16)
    assert small.resolution == 16 and small.block_resolutions == [16, 8]
    for mine, theirs in zip(small.blocks, D.blocks[2:]):  # D's blocks: 64, 32, 16, 8
        for (k, a), (_, b) in zip(mine.state_dict().items(), theirs.state_dict().items()):
            assert torch.equal(a, b), k
    assert all(torch.equal(a, b) for a, b in zip(small.epilogue.state_dict().values(), D.epilogue.state_dict().values()))
    # the same features at 16 px give the same logit: only FromRGB is new
    x = torch.randn(4, small.blocks[0].conv0.weight.shape[1], 16, 16)
    h_small, h_full = x, x
    for blk in small.blocks:
        h_small = blk(h_small)
    for blk in D.blocks[2:]:
        h_full = blk(h_full)
    assert torch.equal(small.epilogue(h_small), D.epilogue(h_full))
    assert small(torch.randn(4, 3, 16, 16)).shape == (4, 1)
    same = discriminator_at(D, 64)
    img = torch.randn(4, 3, 64, 64)
    assert torch.equal(same(img), D(img))
    with pytest.raises(ValueError, match="cannot grow"):
        discriminator_at(small, 32)
