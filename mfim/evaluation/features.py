"""The streaming pass of the `evaluate` stage: pairs and triplets in, features out, one batch of images at a time.

Per batch of pairs: read source and target (from the eval shards, else the aligned PNG), swap, self-swap, and keep
only the evaluation networks' features of source / target / swap (``Features``: a few hundred numbers an image), the
per-pair reconstruction errors, the running Fréchet statistics and the first few images the grids show. Per batch of
triplets: the features of both sources and of the local / mixed / global results. Memory is one batch of images plus
features, flat in the number of pairs -- holding every swap as float32 took 12 MB a pair at 1024 px.

The batches are the ones the in-memory evaluation used (``evaluate.batch_size`` consecutive pairs), so every network
sees the same inputs and the numbers are the same.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from mfim.evaluation.evaluators import Features
from mfim.evaluation.grids import from_uint8
from mfim.tracking import log_progress

MIXING_ROWS = ("local", "id_mixing", "global")  # Table 5's rows: swap with the local source, mix, swap with global


class ImageReader:
    """[-1, 1] image batches by key: from the eval shards when they hold the key, else from the aligned PNG path."""

    def __init__(self, shard_pattern: str, resolution: int):
        from mfim.data.shards import ShardIndex

        self.resolution = resolution
        try:
            self.index = ShardIndex(shard_pattern)
        except (FileNotFoundError, ValueError):
            self.index = None

    def read(self, keys, paths) -> torch.Tensor:
        from mfim.data.shards import resize_square
        from mfim.imageio import read_rgb

        images = []
        for k, p in zip(keys, paths):
            if self.index is not None and k in self.index.position_of:
                images.append(self.index.read(self.index.position_of[k], self.resolution).image)
            else:
                images.append(resize_square(read_rgb(p), self.resolution))
        return from_uint8(np.stack(images))

    def close(self) -> None:
        if self.index is not None:
            self.index.close()

    def __enter__(self) -> ImageReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def ground_truth(shard_pattern: str) -> dict[str, dict]:
    """key -> ground-truth 3DMM of synthetic eval images (pose radians, exp), when the shards carry it."""
    from mfim.data.shards import ShardIndex

    try:
        index = ShardIndex(shard_pattern)
    except (FileNotFoundError, ValueError):
        return {}
    gt = {}
    for k, meta in zip(index.keys, index.metas):
        g = meta.get("ground_truth") or meta.get("gt")
        if isinstance(g, dict) and all(n in g for n in ("yaw", "pitch", "roll")):
            gt[k] = g
    index.close()
    return gt


class Rows:
    """Per-image values of one kind (features, errors) written into arrays sized for all rows on the first batch.

    Preallocated rather than concatenated at the end: with the stage's allocator settings (nothing returned to the
    OS, mfim.runtime.ensure_allocator_env) small arrays kept from every batch land in the space the batch's images
    just freed and split it, so the next batch's images take fresh memory -- peak RSS then grew ~1 MB a pair."""

    def __init__(self, n: int):
        self.n = n
        self.arrays: dict[str, np.ndarray] | None = None

    def put(self, start: int, values: dict[str, np.ndarray]) -> None:
        if self.arrays is None:
            self.arrays = {k: np.empty((self.n, *np.shape(v)[1:]), np.asarray(v).dtype) for k, v in values.items()}
        for k, v in values.items():
            self.arrays[k][start : start + len(v)] = v

    def result(self) -> dict[str, np.ndarray]:
        return self.arrays if self.arrays is not None else {}


class FeatureRows(Rows):
    def add(self, start: int, f: Features) -> None:
        self.put(start, {k.name: getattr(f, k.name) for k in fields(Features)})

    def features(self) -> Features:
        if self.arrays is None:
            return Features(*(np.zeros((0, 0)) for _ in fields(Features)))
        return Features(**self.arrays)


