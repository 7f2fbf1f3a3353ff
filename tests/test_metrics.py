"""Metrics on hand-built cases with known answers."""

import numpy as np
import pytest

from mfim.evaluation.metrics import (
    angle_error_deg,
    bootstrap_ci,
    cosine_similarity,
    id_retrieval,
    l2_distance,
    relative_distance,
)


def test_identical_inputs_give_zero_distance(rng):
    e = rng.normal(size=(5, 128))
    assert np.all(l2_distance(e, e) == 0)
    np.testing.assert_allclose(cosine_similarity(e, e), 1.0)


def test_l2_distance_value():
    np.testing.assert_allclose(l2_distance([[0, 0], [1, 1]], [[3, 4], [1, 1]]), [5.0, 0.0])
    with pytest.raises(ValueError):
        l2_distance(np.zeros((2, 3)), np.zeros((2, 4)))


def test_relative_distances_sum_to_one(rng):
    d_gb, d_lc = rng.uniform(0.1, 2, 50), rng.uniform(0.1, 2, 50)
    r_gb, r_lc = relative_distance(d_gb, d_lc)
    np.testing.assert_allclose(r_gb + r_lc, 1.0)
    assert relative_distance([1.0], [3.0])[0][0] == pytest.approx(0.25)
    assert relative_distance([0.0], [0.0])[0][0] == 0.5


def test_id_retrieval_known_answer(rng):
    gallery = rng.normal(size=(4, 16))
    swaps = gallery[[2, 0, 3]] + 0.01 * rng.normal(size=(3, 16))
    np.testing.assert_array_equal(id_retrieval(swaps, gallery, [2, 0, 3]), [1, 1, 1])
    np.testing.assert_array_equal(id_retrieval(swaps, gallery, [2, 1, 3]), [1, 0, 1])


def test_bootstrap_interval_contains_mean_and_shrinks_with_n(rng):
    small = bootstrap_ci(rng.normal(1.0, 1.0, 20))
    large = bootstrap_ci(rng.normal(1.0, 1.0, 2000))
    for r in (small, large):
        assert r["ci_low"] <= r["mean"] <= r["ci_high"]
    assert (large["ci_high"] - large["ci_low"]) < (small["ci_high"] - small["ci_low"]) / 5
    assert bootstrap_ci([])["n"] == 0


def test_bootstrap_in_blocks_is_the_single_draw_interval(rng, monkeypatch):
    """Blocks of replicates bound memory; the interval must stay the one a single (n_boot, n) draw gives."""
    from mfim.evaluation import metrics

    v = rng.normal(size=1001)
    single = np.random.default_rng(3).integers(0, v.size, size=(200, v.size))
    lo, hi = np.quantile(v[single].mean(axis=1), [0.025, 0.975])
    monkeypatch.setattr(metrics, "BOOTSTRAP_BLOCK", 3 * v.size + 5)  # 3 replicates a block, 200 % 3 left over
    blocked = bootstrap_ci(v, n_boot=200, seed=3)
    assert (blocked["ci_low"], blocked["ci_high"]) == (lo, hi)


def test_angle_error_wraps():
    a = np.radians([[179.0, 0, 0]])
    b = np.radians([[-179.0, 0, 0]])
    np.testing.assert_allclose(angle_error_deg(a, b), [2.0], atol=1e-9)


def test_chunked_float32_retrieval_is_the_full_float64_matrix(rng):
    """Chunks of swaps against the gallery must give what one float64 swaps x gallery matrix gives (scipy's cosine
    distance as the independent path), near ties included."""
    from scipy.spatial.distance import cdist

    gallery = rng.normal(size=(300, 128))
    gallery[7] = gallery[3]  # an exact tie: the first row wins, as argmax over the full matrix picks it
    gallery[12] = gallery[5] + 2e-4 * rng.normal(size=128)  # nearly one direction: float32 cannot tell them apart
    true_index = rng.integers(0, 300, 1000)
    swaps = gallery[true_index] + 3.0 * rng.normal(size=(1000, 128))
    swaps[:20] = gallery[[3, 5] * 10] + 1e-4 * rng.normal(size=(20, 128))
    true_index[:20] = [3, 5] * 10
    nearest = np.argmin(cdist(swaps, gallery, metric="cosine"), axis=1)
    want = (nearest == true_index).astype(float)
    assert 0.05 < want.mean() < 0.95
    for chunk in (1, 7, 128, 4096):
        np.testing.assert_array_equal(id_retrieval(swaps, gallery, true_index, chunk=chunk), want)
