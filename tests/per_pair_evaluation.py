"""The evaluate stage's streaming pass as it was before features were cached per distinct image (commit 05abea1):
every pair recomputes its source's and target's features, the target's self-swaps and Fréchet features, on CPU
copies of every image. Kept as the reference the cached pass must reproduce (tests/test_evaluate_stream.py) and as
the "before" of benchmarks/bench_evaluate.py; a drop-in for mfim.evaluation.features.Streamer."""

from __future__ import annotations

from dataclasses import fields

import numpy as np
import torch
import torch.nn.functional as F

from mfim.evaluation.evaluators import Features
from mfim.evaluation.features import (
    MIXING_ROWS,
    GridImages,
    ImageReader,
    PairFeatures,
    TripletFeatures,
    swap_without_style_maps,
)


class FeatureRows:
    def __init__(self, n: int):
        self.n, self.arrays = n, None

    def put(self, start: int, values: dict) -> None:
        if self.arrays is None:
            self.arrays = {k: np.empty((self.n, *np.shape(v)[1:]), np.asarray(v).dtype) for k, v in values.items()}
        for k, v in values.items():
            self.arrays[k][start : start + len(v)] = v

    def add(self, start: int, f: Features) -> None:
        self.put(start, {k.name: getattr(f, k.name) for k in fields(Features)})

    def features(self) -> Features:
        return Features(**self.arrays)


@torch.no_grad()
def stream_pairs(model, pairs, reader, evaluators, lpips, fd, batch, device, keep=8) -> PairFeatures:
    res = reader.resolution
    feats = {k: FeatureRows(len(pairs)) for k in ("source", "target", "swap")}
    recon = FeatureRows(len(pairs))
    grid = GridImages(keep)

    def at_res(x):
        return F.interpolate(x, size=(res, res), mode="area") if x.shape[-1] != res else x

    for i in range(0, len(pairs), batch):
        rows = pairs.iloc[i : i + batch]
        x_src = reader.read(rows.source_key, rows.source_path)
        x_tgt = reader.read(rows.target_key, rows.target_path)
        src_d, tgt_d = x_src.to(device), x_tgt.to(device)
        x_swap = model.swap(src_d, tgt_d).float().cpu()
        for name, x in (("swap", x_swap), ("source", x_src), ("target", x_tgt)):
            feats[name].add(i, evaluators.features(x))
        fd.add("real", x_tgt)
        fd.add("fake", x_swap)
        x_rec = model.reconstruct(tgt_d).float().cpu()
        x_rec_nomaps = swap_without_style_maps(model, tgt_d, tgt_d).float().cpu()
        errors = {}
        for suffix, x in (("", x_rec), ("_without_style_maps", x_rec_nomaps)):
            errors[f"self_swap_l1{suffix}"] = (at_res(x) - x_tgt).abs().flatten(1).mean(1).numpy()
            errors[f"self_swap_lpips{suffix}"] = lpips(at_res(x.to(device)), tgt_d).flatten().float().cpu().numpy()
        recon.put(i, errors)
        for name, x in (("source", x_src), ("target", x_tgt), ("swap", x_swap), ("self_swap", x_rec),
                        ("self_swap_without_style_maps", x_rec_nomaps)):
            grid.add(name, x)
    return PairFeatures(feats["source"].features(), feats["target"].features(), feats["swap"].features(),
                        recon.arrays, fd.report(), grid)


@torch.no_grad()
def stream_triplets(model, triplets, reader, evaluators, batch, device, keep=8) -> TripletFeatures:
    feats = {k: FeatureRows(len(triplets)) for k in ("global_source", "local_source", *MIXING_ROWS)}
    grid = GridImages(keep)
    for i in range(0, len(triplets), batch):
        rows = triplets.iloc[i : i + batch]
        t_tgt, t_gb, t_lc = (reader.read(rows[f"{c}_key"], rows[f"{c}_path"]) for c in ("target", "global", "local"))
        d_tgt, d_gb, d_lc = t_tgt.to(device), t_gb.to(device), t_lc.to(device)
        results = {"local": model.swap(d_lc, d_tgt), "id_mixing": model.mix(d_tgt, d_gb, d_lc),
                   "global": model.swap(d_gb, d_tgt)}
        feats["global_source"].add(i, evaluators.features(t_gb))
        feats["local_source"].add(i, evaluators.features(t_lc))
        for row in MIXING_ROWS:
            feats[row].add(i, evaluators.features(results[row].float().cpu()))
        for name, x in (("global", t_gb), ("local", t_lc), ("target", t_tgt), ("mix", results["id_mixing"])):
            grid.add(name, x.float())
    return TripletFeatures(feats["global_source"].features(), feats["local_source"].features(),
                           {row: feats[row].features() for row in MIXING_ROWS}, grid)


class PerPairStreamer:
    """Streamer's interface over the functions above (no parts, no resume, one process)."""

    def __init__(self, model, pairs, triplets, shard_pattern, resolution, evaluators, lpips, fd, batch, device,
                 store=None, workers=0, rank=0, world=1):
        self.args = model, pairs, triplets, shard_pattern, resolution, evaluators, lpips, fd, batch, device

    def run(self) -> None:
        model, pairs, triplets, pattern, res, evaluators, lpips, fd, batch, device = self.args
        with ImageReader(pattern, res) as reader:
            self.pf = stream_pairs(model, pairs, reader, evaluators, lpips, fd, batch, device)
            self.tf = stream_triplets(model, triplets, reader, evaluators, batch, device) if len(triplets) else None

    def collect(self, keep: int = 8):
        return self.pf, self.tf
