"""Evaluation manifests on tiny folders laid out like FF++ and CelebA-HQ (built here), and on synthetic shards."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest

from mfim.data import evalsets as E
from mfim.imageio import read_rgb
from tests.test_shards import fixture_image, make_fixture_shards

LEVEL = 8  # frame i of every test video is a flat grey of 8·i (+ the video's id in a corner)


def write_video(path, n_frames: int, video_id: int, no_face: set[int] = frozenset()):
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), 25, (64, 48))
    assert writer.isOpened()
    for i in range(n_frames):
        frame = np.full((48, 64, 3), LEVEL * i, np.uint8)
        cv2.circle(frame, (32, 24), 10, (255, 255, 255) if i not in no_face else (LEVEL * i,) * 3, -1)
        writer.write(frame)
    writer.release()


def stub_aligner(frame: np.ndarray):
    """'Finds a face' when the white disc is there; the aligned crop is the frame resized to 32 px."""
    if frame[24, 32].min() < 240:
        return None
    return cv2.resize(frame, (32, 32), interpolation=cv2.INTER_AREA)


def frame_level(path) -> float:
    img = read_rgb(path).astype(float)
    return float(np.median(img[:4]))  # the top rows: grey level only


@pytest.fixture
def ffpp_root(tmp_path):
    root = tmp_path / "FaceForensics++"
    videos = root / "original_sequences" / "youtube" / "c23" / "videos"
    write_video(videos / "000.mp4", 30, 0)
    write_video(videos / "001.mp4", 25, 1, no_face={6})
    write_video(videos / "002.mp4", 30, 2)
    fakes = root / "manipulated_sequences" / "Deepfakes" / "c23" / "videos"
    fakes.mkdir(parents=True)
    for name in ("000_001", "001_000", "002_000", "000_003"):  # 003 has no video
        (fakes / f"{name}.mp4").write_bytes(b"")
    return root


def test_frame_rule_matches_the_protocol():
    assert E.evenly_spaced_frames(300, 10) == list(range(0, 300, 30))
    assert E.evenly_spaced_frames(95, 10) == list(range(0, 95, 10))
    assert E.evenly_spaced_frames(25, 10) == [0, 3, 6, 9, 12, 15, 18, 21, 24]  # ceil(2.5) = 3: nine frames
    assert E.evenly_spaced_frames(7, 10) == list(range(7)) and E.evenly_spaced_frames(0) == []


def test_ffpp_manifest_from_a_folder_laid_out_like_the_data_set(ffpp_root, tmp_path):
    out = tmp_path / "evalsets"
    pairs, triplets, protocol, rejects = E.build_ffpp(ffpp_root, out, "c23", 10, aligner=stub_aligner)
    assert set(pairs["pair_id"]) == {"000_001", "001_000", "002_000"}
    assert any("003.mp4" in r["file"] and r["reason"] == "video missing" for r in rejects)
    by_pair = {p: df for p, df in pairs.groupby("pair_id")}
    assert list(by_pair["000_001"]["frame_index"]) == list(range(0, 30, 3))  # target 000: 30 frames, step 3
    # target 001 has 25 frames (step 3, nine frames) and no face in frame 6
    assert list(by_pair["001_000"]["frame_index"]) == [0, 3, 9, 12, 15, 18, 21, 24]
    assert any("001.mp4#6" in r["file"] and r["reason"] == "no face found" for r in rejects)
    # the target's j-th sampled frame gets the source's j-th; where the source's has no face, its first aligned one
    src = by_pair["000_001"].set_index("frame_index")["source_frame_index"]
    assert src[0] == 0 and src[3] == 3 and src[9] == 9 and src[6] == 0
    assert list(by_pair["001_000"]["source_frame_index"]) == [0, 3, 9, 12, 15, 18, 21, 24]
    for row in pairs.itertuples():
        assert abs(frame_level(row.target_path) - LEVEL * row.frame_index) < 6  # the PNG is that very frame
        assert abs(frame_level(row.source_path) - LEVEL * row.source_frame_index) < 6
        assert row.target_key == f"ffpp/{row.pair_id[:3]}/{row.frame_index:04d}"
    assert protocol["compression"] == "c23" and protocol["frames_per_video"] == 10 and len(triplets) == 0
    summary = E.write_evalsets(out, pairs, triplets, protocol)
    assert summary["pairs"] == len(pairs) == 28
    assert json.loads((out / "protocol.json").read_text())["protocol"] == "ffpp"

    # resumable: a second run decodes nothing and gives the same manifest
    calls = []
    again, *_ = E.build_ffpp(ffpp_root, out, "c23", 10, aligner=lambda f: calls.append(1))
    assert not calls and again.equals(pairs)


KILL_SCRIPT = """
import os, signal, sys
from mfim.data import evalsets as E
from tests.test_evalsets import stub_aligner
calls = []
def aligner(frame):
    calls.append(1)
    if len(calls) == int(sys.argv[3]):
        os.kill(os.getpid(), signal.SIGKILL)
    return stub_aligner(frame)
