"""Give a shipped swapper a trained refiner: the `warmstart` stage's phase 3 (mfim.training.warmstart) on its file.

    python docs/experiments/refine_swapper.py IN.pt OUT.pt [-S key=value ...]      (repo root, after `dvc repro shard`)

The swapper in IN.pt (its EMA encoder, frozen) gets a refiner (``encoder.refine_iterations`` of params.yaml, at
least 1) that starts as a copy of its encoder and learns ``warmstart.refine_steps`` steps of self-reconstruction on
data/shards (L1 + LPIPS + ``warmstart.refine_id`` x ID), as the `warmstart` stage's phase 3 does on a fresh encoder.
OUT.pt is IN.pt's generator and discriminator with the refined encoder; OUT.json records IN's record whole under
"previous", the params, the curve and the wall time (the layout of docs/experiments/continue_swapper.py).
"""

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

import torch

from mfim.runtime import ensure_allocator_env


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("inp", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("-S", dest="overrides", action="append", default=[])
    args = ap.parse_args()
    ensure_allocator_env()
    from mfim.assets import sha256_file
    from mfim.config import load_params, lookup, override
    from mfim.criteria.id_loss import IDLoss
    from mfim.criteria.recon_loss import ReconLoss
    from mfim.data.pairs import pair_batches
    from mfim.data.shards import split_pattern
    from mfim.models.encoder import FacialAttributeEncoder
    from mfim.models.mfim import load_swapper, save_swapper
    from mfim.nets.perceptual import load_lpips
    from mfim.runtime import configure_threads
    from mfim.training.build import build_identity_embedder
    from mfim.training.warmstart import WarmStartConfig, run_warmstart

    params = override(load_params(), args.overrides)
    configure_threads(lookup(params, "project.threads"))
    seed = int(lookup(params, "project.seed"))
    cfg = replace(WarmStartConfig.from_params(params["warmstart"]), regression_steps=0, recon_steps=0)
    iterations = max(1, int(lookup(params, "encoder.refine_iterations")))

    model, _ = load_swapper(args.inp)
    G = model.generator
    if model.encoder.refiner is None:
        refine_res = lookup(params, "encoder.refine_map_resolutions")
        enc = FacialAttributeEncoder(replace(model.encoder.cfg, refine_iterations=iterations,
                                             refine_map_resolutions=None if refine_res is None else tuple(refine_res)),
                                     G.style_layers, G.noise_layers)
        assert enc.load_state_starting_refiner(model.encoder.state_dict())
        model.encoder = enc
    lp = load_lpips(lookup(params, "loss.lpips_net")).eval().requires_grad_(False)
    real = iter(pair_batches(split_pattern("data/shards", "train"), None, (cfg.batch_size + 1) // 2, seed + 7,
                             same_identity_fraction=0.0, augment=bool(lookup(params, "train.augment")),
                             resolution=G.resolution))
    t0 = time.perf_counter()
    _, ema_state, rows = run_warmstart(model, cfg, real, ReconLoss(lp), seed=seed,
                                       id_loss=IDLoss(build_identity_embedder(params, "cpu")))
    seconds = time.perf_counter() - t0
    source = torch.load(args.inp, map_location="cpu", weights_only=True)
    # the D the swapper was trained against, so that `train` can continue from it
    extra = {"discriminator": source["discriminator"]} if "discriminator" in source else None
    save_swapper(model, args.out, encoder_state=ema_state, meta={"refine_steps": cfg.refine_steps}, extra=extra)
    previous_path = args.inp.with_suffix(".json")
    record = {
        "output": str(args.out),
        "output_sha256": sha256_file(args.out),
        "previous": json.loads(previous_path.read_text()) if previous_path.is_file() else str(args.inp),
        "refine": {"input": str(args.inp), "input_sha256": sha256_file(args.inp), "seconds": round(seconds, 1),
                   "params": {"warmstart": params.get("warmstart"), "encoder": params.get("encoder"),
                              "project": params.get("project"), "train.augment": lookup(params, "train.augment")},
                   "curve": rows},
    }
    args.out.with_suffix(".json").write_text(json.dumps(record, indent=1) + "\n")
    print(args.out, record["output_sha256"], f"{seconds:.0f} s")


if __name__ == "__main__":
    main()
