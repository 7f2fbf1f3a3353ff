"""Fréchet distances: FID only with the Inception weights; otherwise a named substitute; known-answer math."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import mfim.nets.fid as fid
from mfim.assets import MissingAssetError


class MeanColour(nn.Module):
    """A 3-d 'feature network' (mean colour): Fréchet distances with known answers."""

    name = "fd_mean_colour"

    def __init__(self):
        super().__init__()
        self.dummy = nn.Parameter(torch.zeros(()))

    def forward(self, x):
        return x.mean(dim=(2, 3))


@pytest.fixture
def no_inception(monkeypatch):
    monkeypatch.setattr(fid, "hub_cached_inception", lambda: None)
    monkeypatch.setattr(fid, "cached_path", lambda asset: fid.Path("/nonexistent") / asset.filename)


def _images(n: int, offset: float, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(n, 3, 16, 16, generator=g) * 0.5 - 0.25 + offset).clamp(-1, 1)


def test_frechet_known_answer():
    net = MeanColour()
    real = _images(64, 0.0, 0)
    # a pure shift of every image by +0.2 moves the feature mean by 0.2 per channel, covariances unchanged
    fd_shift = fid.frechet_distance(fid.feature_statistics(net, real, 16), fid.feature_statistics(net, real + 0.2, 16))
    assert abs(fd_shift - 3 * 0.2**2) < 1e-6
    fd_self = fid.frechet_distance(fid.feature_statistics(net, real, 16), fid.feature_statistics(net, real, 16))
    assert abs(fd_self) < 1e-6


def test_batches_accept_tensors_lists_and_uint8():
    x = _images(5, 0.0, 1)
    as_uint8 = [((a.permute(1, 2, 0) + 1) * 127.5).round().to(torch.uint8).numpy() for a in x]
    net = MeanColour()
    m_tensor = fid.feature_statistics(net, x, 2)[0]
    m_batches = fid.feature_statistics(net, list(x.split(2)), 2)[0]
    m_uint8 = fid.feature_statistics(net, as_uint8, 2)[0]
    assert np.allclose(m_tensor, m_batches) and np.allclose(m_tensor, m_uint8, atol=1 / 255)


def test_given_but_missing_inception_raises():
    with pytest.raises(MissingAssetError, match="evaluate.fid.inception_checkpoint"):
        fid.compute_fd(_images(4, 0, 0), _images(4, 0, 1), inception_checkpoint="/nonexistent/pt_inception.pth")
    with pytest.raises(MissingAssetError, match="pt_inception-2015-12-05-6726825d.pth"):
        fid.load_fid_inception("/nonexistent/pt_inception.pth")


def test_without_inception_nothing_is_called_fid(no_inception):
    assert fid.find_inception_checkpoint(None) is None
    with pytest.raises(MissingAssetError, match="pytorch-fid"):
        fid.load_fid_inception()


@pytest.mark.slow
def test_substitute_is_named_after_its_network(no_inception):
    # the LPIPS-AlexNet substitute (1152-d; scipy's sqrtm on it takes ~10-30 s on 2 cores)
    real, close, far = _images(24, 0.0, 0), _images(24, 0.0, 1), _images(24, 0.5, 2)
    near_report = fid.compute_fd(real, close, batch_size=8)
    far_report = fid.compute_fd(real, far, batch_size=8)
    assert near_report["name"] == far_report["name"] == "fd_lpips_alex"
    assert "NOT FID" in near_report["note"] and "not found" in near_report["note"]
    assert 0 <= near_report["value"] < far_report["value"]
    assert near_report["n_real"] == 24 and near_report["n_fake"] == 24


class MeanStd(MeanColour):
    """Mean and standard deviation per channel: the deviation sees fine detail, so it depends on the image size."""

    def forward(self, x):
        return torch.cat([x.mean(dim=(2, 3)), x.std(dim=(2, 3))], 1)


def _detail_at_4x(x: torch.Tensor) -> torch.Tensor:
    """x at 4× the size, plus a ±0.1 checkerboard that every 4×4 block averages away: area-downsampling restores x."""
    up = F.interpolate(x, scale_factor=4, mode="nearest")
    yy, xx = torch.meshgrid(torch.arange(up.shape[-2]), torch.arange(up.shape[-1]), indexing="ij")
    return up + 0.1 * (1 - 2 * ((yy + xx) % 2)).float()


def test_fd_compares_generated_images_at_the_real_resolution(no_inception, monkeypatch):
    monkeypatch.setattr(fid, "build_substitute_extractor", lambda network="lpips_alex", device="cpu": MeanStd())
    real = _images(12, 0.0, 0)  # 16 px
    fake = _detail_at_4x(real)  # the same faces at 64 px, with detail a 16 px image cannot hold
    fd = fid.FrechetDistance()
    for r, f in zip(real.split(5), fake.split(5)):
        fd.add("real", r)
        fd.add("fake", f)
    report = fd.report()
    assert report["resolution"] == 16 and abs(report["value"]) < 1e-6
    assert "generated images area-downsampled from 64 px" in report["note"]
    # fed to the network at their own sizes (as before: pytorch-fid resizes each to 299 unaided) they differ
    apart = fid.frechet_distance(fid.feature_statistics(MeanStd(), real, 5), fid.feature_statistics(MeanStd(), fake, 5))
    assert apart > 1e-3


def test_fd_resolution_is_a_choice_but_never_an_upsampling(no_inception, monkeypatch):
    monkeypatch.setattr(fid, "build_substitute_extractor", lambda network="lpips_alex", device="cpu": MeanStd())
    real = _images(6, 0.0, 0)
    at8 = fid.compute_fd(real, _detail_at_4x(real), batch_size=4, resolution=8)
    assert at8["resolution"] == 8 and abs(at8["value"]) < 1e-6
    assert "real images area-downsampled from 16 px" in at8["note"]
    with pytest.raises(ValueError, match="above the images' 16 px"):
        fid.compute_fd(real, _detail_at_4x(real), resolution=32)


def test_running_statistics_match_numpy(rng):
    f = rng.normal(size=(37, 5)) * [1, 2, 3, 4, 5] + 7
    stats = fid.RunningStatistics()
    for part in np.array_split(f, [1, 2, 10, 30]):  # a batch of one and uneven ones
        stats.update(part)
    mean, cov, n = stats.statistics()
    assert n == 37
    np.testing.assert_allclose(mean, f.mean(0), rtol=1e-12)
    np.testing.assert_allclose(cov, np.cov(f, rowvar=False), rtol=1e-10)
