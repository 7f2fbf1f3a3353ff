"""The commands say, once and in one line each, when their model draws synthetic 64 px renders and when `mfim swap`'s
settings differ from the ones reports/ were made with (mfim/commands/model_notes.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mfim import cli
from mfim.commands import model_notes
from mfim.models.stylegan2 import Generator
from mfim.weights import load_generator
from tests.test_cli_swap import fake, inputs  # noqa: F401  (fixtures)

REPO = Path(__file__).resolve().parents[1]
SHIPPED_SWAPPER = REPO / "checkpoints" / "mfim_synth64.pt"
SHIPPED_GENERATOR = REPO / "checkpoints" / "generator_synth64.pt"
SYNTHETIC_LINE = "model trained on synthetic BFM renders"


def lines_with(text: str, needle: str) -> list[str]:
    return [line for line in text.splitlines() if needle in line]


def test_the_shipped_generator_is_recognised_by_its_weights_and_nothing_else():
    G = load_generator(SHIPPED_GENERATOR)
    note = model_notes.synthetic_note(G, "g.pt")
    assert note.startswith("g.pt is a 64 px " + SYNTHETIC_LINE) and "configs/paper.yaml" in note
    with torch.no_grad():  # one weight one ulp away is another model
        w = next(G.parameters())
        w.view(-1)[0] = torch.nextafter(w.view(-1)[0], torch.tensor(float("inf")))
    assert model_notes.synthetic_note(G, "g.pt") is None
    torch.manual_seed(0)
    assert model_notes.synthetic_note(Generator(resolution=64, style_dim=32, n_mlp=2, channel_base=1024,
                                                channel_max=16), "random.pt") is None


def test_shipped_swapper_on_a_photo_says_it_is_synthetic_once(photo_paths, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # no params.yaml here: only the model's note
    out = tmp_path / "swap.png"
    rc = cli.main(["swap", "-s", str(photo_paths["obama"]), "-t", str(photo_paths["biden"]), "-o", str(out), "-q",
                   "--checkpoint", str(SHIPPED_SWAPPER)])
    err = capsys.readouterr().err
    assert rc == 0 and out.is_file()
    [line] = lines_with(err, SYNTHETIC_LINE)
    assert line.startswith(f"mfim swap: {SHIPPED_SWAPPER} is a 64 px ") and "paper scale (configs/paper.yaml" in line
    assert err.strip().splitlines() == [line]


def test_mix_and_generate_say_it_too(photo_paths, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    rc = cli.main(["mix", "--global", str(photo_paths["obama"]), "--local", str(photo_paths["obama2"]),
                   "-t", str(photo_paths["biden"]), "-o", str(tmp_path / "mix.png"), "-q",
                   "--checkpoint", str(SHIPPED_SWAPPER)])
    assert rc == 0 and len(lines_with(capsys.readouterr().err, "mfim mix: ")) == 1
    rc = cli.main(["generate", "--checkpoint", str(SHIPPED_GENERATOR), "--seeds", "0", "--outdir",
                   str(tmp_path / "g"), "--device", "cpu"])
    [line] = lines_with(capsys.readouterr().err, SYNTHETIC_LINE)
    assert rc == 0 and line.startswith("mfim generate: ")


def write_params(folder: Path, steps, exp) -> None:
    from tests.defaults import write_params as write_full

    write_full(folder / "params.yaml", {"source_fit": {"steps": steps, "exp": exp}})


@pytest.mark.parametrize(
    "params, flags, expected",
    [
        ((50, 0.1), [], "--fit-steps 0 --fit-exp 0 (the paper's feed-forward swap); reports/ use --fit-steps 50 "
                        "--fit-exp 0.1 (params.yaml source_fit)"),
        ((50, 0.1), ["--fit-steps", "50"], "--fit-steps 50 --fit-exp 0 (50 source-fit steps); reports/ use "
                                           "--fit-steps 50 --fit-exp 0.1"),
        ((50, 0.1), ["--fit-steps", "50", "--fit-exp", "0.1"], None),
        ((0, 0.0), [], None),  # configs/paper.yaml: the feed-forward swap, as the default
        (None, [], None),  # no params.yaml in the working folder: nothing to compare with
        ("other", [], None),  # a params.yaml this code cannot read (another project's): nothing to compare with
    ],
)
def test_swap_settings_that_differ_from_reports_are_printed(fake, inputs, tmp_path, monkeypatch, capsys,  # noqa: F811
                                                             params, flags, expected):
    monkeypatch.chdir(tmp_path)
    if params == "other":
        (tmp_path / "params.yaml").write_text("project:\n  seed: 0\nsource_fit:\n  steps: 50\n")
    elif params is not None:
        write_params(tmp_path, *params)
    rc = cli.main(["swap", "-s", str(inputs["obama"]), "-t", str(inputs["biden"]), "-o", str(tmp_path / "o.png"),
                   "-q", *flags])
    err = capsys.readouterr().err
    assert rc == 0
    notes = lines_with(err, "reports/ use")
    if expected is None:
        assert notes == []
    else:
        assert len(notes) == 1 and notes[0].startswith("mfim swap: " + expected)


def test_the_repository_params_are_what_reports_were_made_with():
    """The note compares against params.yaml; the evaluate stage recorded the fit reports/ were made with."""
    import json

    made_with = json.loads((REPO / "reports" / "metrics_detail.json").read_text())["source_fit"]
    assert model_notes.reports_source_fit(REPO / "params.yaml") == (made_with["steps"], made_with.get("exp", 0.0))


def test_make_demo_inputs_swap_with_the_shipped_model(tmp_path, monkeypatch, capsys):
    """What `make demo` runs: two held-out people rendered by mfim.demo, one swap, a marked output."""
    from mfim import demo
    from mfim import watermark as wm
    from mfim.imageio import read_rgb
    from mfim.provenance import read_record

    monkeypatch.chdir(REPO)  # params.yaml's synthesize group, as make runs it
    inputs = demo.render_pair(tmp_path)
    assert all(read_record(p)["synthetic"] for p in inputs.values())
    out = tmp_path / "swap.png"
    rc = cli.main(["swap", "--source", str(inputs["source"]), "--target", str(inputs["target"]), "--output", str(out),
                   "--roi", "-q", "--checkpoint", str(SHIPPED_SWAPPER)])
    err = capsys.readouterr().err
    assert rc == 0 and wm.detect(read_rgb(out))["watermarked"]
    assert len(lines_with(err, SYNTHETIC_LINE)) == 1 and len(lines_with(err, "reports/ use")) == 1
    # the swap changed the target's face and kept its scene (up to the watermark, 40 dB: a few levels)
    swap, target = read_rgb(out).astype(int), read_rgb(inputs["target"]).astype(int)
    assert abs(swap - target).mean() > 5 and (abs(swap - target)[:, :16] <= 8).mean() > 0.99


def test_an_unreadable_reference_file_gives_no_note_and_no_error(tmp_path, monkeypatch):
    pointer = tmp_path / "generator_synth64.pt"
    pointer.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:00\nsize 1\n")
    monkeypatch.setattr(model_notes, "SYNTHETIC_GENERATORS", (pointer,))
    assert model_notes.synthetic_note(load_generator(SHIPPED_GENERATOR), "g.pt") is None
