"""`mfim generate` never replaces a file it did not make and refuses a bad --outdir before loading anything."""

from __future__ import annotations

from mfim.cli import main


def test_generate_refuses_existing_outputs_and_bad_outdir_before_loading(tmp_path, capsys):
    ckpt = tmp_path / "not_even_read.pt"
    ckpt.write_bytes(b"a checkpoint would fail to load, so refusals below happen before loading it")
    out = tmp_path / "o"
    out.mkdir()
    (out / "seed0001.png").write_bytes(b"my picture")
    argv = ["generate", "--checkpoint", str(ckpt), "--seeds", "0-2"]
    assert main(argv + ["--outdir", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"mfim generate: {out / 'seed0001.png'} already exists; pass --overwrite to replace it"
    assert (out / "seed0001.png").read_bytes() == b"my picture"

    inside = tmp_path / "models"
    inside.mkdir()
    as_output = inside / "manifest.json"
    as_output.write_bytes(b"checkpoint bytes")
    assert main(["generate", "--checkpoint", str(as_output), "--seeds", "0", "--outdir", str(inside)]) == 2
    assert "is the --checkpoint file itself" in capsys.readouterr().err
    assert as_output.read_bytes() == b"checkpoint bytes"

    assert main(argv + ["--outdir", str(ckpt / "sub")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "is a file, not a folder" in err
    # with --overwrite the checks pass and the (bad) checkpoint is what fails: a model-file problem, exit 3
    assert main(argv + ["--outdir", str(out), "--overwrite"]) == 3
    assert "already exists" not in capsys.readouterr().err
