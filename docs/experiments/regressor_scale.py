"""The loss network's regressor fitted at scale on a GPU machine, with the curve of r against people (§17, §18).

    python docs/experiments/regressor_scale.py OUT_DIR [--seconds 480] [--device cuda] [--workers 15]

Renders, with ``workers`` processes, (1) a validation set of 500 people x 2 renders from identity 190,000 (never in
any other set: the loss network's people start at 100,000, the shape evaluator's at 200,000), (2) the `fit_regressor`
stage's render set (threedmm.regressor: 600 people x 4 renders from 100,000) and (3) as many more people as the time
allows at one render each (identities 100,600 on; people, not renders per person, are what the shape needs). Then
fits `mobilenet_v1` regressors with the §15 recipe (3DDFA_V2 start, batch 64, lr 1e-3, shape_tail_weight 0.1,
photometric augmentation, 8 epochs) on the first N people for N = all, 600, 2,400, 6,600, 12,000, 24,000 (all
first: it is the one kept), each validated on (1), while the time lasts.

Writes OUT_DIR/curve.json (one row per fit) and OUT_DIR/regressor_scale.pt (the fit on all people, the
`fit_regressor` checkpoint format). The render is deterministic from params.yaml and the identity ids, whatever the
number of workers. `--group evaluator` does the same from the shape evaluator's set (threedmm.evaluator: people from
200,000 on, its seed): an evaluator independent of the loss network's people. `--epochs`, `--sizes` and
`--ms-per-image` (skip the two-epoch timing, which overstates an epoch about twice) trade the curve for a longer fit.
The shipped checkpoints/regressor_synth64.pt is `--seconds 520 --render-share 0.5 --workers 15` (§18). On a machine
without onnx2torch, set MFIM_TDDFA_STATE to a .pt of
``mfim.nets.mobilenet_v1.tddfa_state()`` made elsewhere.
"""

import argparse
import json
import os
import sys
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import asdict, replace
from multiprocessing import get_context
from pathlib import Path

import numpy as np
import torch

from mfim.data.regressor_set import stack_renders

VAL_OFFSET, VAL_PEOPLE, VAL_RENDERS = 190_000, 500, 2
CHUNK = 40  # people per task: small, so stopping at the deadline waits little
SIZES = (600, 2400, 6600, 12000, 24000)


def _render_chunk(ids, renders, size):
    from mfim.data import regressor_set

    return [regressor_set._render_identity(i, renders, size) for i in ids]


def _init_worker(cfg):
    import cv2

    from mfim.data import regressor_set

    cv2.setNumThreads(1)
    regressor_set._init(cfg)


def render_sets(synth, val_people, base_people, base_renders, base_offset, workers, render_deadline, log):
    """(val, base, extra results list in identity order); extra stops at ``render_deadline`` (time.time())."""
    jobs = [("val", list(range(VAL_OFFSET + i, min(VAL_OFFSET + val_people, VAL_OFFSET + i + CHUNK))), VAL_RENDERS)
            for i in range(0, val_people, CHUNK)]
    jobs += [("base", list(range(base_offset + i, min(base_offset + base_people, base_offset + i + CHUNK))),
              base_renders) for i in range(0, base_people, CHUNK)]
    first_extra = base_offset + base_people
    last = VAL_OFFSET if first_extra < VAL_OFFSET else first_extra + 100_000  # never into another set's people
    jobs += [("extra", list(range(first_extra + i, first_extra + i + CHUNK)), 1)
             for i in range(0, last - first_extra - CHUNK, CHUNK)]
    got = {"val": [], "base": [], "extra": []}
    t0 = time.time()
    with ProcessPoolExecutor(workers, mp_context=get_context("spawn"), initializer=_init_worker,
                             initargs=(synth,)) as pool:
        pending, queue = {}, iter(jobs)
        for _ in range(2 * workers):
            kind, ids, n = next(queue)
            pending[pool.submit(_render_chunk, ids, n, 64)] = kind
        while pending:
            done, _ = wait(pending, return_when=FIRST_COMPLETED)
            for f in done:
                got[pending.pop(f)].extend(f.result())
            needed = len(got["val"]) < val_people or len(got["base"]) < base_people
            if needed or time.time() < render_deadline:
                for _ in range(len(done)):
                    job = next(queue, None)
                    if job is not None:
                        pending[pool.submit(_render_chunk, job[1], job[2], 64)] = job[0]
            n_extra = len(got["extra"])
            if n_extra and n_extra % (25 * CHUNK) == 0:
                log(f"rendered {n_extra} extra people ({time.time() - t0:.0f} s)")
    for k in got:
        got[k].sort(key=lambda r: r[0])
    # keep the extra people a contiguous run of identities (a fit on "the first N" is then well defined)
    extra, expect = [], first_extra
    for r in got["extra"]:
        if r[0] != expect:
            break
        extra.append(r)
        expect += 1
    log(f"render: val {len(got['val'])} people, base {len(got['base'])}, extra {len(extra)} in "
        f"{time.time() - t0:.0f} s")
    return stack_renders(got["val"], VAL_RENDERS), stack_renders(got["base"], base_renders), extra


