"""`mfim swap` / `mfim mix` / `mfim detect` and mfim.video, with a stand-in swapper (the real one is mfim.inference)
that finds faces with dlib's HOG detector, so "no face found" comes from a real detector on real photos."""

from __future__ import annotations

import csv
import importlib.util
import json
import os
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
    monkeypatch.setattr(swap_cmd, "load_swapper", lambda checkpoint, device, fit_steps=0, fit_exp=0.0: swapper)
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
    out = targets / "out"  # inside the target folder: refused unless --overwrite, and never taken for inputs
    argv = ["swap", "-s", str(inputs["obama"]), "-t", str(targets), "-o", str(out), "-q"]
    assert cli.main(argv) == 2 and not out.exists()
    for _ in range(2):
        assert cli.main(argv + ["--overwrite"]) == 0
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


def test_negative_fit_steps_is_a_usage_error_and_writes_nothing(fake, inputs, tmp_path, capsys):
    out = tmp_path / "out.png"
    argv = ["swap", "-s", str(inputs["obama"]), "-t", str(inputs["biden"]), "-o", str(out), "--fit-steps", "-1"]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines() == ["mfim swap: --fit-steps must be >= 0, got -1"]
    assert not out.exists() and fake.calls.get("swap", 0) == 0


def test_folder_source_needs_folder_target(fake, inputs, tmp_path, capsys):
    folder = str(inputs["obama"].parent)
    rc = cli.main(["swap", "-s", folder, "-t", str(inputs["biden"]), "-o", str(tmp_path / "x.png")])
    assert rc == 2 and "folder" in capsys.readouterr().err


def test_detect_text_report(tmp_path, photo_paths, capsys):
    assert cli.main(["detect", str(photo_paths["obama2"])]) == 0
    out = capsys.readouterr().out
    assert "metadata:  none" in out and "watermark: not detected" in out
    assert cli.main(["detect", str(tmp_path / "missing.png")]) == 1


# ------------------------------------------------------------------------------------- outputs never destroy inputs


