"""The faces' own landmarks reach DECA's crop: shard -> pair batch (resized, flipped) -> objective (the swap cropped
with the target's landmarks) and shard -> 3DMM table. Pixel-index landmarks resize as (x + 0.5) s - 0.5."""

from __future__ import annotations

import numpy as np
import torch

import mfim.data.shards as S
from mfim.criteria.threedmm_loss import ThreeDMMLoss
from mfim.data import threedmm_table as T
from mfim.data.augment import flip_landmarks
from mfim.data.pairs import pair_batches
from mfim.nets.types import ThreeDMMParams
from mfim.training.objective import MFIMObjective
from tests.test_shards import fixture_image, fixture_meta
from tests.defaults import loss_weights

NO_LANDMARKS = "train/00001_01"


def write_shards(out_dir, size: int = 32) -> dict[str, np.ndarray | None]:
    """Shards as build_shards writes them (landmarks with the ``resolution`` they are in); one sample has none."""
    landmarks, samples = {}, []
    for i in range(8):
        key = f"train/{i // 4:05d}_{i % 4:02d}"
        meta = {**fixture_meta(i, i // 4), "key": key, "resolution": size}
        if key == NO_LANDMARKS:
            meta["landmarks"] = None
        landmarks[key] = None if meta["landmarks"] is None else np.asarray(meta["landmarks"], np.float64)
        samples.append((key, fixture_image(i, size), meta))
    S.write_split_shards(samples, out_dir, "train", 10**9)
    return landmarks


def test_pair_batches_carry_landmarks_resized_and_flipped_with_the_image(tmp_path):
    truth = write_shards(tmp_path)
    pattern = str(tmp_path / "train-*.tar")
    for augment, flip in ((False, 0.0), (True, 1.0)):
        b = next(pair_batches(pattern, None, batch_size=8, seed=0, same_identity_fraction=0.0, resolution=64,
                              augment=augment, flip_probability=flip))
        assert b["tgt_landmarks"].shape == b["src_landmarks"].shape == (8, 68, 2)
        for role in ("src", "tgt"):
            for key, got in zip(b[f"{role}_key"], b[f"{role}_landmarks"].numpy()):
                if truth[key] is None:
                    assert np.isnan(got).all()
                    continue
                want = (truth[key] + 0.5) * 2.0 - 0.5  # 32 -> 64 px
                want = flip_landmarks(want, 64) if flip else want
                assert np.allclose(got, want, atol=1e-4), (role, key, augment)


class LandmarkSpy(torch.nn.Module):
    """A 3DMM encoder that crops from landmarks: records what it is given; parameters from the image mean."""

    takes_landmarks = True

    def __init__(self):
        super().__init__()
        self.calls: list[tuple[int, object]] = []

    def forward(self, x, landmarks=None):
        self.calls.append((x.shape[-1], None if landmarks is None else torch.as_tensor(landmarks).clone()))
        m = x.mean(dim=(2, 3))
        return ThreeDMMParams(m[:, :1].repeat(1, 4), m[:, 1:2].repeat(1, 3), m)


def test_objective_crops_source_target_and_swap_with_their_landmarks():
    spy = LandmarkSpy()
    w = loss_weights(id=0.0, l1=0.0, lpips=0.0, adv=0.0, shape=1.0, pose=1.0, exp=1.0, recon_cross_identity=1.0,
                     background_l1=0.0)
    objective = MFIMObjective(w, threedmm=ThreeDMMLoss(spy))
    g = torch.Generator().manual_seed(0)
    x_src, x_tgt = torch.rand(2, 3, 32, 32, generator=g), torch.rand(2, 3, 32, 32, generator=g)
    x_swap = torch.rand(2, 3, 128, 128, generator=g, requires_grad=True)  # the generator's size, 4x the data's
    src_lm, tgt_lm = torch.rand(2, 68, 2, generator=g) * 31, torch.rand(2, 68, 2, generator=g) * 31
    objective.encoder_terms(x_swap, x_src, x_tgt, src_landmarks=src_lm, tgt_landmarks=tgt_lm)
    by_size = {}
    for size, lm in spy.calls:
        by_size.setdefault(size, []).append(lm)
    src_call, tgt_call = by_size[32]
    assert torch.equal(src_call, src_lm) and torch.equal(tgt_call, tgt_lm)
    # the swap keeps the target's pose: the target's landmarks, resized to the swap (pixel centre 0 -> 1.5 at 4x)
    assert torch.allclose(by_size[128][0], (tgt_lm + 0.5) * 4 - 0.5)
    # without landmarks every crop is the canonical one, as before
    spy.calls.clear()
    objective.encoder_terms(x_swap, x_src, x_tgt)
    assert [lm for _, lm in spy.calls] == [None, None, None]


def test_threedmm_table_gives_the_encoder_each_samples_landmarks(tmp_path):
    truth = write_shards(tmp_path)
    spy = LandmarkSpy()
    df = T.precompute_threedmm([str(tmp_path / "train-*.tar")], spy, "stub", batch_size=8)
    (size, got), = spy.calls
    assert size == 32 and got.shape == (8, 68, 2)
    for key, lm in zip(df["key"], got.numpy()):
        if truth[key] is None:
            assert np.isnan(lm).all()
        else:
            assert np.allclose(lm, truth[key], atol=1e-5)
