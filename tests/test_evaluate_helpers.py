"""Evaluation helpers on hand-built cases: identity separation of the evaluator, retrieval gallery grouping."""

import numpy as np
import pandas as pd
import pytest

from mfim.evaluation.tables import identity_separation, source_groups


def test_identity_separation_known_answer():
    pairs = pd.DataFrame({"source_identity": [0, 1, 2], "target_identity": [1, 0, 0],
                          "source_key": ["a", "b", "c"], "target_key": ["b", "a", "d"]})
    feats = {"a": [0, 0], "b": [5, 0], "c": [0, 9], "d": [0.5, 0]}
    out = identity_separation(pairs, np.array([feats[k] for k in pairs.source_key]),
                              np.array([feats[k] for k in pairs.target_key]))
    np.testing.assert_allclose(out["identity_distance_same_person"], [0.5])  # a and d are identity 0
    assert len(out["identity_distance_different_people"]) == 5  # 4 unique images: 6 pairs, 1 same
    assert out["identity_verification_auc"][0] == 1.0


def test_identity_separation_needs_labels():
    pairs = pd.DataFrame({"source_identity": [-1], "target_identity": [-1], "source_key": ["a"], "target_key": ["b"]})
    assert identity_separation(pairs, np.zeros((1, 2)), np.ones((1, 2))) == {}


def test_source_groups_use_labels_or_video():
    labelled = pd.DataFrame({"source_identity": [3, 5, 3], "source_key": ["x", "y", "z"], "source_frame_index": [-1] * 3})
    np.testing.assert_array_equal(source_groups(labelled), [3, 5, 3])
    ffpp = pd.DataFrame({"source_identity": [-1] * 4, "source_key": ["ffpp/001/0000", "ffpp/001/0030", "ffpp/002/0000",
                         "ffpp/001/0060"], "source_frame_index": [0, 30, 0, 60]})
    g = source_groups(ffpp)
    assert g[0] == g[1] == g[3] != g[2]
    stills = pd.DataFrame({"source_identity": [-1] * 2, "source_key": ["celebahq/1", "celebahq/2"],
                           "source_frame_index": [-1, -1]})
    g = source_groups(stills)
    assert g[0] != g[1]


def test_pose_vector_takes_the_jaw_only_when_asked_and_only_from_flame():
    import torch

    from mfim.evaluation.evaluators import pose_vector
    from mfim.nets.deca import FLAMEParams
    from mfim.nets.types import ThreeDMMParams

    pose, jaw = torch.randn(2, 3), torch.randn(2, 3)
    flame = FLAMEParams(torch.zeros(2, 100), torch.zeros(2, 50), pose, jaw=jaw)
    assert torch.equal(pose_vector(flame), pose)
    assert torch.equal(pose_vector(flame, jaw=True), torch.cat([pose, jaw], 1))
    with pytest.raises(ValueError, match="no jaw"):
        pose_vector(ThreeDMMParams(torch.zeros(2, 40), torch.zeros(2, 10), pose), jaw=True)


def _features(n: int, shape: np.ndarray, exp: np.ndarray):
    from mfim.evaluation.evaluators import Features

    z = np.zeros((n, 3))
    return Features(identity=z, shape=shape, exp=exp, pose=z, pose_hn=z, id_train=z)


def test_ground_truth_errors_measure_each_evaluator_on_the_unswapped_targets_once():
    from mfim.evaluation.tables import ground_truth_errors

    rng = np.random.default_rng(0)
    keys = ["t0", "t1", "t2", "t3", "t0"]  # t0 twice: its row must count once
    gt = {k: {"yaw": 0.0, "pitch": 0.0, "roll": 0.0, "shape": rng.normal(size=40).tolist(),
              "exp": rng.normal(size=10).tolist()} for k in dict.fromkeys(keys)}
    pairs = pd.DataFrame({"target_key": keys})
    exact_exp = np.array([gt[k]["exp"] for k in keys])
    negated_shape = -np.array([gt[k]["shape"][:10] for k in keys])
    tgt = _features(len(keys), negated_shape, 2.0 * exact_exp + 1.0)  # r is scale- and offset-free
    _, ev = ground_truth_errors(pairs, tgt, tgt, gt)
    np.testing.assert_allclose(ev["exp_pearson_r_on_real"], np.ones(10))
    np.testing.assert_allclose(ev["shape_pearson_r_on_real"], -np.ones(10))
    # a 3DMM whose expression has other coefficients (FLAME's 50) is not compared with BFM's 10
    _, ev = ground_truth_errors(pairs, _features(len(keys), negated_shape, np.zeros((len(keys), 50))), tgt, gt)
    assert "exp_pearson_r_on_real" not in ev and "shape_pearson_r_on_real" in ev


def test_evaluator_choice_is_the_regressor_or_the_3dmm_encoder():
    from types import SimpleNamespace

    from mfim.evaluation.evaluators import Evaluators

    me = SimpleNamespace(threedmm_name="tddfa")
    pick = lambda v: Evaluators._regressor_or_3dmm(me, {"evaluate": {"expression_encoder": v}}, "expression_encoder")  # noqa: E731
    assert pick("evaluator") == "evaluator" and pick("") == "tddfa" and pick("tddfa") == "tddfa"
    with pytest.raises(ValueError, match="evaluate.expression_encoder must be 'evaluator' or empty"):
        pick("deca")


def test_evaluators_given_the_workers_dlib_embeddings_return_their_own_features():
    """The real evaluation networks (dlib, 3DDFA_V2, Hopenet, MobileFaceNet): features(x, identity=what a worker's
    dlib took from the uint8 image) equals features(x), every column bit for bit, over a partial last batch."""
    import torch

    from mfim.evaluation.evaluators import Evaluators
    from mfim.evaluation.features import dlib_embed
    from mfim.evaluation.grids import to_uint8

    from tests.defaults import EVAL_BASE, params_with

    ev = Evaluators(params_with(EVAL_BASE), batch_size=3)  # 3DDFA_V2's shape and expression, every coefficient
    x = torch.rand(5, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    own, given = ev.features(x), ev.features(x, identity=dlib_embed(to_uint8(x)))
    for name in ("identity", "shape", "exp", "pose", "pose_hn", "id_train"):
        np.testing.assert_array_equal(getattr(given, name), getattr(own, name), err_msg=name)
