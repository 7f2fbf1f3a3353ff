"""Provenance metadata round trips (PNG, JPEG, video sidecar) and the automatic watermark of synthetic images."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mfim import watermark as wm
from mfim.provenance import (
    inspect,
    provenance_record,
    read_record,
    save_image,
    sidecar_path,
    write_sidecar,
)

SHA = "0123456789abcdef" * 4


@pytest.mark.parametrize("suffix", [".png", ".jpg"])
def test_synthetic_record_round_trip_and_watermark(tmp_path, photos, suffix):
    img = photos["obama2"]
    record = provenance_record(checkpoint_sha256=SHA, operation="swap")
    path = save_image(tmp_path / f"out{suffix}", img, record)
    back = read_record(path)
    assert back == {**record, "watermark": wm.SCHEME}
    assert back["synthetic"] is True and back["checkpoint_sha256"] == SHA
    assert back["software"].startswith("mfim ")
    assert "watermark" not in record  # the caller's dict is not changed
    written = np.asarray(Image.open(path).convert("RGB"))
    assert wm.detect(written)["watermarked"]
    assert wm.psnr(written, img) >= 38.0


def test_processed_record_has_metadata_only(tmp_path, photos):
    img = photos["biden"][:600, :500]
    path = save_image(tmp_path / "aligned.png", img, provenance_record("processed"))
    assert np.array_equal(np.asarray(Image.open(path).convert("RGB")), img)  # pixels untouched
    rec = read_record(path)
    assert rec["kind"] == "processed" and rec["synthetic"] is False and "watermark" not in rec


def test_watermark_opt_out_and_force(tmp_path, photos):
    img = photos["obama"][:512, :512]
    plain = save_image(tmp_path / "plain.png", img, provenance_record(), watermark=False)
    assert np.array_equal(np.asarray(Image.open(plain).convert("RGB")), img)
    assert "watermark" not in read_record(plain)
    forced = save_image(tmp_path / "forced.png", img, provenance_record("processed"), watermark=True)
    assert wm.detect(np.asarray(Image.open(forced).convert("RGB")))["watermarked"]


def test_png_carries_human_readable_labels(tmp_path):
    img = np.full((64, 64, 3), 100, np.uint8)
    path = save_image(tmp_path / "x.png", img, provenance_record(checkpoint_sha256=SHA))
    info = Image.open(path).info
    assert "synthetic" in info["Description"].lower()
    assert info["Software"].startswith("mfim ")


def test_jpeg_record_also_in_exif(tmp_path):
    img = np.full((64, 64, 3), 100, np.uint8)
    path = save_image(tmp_path / "x.jpg", img, provenance_record(checkpoint_sha256=SHA))
    with Image.open(path) as im:
        assert SHA in im.getexif()[0x010E]


def test_foreign_files_have_no_record(tmp_path, photo_paths):
    assert read_record(photo_paths["obama"]) is None
    fake_video = tmp_path / "clip.mp4"
    fake_video.write_bytes(b"\x00\x00\x00\x18ftypmp42")
    assert read_record(fake_video) is None


def test_video_sidecar_round_trip(tmp_path):
    video = tmp_path / "clip.mp4"
    video.write_bytes(b"not really a video")
    record = provenance_record(checkpoint_sha256=SHA, frames=3)
    write_sidecar(video, record)
    assert sidecar_path(video).name == "clip.mp4.mfim.json"
    assert read_record(video) == record


def test_inspect_reports_record_and_verdict(tmp_path, photos, photo_paths):
    path = save_image(tmp_path / "s.png", photos["obama2"], provenance_record(checkpoint_sha256=SHA))
    report = inspect(path)
    assert report["record"]["checkpoint_sha256"] == SHA
    assert report["watermark"]["watermarked"] and report["watermark"]["score"] > 0.6
    real = inspect(photo_paths["obama2"])
    assert real["record"] is None and not real["watermark"]["watermarked"]


def test_save_is_atomic_and_can_refuse_to_replace(tmp_path, photos, monkeypatch):
    """A write that dies midway leaves the previous file whole and no temp file; overwrite=False never replaces."""
    path = save_image(tmp_path / "s.png", photos["obama2"], provenance_record("processed"))
    before = path.read_bytes()
    assert path.stat().st_mode & 0o777 == 0o666 & ~_umask()  # not mkstemp's 0600

    real_save = Image.Image.save

    def dies_midway(self, fp, *args, **kwargs):
        real_save(self, fp, *args, **kwargs)
        with open(fp, "r+b") if isinstance(fp, (str, Path)) else fp as f:
            f.truncate(100)  # half an image on disk, then the process "dies"
        raise KeyboardInterrupt

    monkeypatch.setattr(Image.Image, "save", dies_midway)
    with pytest.raises(KeyboardInterrupt):
        save_image(path, photos["obama"], provenance_record("processed"))
    monkeypatch.setattr(Image.Image, "save", real_save)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.png"]

    with pytest.raises(FileExistsError):
        save_image(path, photos["obama"], provenance_record("processed"), overwrite=False)
    assert path.read_bytes() == before
    video = tmp_path / "clip.mp4"
    write_sidecar(video, {"software": "first"})
    with pytest.raises(FileExistsError):
        write_sidecar(video, {"software": "second"}, overwrite=False)
    assert read_record(video) == {"software": "first"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clip.mp4.mfim.json", "s.png"]


def _umask() -> int:
    import os

    mask = os.umask(0o022)
    os.umask(mask)
    return mask
