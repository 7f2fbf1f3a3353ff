"""FaceSwapper and `mfim swap` with the real model code: a randomly initialised small MFIM written by the same
save_swapper the train stage uses (no trained weights needed), on the real test photos."""

import numpy as np
import pytest
import torch

from mfim import cli
from mfim import watermark as wm
from mfim.imageio import ImageRejected, read_rgb
from mfim.models.mfim import MFIM, load_swapper, save_swapper
from mfim.models.stylegan2 import Generator
from mfim.provenance import read_record
from tests.defaults import unit_encoder


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    G = Generator(resolution=64, style_dim=32, n_mlp=2, channel_base=1024, channel_max=16)
    model = MFIM(G, unit_encoder(input_size=64, width=8, code_channels=16), coarse_max_res=16)
    path = tmp_path_factory.mktemp("ck") / "mfim.pt"
    save_swapper(model, path, meta={"align_output_size": 128, "data_resolution": 64})
    return path


def test_swapper_round_trip_is_bit_exact(checkpoint):
    a, meta = load_swapper(checkpoint)
    b, _ = load_swapper(checkpoint)
    x, y = torch.rand(2, 3, 64, 64) * 2 - 1, torch.rand(2, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        assert torch.equal(a.swap(x, y), b.swap(x, y))
    assert meta["align_output_size"] == 128


def test_face_swapper_on_photos(checkpoint, photos):
    from mfim.inference import FaceSwapper

    fs = FaceSwapper.from_checkpoint(checkpoint)
    src, tgt = fs.prepare(photos["obama"]), fs.prepare(photos["biden"])
    assert src.aligned.shape == (128, 128, 3) and src.landmarks.shape == (68, 2)
    face = fs.swap(src, tgt)
    assert face.shape == (64, 64, 3) and face.dtype == np.uint8
    pasted = fs.swap(src, tgt, roi=True)
    assert pasted.shape == photos["biden"].shape
    # E+ keeps the target photo outside the face region exactly
    assert np.array_equal(pasted[:20, :20], photos["biden"][:20, :20])
    assert not np.array_equal(pasted, photos["biden"])
    mixed = fs.mix(tgt, src, src)
    np.testing.assert_array_equal(mixed, face)  # one source twice = a plain swap
    with pytest.raises(ImageRejected, match="no face"):
        fs.prepare(np.full((200, 200, 3), 128, np.uint8))


def test_cli_swap_with_real_model_marks_output(checkpoint, photo_paths, tmp_path):
    out = tmp_path / "out.png"
    rc = cli.main(["swap", "-s", str(photo_paths["obama"]), "-t", str(photo_paths["biden"]), "-o", str(out), "--roi",
                   "-q", "--checkpoint", str(checkpoint)])
    assert rc == 0
    rec = read_record(out)
    from mfim.assets import sha256_file

    assert rec["synthetic"] and rec["checkpoint_sha256"] == sha256_file(checkpoint)
    img = read_rgb(out)
    assert img.shape == read_rgb(photo_paths["biden"]).shape
    assert wm.detect(img)["watermarked"]


@pytest.mark.parametrize("content", [b"", b"not a checkpoint at all", "truncated", "wrong_kind", "bad_pickle"])
def test_bad_swapper_file_is_one_clear_error_and_exit_code(tmp_path, checkpoint, photo_paths, capsys, content):
    import pickle

    from mfim.weights import CheckpointError

    bad = tmp_path / "bad.pt"
    if content == "truncated":
        bad.write_bytes(checkpoint.read_bytes()[:5000])
    elif content == "wrong_kind":
        torch.save({"format": "something-else", "weights": torch.zeros(3)}, bad)
    elif content == "bad_pickle":

        class Evil:
            def __reduce__(self):
                return (print, ("this must never run",))

        bad.write_bytes(pickle.dumps(Evil()))
    else:
        bad.write_bytes(content)
    with pytest.raises(CheckpointError, match="bad.pt"):
        load_swapper(bad)
    rc = cli.main(["swap", "--source", str(photo_paths["obama"]), "--target", str(photo_paths["biden"]),
                   "--output", str(tmp_path / "out.png"), "--checkpoint", str(bad), "--quiet"])
    err = capsys.readouterr()
    assert rc == 3 and "bad.pt" in err.err and "Traceback" not in err.err + err.out
    assert "this must never run" not in err.out
    assert len(err.err.strip().splitlines()) == 1
    assert not (tmp_path / "out.png").exists()
