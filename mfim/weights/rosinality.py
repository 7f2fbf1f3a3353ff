"""rosinality/stylegan2-pytorch ``.pt`` checkpoints (``g_ema`` [+ ``d``, ``latent_avg``]), read with
``torch.load(weights_only=True)``: key maps to and from our networks, configs inferred from the key names
(``noises.noise_<i>``, ``convs.<i>``) and tensor shapes, and a writer producing the layout convert_weight.py writes.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from mfim.models.layers import make_fir_kernel
from mfim.models.stylegan2 import Discriminator, Generator
from mfim.weights.common import (
    SAME,
    KeyMap,
    build_network,
    channel_rule,
    export_state,
    import_state,
    reshape_to,
    tensor_dict,
)
from mfim.weights.limits import CheckpointError


# ====================================================================================================================
# Name maps between our networks and rosinality's
# ====================================================================================================================


def rosinality_generator_keys(G: Generator) -> KeyMap:
    """In the order rosinality's ``Generator.state_dict()`` lists them (blur kernels are written separately)."""
    m: KeyMap = []
    for i in range(len(G.mapping.layers)):
        m += [(f"mapping.layers.{i}.{p}", f"style.{i + 1}.{p}", SAME, SAME) for p in ("weight", "bias")]
    c4 = G.synthesis.const.shape[0]
    m.append(("synthesis.const", "input.input", reshape_to((1, c4, 4, 4)), reshape_to((c4, 4, 4))))

    def conv_entries(i: int, theirs: str):
        w = G.synthesis.convs[i].conv.weight
        return [
            (f"synthesis.convs.{i}.conv.weight", f"{theirs}.conv.weight",
             reshape_to((1, *w.shape)), reshape_to(tuple(w.shape))),
            (f"synthesis.convs.{i}.affine.weight", f"{theirs}.conv.modulation.weight", SAME, SAME),
            (f"synthesis.convs.{i}.affine.bias", f"{theirs}.conv.modulation.bias", SAME, SAME),
            (f"synthesis.convs.{i}.noise.strength", f"{theirs}.noise.weight", reshape_to((1,)), reshape_to(())),
            (f"synthesis.convs.{i}.bias", f"{theirs}.activate.bias", SAME, SAME),
        ]  # fmt: skip

    def rgb_entries(i: int, theirs: str):
        w = G.synthesis.torgbs[i].conv.weight
        c = w.shape[0]
        return [
            (f"synthesis.torgbs.{i}.bias", f"{theirs}.bias", reshape_to((1, c, 1, 1)), reshape_to((c,))),
            (f"synthesis.torgbs.{i}.conv.weight", f"{theirs}.conv.weight",
             reshape_to((1, *w.shape)), reshape_to(tuple(w.shape))),
            (f"synthesis.torgbs.{i}.affine.weight", f"{theirs}.conv.modulation.weight", SAME, SAME),
            (f"synthesis.torgbs.{i}.affine.bias", f"{theirs}.conv.modulation.bias", SAME, SAME),
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
                  reshape_to((1, 1, r, r)), reshape_to((r, r))))  # fmt: skip
    return m


def rosinality_discriminator_keys(D: Discriminator) -> KeyMap:
    m: KeyMap = [
        ("from_rgb.weight", "convs.0.0.weight", SAME, SAME),
        ("from_rgb.bias", "convs.0.1.bias", SAME, SAME),
    ]
    for i in range(len(D.blocks)):
        j = i + 1
        m += [
            (f"blocks.{i}.conv0.weight", f"convs.{j}.conv1.0.weight", SAME, SAME),
            (f"blocks.{i}.conv0.bias", f"convs.{j}.conv1.1.bias", SAME, SAME),
            (f"blocks.{i}.conv1.weight", f"convs.{j}.conv2.1.weight", SAME, SAME),
            (f"blocks.{i}.conv1.bias", f"convs.{j}.conv2.2.bias", SAME, SAME),
            (f"blocks.{i}.skip.weight", f"convs.{j}.skip.1.weight", SAME, SAME),
        ]
    m += [
        ("epilogue.conv.weight", "final_conv.0.weight", SAME, SAME),
        ("epilogue.conv.bias", "final_conv.1.bias", SAME, SAME),
        ("epilogue.fc.weight", "final_linear.0.weight", SAME, SAME),
        ("epilogue.fc.bias", "final_linear.0.bias", SAME, SAME),
        ("epilogue.out.weight", "final_linear.1.weight", SAME, SAME),
        ("epilogue.out.bias", "final_linear.1.bias", SAME, SAME),
    ]
    return m


# ====================================================================================================================
# Config inference and loading
# ====================================================================================================================


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
    channel_base, channel_max = channel_rule(channels, "generator")
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
    channel_base, channel_max = channel_rule(channels, "discriminator")
    return dict(resolution=resolution, channel_base=channel_base, channel_max=channel_max, mbstd_group_size=4,
                mbstd_channels=1, conv_clamp=None, img_channels=int(sd["convs.0.0.weight"].shape[1]))  # fmt: skip


def _estimate_w_avg(G: Generator, n: int = 4096, seed: int = 0) -> torch.Tensor:
    """Mean of w over ``n`` fixed-seed z (rosinality files without latent_avg do the same for truncation)."""
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(n, G.z_dim, generator=gen)
    with torch.no_grad():
        return G.mapping(z, update_w_avg=False).mean(0)


def generator_from(d: dict, what: str) -> Generator:
    sd = d["g_ema"]
    G = build_network(Generator, _rosinality_generator_config(tensor_dict(sd, what)), what, sd)
    import_state(G, sd, rosinality_generator_keys(G), what, ignore=lambda k: k.endswith("kernel"))
    latent_avg = d.get("latent_avg")
    with torch.no_grad():
        if isinstance(latent_avg, torch.Tensor) and latent_avg.shape[-1] == G.w_dim:
            G.mapping.w_avg.copy_(latent_avg.reshape(-1, G.w_dim)[0].float())
        else:
            G.mapping.w_avg.copy_(_estimate_w_avg(G))
    return G


def discriminator_from(d: dict, what: str) -> Discriminator:
    sd = d.get("d")
    if not isinstance(sd, dict):
        raise CheckpointError(f"{what}: this checkpoint has no discriminator ('d')")
    D = build_network(Discriminator, _rosinality_discriminator_config(tensor_dict(sd, what)), what, sd)
    import_state(D, sd, rosinality_discriminator_keys(D), what, ignore=lambda k: k.endswith("kernel"))
    return D


# ====================================================================================================================
# Writer
# ====================================================================================================================


def write_rosinality_checkpoint(
    path: str | os.PathLike, G: Generator, D: Discriminator | None = None, latent_avg: bool = True
) -> Path:
    """Write ``{"g_ema": ..., "latent_avg": ..., ["d": ...]}`` as rosinality's convert_weight.py does, with the state
    dict names, shapes and order of its ``Generator`` / ``Discriminator`` (blur kernels included)."""
    theirs = export_state(G, rosinality_generator_keys(G))
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
        dt = export_state(D, rosinality_discriminator_keys(D))
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