def run_log(out: Path, t_start: float):
    """A ``log(msg)`` that prints and appends to OUT/log.txt, each line stamped with the seconds since ``t_start``."""
    out.mkdir(parents=True, exist_ok=True)
    log_file = open(out / "log.txt", "a")

    def log(msg):
        line = f"[{time.time() - t_start:6.1f} s] {msg}"
        print(line, flush=True)
        log_file.write(line + "\n")
        log_file.flush()

    return log


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--seconds", type=float, default=480, help="the whole run's time budget")
    ap.add_argument("--render-share", type=float, default=0.55, help="part of the budget spent rendering")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 1))
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--lr", type=float, default=1e-3, help="Adam's step (the stage's small CNN from scratch: 2e-3)")
    ap.add_argument("--max-extra", type=int, default=None, help="cap on the extra people (for a quick check)")
    ap.add_argument("--sizes", default=",".join(map(str, SIZES)),
                    help="people in the curve's smaller fits (comma-separated; empty: only the fit on all)")
    ap.add_argument("--ms-per-image", type=float, default=None,
                    help="the fit's time an image, instead of timing two epochs of the base set (which overstates it ~2x)")
    ap.add_argument("--group", default="regressor", choices=("regressor", "evaluator"),
                    help="threedmm.<group>: whose render set is the base (evaluator: people from 200,000, so a fit "
                         "independent of the loss network's people)")
    ap.add_argument("--backbone", default="mobilenet_v1", choices=("mobilenet_v1", "small"),
                    help="small: the stage's CNN from scratch, threedmm.<group>.width wide (a differently built network)")
    ap.add_argument("--render-cache", default=None,
                    help="an .npz of the rendered sets: written after rendering, read instead of rendering if present")
    ap.add_argument("--quick", action="store_true", help="40 validation and 40 base people (a check of the script)")
    args = ap.parse_args()
    t_start = time.time()
    out = Path(args.out)
    log = run_log(out, t_start)

    state = os.environ.get("MFIM_TDDFA_STATE")
    if state:
        import mfim.nets.mobilenet_v1 as mb

        mb.tddfa_state = lambda onnx_path=None: torch.load(state, map_location="cpu", weights_only=True)
    from mfim.config import load_params
    from mfim.data.synth import SynthConfig
    from mfim.data.regressor_fit import FitConfig
    from mfim.nets.threedmm_regressor import RegressorConfig, save_regressor
    from mfim.data.regressor_fit import fit_regressor as library_fit

    import cv2

    cv2.setNumThreads(1)  # inherited by the forked augmentation workers: one thread each
    torch.backends.cudnn.benchmark = True
    params = load_params()
    r = params["threedmm"][args.group]
    synth = SynthConfig.from_params(params["synthesize"])
    base_people, base_renders, base_offset = (int(r["render_identities"]), int(r["render_images_per_identity"]),
                                              int(r["identity_offset"]))
    log(f"device {args.device} ({torch.cuda.get_device_name() if args.device == 'cuda' else 'cpu'}), "
        f"{args.workers} workers, budget {args.seconds:.0f} s")
    val_people = VAL_PEOPLE
    if args.quick:
        val_people, base_people = 40, 40
    cache = Path(args.render_cache) if args.render_cache else None
    if cache is not None and cache.is_file():
        with np.load(cache) as z:
            val, base, extra = ({k[len(p) + 1:]: z[k] for k in z.files if k.startswith(p + "/")}
                                for p in ("val", "base", "extra"))
        log(f"render sets read from {cache}: val {len(val['images'])}, base {len(base['images'])}, "
            f"extra {len(extra['images'])} images")
    else:
        val, base, extra = render_sets(synth, val_people, base_people, base_renders, base_offset, args.workers,
                                       t_start + args.render_share * args.seconds, log)
        extra = stack_renders(extra, 1) if extra else {k: v[:0] for k, v in base.items()}
        if cache is not None:
            np.savez(cache, **{f"{p}/{k}": v for p, d in (("val", val), ("base", base), ("extra", extra))
                               for k, v in d.items()})
    if args.max_extra is not None:
        extra = {k: v[: args.max_extra] for k, v in extra.items()}
    cfg = RegressorConfig(64, int(r["width"]), backbone=args.backbone)  # width: unused by mobilenet_v1

    def recipe_fit(epochs):
        return FitConfig(epochs=epochs, batch_size=64, lr=args.lr, shape_tail_weight=0.1, workers=args.workers,
                         device=args.device, seed=int(r.get("seed", 0)))

    def fit_regressor(*a, **kw):  # worker processes need shared memory; without enough, augment in-process
        try:
            return library_fit(*a, **kw)
        except RuntimeError as e:
            if args.workers == 0 or "DataLoader worker" not in str(e):
                raise
            log(f"augmentation workers failed ({e}); again with none")
            args.workers = 0
            return library_fit(*a[:4], replace(a[4], workers=0), *a[5:], **kw)

    # two epochs on the base set time an epoch (the second one's: setup and validation apart), so the fit on every
    # person cannot run past the budget: it gets at most 60 % of what is left, extra people dropped if need be
    if args.ms_per_image is None:
        ends = []
        fit_regressor(base["images"], base, base["identity"], cfg, recipe_fit(2),
                      log=lambda m: (ends.append(time.time()), log(m)), val=val)
        seconds_per_image = (ends[-1] - ends[-2]) / len(base["images"])
    else:
        seconds_per_image = args.ms_per_image / 1e3
    left = t_start + args.seconds - time.time()
    fits_images = int(0.6 * left / (seconds_per_image * args.epochs))
    log(f"calibration: {seconds_per_image * 1e3:.3f} ms an image; {left:.0f} s left: at most {fits_images} images")
    extra = {k: v[: max(0, fits_images - len(base["images"]))] for k, v in extra.items()}
    all_people = base_people + len(extra["images"])
    curve = [int(n) for n in args.sizes.split(",") if n] if not args.quick else [40, 60]
    sizes = [all_people] + [s for s in curve if s < all_people]
    rows = []
    for people in sizes:
        n_extra = people - base_people
        steps_images = (len(base["images"]) + n_extra) * args.epochs
        left = t_start + args.seconds - time.time()
        if people != all_people and steps_images * seconds_per_image * 1.2 + 10 > left:
            log(f"skip {people} people: ~{steps_images * seconds_per_image:.0f} s needed, {left:.0f} s left")
            continue
        train = base if n_extra == 0 else {k: np.concatenate([base[k], extra[k][:n_extra]]) for k in base}
        fit = recipe_fit(args.epochs)
        t0 = time.time()
        model, rep = fit_regressor(train["images"], train, train["identity"], cfg, fit, log=log, val=val)
        took = time.time() - t0
        seconds_per_image = took / steps_images
        v = rep["val_error"]
        row = {"people": people, "images": int(len(train["images"])), "epochs": args.epochs, "seconds": round(took, 1),
               "val_shape_r_first10": v["shape"]["pearson_r_first10"], "val_shape_r": v["shape"]["pearson_r"],
               "val_exp_r": v["exp"]["pearson_r"], "val_pose_mae_deg": v["pose"]["mae_deg"]}
        rows.append(row)
        log(json.dumps(row))
        (out / "curve.json").write_text(json.dumps({"val": {"people": val_people, "renders": VAL_RENDERS,
                                                            "identity_offset": VAL_OFFSET},
                                                    "device": args.device, "rows": rows}, indent=1))
        if people == all_people:
            recipe = {"render": {"base": [base_people, base_renders, base_offset],
                                 "extra": [len(extra["images"]), 1, base_offset + base_people]},
                      "backbone": args.backbone,
                      "fit": asdict(fit), "val": {"people": val_people, "renders": VAL_RENDERS,
                                                  "identity_offset": VAL_OFFSET},
                      "train_loss": rep["train_loss"], "seconds": rep["seconds"], "device": args.device}
            save_regressor(model, out / "regressor_scale.pt", "ground_truth", rep["val_error"],
                           extra={"recipe": json.dumps(recipe)})
            log(f"saved the {people}-people fit")
    log("done")


if __name__ == "__main__":
    sys.exit(main())
