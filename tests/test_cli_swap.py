"""`mfim swap` / `mfim mix` / `mfim detect` and mfim.video, with a stand-in swapper (the real one is mfim.inference)
that finds faces with dlib's HOG detector, so "no face found" comes from a real detector on real photos."""

from __future__ import annotations

import csv
import importlib.util
import json
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from mfim import cli
from mfim import watermark as wm
from mfim.commands import swap as swap_cmd
from mfim.imageio import ImageRejected, read_rgb
from mfim.provenance import read_record
from mfim.video import VideoWriter, probe, read_frames, transform_video

FAKE_SHA = "fa" * 32
ALIGNED = 64  # aligned output size of the embedded default model


class FakeFace:
    def __init__(self, image, box, crop):
        self.image, self.box, self.crop = image, box, crop


class FakeSwapper:
    """The FaceSwapper API with a trivial 'model': swap returns the target's face crop (or, with roi, the target
    photo with the source's face crop pasted over the target's face box)."""

    checkpoint_sha256 = FAKE_SHA

    def __init__(self):
        import dlib

        self.detector = dlib.get_frontal_face_detector()
        self.calls = {"prepare": 0, "swap": 0, "mix": 0}

    def prepare(self, img):
        self.calls["prepare"] += 1
        faces = self.detector(np.ascontiguousarray(img), 1)
        if not faces:
            raise ImageRejected("no face found")
        f = max(faces, key=lambda r: r.area())
        h, w = img.shape[:2]
        x0, y0, x1, y1 = max(f.left(), 0), max(f.top(), 0), min(f.right(), w), min(f.bottom(), h)
        crop = cv2.resize(img[y0:y1, x0:x1], (ALIGNED, ALIGNED), interpolation=cv2.INTER_AREA)
        return FakeFace(img, (x0, y0, x1, y1), crop)

    def _paste(self, face, tgt):
        out = tgt.image.copy()
        x0, y0, x1, y1 = tgt.box
        out[y0:y1, x0:x1] = cv2.resize(face.crop, (x1 - x0, y1 - y0))
        return out

    def swap(self, src, tgt, roi):
        self.calls["swap"] += 1
        return self._paste(src, tgt) if roi else tgt.crop.copy()

    def mix(self, tgt, global_src, local_src, roi):
        self.calls["mix"] += 1
        return self._paste(global_src, tgt) if roi else local_src.crop.copy()


@pytest.fixture
def fake(monkeypatch):
    swapper = FakeSwapper()
    monkeypatch.setattr(swap_cmd, "load_swapper", lambda checkpoint, device: swapper)
    return swapper


def small_copy(src: Path, dst: Path, max_side: int = 480) -> Path:
    img = read_rgb(src)
    s = max_side / max(img.shape[:2])
    dst.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(img).resize((round(img.shape[1] * s), round(img.shape[0] * s)), Image.LANCZOS).save(dst)
    return dst


