"""L_id (eq. 1) and its optional jittered views: exactly eq. (1) at views 0, a true similarity transform, gradients
through every view, and a loss that a crop-dependent "identity" cannot satisfy the way a crop-robust one does."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mfim.criteria.id_loss import IDLoss, jitter


class PixelEmbedder(nn.Module):
    """Embedding = the flattened image: reads every pixel at its exact position (maximally crop-sensitive)."""

    def forward(self, x):
        return x.flatten(1)


class PooledEmbedder(nn.Module):
    """Embedding = per-channel mean: unchanged by mirror, nearly unchanged by small re-crops."""

    def forward(self, x):
        return x.mean(dim=(2, 3))


def test_views_zero_is_equation_one():
    torch.manual_seed(0)
    a, b = torch.randn(4, 3, 16, 16), torch.randn(4, 3, 16, 16)
    expected = (1 - F.cosine_similarity(a.flatten(1), b.flatten(1), dim=1)).mean()
    assert torch.allclose(IDLoss(PixelEmbedder())(a, b), expected, atol=1e-6)


def test_jitter_without_magnitudes_is_identity_and_mirror_is_flip():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 32, 32)
    assert (jitter(x, 0, 0, 0, False) - x).abs().max() < 1e-4
    y = jitter(x, 0, 0, 0, True)  # each image either unchanged or mirrored
    for i in range(2):
        assert min((y[i] - x[i]).abs().max(), (y[i] - x[i].flip(-1)).abs().max()) < 1e-4


def test_jittered_views_get_gradient_and_penalise_crop_specific_identity():
    torch.manual_seed(0)
    src = torch.randn(2, 3, 16, 16)
    swap = src.clone().requires_grad_(True)  # pixel-identical: the clean view alone is a perfect match
    assert IDLoss(PixelEmbedder())(swap, src) < 1e-6
    loss = IDLoss(PixelEmbedder(), views=3)(swap, src)
    assert loss > 0.05  # a pixel-position identity does not survive re-crops
    loss.backward()
    assert swap.grad is not None and swap.grad.abs().sum() > 0
    smooth = F.avg_pool2d(torch.randn(2, 3, 64, 64), 9, 1, 4)  # a crop-robust identity does
    assert IDLoss(PooledEmbedder(), views=3)(smooth, smooth) < 1e-2


def test_jitter_params_override_defaults_and_unknown_keys_are_refused():
    assert IDLoss(PixelEmbedder(), views=1, jitter={"flip": False}).jitter["flip"] is False
    assert IDLoss(PixelEmbedder(), views=1).jitter["scale"] == 0.08
    with pytest.raises(ValueError, match="rotate"):
        IDLoss(PixelEmbedder(), views=1, jitter={"rotate": 5.0})
    with pytest.raises(ValueError, match="id_views"):
        IDLoss(PixelEmbedder(), views=-1)
