"""Pair sampling, the 3DMM join, and the label-keeping augmentations (the flip negates yaw and roll)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from mfim.data.augment import IBUG68_MIRROR, FaceAugment, flip_landmarks, flip_pose
from mfim.data.pairs import pair_batches
from mfim.data.threedmm_table import write_table
from tests.test_shards import make_fixture_shards


def identity_of(key: str) -> int:
    return int(key.split("/")[1].split("_")[0])


def test_same_identity_fraction_and_pair_semantics(tmp_path):
    make_fixture_shards(tmp_path, n_identities=8, per_identity=4)
    it = pair_batches(str(tmp_path / "train-*.tar"), None, batch_size=16, seed=0, same_identity_fraction=0.3)
    same, n = 0, 0
    for _ in range(25):
        b = next(it)
        assert b["src"].shape == b["tgt"].shape == (16, 3, 32, 32)
        for s, t, flag in zip(b["src_key"], b["tgt_key"], b["same_identity"].tolist()):
            assert flag == (identity_of(s) == identity_of(t))
            if flag:
                assert s != t  # another image of the identity (each has 4)
        same += int(b["same_identity"].sum())
        n += 16
    assert abs(same / n - 0.3) < 0.06  # 400 draws: ±3σ ≈ 0.07


def test_without_identities_the_same_pair_is_the_target_itself(tmp_path):
    make_fixture_shards(tmp_path, n_identities=4, per_identity=4, identities_known=False)
    pattern = str(tmp_path / "train-*.tar")
    b = next(pair_batches(pattern, None, batch_size=16, seed=0, same_identity_fraction=1.0))
    assert b["src_key"] == b["tgt_key"] and torch.equal(b["src"], b["tgt"]) and bool(b["same_identity"].all())
    b = next(pair_batches(pattern, None, batch_size=16, seed=0, same_identity_fraction=0.0))
    assert all(s != t for s, t in zip(b["src_key"], b["tgt_key"])) and not bool(b["same_identity"].any())


def test_targets_are_disjoint_across_ranks_and_resume_exactly(tmp_path):
    make_fixture_shards(tmp_path, n_identities=6, per_identity=4)
    pattern = str(tmp_path / "train-*.tar")
    keys = []
    for rank in range(2):
        it = pair_batches(pattern, None, batch_size=4, seed=1, rank=rank, world=2, augment=True)
        keys.append([k for _ in range(3) for k in next(it)["tgt_key"]])
    assert len(set(keys[0])) == 12 and not set(keys[0]) & set(keys[1])
    it = pair_batches(pattern, None, batch_size=5, seed=1, augment=True)
    next(it), next(it)
    pos = it.position.as_dict()
    want = next(it)
    got = next(pair_batches(pattern, None, batch_size=5, seed=1, augment=True, position=pos))
    assert got["src_key"] == want["src_key"] and torch.equal(got["src"], want["src"])
    assert torch.equal(got["tgt"], want["tgt"]) and torch.equal(got["same_identity"], want["same_identity"])


def _table_for(samples: dict, path):
    rows = []
    for k, (_, meta) in samples.items():
        gt = meta["ground_truth"]
        rows.append({"key": k, "split": "train", "identity": meta["identity"], "encoder": "test",
                     "shape": np.asarray(gt["shape"], np.float32) + 1, "exp": np.asarray(gt["exp"], np.float32),
                     "pose": np.asarray(gt["pose"], np.float32) * 0.5, "gt_shape": np.asarray(gt["shape"], np.float32),
                     "gt_exp": np.asarray(gt["exp"], np.float32), "gt_pose": np.asarray(gt["pose"], np.float32)})
    write_table(pd.DataFrame(rows), path)


def test_3dmm_labels_join_by_key_and_flip_with_the_image(tmp_path):
    samples = make_fixture_shards(tmp_path, n_identities=4, per_identity=3)
    table = tmp_path / "params.parquet"
    _table_for(samples, table)
    pattern = str(tmp_path / "train-*.tar")
    b = next(pair_batches(pattern, str(table), batch_size=6, seed=0, threedmm_columns="ground_truth"))
    for role in ("src", "tgt"):
        for j, key in enumerate(b[f"{role}_key"]):
            gt = samples[key][1]["ground_truth"]
            p = b[f"{role}_3dmm"]
            assert torch.allclose(p.shape[j], torch.tensor(gt["shape"], dtype=torch.float32))
            assert torch.allclose(p.pose[j], torch.tensor(gt["pose"], dtype=torch.float32))
    est = next(pair_batches(pattern, str(table), batch_size=6, seed=0))["tgt_3dmm"]
    assert torch.allclose(est.shape, b["tgt_3dmm"].shape + 1)  # the estimate columns are another set
    flipped = next(pair_batches(pattern, str(table), batch_size=6, seed=0, augment=True, flip_probability=1.0,
                                threedmm_columns="ground_truth"))
    assert flipped["tgt_key"] == b["tgt_key"]
    for role in ("src", "tgt"):
        want = b[f"{role}_3dmm"].pose * torch.tensor([-1.0, 1.0, -1.0])
        assert torch.allclose(flipped[f"{role}_3dmm"].pose, want)
        assert torch.equal(flipped[f"{role}_3dmm"].shape, b[f"{role}_3dmm"].shape)


# ------------------------------------------------------------------------------------------------- augmentation


def test_flip_negates_yaw_and_roll_and_mirrors_landmarks():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    lms = rng.uniform(0, 31, (68, 2)).astype(np.float32)
    pose = np.array([0.3, 0.1, -0.2], np.float32)
    out = FaceAugment(flip_probability=1.0, photometric=False)(image, rng, landmarks=lms, pose=pose)
    assert out.flipped and np.array_equal(out.image, image[:, ::-1])
    assert np.allclose(out.pose, [-0.3, 0.1, 0.2])
    assert np.allclose(out.landmarks, flip_landmarks(lms, 32))
    # a landmark moves to its mirror partner's slot: the left eye corner 36 becomes the right one 45
    assert np.allclose(out.landmarks[45], [31 - lms[36, 0], lms[36, 1]])
    assert np.allclose(flip_landmarks(flip_landmarks(lms, 32), 32), lms)
    assert np.allclose(flip_pose(torch.tensor(pose)).numpy(), out.pose)
    never = FaceAugment(photometric=False)(image, rng, landmarks=lms, pose=pose)
    assert not never.flipped and np.array_equal(never.image, image) and np.array_equal(never.pose, pose)


def test_ibug_mirror_is_an_involution_fixing_the_midline():
    assert sorted(IBUG68_MIRROR.tolist()) == list(range(68))
    assert np.array_equal(IBUG68_MIRROR[IBUG68_MIRROR], np.arange(68))
    fixed = set(np.flatnonzero(IBUG68_MIRROR == np.arange(68)).tolist())
    assert fixed == {8, 27, 28, 29, 30, 33, 51, 57, 62, 66}  # chin, nose ridge and tip, lip centres


def test_flip_maps_a_symmetric_face_onto_itself():
    from mfim.nets.align import canonical_landmarks

    lms = canonical_landmarks(256)  # the dlib mean face: left-right symmetric about the crop centre
    assert np.abs(flip_landmarks(lms, 256) - lms).max() < 0.05 * 256 / 100 + 1e-3


def test_photometric_augmentation_is_seeded_and_moves_no_pixel():
    rng_img = np.random.default_rng(1)
    image = np.zeros((32, 32, 3), np.uint8)
    image[8:24, 8:24] = rng_img.integers(60, 200, (16, 16, 3))
    aug = FaceAugment(strength=1.0)
    a = aug(image, np.random.default_rng(7)).image
    b = aug(image, np.random.default_rng(7)).image
    assert np.array_equal(a, b)
    outs = [aug(image, np.random.default_rng(s)).image for s in range(8)]
    assert any(not np.array_equal(o, image) for o in outs)
    # geometry stays: the bright square's edges are where they were (labels remain true)
    for o in outs:
        inside = o[9:23, 9:23].astype(float).mean()
        outside = o[:6].astype(float).mean()
        assert inside > outside + 30


def test_one_identity_split_says_why_no_cross_pair_exists(tmp_path):
    from mfim.data.pairs import EpochPlan, PairItems
    from mfim.data.shards import CorruptSample, ShardIndex

    make_fixture_shards(tmp_path, n_identities=1, per_identity=3)
    index = ShardIndex(str(tmp_path / "train-*.tar"))
    items = PairItems(index, EpochPlan(len(index), 0), None, same_identity_fraction=0.0)
    with pytest.raises(CorruptSample, match="holds 1 identity; a pair of different people needs two"):
        items.choose_source(0, np.random.default_rng(0))


def test_self_pairs_are_the_augmented_target_itself_and_drawn_before_same_identity(tmp_path):
    make_fixture_shards(tmp_path, n_identities=8, per_identity=4)
    pattern = str(tmp_path / "train-*.tar")
    b = next(pair_batches(pattern, None, batch_size=16, seed=0, augment=True, self_pair_fraction=1.0))
    assert b["src_key"] == b["tgt_key"] and torch.equal(b["src"], b["tgt"]) and bool(b["same_identity"].all())
    it = pair_batches(pattern, None, batch_size=16, seed=0, augment=True, self_pair_fraction=0.5,
                      same_identity_fraction=0.0)
    kinds = {"self": 0, "cross": 0}
    for _ in range(20):
        b = next(it)
        for s, t, flag in zip(b["src_key"], b["tgt_key"], b["same_identity"].tolist()):
            assert flag == (s == t)  # no other-render pairs at same_identity_fraction 0
            kinds["self" if s == t else "cross"] += 1
    assert abs(kinds["self"] / 320 - 0.5) < 0.09  # 320 draws: ±3σ ≈ 0.084
    with pytest.raises(ValueError, match="self_pair_fraction"):
        pair_batches(pattern, None, batch_size=4, seed=0, self_pair_fraction=1.5)
    # 0 draws nothing extra: the pairs are those of a run without the option
    want = next(pair_batches(pattern, None, batch_size=8, seed=3, augment=True))
    got = next(pair_batches(pattern, None, batch_size=8, seed=3, augment=True, self_pair_fraction=0.0))
    assert got["src_key"] == want["src_key"] and torch.equal(got["src"], want["src"])
