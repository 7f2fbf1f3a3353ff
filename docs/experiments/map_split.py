"""Style maps split by resolution like the codes: the source's maps at some resolutions (docs/EXPERIMENTS.md §16).

    python docs/experiments/map_split.py eval MODEL.pt OUT_DIR [--alpha A] [--res 16]
    python docs/experiments/map_split.py train RUN_DIR [--alpha A] [--res 16] [-S key=value ...]

The paper takes every style map from the target. §15's layer probe found that at 64 px the target's 16 px maps carry
part of the target's identity; this probe asks what the swap gains and loses when the maps at ``--res`` are
``alpha`` x the source's + (1 - alpha) x the target's. ``eval`` changes only inference (the `evaluate` stage on
MODEL.pt into OUT_DIR); ``train`` also trains that way (docs/experiments/run_variant.py, same arguments). Self-swaps
are unchanged (source = target). Repo root, after `dvc repro evalsets`.
"""

import argparse
import sys
from pathlib import Path

from mfim.runtime import ensure_allocator_env


def split_maps_swap(resolutions: set[int], alpha: float):
    """An ``MFIM.swap`` whose style maps at ``resolutions`` are blended from the source's (weight ``alpha``)."""

    def swap(model, x_src, x_tgt):
        if x_src is x_tgt:
            return model.synthesize(*model.invert(x_tgt))
        codes, maps = model.encode_target(x_tgt)
        src_codes, src_maps = model.invert(x_src, None, with_maps=True)
        codes.update({i: src_codes[i] for i in model.src_indices})
        res_of = {n.index: n.resolution for n in model.generator.noise_layers}
        maps = {i: (1 - alpha) * m + alpha * src_maps[i] if res_of[i] in resolutions else m for i, m in maps.items()}
        return model.synthesize(codes, maps)

    return swap


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("mode", choices=["eval", "train"])
    ap.add_argument("paths", nargs="+")
    ap.add_argument("--alpha", type=float, default=1.0)
    ap.add_argument("--res", default="16", help="comma-separated map resolutions taken (partly) from the source")
    args, rest = ap.parse_known_args()

    ensure_allocator_env()
    from mfim.models import mfim

    mfim.MFIM.swap = split_maps_swap({int(r) for r in args.res.split(",")}, args.alpha)
    if args.mode == "eval":
        from mfim.config import load_params
        from mfim.evaluation.evaluate import run_evaluation
        from mfim.training.presets import apply_preset

        model_path, out = args.paths
        run_evaluation(apply_preset(load_params()), model_path=Path(model_path), reports_dir=Path(out))
    else:
        import runpy

        sys.argv = ["run_variant.py", *args.paths, *rest]
        runpy.run_path(str(Path(__file__).with_name("run_variant.py")), run_name="__main__")


if __name__ == "__main__":
    main()
