"""Issue 34 (hardening round 2): what a hostile user tried after the first round, one test per class. Full disks
are an injected error (ENOSPC, or the truncated file OpenCV's writer leaves without a word)."""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest

from mfim import cli
from mfim import video as video_mod
from mfim.imageio import read_rgb
from mfim.provenance import read_record, sidecar_path
from tests.test_cli_swap import FAKE_SHA, fake, inputs, write_video  # noqa: F401 (fixtures)


def face_clip(inputs, path: Path, n: int = 3) -> Path:
    face = np.ascontiguousarray(read_rgb(inputs["obama2"])[:400, :240])
    return write_video(path, [np.roll(face, i, axis=1) for i in range(n)])


def truncate_on_release(monkeypatch, keep_bytes: int = 300):
    """OpenCV's writer on a full disk: release() returns normally and the file is cut short."""
    real = video_mod.VideoWriter.close

    def close(self):
        real(self)
        if self.path.exists():
            with open(self.path, "r+b") as f:
                f.truncate(min(keep_bytes, os.path.getsize(self.path)))

    monkeypatch.setattr(video_mod.VideoWriter, "close", close)


# ------------------------------------------------------------------------------------------------------ data loss


def test_full_disk_video_overwrite_keeps_the_playable_input(fake, inputs, tmp_path, monkeypatch, capsys):
    clip = face_clip(inputs, tmp_path / "clip.mp4")
    before = clip.read_bytes()
    truncate_on_release(monkeypatch)
    rc = cli.main(["swap", "-s", str(inputs["obama"]), "-t", str(clip), "-o", str(clip), "--overwrite", "--roi", "-q"])
    err = capsys.readouterr().err
    assert rc == 1 and clip.read_bytes() == before and "incomplete" in err and "Traceback" not in err
    assert not sidecar_path(clip).exists() and sorted(p.name for p in tmp_path.iterdir()) == ["clip.mp4", "in"]


def test_full_disk_video_leaves_nothing_under_the_final_name(fake, inputs, tmp_path, monkeypatch, capsys):
    clip = face_clip(inputs, tmp_path / "clip.avi")
    truncate_on_release(monkeypatch)
    out = tmp_path / "out" / "swapped.avi"
    rc = cli.main(["swap", "-s", str(inputs["obama"]), "-t", str(clip), "-o", str(out), "--roi", "-q"])
    assert rc == 1 and list(out.parent.iterdir()) == [] and "Traceback" not in capsys.readouterr().err


def test_video_refused_up_front_when_the_disk_cannot_hold_it(fake, inputs, tmp_path, monkeypatch, capsys):
    clip = face_clip(inputs, tmp_path / "clip.mp4")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**9, 10**9 - 1000, 1000))
    swapped = []
    monkeypatch.setattr(fake, "swap", lambda *a, **k: swapped.append(1))
    rc = cli.main(["swap", "-s", str(inputs["obama"]), "-t", str(clip), "-o", str(tmp_path / "o.mp4"), "-q"])
    assert rc == 1 and not swapped and "not enough free space" in capsys.readouterr().err


def test_full_disk_image_write_is_one_line_and_keeps_the_old_file(fake, inputs, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out.png"
    out.write_bytes(b"earlier output")
    import mfim.atomic

    def enospc(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(mfim.atomic.os, "fsync", enospc)
    rc = cli.main(["swap", "-s", str(inputs["obama"]), "-t", str(inputs["biden"]), "-o", str(out), "--overwrite",
                   "-q"])
    err = capsys.readouterr().err
    assert rc == 1 and out.read_bytes() == b"earlier output" and "No space left on device" in err
    assert "Traceback" not in err and sorted(p.name for p in tmp_path.iterdir()) == ["in", "out.png"]


def test_overwrite_into_the_target_folder_never_replaces_an_unread_input(fake, inputs, tmp_path):
    d = tmp_path / "in"
    png = d / "obama.png"
    png.write_bytes((d / "biden.jpg").read_bytes())  # a.png (biden's face) beside a.jpg (obama's face)
    rc = cli.main(["swap", "-s", str(inputs["obama2"]), "-t", str(d), "-o", str(d), "--overwrite", "-q"])
    assert rc == 0
    # obama.png's output was made from obama.png itself (biden), obama.jpg's went beside it under its own name
    assert read_record(png)["inputs"]["target"]["file"] == "obama.png"
    assert read_record(d / "obama.jpg.png")["inputs"]["target"]["file"] == "obama.jpg"


# ------------------------------------------------------------------------------------------- silently wrong output


def test_folder_pairing_treats_names_as_data(fake, inputs, tmp_path):
    t, s = tmp_path / "t", tmp_path / "s"
    t.mkdir(), s.mkdir()
    for name in ("a[b].png", "x*.png"):
        (t / name).write_bytes(inputs["biden"].read_bytes())
    (s / "a[b].jpg").write_bytes(inputs["obama"].read_bytes())
    (s / "ab.jpg").write_bytes(inputs["obama2"].read_bytes())  # what the glob [b] would match
    (s / "x*.jpg").write_bytes(inputs["obama"].read_bytes())
    (s / "xyz.jpg").write_bytes(inputs["obama2"].read_bytes())  # what the glob * would match first
    rc = cli.main(["swap", "-s", str(s), "-t", str(t), "-o", str(tmp_path / "o"), "-q"])
    assert rc == 0
    assert read_record(tmp_path / "o" / "a[b].png")["inputs"]["source"]["file"] == "a[b].jpg"
    assert read_record(tmp_path / "o" / "x*.png")["inputs"]["source"]["file"] == "x*.jpg"
