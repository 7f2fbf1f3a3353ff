"""DECA's FLAME coefficients in L_shape / L_exp on the training set's own scale, the jaw in L_pose, and each loss
term's share of eq. (6) (issue 13 §2, issue 11 §3)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from mfim.criteria.threedmm_loss import ThreeDMMLoss
from mfim.data.threedmm_table import STATS_NAME, coefficient_stats, write_stats
from mfim.nets.deca import DECAEncoder, FlameEncoder
from mfim.nets.types import ThreeDMMParams
from mfim.training.build import threedmm_std
from mfim.training.objective import loss_shares
from tests.official_files import randomize_batchnorm
from tests.defaults import loss_weights


def faces(n: int, seed: int, size: int = 64) -> torch.Tensor:
    """Smooth random 'faces': low-frequency colour fields, so a random ResNet's codes vary between images."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, 3, 4, 4, generator=g) * 2 - 1
    return torch.nn.functional.interpolate(low, size=size, mode="bilinear", align_corners=False)


@pytest.fixture(scope="module")
def deca(tmp_path_factory):
    torch.manual_seed(0)
    net = randomize_batchnorm(FlameEncoder())
    with torch.no_grad():  # coefficients whose spreads span four orders of magnitude, as no trained net promises not to
        net.layers[2].weight.mul_(torch.logspace(-2, 2, 236)[torch.randperm(236)][:, None])
    path = tmp_path_factory.mktemp("deca") / "deca_model.tar"
    torch.save({"E_flame": net.state_dict()}, path, _use_new_zipfile_serialization=False)
    return DECAEncoder(path)


def table_of(params, split: str) -> pd.DataFrame:
    return pd.DataFrame({"key": [f"{split}{i}" for i in range(len(params))], "split": split, "encoder": "deca",
                         "shape": list(params.shape.numpy()), "exp": list(params.exp.numpy())})


def test_flame_terms_have_unit_scale_with_training_set_statistics(deca, tmp_path):
    with torch.no_grad():
        train, held_out = deca(faces(24, seed=1)), deca(faces(12, seed=2))
    df = pd.concat([table_of(train, "train"), table_of(ThreeDMMParams(held_out.shape[:2], held_out.exp[:2],
                                                                      held_out.pose[:2]), "eval")])
    stats = coefficient_stats(df)
    assert stats["encoder"] == "deca" and stats["rows"] == 24 and len(stats["shape_std"]) == 100
    path = write_stats(stats, tmp_path / STATS_NAME)
    shape_std, exp_std = threedmm_std("deca", deca, stats_path=path)
    assert shape_std.shape == (100,) and exp_std.shape == (50,)

    # held-out faces, standardised with the training set's statistics: about unit spread per coefficient
    z_shape = (held_out.shape - torch.tensor(stats["shape_mean"])) / shape_std
    z_exp = (held_out.exp - torch.tensor(stats["exp_mean"])) / exp_std
    for z in (z_shape, z_exp):
        spread = z.std(dim=0)
        assert 0.4 < spread.quantile(0.1).item() and spread.quantile(0.9).item() < 2.5, spread
    # and so are the loss terms between different faces, per coefficient (sqrt(2) for independent unit variables)
    loss = ThreeDMMLoss(deca, shape_std, exp_std)
    other = ThreeDMMParams(held_out.shape.roll(1, 0), held_out.exp.roll(1, 0), held_out.pose)  # another face each
    with torch.no_grad():
        terms = loss(faces(12, seed=2), other, other, ("shape", "exp"))
    assert 0.4 < terms["shape"].item() / 10 < 3.0 and 0.4 < terms["exp"].item() / 50**0.5 < 3.0, terms
    # raw units (the identity normaliser DECA had) leave L_shape to the few widest coefficients
    raw = ThreeDMMLoss(deca)
    with torch.no_grad():
        raw_shape = raw(faces(12, seed=2), other, other, ("shape",))["shape"].item() / 10
    assert raw_shape > 10, raw_shape


def test_deca_statistics_must_be_flame(deca, tmp_path):
    bfm = {"encoder": "tddfa", "shape_mean": [0.0] * 40, "shape_std": [1.0] * 40, "exp_mean": [0.0] * 10,
           "exp_std": [1.0] * 10}
    with pytest.raises(ValueError, match="threedmm.encoder: deca"):
        threedmm_std("deca", deca, stats_path=write_stats(bfm, tmp_path / STATS_NAME))
    with pytest.raises(FileNotFoundError, match="threedmm"):
        threedmm_std("deca", deca, stats_path=tmp_path / "absent.json")


def test_jaw_pose_joins_l_pose_with_deca(deca):
    x = faces(2, seed=3)
    with torch.no_grad():
        tgt = deca(x)
    opened = tgt.detach()
    opened.jaw = opened.jaw + torch.tensor([0.3, 0.0, 0.0])  # same head pose, mouth opened by 0.3 rad
    with torch.no_grad():
        without = ThreeDMMLoss(deca)(x, opened, opened, ("pose",))["pose"].item()
        with_jaw = ThreeDMMLoss(deca, jaw_pose=True)(x, opened, opened, ("pose",))["pose"].item()
    assert without < 1e-4  # the jaw is invisible to L_pose without the switch
    assert abs(with_jaw - 0.3) < 1e-4


def test_jaw_pose_refuses_an_encoder_without_a_jaw():
    class NoJaw(torch.nn.Module):
        def forward(self, x):
            return ThreeDMMParams(torch.zeros(len(x), 40), torch.zeros(len(x), 10), torch.zeros(len(x), 3))

    p = NoJaw()(torch.zeros(2, 3, 8, 8))
    with pytest.raises(ValueError, match="jaw"):
        ThreeDMMLoss(NoJaw(), jaw_pose=True)(torch.zeros(2, 3, 8, 8), p, p, ("pose",))


def test_loss_shares_are_the_weighted_terms_over_the_total():
    w = loss_weights(id=4.0, l1=1.0, lpips=0.8, adv=0.1, shape=1.0, pose=1.0, exp=1.0, recon_cross_identity=1.0,
                     background_l1=0.0)
    logs = {"loss": 10.0, "id": 0.5, "l1": 1.0, "lpips": 1.0, "adv": 2.0, "shape": 5.0, "pose": 0.8, "exp": 0.2,
            "d_adv": 1.3, "r1": 0.1, "img_per_s": 3.0}
    shares = loss_shares(logs, w)
    assert set(shares) == {f"loss_share/{k}" for k in ("id", "l1", "lpips", "adv", "shape", "pose", "exp")}
    assert abs(sum(shares.values()) - 1.0) < 1e-12
    assert abs(shares["loss_share/shape"] - 0.5) < 1e-12 and abs(shares["loss_share/id"] - 0.2) < 1e-12
    assert np.isclose(shares["loss_share/adv"], 0.02)
