"""3DMM precompute table: one row per valid shard sample, ground truth beside the estimate, known-answer errors."""

from __future__ import annotations

import numpy as np
import pandas as pd
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


# ------------------------------------------------------------------------------ workers and a killed precompute


def _reference_table(patterns, encoder, batch_size):
    """The table by the plain route: every valid sample streamed in one process, batched per split."""
    from mfim.data.shards import iter_samples

    keys, est = [], []
    for pattern in patterns:
        samples = list(iter_samples(pattern))
        for i in range(0, len(samples), batch_size):
            batch = samples[i : i + batch_size]
            keys += [s.key for s in batch]
            est.append(encoder(T.images_to_tensor([s.image for s in batch])).shape[:, 0])
    return keys, torch.cat(est).numpy()


def _kill_fixture(tmp_path):
    make_fixture_shards(tmp_path, n_identities=5, per_identity=4, max_shard_bytes=12_000)
    make_fixture_shards(tmp_path, n_identities=2, per_identity=3, split="eval")
    import tarfile

    holder = next(p for p in sorted(tmp_path.glob("train-*.tar")) if "train/00001_01.png" in tarfile.open(p).getnames())
    corrupt_member(holder, "train/00001_01.png")
    return [str(tmp_path / "train-*.tar"), str(tmp_path / "eval-*.tar")]


def test_decoding_workers_give_the_table_of_one_process(tmp_path):
    patterns = _kill_fixture(tmp_path)
    assert len(list(tmp_path.glob("train-*.tar"))) > 2  # chunks cross shard boundaries
    keys, shape0 = _reference_table(patterns, MeanColourEncoder(), 3)
    tables = []
    for workers in (0, 2):
        out = tmp_path / f"w{workers}" / "params.parquet"
        T.run_precompute(patterns, MeanColourEncoder(), "stub", out, batch_size=3, workers=workers)
        assert not out.with_name("params.parts").exists()  # removed once the table is written
        tables.append((out.read_bytes(), out.with_name("stats.json").read_bytes()))
    assert tables[0] == tables[1]
    df = T.read_table(tmp_path / "w2" / "params.parquet")
    assert df["key"].tolist() == keys and len(keys) == 20 - 1 + 6
    np.testing.assert_array_equal(T.stack_column(df, "shape")[:, 0], shape0)


class KillOnCall(MeanColourEncoder):
    """The stand-in encoder, which SIGKILLs its own process on call number ``n`` (in a subprocess)."""

    def __init__(self, n: int):
        self.n, self.calls = n, 0

    def __call__(self, x):
        import os
        import signal

        self.calls += 1
        if self.calls == self.n:
            os.kill(os.getpid(), signal.SIGKILL)
        return super().__call__(x)


KILL_SCRIPT = """
import sys
from mfim.data import threedmm_table as T
from tests.test_threedmm_table import KillOnCall
T.run_precompute(sys.argv[1].split(","), KillOnCall(int(sys.argv[3])), "stub", sys.argv[2], batch_size=3, workers=1)
"""


@pytest.mark.parametrize("kill_at", [4, 8])  # within the train split; in the eval split (after every train batch)
def test_sigkill_part_way_then_rerun_gives_the_uninterrupted_table(tmp_path, kill_at):
    import os
    import signal
    import subprocess
    import sys
    from pathlib import Path

    patterns = _kill_fixture(tmp_path)
    whole = tmp_path / "whole" / "params.parquet"
    T.run_precompute(patterns, MeanColourEncoder(), "stub", whole, batch_size=3)
    out = tmp_path / "killed" / "params.parquet"
    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": f"{repo}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.run([sys.executable, "-c", KILL_SCRIPT, ",".join(patterns), str(out), str(kill_at)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert not out.exists() and len(list(out.with_name("params.parts").glob("part-*.parquet"))) == kill_at - 1
    calls = []

    class Counting(MeanColourEncoder):
        def __call__(self, x):
            calls.append(len(x))
            return super().__call__(x)

    T.run_precompute(patterns, Counting(), "stub", out, batch_size=3, workers=2)
    assert len(calls) == 9 - (kill_at - 1)  # 19 train rows in 7 batches, 6 eval rows in 2: only the rest redone
    assert out.read_bytes() == whole.read_bytes()
    assert out.with_name("stats.json").read_bytes() == whole.with_name("stats.json").read_bytes()


def test_saved_batches_of_other_settings_are_not_reused(tmp_path):
    patterns = _kill_fixture(tmp_path)
    out = tmp_path / "p.parquet"
    parts = T._Parts(out.with_name("p.parts"), "another fingerprint")
    parts.save(0, 0, pd.DataFrame(columns=T.TABLE_COLUMNS))  # an empty first batch: would drop 3 rows
    T.run_precompute(patterns, MeanColourEncoder(), "stub", out, batch_size=3)
    ref = tmp_path / "ref.parquet"
    T.run_precompute(patterns, MeanColourEncoder(), "stub", ref, batch_size=3)
    assert out.read_bytes() == ref.read_bytes()
