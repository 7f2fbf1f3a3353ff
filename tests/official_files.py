"""Random-weight files in each official project's released layout, shared by the format round-trip tests and the
paper-scale smoke run (tests/test_paper_smoke.py).

Each writer builds the network with the key names and serialisation its project releases (insightface arcface_torch
``backbone.pth``, DECA ``deca_model.tar``, Hopenet ``.pkl`` in the PyTorch 0.2 era, pytorch-fid Inception ``.pth``,
pSp ``model_ir_se50.pth``, an NVIDIA stylegan2-ada-pytorch snapshot ``.pkl``) and returns the in-memory network, so a
test can compare what our loader makes of the file against it.

What they are not: the official networks. Except the FID Inception (assembled from pytorch_fid's own blocks), every
writer builds the network from this project's modules, so a test "write here -> load with our loader" is a round trip
of our writer against our reader (named ``test_*_round_trip``): it checks renaming, serialisation and preprocessing,
and cannot catch an architecture difference from the official code. Facts that can -- key lists written out
independently, published parameter counts -- are separate tests (tests/test_official_formats.py,
tests/test_checkpoints.py).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

GEN = torch.Generator().manual_seed(0)


def randomize_batchnorm(net: nn.Module, gen: torch.Generator = GEN) -> nn.Module:
    """Non-trivial BatchNorm statistics, so a mis-loaded buffer changes the output."""
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.weight.uniform_(0.5, 1.5, generator=gen)
                m.bias.normal_(0, 0.1, generator=gen)
                m.running_mean.normal_(0, 0.1, generator=gen)
                m.running_var.uniform_(0.5, 1.5, generator=gen)
    return net.eval()


def write_iresnet_backbone(path: Path, depth: int = 18) -> nn.Module:
    """arcface_torch ``backbone.pth``: a bare IResNet state dict (the depth is read back from the keys)."""
    from mfim.nets.iresnet import IRESNET_LAYERS, IResNet

    net = randomize_batchnorm(IResNet(IRESNET_LAYERS[depth]))
    torch.save(net.state_dict(), path)
    return net


def write_deca_tar(path: Path) -> nn.Module:
    """DECA ``deca_model.tar``: the coarse encoder under ``E_flame`` next to the detail networks (which the coarse
    encoder must ignore), legacy (non-zip) serialisation like the released file."""
    from mfim.nets.deca import FlameEncoder

    e_flame = randomize_batchnorm(FlameEncoder())
    checkpoint = {"E_flame": e_flame.state_dict(), "E_detail": {"layers.0.weight": torch.zeros(3)},
                  "D_detail": {"x": torch.zeros(1)}}  # fmt: skip
    torch.save(checkpoint, path, _use_new_zipfile_serialization=False)
    return e_flame


def write_hopenet_pkl(path: Path) -> nn.Module:
    """``hopenet_robust_alpha1.pkl`` as written in 2017: no BatchNorm ``num_batches_tracked``, legacy serialisation."""
    from mfim.nets.headpose import HopenetResNet50

    net = randomize_batchnorm(HopenetResNet50(load=False))
    official = {k: v for k, v in net.state_dict().items() if not k.endswith("num_batches_tracked")}
    torch.save(official, path, _use_new_zipfile_serialization=False)
    return net


def reference_fid_inception() -> nn.Module:
    """The FID Inception as pytorch-fid assembles it: torchvision Inception-v3 (1008 classes, no aux head) with the
    TF-compatible Mixed blocks swapped in."""
    import torchvision
    from pytorch_fid.inception import FIDInceptionA, FIDInceptionC, FIDInceptionE_1, FIDInceptionE_2

    net = torchvision.models.inception_v3(weights=None, aux_logits=False, num_classes=1008, init_weights=False)
    net.Mixed_5b, net.Mixed_5c, net.Mixed_5d = FIDInceptionA(192, 32), FIDInceptionA(256, 64), FIDInceptionA(288, 64)
    net.Mixed_6b, net.Mixed_6c = FIDInceptionC(768, 128), FIDInceptionC(768, 160)
    net.Mixed_6d, net.Mixed_6e = FIDInceptionC(768, 160), FIDInceptionC(768, 192)
    net.Mixed_7b, net.Mixed_7c = FIDInceptionE_1(1280), FIDInceptionE_2(2048)
    return randomize_batchnorm(net)


def write_fid_inception(path: Path) -> nn.Module:
    """pytorch-fid ``pt_inception-2015-12-05-6726825d.pth``: the reference network's state dict."""
    net = reference_fid_inception()
    torch.save(net.state_dict(), path)
    return net


def write_psp_ir_se50(path: Path, *, num_batches_tracked: bool = False) -> dict:
    """pSp ``model_ir_se50.pth``: the IR-SE50 body (random weights) plus the recognition head pSp skips; returns the
    state written. Files from older PyTorch lack ``num_batches_tracked``, the default here."""
    from mfim.models.irse import IRSEBackbone

    body = IRSEBackbone()
    state = {k: torch.randn(v.shape, generator=GEN) * 0.05 if v.is_floating_point() else v
             for k, v in body.state_dict().items() if num_batches_tracked or not k.endswith("num_batches_tracked")}
    for k in [k for k in state if k.endswith("running_var")]:
        state[k] = state[k].abs() + 1.0  # a variance, not noise around zero (the smoke's activations stay finite)
    state["output_layer.0.weight"] = torch.zeros(3)  # the face-recognition head pSp does not load
    torch.save(state, path)
    return state


def write_stylegan2_pkl(path: Path, resolution: int = 1024, style_dim: int = 512, n_mlp: int = 8,
                        channel_base: int = 32768, channel_max: int = 512, seed: int = 0) -> nn.Module:
    """An NVIDIA stylegan2-ada-pytorch snapshot (``G``, ``D``, ``G_ema`` persistent records) of a randomly initialised
    generator; the defaults are the FFHQ-1024 architecture, smaller widths keep CPU runs short."""
    from mfim.models.stylegan2 import Generator, discriminator_for
    from tests.nvidia_writer import write_nvidia_pickle

    torch.manual_seed(seed)
    G = Generator(resolution=resolution, style_dim=style_dim, n_mlp=n_mlp, channel_base=channel_base,
                  channel_max=channel_max).eval()
    write_nvidia_pickle(path, G, discriminator_for(G))
    return G
