"""3DMM precompute table: one row per valid shard sample, ground truth beside the estimate, known-answer errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mfim.data import threedmm_table as T
from mfim.nets.types import ThreeDMMParams
from tests.test_shards import corrupt_member, make_fixture_shards


class MeanColourEncoder:
    """A stand-in encoder: parameters are simple functions of the image, so the table can be checked exactly."""

    def __call__(self, x: torch.Tensor) -> ThreeDMMParams:
        m = x.mean(dim=(2, 3))  # B×3
        return ThreeDMMParams(m[:, :1].repeat(1, 40), m[:, 1:2].repeat(1, 10), m)


def test_table_has_one_row_per_valid_sample_with_ground_truth(tmp_path):
    samples = make_fixture_shards(tmp_path, n_identities=3, per_identity=4)
    shard = tmp_path / "train-000000.tar"
    corrupt_member(shard, "train/00002_03.png")
    df = T.precompute_threedmm([str(tmp_path / "train-*.tar")], MeanColourEncoder(), "stub", batch_size=5)
    assert sorted(df["key"]) == sorted(k for k in samples if k != "train/00002_03")
    path = T.write_table(df, tmp_path / "params.parquet")
    back = T.read_table(path)
    assert list(back["key"]) == list(df["key"])
    arrays = T.load_threedmm_arrays(path, "estimate")
    gt = T.load_threedmm_arrays(path, "ground_truth")
    assert arrays["shape"].shape == (11, 40) and arrays["exp"].shape == (11, 10) and arrays["pose"].shape == (11, 3)
    for i, key in enumerate(arrays["key"]):
        image, meta = samples[key]
        x = image.astype(np.float64) / 127.5 - 1
        assert np.allclose(arrays["pose"][i], x.mean((0, 1)), atol=1e-5)
        assert np.allclose(gt["shape"][i], meta["ground_truth"]["shape"], atol=1e-6)
        assert np.allclose(gt["pose"][i], meta["ground_truth"]["pose"], atol=1e-6)
    assert set(back["identity"]) == {0, 1, 2} and (back["encoder"] == "stub").all()


def test_group_errors_known_answers():
    rng = np.random.default_rng(0)
    gt = {"shape": rng.normal(size=(200, 40)), "exp": rng.normal(size=(200, 10)),
          "pose": rng.uniform(-0.5, 0.5, (200, 3))}
    exact = T.group_errors(gt, gt)
    assert exact["pose"]["mae_deg"] == 0 and exact["shape"]["nrmse"] == 0
    assert exact["shape"]["pearson_r"] == pytest.approx(1.0) and exact["exp"]["pearson_r"] == pytest.approx(1.0)
    off = {**gt, "pose": gt["pose"] + np.radians([1.0, -2.0, 0.0])}
    e = T.group_errors(off, gt)["pose"]
    assert e["yaw_mae_deg"] == pytest.approx(1.0) and e["pitch_mae_deg"] == pytest.approx(2.0)
    assert e["roll_mae_deg"] == pytest.approx(0.0, abs=1e-9) and e["mae_deg"] == pytest.approx(1.0)
    mean_only = {k: np.broadcast_to(v.mean(0), v.shape) for k, v in gt.items()}
    assert T.group_errors(mean_only, gt)["shape"]["nrmse"] == pytest.approx(1.0)
    noisy = {k: v + 0.5 * rng.normal(size=v.shape) for k, v in gt.items()}
    err = T.group_errors(noisy, gt)
    assert 0.3 < err["shape"]["nrmse"] < 0.7 and 0.8 < err["shape"]["pearson_r"] < 0.95


def test_report_compares_estimate_with_ground_truth_per_split(tmp_path):
    make_fixture_shards(tmp_path, n_identities=2, per_identity=3)
    make_fixture_shards(tmp_path, n_identities=2, per_identity=3, split="eval")
    patterns = [str(tmp_path / "train-*.tar"), str(tmp_path / "eval-*.tar")]
    report = T.run_precompute(patterns, MeanColourEncoder(), "stub", tmp_path / "p.parquet", batch_size=4)
    assert report["rows"] == 12 and report["rows_per_split"] == {"train": 6, "eval": 6}
    assert set(report["error"]) == {"all", "train", "eval"} and report["error"]["all"]["n"] == 12
    assert report["error"]["all"]["pose"]["mae_deg"] > 0
    # the coefficient statistics beside the table come from the training split only
    stats = T.read_stats(tmp_path / T.STATS_NAME)
    train = T.read_table(tmp_path / "p.parquet").query("split == 'train'")
    assert stats["encoder"] == "stub" and stats["split"] == "train" and stats["rows"] == 6
    assert np.allclose(stats["shape_mean"], T.stack_column(train, "shape").mean(0), atol=1e-5)


def test_real_data_without_ground_truth_reports_no_error(tmp_path):
    from mfim.data.shards import write_split_shards
    from tests.test_shards import fixture_image

    write_split_shards(((f"img{i}", fixture_image(i), {"identity": None, "split": "train", "ground_truth": None})
                        for i in range(4)), tmp_path, "train", 10**6)
    report = T.run_precompute([str(tmp_path / "train-*.tar")], MeanColourEncoder(), "stub", tmp_path / "p.parquet")
    assert report["rows"] == 4 and report["error"] is None
    df = T.read_table(tmp_path / "p.parquet")
    assert not T.has_ground_truth(df) and df["gt_shape"].isna().all()
    with pytest.raises(ValueError, match="null rows"):
        T.load_threedmm_arrays(tmp_path / "p.parquet", "ground_truth")


class FlameWidthEncoder:
    """Like DECA: 100 shape and 50 expression coefficients (FLAME), pose as yaw/pitch/roll."""

    def __call__(self, x: torch.Tensor) -> ThreeDMMParams:
        m = x.mean(dim=(2, 3))
        return ThreeDMMParams(m[:, :1].repeat(1, 100), m[:, 1:2].repeat(1, 50), m)


def test_a_flame_width_table_reads_back_and_reports_pose_only_against_bfm_ground_truth(tmp_path):
    make_fixture_shards(tmp_path, n_identities=2, per_identity=3)
    report = T.run_precompute([str(tmp_path / "train-*.tar")], FlameWidthEncoder(), "deca", tmp_path / "p.parquet")
    arrays = T.load_threedmm_arrays(tmp_path / "p.parquet", "estimate")
    assert arrays["shape"].shape == (6, 100) and arrays["exp"].shape == (6, 50) and arrays["pose"].shape == (6, 3)
    assert T.load_threedmm_arrays(tmp_path / "p.parquet", "ground_truth")["shape"].shape == (6, 40)
    err = report["error"]["all"]
    assert err["pose"]["mae_deg"] > 0 and "not_comparable" in err["shape"] and "not_comparable" in err["exp"]
    assert set(T.error_metrics(err)) == {"pose_mae_deg"} and "shape not comparable" in T.error_summary(err)
    stats = T.read_stats(tmp_path / T.STATS_NAME)
    assert len(stats["shape_std"]) == 100 and len(stats["exp_std"]) == 50
    # rows of two widths in one column are refused, as is an expected width that does not match
    df = T.read_table(tmp_path / "p.parquet")
    df.at[0, "shape"] = np.zeros(40, np.float32)
    with pytest.raises(ValueError, match="mixes rows"):
        T.stack_column(df, "shape")
    with pytest.raises(ValueError, match="expected 40"):
        T.stack_column(T.read_table(tmp_path / "p.parquet"), "shape", dim=40)
