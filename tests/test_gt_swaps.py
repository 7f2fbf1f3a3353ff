"""Ground-truth swaps of the synthetic protocol: the source's person in the target's scene, exactly; deterministic
and resumable batch rows; the objective's gt_swap term sees only the rows that have a ground truth."""

import numpy as np
import pytest
import torch

from mfim.data.gt_swaps import (BatchesWithGtRows, GtSwapRows, draw_triples, load_gt_swap_set,
                                render_triple, save_gt_swap_set, with_gt_rows)
from mfim.data.synth import Synthesizer
from tests.defaults import loss_weights, gt_swap_config, synth_config

SMALL = synth_config(canvas=96, supersample=1, identities_train=6, identities_eval=2, images_per_identity=8)


@pytest.fixture(scope="module")
def synth():
    return Synthesizer(SMALL)


def test_a_person_in_another_scene_keeps_the_scene_and_changes_the_face(synth):
    a, b = synth.identity(0), synth.identity(1)
    own, _ = synth.render(a, 3)
    again, _ = synth.render(a, 3, scene=0)  # its own scene named explicitly: the same render, bit for bit
    np.testing.assert_array_equal(own.image, again.image)
    target, t_spec = synth.render(b, 3)
    swap, s_spec = synth.render(a, 3, scene=1)
    np.testing.assert_array_equal(t_spec.exp, s_spec.exp)
    np.testing.assert_array_equal(t_spec.pose, s_spec.pose)
    np.testing.assert_array_equal(swap.pose_matrix, target.pose_matrix)  # the same camera
    # background and grain are the target's wherever neither face covers the pixel (anti-aliased rims aside)
    outside = ~(swap.mask | target.mask)
    outside[1:-1, 1:-1] &= outside[:-2, 1:-1] & outside[2:, 1:-1] & outside[1:-1, :-2] & outside[1:-1, 2:]
    np.testing.assert_array_equal(swap.image[outside], target.image[outside])
    inside = swap.mask & target.mask
    assert np.abs(swap.image[inside].astype(int) - target.image[inside]).mean() > 5  # another person's face
    assert not np.allclose(swap.landmarks, target.landmarks)  # another face shape


def test_triples_pair_two_training_people(synth):
    cfg = gt_swap_config(pairs=50, first_index=100)
    train = [i for i, s in SMALL.identities() if s == "train"]
    t = draw_triples(train, cfg)
    assert t.shape == (50, 4) and (t[:, 0] != t[:, 1]).all()
    assert set(t[:, :2].ravel()) <= set(train)  # never an eval person
    assert (t[:, 2:] >= 100).all() and len(set(t[:, 2:].ravel())) == 100  # unseen scenes, each used once
    np.testing.assert_array_equal(t, draw_triples(train, cfg))
    with pytest.raises(ValueError, match="2 training people"):
        draw_triples([3], cfg)
    src, tgt, gt = render_triple(synth, t[0], 32)
    assert src.shape == tgt.shape == gt.shape == (32, 32, 3)
    # the swap shares the target's crop: same background at the corners, a different face
    np.testing.assert_array_equal(gt[:3, :3], tgt[:3, :3])
    assert np.abs(gt[12:20, 12:20].astype(int) - tgt[12:20, 12:20]).mean() > 3


def fake_set(n=6, size=8):
    rng = np.random.default_rng(0)
    tgt = rng.integers(0, 255, (n, size, size, 3), dtype=np.uint8)
    return {"src": rng.integers(0, 255, (n, size, size, 3), dtype=np.uint8), "tgt": tgt, "gt": tgt.copy(),
            "source_identity": np.arange(n), "target_identity": np.arange(n) + 1}


def test_rows_flip_target_and_swap_together_and_resume_from_the_draw_count(tmp_path):
    path = save_gt_swap_set(fake_set(), tmp_path / "t.npz")
    data = load_gt_swap_set(path)
    rows = GtSwapRows(data, k=4, seed=3)
    drawn = [rows.next() for _ in range(5)]
    flipped = 0
    for r in drawn:
        torch.testing.assert_close(r["gt"], r["tgt"], rtol=0, atol=0)  # gt == tgt here: flipped together
        flipped += int(not any(torch.equal(r["tgt"][0], torch.from_numpy(d).permute(2, 0, 1).float() / 127.5 - 1)
                               for d in data["tgt"]))
    assert 0 < flipped < 5  # some draws mirror, some do not
    again = GtSwapRows(data, k=4, seed=3, drawn=3)  # a resumed run: draws 3 and 4 again, exactly
    for want in drawn[3:]:
        got = again.next()
        for k in ("src", "tgt", "gt"):
            torch.testing.assert_close(got[k], want[k], rtol=0, atol=0)
    with pytest.raises(ValueError, match="gt_swaps.pairs"):
        GtSwapRows(data, k=7, seed=0)  # fewer triples than a batch takes (e.g. the default's empty set)
    batch = {"src": torch.zeros(2, 3, 8, 8), "tgt": torch.zeros(2, 3, 8, 8), "same_identity": torch.tensor([True, False]),
             "src_key": ["a", "b"], "tgt_key": ["a", "c"]}
    merged = with_gt_rows(batch, drawn[0])
    assert merged["src"].shape[0] == 6 and merged["has_gt"].tolist() == [False, False, True, True, True, True]
    assert merged["same_identity"].tolist() == [True, False, False, False, False, False]
    assert len(merged["tgt_key"]) == 6

    class Pairs:  # stands in for pair_batches' iterator
        pos = 0

        def __next__(self):
            self.pos += 1
            return batch

        def state_dict(self):
            return {"pos": self.pos}

    rows = GtSwapRows(data, k=4, seed=3)
    wrapped = BatchesWithGtRows(Pairs(), rows)
    first = next(wrapped)
    torch.testing.assert_close(first["gt"][2:], drawn[0]["gt"], rtol=0, atol=0)
    next(wrapped)
    assert wrapped.state_dict() == {"pos": 2} and rows.drawn == 2  # what run_training saves to resume


