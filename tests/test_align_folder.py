"""Folder alignment (`align` stage / `mfim align`) and `mfim analyze`: bad inputs, resume, tables, provenance."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from mfim.data.align_folder import align_folder, landmark_error_report
from mfim.nets.align import AlignTransform, canonical_landmarks
from mfim.nets.landmarks import rotate_image

SIZE = 128


def _small(img: np.ndarray, factor: float = 0.5) -> np.ndarray:
    import cv2

    return cv2.resize(img, None, fx=factor, fy=factor, interpolation=cv2.INTER_AREA)


@pytest.fixture(scope="module")
def input_folder(tmp_path_factory, photos):
    """Good photos (some in sub-folders, odd modes, sideways) and every kind of bad input the issue lists."""
    from mfim.provenance import provenance_record, save_image

    root = tmp_path_factory.mktemp("align_in") / "images"
    (root / "sub" / "deeper").mkdir(parents=True)
    obama, biden, obama2 = _small(photos["obama"]), _small(photos["biden"]), _small(photos["obama2"])
    Image.fromarray(obama).save(root / "obama.jpg", quality=92)
    obama = np.asarray(Image.open(root / "obama.jpg").convert("RGB"))  # the decoded pixels, for the sideways copy
    Image.fromarray(biden).save(root / "sub" / "biden.jpg", quality=92)
    # CMYK JPEG, RGBA PNG, 16-bit grayscale PNG: converted and aligned, not rejected
    Image.fromarray(obama2).convert("CMYK").save(root / "sub" / "cmyk.jpg", quality=92)
    rgba = np.dstack([obama2, np.full(obama2.shape[:2], 255, np.uint8)])
    rgba[:20, :20, 3] = 0
    Image.fromarray(rgba, "RGBA").save(root / "rgba.png")
    gray16 = (np.asarray(Image.fromarray(biden).convert("L"), dtype=np.uint16) * 257).astype(np.uint16)
    Image.fromarray(gray16).save(root / "sub" / "deeper" / "gray16.png")
    assert Image.open(root / "sub" / "deeper" / "gray16.png").mode.startswith("I")
    # a photo lying on its side (no EXIF): found after a rotation
    Image.fromarray(rotate_image(obama, 3)).save(root / "sideways.png")
    # two faces side by side: the larger is kept, the count noted
    b2 = _small(biden, 0.7)
    two = np.full((max(obama.shape[0], b2.shape[0]), obama.shape[1] + b2.shape[1], 3), 90, np.uint8)
    two[: obama.shape[0], : obama.shape[1]] = obama
    two[: b2.shape[0], obama.shape[1] :] = b2
    Image.fromarray(two).save(root / "two_faces.png")
    # an image that already carries a synthetic provenance record
    save_image(root / "synthetic.png", obama2, provenance_record("synthetic", source="test render"))
    # bad input
    (root / "not_an_image.jpg").write_text("this is not a JPEG")
    data = (root / "obama.jpg").read_bytes()
    (root / "truncated.jpg").write_bytes(data[: len(data) // 2])
    yy, xx = np.mgrid[:200, :260]
    Image.fromarray(np.dstack([xx % 256, yy, (xx + yy) % 256]).astype(np.uint8)).save(root / "no_face.png")
    Image.fromarray(obama[:16, :16]).save(root / "tiny16.png")
    Image.new("1", (12000, 12000)).save(root / "huge.png")  # 144 MP, refused from the header (no decode)
    (root / "notes.bin").write_bytes(b"\x00\x01")
    return root


EXPECTED_GOOD = {
    "obama.jpg", "sub/biden.jpg", "sub/cmyk.jpg", "rgba.png", "sub/deeper/gray16.png", "sideways.png",
    "two_faces.png", "synthetic.png",
}  # fmt: skip
EXPECTED_REJECT = {
    "not_an_image.jpg": "not a readable image",
    "truncated.jpg": "corrupt or truncated",
    "no_face.png": "no face found",
    "tiny16.png": "too small",
    "huge.png": "too large",
    "notes.bin": "not an image file type",
}


@pytest.fixture(scope="module")
def aligned_run(input_folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("align_out") / "aligned"
    summary = align_folder(input_folder, out, size=SIZE, workers=1, transform_size=4 * SIZE, progress=False)
    return out, summary


def test_good_files_aligned_bad_files_have_reasons(aligned_run):
    out, summary = aligned_run
    table = pd.read_parquet(out / "aligned.parquet")
    rejects = pd.read_csv(out / "rejects.csv")
    assert set(table["file"]) == EXPECTED_GOOD
    assert set(rejects.columns) == {"file", "reason"}
    assert dict(zip(rejects["file"], rejects["reason"])).keys() == EXPECTED_REJECT.keys()
    for f, reason in zip(rejects["file"], rejects["reason"]):
        assert EXPECTED_REJECT[f] in reason, (f, reason)
    assert pd.read_parquet(out / "rejects.parquet").equals(rejects)
    assert summary["n_aligned"] == len(EXPECTED_GOOD) and summary["n_rejected"] == len(EXPECTED_REJECT)
    # outputs mirror the relative input paths as PNG, at the requested size
    for rel in EXPECTED_GOOD:
        img = np.asarray(Image.open(out / (rel.rsplit(".", 1)[0] + ".png")))
        assert img.shape == (SIZE, SIZE, 3)


def test_table_contents(aligned_run, input_folder):
    out, summary = aligned_run
    table = pd.read_parquet(out / "aligned.parquet").set_index("file")
    row = table.loc["obama.jpg"]
    assert row["key"] == "obama" and table.loc["sub/biden.jpg", "key"] == "sub/biden"
    lm = np.asarray(row["landmarks"]).reshape(68, 2)
    src = np.asarray(row["source_landmarks"]).reshape(68, 2)
    tf = AlignTransform.from_list(row["transform"], SIZE, (row["height"], row["width"]))
    np.testing.assert_allclose(tf.to_aligned(src), lm, atol=1e-3)
    # aligned landmarks sit near the canonical FFHQ face
    assert np.linalg.norm(lm - canonical_landmarks(SIZE), axis=1).mean() < 0.05 * SIZE
    two = table.loc["two_faces.png"]
    assert two["n_faces"] == 2 and "2 faces found; kept the largest" in two["note"]
    assert np.asarray(two["box"])[2] <= 460  # obama, the larger face, on the left half
    side = table.loc["sideways.png"]
    assert side["rotation"] == 90 and "rotating" in side["note"]
    assert summary["n_multi_face"] == 1 and summary["n_rotated"] == 1
    # the sideways copy (same decoded pixels) aligns to the upright photo's crop
    a = np.asarray(Image.open(out / "obama.png"), dtype=float)
    b = np.asarray(Image.open(out / "sideways.png"), dtype=float)
    assert np.abs(a - b).mean() < 1.0


def test_provenance(aligned_run):
    from mfim.provenance import read_record

    out, _ = aligned_run
    rec = read_record(out / "obama.png")
    assert rec["kind"] == "processed" and rec["source_file"] == "obama.jpg" and not rec["synthetic"]
    syn = read_record(out / "synthetic.png")
    assert syn["kind"] == "synthetic" and syn["synthetic"] and syn["source"] == "test render"
    assert syn["source_file"] == "synthetic.png"


def test_resume_skips_done_files(aligned_run, input_folder):
    out, first = aligned_run
    stamp = {p: p.stat().st_mtime_ns for p in out.rglob("*.png")}
    table_before = pd.read_parquet(out / "aligned.parquet")
    again = align_folder(input_folder, out, size=SIZE, workers=1, transform_size=4 * SIZE, progress=False)
    assert again["n_processed"] == 0
    assert again["n_skipped_resume"] == len(EXPECTED_GOOD) + len(EXPECTED_REJECT) - 1  # notes.bin is typed out
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*.png")} == stamp
    pd.testing.assert_frame_equal(pd.read_parquet(out / "aligned.parquet"), table_before)
    assert again["n_aligned"] == first["n_aligned"] and again["n_rejected"] == first["n_rejected"]


def test_resume_redoes_deleted_output_and_changed_settings(input_folder, tmp_path, photos):
    src = tmp_path / "in"
    src.mkdir()
    Image.fromarray(_small(photos["obama"])).save(src / "a.png")
    Image.fromarray(_small(photos["biden"])).save(src / "b.png")
    out = tmp_path / "out"
    s1 = align_folder(src, out, size=64, workers=1, progress=False)
    assert s1["n_processed"] == 2
    (out / "a.png").unlink()
    s2 = align_folder(src, out, size=64, workers=1, progress=False)
    assert s2["n_processed"] == 1 and (out / "a.png").is_file()
    s3 = align_folder(src, out, size=96, workers=1, progress=False)  # another size: everything again
    assert s3["n_processed"] == 2
    assert np.asarray(Image.open(out / "b.png")).shape == (96, 96, 3)


def test_interrupted_run_resumes_from_checkpoint(tmp_path, photos, monkeypatch):
    """Every finished file is journaled as it completes: after a crash, the next run only does the files not yet
    recorded."""
    from mfim.data import align_folder as mod
    from mfim.data.progress import Journal

    src = tmp_path / "in"
    src.mkdir()
    for i, name in enumerate(["obama", "biden", "obama2", "obama3"]):
        Image.fromarray(_small(photos[name], 0.3)).save(src / f"{i}_{name}.png")
    real = mod._process
    calls = []

    def crash_on_third(task):
        calls.append(task)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(task)

    monkeypatch.setattr(mod, "_process", crash_on_third)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        align_folder(src, out, size=64, workers=1, progress=False)
    monkeypatch.setattr(mod, "_process", real)
    assert len(Journal(out / "aligned.journal.jsonl").read()) == 2
    again = align_folder(src, out, size=64, workers=1, progress=False)
    assert again["n_processed"] == 2 and again["n_aligned"] == 4


def _kill_test_folder(root, photos) -> None:
    """20 faces (5 photos x 2 scales x mirrored) and 2 rejects, small enough for a quick run."""
    root.mkdir()
    for name in ("obama", "obama2", "obama3", "biden", "obama_partial_face"):
        for scale in (0.3, 0.45):
            img = _small(photos[name], scale)
            Image.fromarray(img).save(root / f"{name}_{int(scale * 100)}.png")
            Image.fromarray(np.ascontiguousarray(img[:, ::-1])).save(root / f"{name}_{int(scale * 100)}_m.jpg",
                                                                       quality=90)
    yy, xx = np.mgrid[:120, :160]
    Image.fromarray(np.dstack([xx % 256, yy, (xx + yy) % 256]).astype(np.uint8)).save(root / "no_face.png")
    (root / "broken.jpg").write_bytes(b"\xff\xd8\xff not a jpeg")


def _align_outputs(out) -> dict:
    """Everything a run leaves that a later stage reads: tables and the bytes of every crop."""
    return {
        "table": pd.read_parquet(out / "aligned.parquet"),
        "rejects": (out / "rejects.csv").read_bytes(),
        "crops": {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*.png"))},
    }


def _assert_same_outputs(a: dict, b: dict) -> None:
    pd.testing.assert_frame_equal(a["table"], b["table"])
    assert a["rejects"] == b["rejects"]
    assert a["crops"].keys() == b["crops"].keys() and all(a["crops"][k] == b["crops"][k] for k in a["crops"])


KILL_SCRIPT = """
import os, signal, sys
from mfim.data import align_folder as mod
real, calls = mod._process, []
def kill_part_way(task):
    calls.append(task)
    if len(calls) == int(sys.argv[3]):
        os.kill(os.getpid(), signal.SIGKILL)  # no cleanup of any kind, as when the machine takes the process away
    return real(task)
