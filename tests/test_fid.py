"""Fréchet distances: FID only with the Inception weights; otherwise a named substitute; known-answer math."""

from __future__ import annotations

import numpy as np
import pytest
import torch
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
    fd_shift = fid._frechet(fid.feature_statistics(net, real, 16), fid.feature_statistics(net, real + 0.2, 16))
    assert abs(fd_shift - 3 * 0.2**2) < 1e-6
    fd_self = fid._frechet(fid.feature_statistics(net, real, 16), fid.feature_statistics(net, real, 16))
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