def test_a_file_that_is_not_a_set_is_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match="gt_swaps"):
        load_gt_swap_set(tmp_path / "missing.npz")
    np.savez(tmp_path / "other.npz", src=np.zeros(1))
    with pytest.raises(ValueError, match="lacks"):
        load_gt_swap_set(tmp_path / "other.npz")


def test_gt_swap_term_sees_only_rows_with_a_ground_truth():
    from tests.test_training import ONLY, build, fixed_batch

    tr = build(loss_weights(**{**ONLY, "gt_swap": 1.0}))
    b = fixed_batch()
    x_swap = tr.model(b["src"], b["tgt"])
    _, none = tr.objective.encoder_terms(x_swap, b["src"], b["tgt"])
    assert "gt_swap" not in none  # no ground truth in the batch: no term
    gt = torch.rand_like(b["tgt"]) * 2 - 1
    has = torch.tensor([False, False, True, True])
    total, terms = tr.objective.encoder_terms(x_swap, b["src"], b["tgt"], None, gt, has)
    want = float((x_swap[2:] - gt[2:]).abs().mean().detach())  # L1 only: this objective has no LPIPS network
    assert float(terms["gt_swap"].detach()) == pytest.approx(want, rel=1e-5)
    assert float(total.detach()) == pytest.approx(want, rel=1e-5)
    x = x_swap.detach().requires_grad_(True)
    tr.objective.encoder_terms(x, b["src"], b["tgt"], None, gt, has)[0].backward()
    assert float(x.grad[:2].abs().max()) == 0.0 and float(x.grad[2:].abs().min()) > 0  # rows without gt: none
    _, exact = tr.objective.encoder_terms(x_swap, b["src"], b["tgt"], None, x_swap.detach(), has)
    assert float(exact["gt_swap"].detach()) == 0.0


def test_face_region_asks_for_the_face_alone():
    from mfim.criteria.id_loss import IDLoss
    from mfim.criteria.recon_loss import ReconLoss
    from mfim.training.objective import MFIMObjective
    from tests.stubs import StubEmbedder

    w = loss_weights(id=0.0, l1=0.0, lpips=0.0, adv=0.0, r1=0.0, shape=0.0, pose=0.0, exp=0.0, gt_swap=1.0,
                     recon_cross_identity=1.0, background_l1=0.0)
    with pytest.raises(ValueError, match="gt_swap_region"):
        MFIMObjective(w, recon=ReconLoss(None), gt_swap_region="hair")
    obj = MFIMObjective(w, id_loss=IDLoss(StubEmbedder()), recon=ReconLoss(None), gt_swap_region="face")
    gt = torch.zeros(2, 3, 32, 32)
    x = torch.full((2, 3, 32, 32), 0.5, requires_grad=True)
    has = torch.tensor([True, True])
    total, terms = obj.encoder_terms(x, gt, gt, None, gt, has)
    outside = obj.gt_face.background(32, "cpu", torch.float32)
    assert float(terms["gt_swap"].detach()) == pytest.approx(0.5 * float((1 - outside).mean()), rel=1e-5)
    total.backward()
    assert float(x.grad[:, :, outside[0, 0] == 1].abs().max()) == 0.0  # the scene is not asked for
    assert float(x.grad[:, :, 16, 16].abs().min()) > 0  # the face is


def test_gt_swap_id_target_compares_with_the_truth_on_its_rows():
    import torch.nn.functional as F

    from mfim.criteria.id_loss import IDLoss
    from mfim.criteria.recon_loss import ReconLoss
    from mfim.training.objective import MFIMObjective
    from tests.stubs import StubEmbedder

    w = loss_weights(id=1.0, l1=0.0, lpips=0.0, adv=0.0, r1=0.0, shape=0.0, pose=0.0, exp=0.0,
                     recon_cross_identity=1.0, background_l1=0.0)
    g = torch.Generator().manual_seed(0)
    x_swap, x_src = (torch.rand(4, 3, 16, 16, generator=g) * 2 - 1 for _ in range(2))
    has = torch.tensor([False, True, False, True])
    obj = MFIMObjective(w, id_loss=IDLoss(StubEmbedder()), recon=ReconLoss(None), gt_swap_id_target=True)
    _, terms = obj.encoder_terms(x_swap, x_src, x_src, None, x_swap.clone(), has)  # the truth is the swap itself
    emb = obj.id_loss.embedder
    per_row = 1 - F.cosine_similarity(emb(x_swap), emb(x_src), dim=1)
    want = float(per_row[~has].sum() / 4)  # rows with a truth contribute 0: the swap is their target
    assert float(terms["id"].detach()) == pytest.approx(want, rel=1e-5)
    plain = MFIMObjective(w, id_loss=IDLoss(StubEmbedder()), recon=ReconLoss(None))  # off: the source, as eq. (1)
    _, eq1 = plain.encoder_terms(x_swap, x_src, x_src, None, x_swap.clone(), has)
    assert float(eq1["id"].detach()) == pytest.approx(float(per_row.mean().detach()), rel=1e-5)
