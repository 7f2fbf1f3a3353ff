"""Eq. (6) of the paper apart from our additions: with every extra at its off value the objective is eq. (6)
computed from the paper's own formulas (a second path, written from eqs. (1)-(6) here), and the term names the
module declares are exactly what a training step logs."""

import dataclasses
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml

from mfim.criteria.id_loss import IDLoss
from mfim.criteria.recon_loss import ReconLoss
from mfim.criteria.threedmm_loss import ThreeDMMLoss
from mfim.models.mfim import MFIM
from mfim.training.objective import COMPUTED_ORDER, ENCODER_TERMS, EXTRA_TERMS, PAPER_TERMS, LossWeights, MFIMObjective
from mfim.training.trainer import Trainer
from tests.defaults import loss_weights, train_config, unit_encoder
from tests.stubs import Stub3DMM, StubDiscriminator, StubEmbedder, StubGenerator, StubLPIPS

RES = 32
PAPER = dict(id=1.3, l1=0.9, lpips=0.8, adv=0.1, shape=0.5, pose=0.7, exp=1.1)


def batch(seed=0, n=4):
    g = torch.Generator().manual_seed(seed)
    rand = lambda: torch.rand(n, 3, RES, RES, generator=g) * 2 - 1  # noqa: E731
    return {"src": rand(), "tgt": rand(), "gt": rand(), "has_gt": torch.tensor([True, False, True, False]),
            "same_identity": torch.tensor([True, False, False, True])}


def objective(weights, **kw):
    torch.manual_seed(7)
    return MFIMObjective(weights, id_loss=IDLoss(StubEmbedder()), recon=ReconLoss(StubLPIPS()),
                         threedmm=ThreeDMMLoss(Stub3DMM()), discriminator=StubDiscriminator(), **kw)


def eq6_by_hand(obj, w: LossWeights, x_swap, x_src, x_tgt):
    """Eqs. (1)-(5) and the encoder's part of (6), each from its formula in the paper."""
    R, E, D = obj.id_loss.embedder, obj.threedmm.encoder, obj.discriminator
    cos = (R(x_swap) * R(x_src)).sum(1) / (R(x_swap).norm(dim=1) * R(x_src).norm(dim=1))
    s, p, e = E(x_swap), E(x_src), E(x_tgt)
    terms = {
        "id": (1 - cos).mean(),  # (1)
        "l1": (x_swap - x_tgt).abs().mean(),  # (2), its L1 ...
        "lpips": obj.recon.lpips(x_swap, x_tgt).mean(),  # ... and LPIPS
        "adv": F.softplus(-D(x_swap)).mean(),  # non-saturating: -log sigmoid(D(x_swap))
        "shape": torch.linalg.vector_norm(s.shape - p.shape, dim=1).mean(),  # (3)
        "pose": torch.linalg.vector_norm(s.pose - e.pose, dim=1).mean(),  # (4)
        "exp": torch.linalg.vector_norm(s.exp - e.exp, dim=1).mean(),  # (5)
    }
    return sum(getattr(w, k) * v for k, v in terms.items()), terms


def test_with_every_extra_off_the_loss_is_eq6_of_the_paper_terms():
    paper = yaml.safe_load((Path(__file__).parents[1] / "configs" / "paper.yaml").read_text())["loss"]
    off = {k: paper[k] for k in ("recon_cross_identity", *EXTRA_TERMS)}
    assert off == {"recon_cross_identity": 1.0, "background_l1": 0.0, "gt_swap": 0.0}  # paper scale: extras off
    w = loss_weights(**PAPER, **off)
    obj = objective(w)
    b = batch()
    x_swap = torch.rand(4, 3, RES, RES, generator=torch.Generator().manual_seed(9)) * 2 - 1
    # a batch with everything an extra could use (same_identity flags, ground-truth swaps): none of it may count
    with torch.no_grad():
        total, terms = obj.encoder_terms(x_swap, b["src"], b["tgt"], b["same_identity"], b["gt"], b["has_gt"])
        want_total, want = eq6_by_hand(obj, w, x_swap, b["src"], b["tgt"])
    assert set(terms) == set(PAPER_TERMS)
    for k in PAPER_TERMS:
        assert float(terms[k]) == pytest.approx(float(want[k]), rel=1e-6, abs=1e-7), k
    assert float(total) == pytest.approx(float(want_total), rel=1e-6)
    # an extra switched on adds exactly its own weighted term on top of eq. (6)
    w2 = dataclasses.replace(w, background_l1=0.4, gt_swap=0.3)
    with torch.no_grad():
        total2, terms2 = objective(w2).encoder_terms(x_swap, b["src"], b["tgt"], b["same_identity"], b["gt"],
                                                     b["has_gt"])
    assert set(terms2) == set(ENCODER_TERMS)
    extra = 0.4 * terms2["background_l1"] + 0.3 * terms2["gt_swap"]
    assert float(total2) == pytest.approx(float(want_total + extra), rel=1e-6)


def test_encoder_terms_are_the_paper_terms_and_the_extras_and_exactly_what_a_step_logs():
    assert ENCODER_TERMS == PAPER_TERMS + EXTRA_TERMS and not set(PAPER_TERMS) & set(EXTRA_TERMS)
    assert sorted(COMPUTED_ORDER) == sorted(ENCODER_TERMS)
    assert set(ENCODER_TERMS) <= {f.name for f in dataclasses.fields(LossWeights)}
    w = loss_weights(**PAPER, r1=1.0, r1_every=1, recon_cross_identity=1.0, background_l1=0.5, gt_swap=0.5)
    torch.manual_seed(0)
    model = MFIM(StubGenerator(RES, channels=8, w_dim=8), unit_encoder(RES, width=8,
                 style_map_resolutions=(8,)), coarse_max_res=4)
    tr = Trainer(model, objective(w), train_config(lr=1e-3, d_lr=1e-3, log_every=1), torch.device("cpu"))
    logs = tr.train_step([batch()])
    discriminator = {"d_adv", "r1"}
    assert set(logs) - {"loss"} - discriminator == set(ENCODER_TERMS)
    assert [k for k in logs if k in ENCODER_TERMS] == list(COMPUTED_ORDER)  # what loss_shares sums in