mod._process = kill_part_way
mod.align_folder(sys.argv[1], sys.argv[2], size=64, workers=1, progress=False, ground_truth=False)
"""


def test_sigkill_part_way_then_rerun_equals_an_uninterrupted_run(tmp_path, photos):
    import os
    import signal
    import subprocess
    import sys

    from mfim.data.progress import Journal

    src = tmp_path / "in"
    _kill_test_folder(src, photos)
    whole = align_folder(src, tmp_path / "whole", size=64, workers=1, progress=False, ground_truth=False)
    assert whole["n_aligned"] >= 18 and whole["n_rejected"] == 2
    out = tmp_path / "killed"
    env = {**os.environ, "PYTHONPATH": os.getcwd() + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run([sys.executable, "-c", KILL_SCRIPT, str(src), str(out), "12"], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert not (out / "aligned.parquet").exists()  # the tables are written once, at the end
    assert len(Journal(out / "aligned.journal.jsonl").read()) == 11
    resumed = align_folder(src, out, size=64, workers=2, progress=False, ground_truth=False)
    assert resumed["n_skipped_resume"] == 11 and resumed["n_processed"] == whole["n_processed"] - 11
    _assert_same_outputs(_align_outputs(out), _align_outputs(tmp_path / "whole"))


def test_rerun_redoes_a_replaced_source_and_drops_the_crop_of_a_removed_one(tmp_path, photos):
    import os

    src = tmp_path / "in"
    src.mkdir()
    for name in ("obama", "biden", "obama2"):
        Image.fromarray(_small(photos[name], 0.3)).save(src / f"{name}.png")
    out = tmp_path / "out"
    align_folder(src, out, size=64, workers=1, progress=False)
    # same mtime, other bytes of the same size would pass unnoticed (as in DVC); a new mtime is rehashed
    st = os.stat(src / "obama.png")
    os.utime(src / "obama.png", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    again = align_folder(src, out, size=64, workers=1, progress=False)
    assert again["n_processed"] == 0  # touched but the same bytes: kept
    Image.fromarray(_small(photos["obama3"], 0.3)).save(src / "obama.png")  # replaced
    (src / "biden.png").unlink()  # removed
    third = align_folder(src, out, size=64, workers=1, progress=False)
    assert third["n_processed"] == 1 and third["n_skipped_resume"] == 1 and third["n_stale_removed"] == 1
    assert not (out / "biden.png").exists()
    fresh_src = tmp_path / "fresh_in"
    fresh_src.mkdir()
    for name in ("obama.png", "obama2.png"):
        (fresh_src / name).write_bytes((src / name).read_bytes())
    align_folder(fresh_src, tmp_path / "fresh", size=64, workers=1, progress=False)
    _assert_same_outputs(_align_outputs(out), _align_outputs(tmp_path / "fresh"))


def test_journal_drops_a_torn_last_line_and_appends_after_it(tmp_path):
    from mfim.data.progress import Journal

    j = Journal(tmp_path / "j.jsonl")
    j.append({"file": "a", "n": 1})
    j.append({"file": "b", "n": 2})
    j.close()
    with open(tmp_path / "j.jsonl", "ab") as f:
        f.write(b'{"file": "c", "n"')  # a kill in the middle of a write
    assert [r["file"] for r in Journal(tmp_path / "j.jsonl").read()] == ["a", "b"]
    j = Journal(tmp_path / "j.jsonl")
    j.append({"file": "d", "n": 4})
    j.close()
    assert [r["file"] for r in Journal(tmp_path / "j.jsonl").read()] == ["a", "b", "d"]


def test_workers_auto_is_the_usable_cores():
    import os

    from mfim.data.progress import resolve_workers

    assert resolve_workers("auto") == len(os.sched_getaffinity(0))
    assert resolve_workers(3) == 3
    with pytest.raises(ValueError, match="workers"):
        resolve_workers(-1)


def test_worker_processes_match_in_process(tmp_path, photos):
    src = tmp_path / "in"
    src.mkdir()
    for name in ("obama", "biden", "obama2"):
        Image.fromarray(_small(photos[name])).save(src / f"{name}.png")
    (src / "bad.jpg").write_bytes(b"\xff\xd8\xff garbage")
    one = align_folder(src, tmp_path / "one", size=64, workers=1, progress=False)
    two = align_folder(src, tmp_path / "two", size=64, workers=2, progress=False)
    assert one["n_aligned"] == two["n_aligned"] == 3 and two["n_rejected"] == 1
    for name in ("obama", "biden", "obama2"):
        a = np.asarray(Image.open(tmp_path / "one" / f"{name}.png"))
        b = np.asarray(Image.open(tmp_path / "two" / f"{name}.png"))
        assert (a == b).all()


def test_ground_truth_report(tmp_path, photos):
    """Beside a ground_truth.parquet (synthetic-set layout) the report holds the landmark error against it."""
    from mfim.nets.landmarks import DlibFaceLandmarker

    root = tmp_path / "raw"
    (root / "images").mkdir(parents=True)
    img = _small(photos["obama"])
    Image.fromarray(img).save(root / "images" / "id000_00.png")
    Image.fromarray(np.full((120, 120, 3), 30, np.uint8)).save(root / "images" / "id000_01.png")
    lm = DlibFaceLandmarker("hog").detect(img)[0].landmarks.astype(np.float64)
    iod = np.linalg.norm(lm[45] - lm[36])
    truth = lm + [0.05 * iod, 0.0]  # ground truth 5% of the inter-ocular distance to the right
    gt = pd.DataFrame(
        {
            "key": ["id000_00", "id000_01", "id999_99"],  # the last one is not in the folder
            "landmarks": [truth.reshape(-1).tolist(), truth.reshape(-1).tolist(), truth.reshape(-1).tolist()],
            "yaw": [0.0, 0.0, 0.0],
        }
    )
    gt.to_parquet(root / "ground_truth.parquet")
    report = tmp_path / "reports" / "align.json"
    summary = align_folder(root / "images", tmp_path / "aligned", size=64, workers=1, progress=False,
                           report_path=report)  # fmt: skip
    g = json.loads(report.read_text())["ground_truth"]
    assert g == summary["ground_truth"]
    assert g["n_ground_truth_images"] == 2 and g["n_matched"] == 1 and g["detection_rate"] == 0.5
    assert abs(g["nme_iod"]["median"] - 0.05) < 0.003  # the same detector on the same pixels: only the offset
    assert abs(g["nme_iod_inner51"]["mean"] - 0.05) < 0.003


def test_landmark_error_report_by_stem():
    truth = canonical_landmarks(100).astype(np.float64)
    rows = [{"key": "sub/x1", "source_landmarks": (truth + [0, 2.0]).reshape(-1).tolist()}]
    gt = pd.DataFrame({"key": ["x1"], "landmarks": [truth.reshape(-1).tolist()]})
    r = landmark_error_report(rows, gt)
    iod = np.linalg.norm(truth[45] - truth[36])
    assert r["n_matched"] == 1 and abs(r["nme_iod"]["mean"] - 2.0 / iod) < 1e-9


# --- CLI ------------------------------------------------------------------------------------------------------------


def test_cli_align(input_folder, tmp_path, capsys):
    from mfim.cli import main

    out = tmp_path / "cli_out"
    rc = main(["align", str(input_folder), str(out), "--size", "64", "--workers", "1", "--quiet"])
    assert rc == 0
    text = capsys.readouterr().out
    assert f"aligned {len(EXPECTED_GOOD)} of" in text and f"{len(EXPECTED_REJECT)} rejected" in text
    assert set(pd.read_csv(out / "rejects.csv")["file"]) == set(EXPECTED_REJECT)


def test_cli_analyze_json(input_folder, capsys, monkeypatch):
    """Box and landmarks per face; per-file errors in an `error` field; each network field holds its output or
    'unavailable: <reason>'. The networks are stand-ins here (the real ones: the slow test below)."""
    import torch

    from mfim.cli import main
    from mfim.commands import analyze
    from mfim.nets.types import ThreeDMMParams

    seen = []

    def embedder(x):
        seen.append(x)
        return torch.arange(512, dtype=torch.float32)[None].repeat(x.shape[0], 1)

    def threedmm(x):
        b = x.shape[0]
        return ThreeDMMParams(torch.zeros(b, 40), torch.ones(b, 10), torch.tensor([[0.1, -0.2, 0.3]]).repeat(b, 1))

    def build(self, name):
        if name == "identity_mobilefacenet":
            return embedder
        if name == "threedmm":
            return threedmm
        if name == "identity_dlib":
            raise FileNotFoundError("dlib_face_recognition_resnet_model_v1.dat missing")
        raise ModuleNotFoundError("No module named 'mfim.nets.headpose'", name="mfim.nets.headpose")

    monkeypatch.setattr(analyze.NetworkHooks, "_build", build)
    files = [input_folder / "two_faces.png", input_folder / "truncated.jpg", input_folder / "no_face.png"]
    rc = main(["analyze", *map(str, files), "--json", "--size", "128"])
    assert rc == 0
    results = json.loads(capsys.readouterr().out)
    assert [r["file"] for r in results] == list(map(str, files))
    two, trunc, none = results
    assert two["n_faces"] == 2 and len(two["faces"]) == 2
    f0 = two["faces"][0]
    assert len(f0["box"]) == 4 and np.asarray(f0["landmarks"]).shape == (68, 2)
    assert f0["headpose_hopenet"] == "unavailable: module mfim.nets.headpose is not installed"
    assert f0["identity_dlib"].startswith("unavailable: FileNotFoundError: dlib_face_recognition")
    assert f0["identity_mobilefacenet"] == list(range(512))
    assert f0["threedmm"]["pose_deg"] == {"yaw": 5.73, "pitch": -11.459, "roll": 17.189}  # radians -> degrees
    assert f0["threedmm"]["expression"] == [1.0] * 10
    # the networks saw each face FFHQ-aligned at --size, as B×3×H×W in [-1, 1]
    assert len(seen) == 2 and seen[0].shape == (1, 3, 128, 128)
    assert -1.0 <= seen[0].min() < -0.5 and 0.5 < seen[0].max() <= 1.0
    assert "corrupt or truncated" in trunc["error"] and "faces" not in trunc
    assert none["error"] == "no face found" and none["faces"] == []


@pytest.mark.slow
def test_cli_analyze_real_networks(photo_paths, capsys):
    from mfim.cli import main

    rc = main(["analyze", str(photo_paths["obama"]), "--json", "--largest"])
    assert rc == 0
    (res,) = json.loads(capsys.readouterr().out)
    face = res["faces"][0]
    assert len(face["identity_mobilefacenet"]) == 512 and len(face["identity_dlib"]) == 128
    assert len(face["threedmm"]["shape"]) == 40 and len(face["threedmm"]["expression"]) == 10
    for field in (face["threedmm"]["pose_deg"], face["headpose_hopenet"]):
        assert abs(field["yaw"]) < 15 and abs(field["roll"]) < 15  # a frontal, level portrait


# --- bad output locations and odd folder entries (issue 12) ---------------------------------------------------------


def _snapshot(folder) -> dict:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _one_photo_folder(root, photos):
    root.mkdir(parents=True)
    Image.fromarray(_small(photos["obama"], 0.3)).save(root / "a.png")
    return root


def test_cli_align_refuses_to_write_over_its_input_folder(tmp_path, photos, capsys, monkeypatch):
    from mfim.cli import main
    from mfim.data import align_folder as mod

    d = _one_photo_folder(tmp_path / "d", photos)
    (d / "rejects.csv").write_text("file,reason\nmy,own table\n")
    (d / "aligned.parquet").write_bytes(b"someone's parquet")
    before = _snapshot(tmp_path)
    calls = []
    monkeypatch.setattr(mod, "_process", lambda task: calls.append(task))
    for out, relation in ((d, "is"), (d / "aligned", "is inside"), (tmp_path, "contains")):
        assert main(["align", str(d), str(out), "--workers", "1", "--quiet"]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and f"{relation} the IN_DIR folder" in err
    assert _snapshot(tmp_path) == before and calls == []


def test_align_replaces_only_files_an_align_run_wrote(tmp_path, photos):
    from mfim.outputs import OutputRefused

    src = _one_photo_folder(tmp_path / "in", photos)
    out = tmp_path / "out"
    out.mkdir()
    (out / "rejects.csv").write_text("mine\n")
    with pytest.raises(OutputRefused, match="rejects.csv already exists and was not written by mfim align"):
        align_folder(src, out, size=64, workers=1, progress=False)
    (out / "rejects.csv").unlink()
    (out / "a.png").write_bytes(b"my own a.png")  # has the name a.png's crop would get
    with pytest.raises(OutputRefused, match="a.png already exists"):
        align_folder(src, out, size=64, workers=1, progress=False)
    assert _snapshot(out) == {"a.png": b"my own a.png"}
    assert align_folder(src, out, size=64, workers=1, progress=False, overwrite=True)["n_aligned"] == 1
    # files the earlier run wrote are its own: a rerun with other settings replaces them without --overwrite
    assert align_folder(src, out, size=96, workers=1, progress=False)["n_processed"] == 1


def test_cli_align_unwritable_out_dir_fails_before_any_image(tmp_path, photos, capsys, monkeypatch):
    from mfim.cli import main
    from mfim.data import align_folder as mod

    src = _one_photo_folder(tmp_path / "in", photos)
    (tmp_path / "file").write_text("x")
    calls = []
    monkeypatch.setattr(mod, "_process", lambda task: calls.append(task))
    assert main(["align", str(src), str(tmp_path / "file" / "out"), "--workers", "1", "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "is a file, not a folder" in err and calls == []
    assert main(["align", str(tmp_path / "missing"), str(tmp_path / "o"), "--quiet"]) == 2


def test_align_accounts_for_every_entry(tmp_path, photos):
    from mfim.assets import sha256_file
    from mfim.provenance import read_record

    src = _one_photo_folder(tmp_path / "in", photos)
    face = _small(photos["obama2"], 0.5)
    frames = [Image.fromarray(face)] + [Image.fromarray(np.full_like(face, 60 * i)) for i in (1, 2)]
    frames[0].save(src / "anim.gif", save_all=True, append_images=frames[1:], duration=80)
    (src / "gone.png").symlink_to(tmp_path / "nowhere.png")
    (src / "loop.png").symlink_to(src / "loop.png")
    (src / "up").symlink_to(src, target_is_directory=True)
    out = tmp_path / "out"
    summary = align_folder(src, out, size=64, workers=1, progress=False)
    table = pd.read_parquet(out / "aligned.parquet").set_index("file")
    rejects = dict(pd.read_csv(out / "rejects.csv").itertuples(index=False))
    assert set(table.index) == {"a.png", "anim.gif"}
    assert "3 frames; only the first frame was used" in table.loc["anim.gif", "note"]
    assert rejects == {
        "gone.png": f"broken symbolic link (target {tmp_path / 'nowhere.png'} not found)",
        "loop.png": "symbolic link loop",
        "up": "symbolic link loop (leads back to .)",
    }
    assert summary["n_files"] == 5
    rec = read_record(out / "anim.png")
    assert rec["source_file"] == "anim.gif" and rec["source_sha256"] == sha256_file(src / "anim.gif")