@pytest.fixture
def inputs(tmp_path, photo_paths):
    d = tmp_path / "in"
    paths = {name: small_copy(photo_paths[name], d / f"{name}.jpg") for name in ("obama", "obama2", "biden")}
    noface = d / "noface.png"
    y, x = np.mgrid[0:300, 0:400]
    Image.fromarray(np.dstack([x * 255 // 400, y * 255 // 300, np.full_like(x, 90)]).astype(np.uint8)).save(noface)
    paths["noface"] = noface
    return paths


def rgb(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def test_swap_roi_writes_provenance_and_watermark(fake, inputs, tmp_path, capsys):
    out = tmp_path / "out" / "swap.png"
    rc = cli.main(["swap", "--source", str(inputs["obama"]), "--target", str(inputs["biden"]), "--output", str(out),
                   "--roi", "--quiet"])
    assert rc == 0 and out.is_file()
    rec = read_record(out)
    assert rec["synthetic"] is True and rec["checkpoint_sha256"] == FAKE_SHA
    assert rec["software"].startswith("mfim ") and rec["operation"] == "swap" and rec["roi"] is True
    img = rgb(out)
    assert img.shape == read_rgb(inputs["biden"]).shape  # pasted back into the full target photo
    assert wm.detect(img)["watermarked"]
    # and `mfim detect` says so
    capsys.readouterr()
    assert cli.main(["detect", str(out), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)[0]
    assert report["record"]["checkpoint_sha256"] == FAKE_SHA and report["watermark"]["watermarked"]


def test_swap_aligned_output_is_upscaled_and_marked(fake, inputs, tmp_path):
    out = tmp_path / "aligned.jpg"
    rc = cli.main(["swap", "-s", str(inputs["obama"]), "-t", str(inputs["obama2"]), "-o", str(out), "-q"])
    assert rc == 0
    img = rgb(out)
    assert img.shape == (swap_cmd.MIN_OUTPUT_SIDE, swap_cmd.MIN_OUTPUT_SIDE, 3)
    assert wm.detect(img)["watermarked"]
    assert read_record(out)["roi"] is False


def test_output_folder_for_single_target(fake, inputs, tmp_path):
    outdir = tmp_path / "o"
    outdir.mkdir()
    assert cli.main(["swap", "-s", str(inputs["obama"]), "-t", str(inputs["biden"]), "-o", str(outdir), "-q"]) == 0
    assert (outdir / "biden.png").is_file()


def test_target_without_face_gets_message_and_no_file(fake, inputs, tmp_path, capsys):
    out = tmp_path / "none.png"
    rc = cli.main(["swap", "-s", str(inputs["obama"]), "-t", str(inputs["noface"]), "-o", str(out), "-q"])
    err = capsys.readouterr().err
    assert rc == 1 and not out.exists()
    assert "noface.png" in err and "no face found" in err


def test_source_without_face_is_named(fake, inputs, tmp_path, capsys):
    out = tmp_path / "none.png"
    rc = cli.main(["swap", "-s", str(inputs["noface"]), "-t", str(inputs["biden"]), "-o", str(out), "-q"])
    assert rc == 1 and not out.exists()
    assert "source noface.png: no face found" in capsys.readouterr().err


def test_folder_with_bad_files_yields_the_rest_and_a_rejects_table(fake, inputs, tmp_path, capsys):
    targets = tmp_path / "targets"
    small_copy(inputs["biden"], targets / "biden.jpg")
    small_copy(inputs["obama2"], targets / "sub" / "obama2.jpg")
    (targets / "broken.jpg").write_bytes(b"this is not a jpeg")
    (targets / "noface.png").write_bytes(inputs["noface"].read_bytes())
    (targets / "notes.txt").write_text("ignored: not an image")
    out = tmp_path / "out"
    rc = cli.main(["swap", "-s", str(inputs["obama"]), "-t", str(targets), "-o", str(out), "--roi", "-q"])
    assert rc == 0
    written = sorted(p.relative_to(out).as_posix() for p in out.rglob("*.png"))
    assert written == ["biden.png", "sub/obama2.png"]
    for p in out.rglob("*.png"):
        assert read_record(p)["checkpoint_sha256"] == FAKE_SHA and wm.detect(rgb(p))["watermarked"]
    with open(out / "rejects.csv") as f:
        rejects = {row["file"]: row["reason"] for row in csv.DictReader(f)}
    assert set(rejects) == {"broken.jpg", "noface.png"}
    assert "not a readable image" in rejects["broken.jpg"]
    assert rejects["noface.png"] == "no face found"
    err = capsys.readouterr().err
    assert "broken.jpg" in err and "noface.png" in err
    assert fake.calls["prepare"] == 4  # the source once, then each readable target


def test_folder_names_collisions_and_output_inside_target(fake, inputs, tmp_path):
    targets = tmp_path / "t"
    small_copy(inputs["biden"], targets / "a.jpg")
    small_copy(inputs["obama2"], targets / "a.png")
    out = targets / "out"  # inside the target folder: its files must not become inputs on a second run
    for _ in range(2):
        assert cli.main(["swap", "-s", str(inputs["obama"]), "-t", str(targets), "-o", str(out), "-q"]) == 0
    assert sorted(p.name for p in out.glob("*.png")) == ["a.png", "a.png.png"]
    assert list(csv.DictReader(open(out / "rejects.csv"))) == []


def test_unexpected_error_on_one_file_does_not_stop_a_folder_run(fake, inputs, tmp_path, monkeypatch):
    targets = tmp_path / "t"
    small_copy(inputs["biden"], targets / "a.jpg")
    small_copy(inputs["obama2"], targets / "b.jpg")
    real_swap = fake.swap

    def flaky(src, tgt, roi):
        if tgt.image.shape[1] == read_rgb(targets / "a.jpg").shape[1]:
            raise RuntimeError("model exploded")
        return real_swap(src, tgt, roi)

    monkeypatch.setattr(fake, "swap", flaky)
    out = tmp_path / "o"
    assert cli.main(["swap", "-s", str(inputs["obama"]), "-t", str(targets), "-o", str(out), "-q"]) == 0
    assert (out / "b.png").is_file() and not (out / "a.png").exists()
    rows = list(csv.DictReader(open(out / "rejects.csv")))
    assert rows == [{"file": "a.jpg", "reason": "error: RuntimeError: model exploded"}]


def test_folder_sources_pair_by_name(fake, inputs, tmp_path):
    sources, targets, out = tmp_path / "s", tmp_path / "t", tmp_path / "o"
    small_copy(inputs["obama"], sources / "a.png")
    small_copy(inputs["biden"], targets / "a.jpg")
    small_copy(inputs["obama2"], targets / "b.jpg")
    rc = cli.main(["swap", "-s", str(sources), "-t", str(targets), "-o", str(out), "-q"])
    assert rc == 0 and (out / "a.png").is_file() and not (out / "b.png").exists()
    rows = list(csv.DictReader(open(out / "rejects.csv")))
    assert [r["file"] for r in rows] == ["b.jpg"] and "no source image named b" in rows[0]["reason"]


def test_mix(fake, inputs, tmp_path):
    out = tmp_path / "mix.png"
    rc = cli.main(["mix", "--global", str(inputs["obama"]), "--local", str(inputs["obama2"]),
                   "--target", str(inputs["biden"]), "--output", str(out), "--roi", "-q"])
    assert rc == 0 and fake.calls["mix"] == 1
    rec = read_record(out)
    assert rec["operation"] == "mix" and rec["checkpoint_sha256"] == FAKE_SHA
    assert wm.detect(rgb(out))["watermarked"]


@pytest.mark.parametrize(
    "argv_tail",
    [
        ["-o", "{tmp}/out.txt"],  # not an image suffix
        ["-o", "{tmp}/out.mp4"],  # a video name for an image target
    ],
)
def test_usage_errors(fake, inputs, tmp_path, argv_tail, capsys):
    argv = ["swap", "-s", str(inputs["obama"]), "-t", str(inputs["biden"])]
    argv += [a.format(tmp=tmp_path) for a in argv_tail]
    assert cli.main(argv) == 2
    assert "--output" in capsys.readouterr().err


def test_folder_source_needs_folder_target(fake, inputs, tmp_path, capsys):
    folder = str(inputs["obama"].parent)
    rc = cli.main(["swap", "-s", folder, "-t", str(inputs["biden"]), "-o", str(tmp_path / "x.png")])
    assert rc == 2 and "folder" in capsys.readouterr().err


def test_detect_text_report(tmp_path, photo_paths, capsys):
    assert cli.main(["detect", str(photo_paths["obama2"])]) == 0
    out = capsys.readouterr().out
    assert "metadata:  none" in out and "watermark: not detected" in out
    assert cli.main(["detect", str(tmp_path / "missing.png")]) == 1


# ------------------------------------------------------------------------------------------------------------ video


def write_video(path: Path, frames: list[np.ndarray], fps: float = 10.0) -> Path:
    with VideoWriter(path, fps) as w:
        for f in frames:
            w.write(f)
    return path


def test_video_round_trip_keeps_frame_count_and_size(tmp_path):
    frames = [np.full((120, 160, 3), 20 + 30 * i, np.uint8) for i in range(7)]
    for suffix in (".mp4", ".avi"):
        src = write_video(tmp_path / f"in{suffix}", frames)
        info = probe(src)
        assert (info.width, info.height, info.frame_count) == (160, 120, 7) and info.fps == pytest.approx(10.0)
        dst = tmp_path / f"out{suffix}"
        res = transform_video(src, dst, lambda f: 255 - f, lambda f: None, progress=False)
        assert (res.frames_read, res.frames_processed, res.frames_written) == (7, 7, 7)
        back = list(read_frames(dst))
        assert len(back) == 7 and back[0].shape == (120, 160, 3)
        means = [f.mean() for f in back]
        assert np.allclose(means, [235 - 30 * i for i in range(7)], atol=4)  # inverted, in order


def test_video_rejected_frames_keep_timing(tmp_path):
    frames = [np.full((64, 96, 3), 10 * i, np.uint8) for i in range(6)]
    src = write_video(tmp_path / "in.mp4", frames)

    def process(f):
        if f.mean() < 15:  # the first two frames
            raise ValueError("no face found")
        return f[:32, :32]

    res = transform_video(src, tmp_path / "out.mp4", process, lambda f: None, progress=False)
    assert [i for i, _ in res.rejects] == [0, 1] and res.frames_written == 6
    back = list(read_frames(tmp_path / "out.mp4"))
    assert len(back) == 6 and back[0].shape == (32, 32, 3) and back[0].max() < 10  # black stand-ins first

    none = transform_video(src, tmp_path / "none.mp4", lambda f: (_ for _ in ()).throw(ValueError("x")),
                           lambda f: f, progress=False)
    assert none.frames_processed == 0 and not (tmp_path / "none.mp4").exists()


def test_swap_on_video_target(fake, inputs, tmp_path, capsys):
    face = read_rgb(inputs["obama2"])[:400, :240]
    face = np.ascontiguousarray(face)
    gray = np.full_like(face, 128)
    frames = [face, np.roll(face, 3, axis=1), gray, np.roll(face, -3, axis=0)]
    src = write_video(tmp_path / "clip.mp4", frames)
    out = tmp_path / "out" / "clip.mp4"
    rc = cli.main(["swap", "-s", str(inputs["obama"]), "-t", str(src), "-o", str(out), "--roi", "-q"])
    assert rc == 0
    back = list(read_frames(out))
    assert len(back) == 4 and back[0].shape == face.shape
    assert read_record(out)["frames_swapped"] == 3 and read_record(out)["checkpoint_sha256"] == FAKE_SHA
    rows = list(csv.DictReader(open(out.with_name("clip.mp4.rejects.csv"))))
    assert rows == [{"file": "clip.mp4#frame2", "reason": "no face found"}]
    assert "clip.mp4#frame2: no face found" in capsys.readouterr().err
    assert wm.detect(back[0])["watermarked"]  # every frame carries the mark, through the MPEG-4 codec
    capsys.readouterr()
    assert cli.main(["detect", "--json", str(out)]) == 0
    report = json.loads(capsys.readouterr().out)[0]
    assert report["watermark"]["frames_watermarked"] == report["watermark"]["frames_sampled"] == 4
    assert report["watermark"]["watermarked"] and report["record"]["watermark"] == wm.SCHEME
    assert cli.main(["detect", "--json", str(src)]) == 0  # the input video: no sidecar, no mark
    report = json.loads(capsys.readouterr().out)[0]
    assert report["record"] is None and report["watermark"]["frames_watermarked"] == 0


# --------------------------------------------------------------------------------------------------- the real model


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("mfim.inference") is None, reason="mfim.inference not written yet")
def test_end_to_end_with_the_trained_model(photo_paths, tmp_path):
    from mfim.assets import MissingAssetError
    from mfim.inference import FaceSwapper

    try:
        swapper = FaceSwapper.from_checkpoint(None, device="cpu")
    except MissingAssetError as e:
        pytest.skip(f"no trained checkpoint: {e}")
    out = tmp_path / "e2e.png"
    rc = cli.main(["swap", "-s", str(photo_paths["obama"]), "-t", str(photo_paths["biden"]), "-o", str(out),
                   "--roi", "-q"])
    assert rc == 0
    rec = read_record(out)
    assert rec["checkpoint_sha256"] == swapper.checkpoint_sha256 and rec["synthetic"]
    img = rgb(out)
    assert img.shape == read_rgb(photo_paths["biden"]).shape
    assert wm.detect(img)["watermarked"]


def test_missing_model_is_a_clear_error(inputs, tmp_path, capsys):
    out = tmp_path / "x.png"
    argv = ["swap", "-s", str(inputs["obama"]), "-t", str(inputs["biden"]), "-o", str(out)]
    rc = cli.main(argv + ["--checkpoint", str(tmp_path / "absent.pt")])
    err = capsys.readouterr().err
    if importlib.util.find_spec("mfim.inference") is None:
        assert rc == 2 and "mfim.inference" in err
    else:  # MissingAssetError from FaceSwapper.from_checkpoint, exit status 3 from mfim.cli
        assert rc == 3 and "absent.pt" in err
    assert not out.exists()