pairs, triplets, protocol, rejects = E.build_ffpp(sys.argv[1], sys.argv[2], "c23", 10, aligner=aligner,
                                                  aligner_settings={"stub": 1})
E.write_evalsets(sys.argv[2], pairs, triplets, protocol)
"""


def _snapshot(folder) -> dict:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _run_ffpp(root, out, settings=None, aligner=stub_aligner):
    pairs, triplets, protocol, rejects = E.build_ffpp(root, out, "c23", 10, aligner=aligner,
                                                      aligner_settings=settings or {"stub": 1})
    E.write_evalsets(out, pairs, triplets, protocol)
    return rejects


@pytest.mark.parametrize("kill_at", [14, 25])  # mid-video 001 (10 frames of 000 done); in the last video
def test_ffpp_sigkill_part_way_then_rerun_equals_an_uninterrupted_run(ffpp_root, tmp_path, kill_at):
    import os
    import shutil
    import signal
    import subprocess
    import sys
    from pathlib import Path

    out = tmp_path / "evalsets"
    whole_rejects = _run_ffpp(ffpp_root, out)
    whole = _snapshot(out)
    shutil.rmtree(out)
    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": f"{repo}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.run([sys.executable, "-c", KILL_SCRIPT, str(ffpp_root), str(out), str(kill_at)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    no_face = 1 if kill_at > 13 else 0  # call 13 is frame 6 of video 001, which has no face
    assert not (out / "pairs.parquet").exists() and len(list(out.rglob("*.png"))) == kill_at - 1 - no_face
    calls = []
    rejects = _run_ffpp(ffpp_root, out, aligner=lambda f: calls.append(1) or stub_aligner(f))
    assert len(calls) == 10 + 9 + 10 - (kill_at - 1)  # only the frames not aligned before the kill
    assert _snapshot(out) == whole and rejects == whole_rejects


def test_ffpp_frames_of_other_settings_or_videos_are_redone_and_unused_ones_removed(ffpp_root, tmp_path):
    out = tmp_path / "evalsets"
    _run_ffpp(ffpp_root, out)
    stray = out / "ffpp" / "c40" / "000"  # another compression: not this protocol's any more
    stray.mkdir(parents=True)
    calls = []
    _run_ffpp(ffpp_root, out, settings={"stub": 2}, aligner=lambda f: calls.append(1) or stub_aligner(f))
    assert len(calls) == 29 and not stray.exists()  # new aligner settings: every frame again
    video = ffpp_root / "original_sequences" / "youtube" / "c23" / "videos" / "002.mp4"
    write_video(video, 20, 2)  # the video changed: its frames again
    calls.clear()
    _run_ffpp(ffpp_root, out, settings={"stub": 2}, aligner=lambda f: calls.append(1) or stub_aligner(f))
    assert len(calls) == 10 and sorted(p.name for p in (out / "ffpp/c23/002").glob("*.png"))[-1] == "0018.png"
    (ffpp_root / "manipulated_sequences" / "Deepfakes" / "c23" / "videos" / "002_000.mp4").unlink()
    _run_ffpp(ffpp_root, out, settings={"stub": 2})
    assert not (out / "ffpp" / "c23" / "002").exists()


def test_ffpp_pairs_from_a_split_json_go_both_ways(ffpp_root, tmp_path):
    split = tmp_path / "test.json"
    split.write_text(json.dumps([["000", "002"]]))
    pairs, *_ = E.build_ffpp(ffpp_root, tmp_path / "ev", "c23", 3, splits_json=split, aligner=stub_aligner)
    assert sorted(set(pairs["pair_id"])) == ["000_002", "002_000"]
    assert sorted(set(pairs["frame_index"])) == [0, 10, 20]


def test_missing_ffpp_says_what_and_where(tmp_path):
    with pytest.raises(E.MissingDatasetError, match="FaceForensics.*github.com/ondyari/FaceForensics"):
        E.build_ffpp("", tmp_path, aligner=stub_aligner)
    with pytest.raises(E.MissingDatasetError, match="original_sequences/youtube/c40/videos"):
        E.build_ffpp(tmp_path, tmp_path, compression="c40", aligner=stub_aligner)


@pytest.fixture
def celebahq_root(tmp_path):
    root = tmp_path / "CelebA-HQ-img"
    root.mkdir()
    for i in range(12):
        cv2.imwrite(str(root / f"{i}.jpg"), fixture_image(i, 32))
    return root


def test_celebahq_pairs_and_triplets(celebahq_root):
    pairs, triplets, protocol = E.build_celebahq(celebahq_root, pairs_per_target=3, seed=0)
    assert len(pairs) == 36 and len(triplets) == 12
    for target, df in pairs.groupby("target_key"):
        assert len(df) == 3 and df["source_key"].nunique() == 3 and target not in set(df["source_key"])
    assert all(len({t.target_key, t.global_key, t.local_key}) == 3 for t in triplets.itertuples())
    assert sorted(triplets["target_key"]) == sorted(f"celebahq/{i}" for i in range(12))
    assert pairs.loc[0, "target_path"].endswith("0.jpg")
    again, again_t, _ = E.build_celebahq(celebahq_root, pairs_per_target=3, seed=0)
    assert again.equals(pairs) and again_t.equals(triplets)
    other, _, _ = E.build_celebahq(celebahq_root, pairs_per_target=3, seed=1)
    assert not other["source_key"].equals(pairs["source_key"])
    capped, capped_t, proto = E.build_celebahq(celebahq_root, 3, seed=0, max_pairs=9, max_triplets=5)
    assert len(capped) == 9 and capped["target_key"].nunique() == 3 and len(capped_t) == 5
    assert proto["pairs_subsampled"] and not protocol["pairs_subsampled"]


def test_missing_celebahq_says_what_and_where(tmp_path):
    with pytest.raises(E.MissingDatasetError, match="CelebA-HQ.*progressive_growing_of_gans"):
        E.build_celebahq(tmp_path / "nope")


def test_synthetic_manifests_use_held_out_identities(tmp_path):
    make_fixture_shards(tmp_path, n_identities=5, per_identity=3, split="eval")
    pairs, triplets, protocol = E.synthetic_from_shards(str(tmp_path / "eval-*.tar"), "data/aligned", 40, 20, 0)
    assert len(pairs) == 40 and len(triplets) == 20
    assert (pairs["source_identity"] != pairs["target_identity"]).all()
    # targets cycle: the first 15 pairs use every eval image once
    assert pairs["target_key"][:15].nunique() == 15
    ids = triplets[["target_identity", "global_identity", "local_identity"]].to_numpy()
    assert all(len(set(r)) == 3 for r in ids)
    assert pairs.loc[0, "target_path"].startswith("data/aligned/eval/")
    assert protocol["protocol"] == "synthetic" and "never seen in training" in protocol["images"]
    again = E.synthetic_from_shards(str(tmp_path / "eval-*.tar"), "data/aligned", 40, 20, 0)
    assert again[0].equals(pairs) and again[1].equals(triplets)
