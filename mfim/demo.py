"""`python -m mfim.demo OUTDIR`: the two input photos of `make demo`, rendered here in seconds, so a first swap
needs no data set and no `make repro`.

Two people of the embedded default's held-out eval split (synthesize params: identities after the 320 training
people; no shipped model trained on them), each in its own scene as the `synthesize` stage renders them, written with
the synthetic provenance record every render carries: OUTDIR/source.png and OUTDIR/target.png.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

# Eval identities 320-359 of params.yaml's synthesize group; this pair differs in skin tone and face shape, so the
# swap's change is visible at 64 px.
SOURCE_PERSON, TARGET_PERSON = 337, 331
IMAGE_INDEX = 0


def synth_config():
    """params.yaml's synthesize group (the working folder's, as `make demo` runs it), else the embedded default's."""
    from mfim.config import embedded_default, load_params
    from mfim.data.synth import SynthConfig

    params = load_params("params.yaml") if Path("params.yaml").is_file() else embedded_default()
    return SynthConfig.from_params(params["synthesize"])


def render_pair(outdir: Path, overwrite: bool = True) -> dict[str, Path]:
    from mfim.data.synth import SOURCE, Synthesizer
    from mfim.provenance import provenance_record, save_image

    synth = Synthesizer(synth_config())
    record = provenance_record("synthetic", source=SOURCE)
    written = {}
    for role, person in (("source", SOURCE_PERSON), ("target", TARGET_PERSON)):
        out, _ = synth.render(synth.identity(person), IMAGE_INDEX)
        written[role] = save_image(outdir / f"{role}.png", out.image, record, overwrite=overwrite)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mfim.demo", description=__doc__.splitlines()[0])
    parser.add_argument("outdir", type=Path)
    args = parser.parse_args(argv)
    args.outdir.mkdir(parents=True, exist_ok=True)
    for role, path in render_pair(args.outdir).items():
        print(f"{role:7s} {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
