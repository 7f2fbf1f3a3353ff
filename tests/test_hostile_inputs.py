"""Issue 34 (hardening round 2): what a hostile user tried after the first round, one test per class. Full disks
are an injected error (ENOSPC, or the truncated file OpenCV's writer leaves without a word)."""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

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


def tiny_generator(seed: int = 0):
    import torch

    from mfim.models.stylegan2 import Generator

    torch.manual_seed(seed)
    return Generator(resolution=16, style_dim=32, n_mlp=2, channel_base=256, channel_max=16).eval()


def test_non_finite_weights_are_refused_at_load_and_nothing_is_written(tmp_path, capsys):
    import torch

    from mfim.weights import save_checkpoint

    G = tiny_generator()
    with torch.no_grad():
        next(G.synthesis.parameters()).view(-1)[3] = float("nan")
    ckpt = save_checkpoint(tmp_path / "g.pt", G)
    rc = cli.main(["generate", "--checkpoint", str(ckpt), "--seeds", "0", "--outdir", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 3 and "non-finite" in err and not any((tmp_path / "o").glob("*"))


def test_generate_refuses_a_non_finite_truncation_and_oversized_values(tmp_path, capsys):
    from mfim.weights import save_checkpoint

    ckpt = save_checkpoint(tmp_path / "g.pt", tiny_generator())
    out = tmp_path / "o"
    argv = ["generate", "--checkpoint", str(ckpt), "--outdir", str(out)]
    assert cli.main([*argv, "--seeds", "0", "--trunc", "nan"]) == 2
    assert "--trunc must be a finite number" in capsys.readouterr().err and not any(out.glob("*.png"))
    assert cli.main(["generate", "--checkpoint", str(ckpt), "--seeds", "0-200000000", "--outdir", str(out)]) == 2
    assert "at most 100000" in capsys.readouterr().err
    # the swapper file (data/train/mfim.pt's format) is what --help promises: its generator is used
    import torch

    G = tiny_generator(1)
    swapper = tmp_path / "mfim.pt"
    torch.save({"format": "mfim-swapper", "generator": {"config": G.config, "state_dict": G.state_dict()}}, swapper)
    assert cli.main(["generate", "--checkpoint", str(swapper), "--seeds", "0", "--outdir", str(out)]) == 0
    arr = np.load(out / "images.npy")
    with torch.no_grad():
        from mfim.commands.generate import z_for_seed

        assert np.array_equal(arr, G(z_for_seed(0, G.z_dim), noise_mode="const").numpy())
    import json

    json.loads((out / "manifest.json").read_text(), parse_constant=lambda c: pytest.fail(f"{c} in the manifest"))


def test_a_shipped_checkpoint_that_differs_from_its_record_is_named(tmp_path, capsys):
    import json

    from mfim.assets import sha256_file
    from mfim.weights import load_generator, save_checkpoint

    ckpt = save_checkpoint(tmp_path / "generator_x.pt", tiny_generator())
    record = tmp_path / "generator_x.json"
    record.write_text(json.dumps({"output": "checkpoints/generator_x.pt", "output_sha256": sha256_file(ckpt)}))
    load_generator(ckpt)
    assert capsys.readouterr().err == ""
    record.write_text(json.dumps({"output": "checkpoints/generator_x.pt", "output_sha256": "0" * 64}))
    load_generator(ckpt)
    assert "does not match its record generator_x.json" in capsys.readouterr().err


def test_a_refused_pickle_does_not_advise_running_it(tmp_path, capsys):
    import torch

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    bad = tmp_path / "evil.pt"
    torch.save({"x": Evil()}, bad)
    rc = cli.main(["swap", "-s", str(bad), "-t", str(bad), "-o", str(tmp_path / "o.png"), "--checkpoint", str(bad)])
    err = capsys.readouterr().err
    assert rc == 3 and "system" in err and "weights_only" not in err and len(err.strip().splitlines()) == 1


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="needs a machine without a GPU")
def test_device_cuda_without_a_gpu_is_a_usage_error(fake, inputs, tmp_path, capsys):
    rc = cli.main(["swap", "-s", str(inputs["obama"]), "-t", str(inputs["biden"]), "-o", str(tmp_path / "o.png"),
                   "--device", "cuda"])
    assert rc == 2 and "no CUDA GPU is available" in capsys.readouterr().err


# -------------------------------------------------------------------------------------------------- memory and time


def test_video_frames_over_the_photo_pixel_limit_are_refused_before_decoding(fake, inputs, tmp_path, monkeypatch,
                                                                              capsys):
    monkeypatch.setattr(video_mod, "MAX_FRAME_PIXELS", 300 * 200)  # the 400x240 clip stands in for 12000x12000
    clip = face_clip(inputs, tmp_path / "clip.avi")
    rc = cli.main(["swap", "-s", str(inputs["obama"]), "-t", str(clip), "-o", str(tmp_path / "o.avi"), "-q"])
    err = capsys.readouterr().err
    assert rc == 1 and "frames too large (240x400 > 60000 pixels" in err and fake.calls["swap"] == 0


# ------------------------------------------------------------------------------------- one line, not a traceback


def test_awkward_names_and_deep_trees_are_one_line_each(fake, inputs, tmp_path, monkeypatch, capsys):
    t = tmp_path / "t"
    t.mkdir()
    odd = os.fsencode(str(t)) + b"/no\xffface.png"
    with open(odd, "wb") as f:
        f.write(inputs["noface"].read_bytes())
    (t / "b.jpg").write_bytes(inputs["biden"].read_bytes())
    (t / ("L" * 240 + ".jpg")).write_bytes(inputs["biden"].read_bytes())
    deep = t
    # deeper than the recursion limit (lowered, so that pytest's own recursive cleanup of tmp_path still works)
    import sys

    for _ in range(400):
        deep = deep / "d"
        deep.mkdir()
    old_limit = sys.getrecursionlimit()
    sys.setrecursionlimit(350)
    (deep / "c.jpg").write_bytes(inputs["biden"].read_bytes())
    out = tmp_path / "o"
    try:
        rc = cli.main(["swap", "-s", str(inputs["obama"]), "-t", str(t), "-o", str(out), "-q"])
    finally:
        sys.setrecursionlimit(old_limit)
    err = capsys.readouterr().err
    assert rc == 0 and "Traceback" not in err
    rows = (out / "rejects.csv").read_text(encoding="utf-8")
    assert "no\\xffface.png,no face found" in rows and "output name too long (244 bytes" in rows
    assert (out / "b.png").is_file() and (out / Path(*["d"] * 400) / "c.png").is_file()
    assert cli.main(["swap", "-s", str(inputs["obama"]), "-t", str(inputs["biden"]), "-q",
                     "-o", str(tmp_path / ("M" * 240 + ".png"))]) == 2
    assert "output name too long" in capsys.readouterr().err


def test_ctrl_c_and_disk_errors_outside_the_work_are_one_line(fake, inputs, tmp_path, monkeypatch, capsys):
    from mfim.commands import swap as swap_cmd

    def interrupted(self, job):
        raise KeyboardInterrupt

    monkeypatch.setattr(swap_cmd.Runner, "run", interrupted)
    rc = cli.main(["swap", "-s", str(inputs["obama"]), "-t", str(inputs["biden"]), "-o", str(tmp_path / "o.png")])
    err = capsys.readouterr().err
    assert rc == 130 and "interrupted" in err and len(err.strip().splitlines()) <= 2


def test_fit_exp_outside_the_repository_is_a_usage_error(inputs, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    rc = cli.main(["swap", "-s", str(inputs["obama"]), "-t", str(inputs["biden"]), "-o", str(tmp_path / "o.png"),
                   "--fit-steps", "2", "--fit-exp", "0.1"])
    assert rc == 2 and "--fit-exp needs the 3DMM network" in capsys.readouterr().err


def test_a_group_photo_says_which_face_was_swapped(fake, inputs, tmp_path, monkeypatch, capsys):
    real = fake.prepare

    def thirty_faces(img):
        face = real(img)
        face.faces_found = 30
        return face

    monkeypatch.setattr(fake, "prepare", thirty_faces)
    out = tmp_path / "o.png"
    assert cli.main(["swap", "-s", str(inputs["obama"]), "-t", str(inputs["biden"]), "-o", str(out), "-q"]) == 0
    err = capsys.readouterr().err
    note = "30 faces found; only the largest was used (it was swapped, the others were left as they are)"
    assert f"target biden.jpg: {note}" in err and read_record(out)["inputs"]["target"]["faces"] == note
    assert "largest was used (its identity is used)" in read_record(out)["inputs"]["source"]["faces"]


@pytest.mark.parametrize("argv, limit", [
    (["analyze", "x.png", "--size", "60000"], "16 to 4096"),
    (["analyze", "x.png", "--upsample", "6"], "0 to 3"),
    (["align", "a", "b", "--upsample", "6"], "0 to 3"),
])
def test_size_values_are_bounded_before_anything_is_allocated(argv, limit, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    assert e.value.code == 2 and limit in capsys.readouterr().err


def test_leftover_temp_files_of_a_killed_run_are_removed_and_named(fake, inputs, tmp_path, capsys):
    out = tmp_path / "o"
    out.mkdir()
    stale = out / ".biden.png.abcd1234.part"
    stale.write_bytes(b"half a png")
    os.utime(stale, (0, 0))
    fresh = out / ".obama.png.zz99yy88.part"
    fresh.write_bytes(b"being written")
    user = out / ".my.notes.part"  # not a name mfim makes
    user.write_bytes(b"mine")
    t = tmp_path / "t"
    t.mkdir()
    for name in ("biden", "obama"):
        (t / f"{name}.jpg").write_bytes(inputs[name].read_bytes())
    assert cli.main(["swap", "-s", str(inputs["obama2"]), "-t", str(t), "-o", str(out), "-q", "--overwrite"]) == 0
    err = capsys.readouterr().err
    assert not stale.exists() and fresh.exists() and user.read_bytes() == b"mine"
    assert "removed 1 hidden .part temp file" in err and "left 1 hidden .part temp file" in err


@pytest.mark.skipif(".avif" not in __import__("PIL.Image").Image.registered_extensions(), reason="no AVIF in Pillow")
def test_avif_is_an_image_in_folders_too(fake, inputs, tmp_path):
    from PIL import Image

    t = tmp_path / "t"
    t.mkdir()
    Image.open(inputs["biden"]).save(t / "b.avif")
    assert cli.main(["swap", "-s", str(inputs["obama"]), "-t", str(t), "-o", str(tmp_path / "o"), "-q"]) == 0
    assert read_record(tmp_path / "o" / "b.png")["inputs"]["target"]["file"] == "b.avif"


def test_align_redoes_a_crop_when_another_folder_brings_the_same_name(inputs, tmp_path):
    """mfim align resumes through the journal of source stamps (mfim.data.align_folder), not by file name."""
    from mfim.assets import sha256_file

    a, b, out = tmp_path / "a", tmp_path / "b", tmp_path / "out"
    a.mkdir(), b.mkdir()
    (a / "p.jpg").write_bytes(inputs["obama"].read_bytes())
    (b / "p.jpg").write_bytes(inputs["biden"].read_bytes())
    common = ["--size", "64", "--workers", "1", "--quiet"]
    assert cli.main(["align", str(a), str(out), *common]) == 0
    assert cli.main(["align", str(b), str(out), *common]) == 0
    rec = read_record(out / "p.png")
    assert rec["source_sha256"] == sha256_file(b / "p.jpg")


def test_roi_photo_too_large_for_this_machine_is_a_reject_naming_the_limit(fake, inputs, tmp_path, monkeypatch,
                                                                          capsys):
    import mfim.resources

    h, w = read_rgb(inputs["biden"]).shape[:2]
    monkeypatch.setattr(mfim.resources, "available_memory", lambda: h * w * 40)  # this photo stands in for 79 MP
    out = tmp_path / "o.png"
    rc = cli.main(["swap", "-s", str(inputs["obama"]), "-t", str(inputs["biden"]), "-o", str(out), "--roi", "-q"])
    err = capsys.readouterr().err
    assert rc == 1 and "photo needs about" in err and "the limit on this machine is" in err and not out.exists()


def test_align_rejects_a_name_that_is_not_utf8_and_aligns_the_rest(inputs, tmp_path, capsys):
    import csv

    src = tmp_path / "photos"
    src.mkdir()
    with open(os.fsencode(str(src)) + b"/odd\xff.jpg", "wb") as f:
        f.write(inputs["obama"].read_bytes())
    (src / "z.jpg").write_bytes(inputs["obama2"].read_bytes())
    out = tmp_path / "out"
    assert cli.main(["align", str(src), str(out), "--size", "64", "--workers", "1", "--quiet"]) == 0
    rows = list(csv.DictReader(open(out / "rejects.csv", encoding="utf-8")))
    assert [r["file"] for r in rows] == ["odd\\xff.jpg"] and "not valid UTF-8" in rows[0]["reason"]
    assert (out / "z.png").is_file()


def test_assets_fetch_on_a_full_or_read_only_disk_is_one_line(monkeypatch, capsys):
    import mfim.assets

    def full(name, progress=True):
        raise OSError(errno.ENOSPC, "No space left on device", "/cache/stylegan2.part")

    monkeypatch.setattr(mfim.assets, "fetch", full)
    rc = cli.main(["assets", "fetch", "photo_obama", "--quiet"])
    err = capsys.readouterr().err.strip()
    assert rc == 1 and err == "mfim assets: No space left on device (/cache/stylegan2.part)"


@pytest.mark.slow
def test_full_disk_video_on_a_real_small_tmpfs(fake, inputs, tmp_path, capsys):
    """The injected truncation above, on a real full disk: a 1 MB tmpfs holding the (small, MPEG-4) input, whose
    Motion-JPEG output does not fit. Needs root (mount); skipped elsewhere."""
    import subprocess

    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(disk)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        src = face_clip(inputs, tmp_path / "clip.mp4", n=60)
        clip = disk / "clip.avi"
        shutil.copy(src, clip)  # an .avi name, so the output is Motion-JPEG: far larger than the MPEG-4 bytes
        before = clip.read_bytes()
        rc = cli.main(["swap", "-s", str(inputs["obama"]), "-t", str(clip), "-o", str(clip), "--overwrite", "--roi",
                       "-q"])
        err = capsys.readouterr().err
        assert rc == 1 and clip.read_bytes() == before and "Traceback" not in err
        assert "incomplete" in err or "empty" in err  # caught after writing, not by the estimate up front
        assert sorted(p.name for p in disk.iterdir()) == ["clip.avi"]
    finally:
        subprocess.run(["umount", str(disk)], check=False)