@dataclass
class GridImages:
    """The first ``keep`` images of each kind, in evaluation order (all the grids show)."""

    keep: int = 8
    images: dict[str, torch.Tensor] = field(default_factory=dict)

    def add(self, name: str, x: torch.Tensor) -> None:
        have = self.images.get(name)
        n = 0 if have is None else len(have)
        if n < self.keep:
            part = x[: self.keep - n].detach().cpu().clone()  # a copy: a view would keep the whole batch alive
            self.images[name] = part if have is None else torch.cat([have, part])

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.images[name]


@dataclass
class PairFeatures:
    source: Features
    target: Features
    swap: Features
    reconstruction: dict[str, np.ndarray]  # per pair: self-swap L1 / LPIPS, with and without style maps
    fd: dict  # mfim.nets.fid.FrechetDistance.report()
    grid: GridImages


@dataclass
class TripletFeatures:
    global_source: Features
    local_source: Features
    results: dict[str, Features]  # MIXING_ROWS -> features of that result
    grid: GridImages


def swap_without_style_maps(model, x_src, x_tgt):
    codes, _ = model.encode_target(x_tgt)
    codes.update(model.encode_codes(x_src, model.src_indices))
    return model.synthesize(codes, {})


def _progress(total: int, unit: str):
    from tqdm import tqdm

    return tqdm(total=total, desc=f"evaluate {unit}s", unit=unit, dynamic_ncols=True)


@torch.no_grad()
def stream_pairs(model, pairs: pd.DataFrame, reader: ImageReader, evaluators, lpips, fd, batch: int, device,
                 keep: int = 8) -> PairFeatures:
    """One pass over the (source, target) pairs; ``fd``: a mfim.nets.fid.FrechetDistance (targets are its reals)."""
    res = reader.resolution
    feats = {k: FeatureRows(len(pairs)) for k in ("source", "target", "swap")}
    recon = Rows(len(pairs))
    grid = GridImages(keep)

    def at_res(x):  # errors are measured at the real images' resolution, as the paper's 256 px targets are
        return F.interpolate(x, size=(res, res), mode="area") if x.shape[-1] != res else x

    with _progress(len(pairs), "pair") as bar:
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
            bar.update(len(rows))
            log_progress(i + len(rows), {"pairs": i + len(rows), **errors}, prefix="progress.")  # the batch's means
    return PairFeatures(feats["source"].features(), feats["target"].features(), feats["swap"].features(),
                        recon.result(), fd.report(), grid)


@torch.no_grad()
def stream_triplets(model, triplets: pd.DataFrame, reader: ImageReader, evaluators, batch: int, device,
                    keep: int = 8) -> TripletFeatures:
    """One pass over the ID-mixing triplets (target, global source, local source)."""
    feats = {k: FeatureRows(len(triplets)) for k in ("global_source", "local_source", *MIXING_ROWS)}
    grid = GridImages(keep)
    with _progress(len(triplets), "triplet") as bar:
        for i in range(0, len(triplets), batch):
            rows = triplets.iloc[i : i + batch]
            t_tgt, t_gb, t_lc = (reader.read(rows[f"{c}_key"], rows[f"{c}_path"])
                                 for c in ("target", "global", "local"))
            d_tgt, d_gb, d_lc = t_tgt.to(device), t_gb.to(device), t_lc.to(device)
            results = {"local": model.swap(d_lc, d_tgt), "id_mixing": model.mix(d_tgt, d_gb, d_lc),
                       "global": model.swap(d_gb, d_tgt)}
            feats["global_source"].add(i, evaluators.features(t_gb))
            feats["local_source"].add(i, evaluators.features(t_lc))
            for row in MIXING_ROWS:
                feats[row].add(i, evaluators.features(results[row].float().cpu()))
            for name, x in (("global", t_gb), ("local", t_lc), ("target", t_tgt), ("mix", results["id_mixing"])):
                grid.add(name, x.float())
            bar.update(len(rows))
    return TripletFeatures(feats["global_source"].features(), feats["local_source"].features(),
                           {row: feats[row].features() for row in MIXING_ROWS}, grid)
