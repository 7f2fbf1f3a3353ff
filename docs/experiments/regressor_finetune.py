"""Continue the shipped loss network's fit on people it has not seen, on this CPU (§20).

    python docs/experiments/regressor_finetune.py OUT_DIR [--people 14000] [--epochs 3] [--group-weights 1,2,1]

§18 fitted the loss network on a lent GPU (22,120 people of its range, identities 100,000-122,119; that file is
`checkpoints/regressor_synth64.pt` at commit 33ed81d, sha256 6f6d0bc4...) and its curve said people, more than
epochs, raise r; its expression r (0.747) stayed under the issue's 0.8. Four runs of this script, each ``--init``
the one before, took it to 0.803 and are what checkpoints/ ships now (the commands and sha256s are in
checkpoints/regressor_synth64.json; remake from ``git show 33ed81d:checkpoints/regressor_synth64.pt``). A fit from 3DDFA_V2's start on more people does not fit this machine's budget (mobilenet_v1 at its
120 px roi: ~17 ms an image forward and backward on 2 cores), but a continuation does: this renders ``--people`` new
people of the same range (from ``--first-id``, one render each, deterministic from params.yaml and the ids), and
fits the shipped network further on them (its weights and normalisation: ``fit_regressor(init=...)``) with the
expression group weighted up (``--group-weights`` shape,exp,pose). Validation: the 500 held-out people of §18
(identities 190,000+, 2 renders each), per coefficient as well as the mean.

Writes OUT_DIR/regressor_finetune.pt (the `fit_regressor` checkpoint format, its recipe inside), OUT_DIR/result.json
(r before and after, per coefficient) and OUT_DIR/log.txt.
"""

import argparse
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from regressor_scale import VAL_OFFSET, VAL_PEOPLE, VAL_RENDERS, run_log  # noqa: E402

from mfim.assets.store import sha256_file  # noqa: E402
from mfim.data.regressor_set import RenderSetConfig, render_aligned_set  # noqa: E402


def render(synth, first: int, people: int, renders: int, workers: int, cache: Path | None, log) -> dict:
    if cache is not None and cache.is_file():
        with np.load(cache) as z:
            out = {k: z[k] for k in z.files}
        if len(out["identity"]) != people * renders or int(out["identity"][0]) != first:
            raise ValueError(f"{cache} holds another set ({len(out['identity'])} images from {out['identity'][0]})")
        log(f"{people} people read from {cache}")
        return out
    out = render_aligned_set(synth, RenderSetConfig(people, renders, first, 64, workers), log=log)
    if cache is not None:
        np.savez(cache, **out)
    return out


def per_coefficient_r(model, val: dict) -> dict:
    from mfim.data.threedmm_table import group_errors, pearson_per_column
    from mfim.data.regressor_fit import predict

    pred = predict(model, val["images"])
    out = {"val_error": group_errors(pred, val)}
    for g in ("shape", "exp"):
        out[f"{g}_r_first10"] = [round(float(v), 4) for v in pearson_per_column(pred[g][:, :10], val[g][:, :10])]
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--init", default="checkpoints/regressor_synth64.pt", help="the fit to continue")
    ap.add_argument("--first-id", type=int, default=122_120, help="first new person (after the shipped fit's)")
    ap.add_argument("--people", type=int, default=14_000)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--lr", type=float, default=3e-4, help="peak of the one-cycle schedule (the first fit: 1e-3)")
    ap.add_argument("--group-weights", default="1,2,1", help="shape,exp,pose weights in the loss")
    ap.add_argument("--workers", type=int, default=2, help="render processes")
    ap.add_argument("--render-cache", default=None, help=".npz of the new people: written once, then read")
    ap.add_argument("--val-cache", default=None, help=".npz of the validation people: written once, then read")
    args = ap.parse_args()
    out = Path(args.out)
    log = run_log(out, time.time())

    from mfim.config import load_params
    from mfim.data.synth import SynthConfig
    from mfim.data.regressor_fit import FitConfig, fit_regressor
    from mfim.nets.threedmm_regressor import load_fitted_regressor, save_regressor

    torch.set_num_threads(2)
    if args.first_id + args.people > VAL_OFFSET:
        raise SystemExit(f"people {args.first_id}..{args.first_id + args.people - 1} reach the validation set's "
                         f"({VAL_OFFSET}+)")
    synth = SynthConfig.from_params(load_params()["synthesize"])
    val = render(synth, VAL_OFFSET, VAL_PEOPLE, VAL_RENDERS, args.workers,
                 Path(args.val_cache) if args.val_cache else None, log)
    train = render(synth, args.first_id, args.people, 1, args.workers,
                   Path(args.render_cache) if args.render_cache else None, log)
    init = load_fitted_regressor(args.init)
    before = per_coefficient_r(init, val)
    log(f"start: shape r {before['val_error']['shape']['pearson_r_first10']:.3f}, expression r "
        f"{before['val_error']['exp']['pearson_r']:.3f}")
    weights = tuple(float(w) for w in args.group_weights.split(","))
    fit = FitConfig(epochs=args.epochs, batch_size=64, lr=args.lr, shape_tail_weight=0.1, group_weights=weights)
    model, rep = fit_regressor(train["images"], train, train["identity"], init.config, fit, log=log, val=val,
                               init=init)
    after = per_coefficient_r(model, val)
    log(f"after: shape r {after['val_error']['shape']['pearson_r_first10']:.3f}, expression r "
        f"{after['val_error']['exp']['pearson_r']:.3f}, pose {after['val_error']['pose']['mae_deg']:.2f} deg "
        f"({rep['seconds']:.0f} s)")
    recipe = {"init": {"path": args.init, "sha256": sha256_file(args.init)},
              "render": {"people": args.people, "renders": 1, "first_id": args.first_id},
              "fit": asdict(fit), "val": {"people": VAL_PEOPLE, "renders": VAL_RENDERS, "identity_offset": VAL_OFFSET},
              "train_loss": rep["train_loss"], "seconds": rep["seconds"], "device": "cpu"}
    save_regressor(model, out / "regressor_finetune.pt", "ground_truth", rep["val_error"],
                   extra={"recipe": json.dumps(recipe)})
    (out / "result.json").write_text(json.dumps({"before": before, "after": after, "recipe": recipe}, indent=1))
    log("done")


if __name__ == "__main__":
    main()