def snapshot(folder: Path) -> dict:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("roi", [False, True])
def test_output_that_is_an_input_is_refused(fake, inputs, tmp_path, roi, capsys):
    target = small_copy(inputs["biden"], tmp_path / "photo.png")
    link = tmp_path / "link.png"
    link.symlink_to(target)
    before = target.read_bytes()
    flags = ["--roi", "-q"] if roi else ["-q"]
    for argv in (
        ["-s", str(inputs["obama"]), "-t", str(target), "-o", str(target)],
        ["-s", str(inputs["obama"]), "-t", str(target), "-o", str(link)],  # the same file through a symlink
        ["-s", str(target), "-t", str(inputs["obama2"]), "-o", str(target)],  # the source
    ):
        capsys.readouterr()
        assert cli.main(["swap", *argv, *flags]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "refusing to replace an input" in err and "--overwrite" in err
    assert target.read_bytes() == before and fake.calls["prepare"] == 0
    # an explicit --overwrite is the user's decision
    assert cli.main(["swap", "-s", str(inputs["obama"]), "-t", str(target), "-o", str(target), *flags,
                     "--overwrite"]) == 0
    assert target.read_bytes() != before and read_record(target)["synthetic"]


def test_output_folder_overlapping_an_input_folder_is_refused(fake, inputs, tmp_path, capsys):
    sources, targets = tmp_path / "s", tmp_path / "t"
    small_copy(inputs["obama"], sources / "a.png")
    small_copy(inputs["biden"], targets / "a.png")
    (targets / "rejects.csv").write_text("file,reason\nmy,own notes\n")
    before = snapshot(tmp_path)
    for out, relation in ((targets, "is"), (targets / "sub", "is inside"), (tmp_path, "contains"),
                          (sources, "is")):
        capsys.readouterr()
        assert cli.main(["swap", "-s", str(sources), "-t", str(targets), "-o", str(out), "-q"]) == 2
        err = capsys.readouterr().err
        assert f"{relation} the --" in err and "folder" in err
    assert snapshot(tmp_path) == before and fake.calls["prepare"] == 0
    mix = ["mix", "--global", str(sources), "--local", str(inputs["obama2"]), "-t", str(targets)]
    assert cli.main(mix + ["-o", str(sources / "x"), "-q"]) == 2
    assert "--global folder" in capsys.readouterr().err


def test_existing_files_are_not_replaced_without_overwrite(fake, inputs, tmp_path, capsys):
    out = tmp_path / "out.png"
    out.write_bytes(b"someone else's file")
    argv = ["swap", "-s", str(inputs["obama"]), "-t", str(inputs["biden"]), "-o", str(out), "-q"]
    assert cli.main(argv) == 2
    assert "already exists" in capsys.readouterr().err and out.read_bytes() == b"someone else's file"
    # a folder run: an existing rejects.csv (or an earlier output) in the output folder is not replaced either
    targets, folder = tmp_path / "t", tmp_path / "o"
    small_copy(inputs["biden"], targets / "a.jpg")
    folder.mkdir()
    (folder / "rejects.csv").write_text("mine\n")
    assert cli.main(["swap", "-s", str(inputs["obama"]), "-t", str(targets), "-o", str(folder), "-q"]) == 2
    assert snapshot(folder) == {"rejects.csv": b"mine\n"} and fake.calls["prepare"] == 0
    assert cli.main(argv + ["--overwrite"]) == 0 and read_record(out)["synthetic"]


@pytest.mark.parametrize("folder_run", [False, True])
def test_unwritable_output_fails_before_any_image_is_processed(fake, inputs, tmp_path, folder_run, capsys):
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    target = inputs["biden"].parent if folder_run else inputs["biden"]
    out = a_file / "sub" / ("" if folder_run else "out.png")
    rc = cli.main(["swap", "-s", str(inputs["obama"]), "-t", str(target), "-o", str(out), "-q"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "is a file, not a folder" in err
    assert fake.calls["prepare"] == 0


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write into a read-only folder")
def test_read_only_output_folder_fails_before_any_image_is_processed(fake, inputs, tmp_path, capsys):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        rc = cli.main(["swap", "-s", str(inputs["obama"]), "-t", str(inputs["biden"]), "-o",
                       str(locked / "o.png"), "-q"])
    finally:
        locked.chmod(0o700)
    assert rc == 2 and "cannot write in" in capsys.readouterr().err and fake.calls["prepare"] == 0


def test_folder_run_killed_midway_keeps_outputs_and_rejects(fake, inputs, tmp_path, monkeypatch):
    targets = tmp_path / "t"
    (targets / "a_broken.jpg").parent.mkdir(parents=True)
    (targets / "a_broken.jpg").write_bytes(b"not a jpeg")
    small_copy(inputs["biden"], targets / "b.jpg")
    small_copy(inputs["obama2"], targets / "c.jpg")
    real_swap = fake.swap

    def dies_on_the_last(src, tgt, roi):
        if fake.calls["swap"] == 1:
            raise KeyboardInterrupt  # the user's Ctrl-C (or a kill) during the third file
        return real_swap(src, tgt, roi)

    monkeypatch.setattr(fake, "swap", dies_on_the_last)
    out = tmp_path / "o"
    assert cli.main(["swap", "-s", str(inputs["obama"]), "-t", str(targets), "-o", str(out), "-q"]) == 130  # Ctrl-C
    assert (out / "b.png").is_file() and not (out / "c.png").exists()
    assert [r["file"] for r in csv.DictReader(open(out / "rejects.csv"))] == ["a_broken.jpg"]
    assert sorted(p.name for p in out.iterdir()) == ["b.png", "rejects.csv"]  # no temp files left


def animated_gif(path: Path, first: np.ndarray, frames: int = 3) -> Path:
    rest = [Image.fromarray(np.full_like(first, 40 * i)) for i in range(1, frames)]
    Image.fromarray(first).save(path, save_all=True, append_images=rest, duration=100, loop=0)
    assert Image.open(path).n_frames == frames
    return path


def test_every_folder_entry_is_an_output_or_a_reject(fake, inputs, tmp_path, capsys):
    targets = tmp_path / "t"
    small_copy(inputs["biden"], targets / "good.jpg")
    animated_gif(targets / "anim.gif", read_rgb(small_copy(inputs["obama2"], tmp_path / "o2.png")))
    (targets / "data.bin").write_bytes(b"\x00\x01")
    (targets / "gone.jpg").symlink_to(tmp_path / "deleted.jpg")
    (targets / "loop_a.jpg").symlink_to(targets / "loop_b.jpg")
    (targets / "loop_b.jpg").symlink_to(targets / "loop_a.jpg")
    (targets / "sub").mkdir()
    (targets / "sub" / "back").symlink_to(targets, target_is_directory=True)
    (targets / "notes.txt").write_text("a note beside the photos, not an input")
    (targets / ".DS_Store").write_bytes(b"hidden")
    out = tmp_path / "o"
    assert cli.main(["swap", "-s", str(inputs["obama"]), "-t", str(targets), "-o", str(out), "-q"]) == 0
    written = {p.relative_to(out).as_posix() for p in out.rglob("*.png")}
    rejects = {r["file"]: r["reason"] for r in csv.DictReader(open(out / "rejects.csv"))}
    assert written == {"good.png", "anim.png"}
    assert rejects == {
        "data.bin": "not an image or video file type (.bin)",
        "gone.jpg": f"broken symbolic link (target {tmp_path / 'deleted.jpg'} not found)",
        "loop_a.jpg": "symbolic link loop",
        "loop_b.jpg": "symbolic link loop",
        "sub/back": "symbolic link loop (leads back to .)",
    }
    note = read_record(out / "anim.png")["inputs"]["target"]["note"]
    assert note == "3 frames; only the first frame was used"
    assert "anim.gif: 3 frames; only the first frame was used" in capsys.readouterr().err
    # and `mfim detect` on the folder names the entries it cannot read instead of dropping them
    assert cli.main(["detect", "--json", str(targets)]) == 1
    reports = json.loads(capsys.readouterr().out)
    assert {Path(r["file"]).name for r in reports if "error" in r} >= {"gone.jpg", "loop_a.jpg", "data.bin"}


def test_single_animated_gif_says_only_the_first_frame_was_used(fake, inputs, tmp_path, capsys):
    gif = animated_gif(tmp_path / "anim.gif", read_rgb(small_copy(inputs["obama2"], tmp_path / "o2.png")), 5)
    out = tmp_path / "out.png"
    assert cli.main(["swap", "-s", str(inputs["obama"]), "-t", str(gif), "-o", str(out), "-q"]) == 0
    assert "target anim.gif: 5 frames; only the first frame was used" in capsys.readouterr().err
    assert read_record(out)["inputs"]["target"]["note"] == "5 frames; only the first frame was used"


def test_record_names_the_inputs_and_checkpoint(fake, inputs, tmp_path):
    from mfim.assets import sha256_file

    out = tmp_path / "mix.png"
    assert cli.main(["mix", "--global", str(inputs["obama"]), "--local", str(inputs["obama2"]), "-t",
                     str(inputs["biden"]), "-o", str(out), "--checkpoint", "models/my.pt", "-q"]) == 0
    rec = read_record(out)
    assert rec["checkpoint"] == "my.pt" and rec["checkpoint_sha256"] == FAKE_SHA
    assert rec["inputs"] == {
        role: {"file": inputs[name].name, "sha256": sha256_file(inputs[name])}
        for role, name in (("global", "obama"), ("local", "obama2"), ("target", "biden"))
    }


def test_a_file_another_run_writes_meanwhile_is_not_replaced(fake, inputs, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out.png"
    real_swap = fake.swap

    def other_run_writes_first(src, tgt, roi):
        out.write_bytes(b"the other run's output")  # after this run's checks, before its write
        return real_swap(src, tgt, roi)

    monkeypatch.setattr(fake, "swap", other_run_writes_first)
    rc = cli.main(["swap", "-s", str(inputs["obama"]), "-t", str(inputs["biden"]), "-o", str(out), "-q"])
    assert rc == 1 and out.read_bytes() == b"the other run's output"
    assert "out.png appeared meanwhile" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in", "out.png"]


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


def test_video_killed_midway_leaves_no_torn_file(tmp_path):
    src = write_video(tmp_path / "in.mp4", [np.full((64, 96, 3), 10 * i, np.uint8) for i in range(6)])
    dst = tmp_path / "out.mp4"
    dst.write_bytes(b"previous video")

    def dies(f):
        if f.mean() > 25:
            raise KeyboardInterrupt
        return f

    with pytest.raises(KeyboardInterrupt):
        transform_video(src, dst, dies, lambda f: None, progress=False)
    assert dst.read_bytes() == b"previous video" and sorted(p.name for p in tmp_path.iterdir()) == ["in.mp4", "out.mp4"]
    with pytest.raises(FileExistsError):
        transform_video(src, dst, lambda f: f, lambda f: None, progress=False, overwrite=False)
    assert dst.read_bytes() == b"previous video"


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


@pytest.mark.parametrize("tail", [["--fit-exp", "-0.1", "--fit-steps", "5"], ["--fit-exp", "0.1"]])
def test_fit_exp_needs_a_fit_and_a_non_negative_weight(fake, inputs, tmp_path, capsys, tail):
    out = tmp_path / "out.png"
    argv = ["swap", "-s", str(inputs["obama"]), "-t", str(inputs["biden"]), "-o", str(out), *tail]
    assert cli.main(argv) == 2
    assert "--fit-exp must be >= 0 and needs --fit-steps > 0" in capsys.readouterr().err
    assert not out.exists() and fake.calls.get("swap", 0) == 0
