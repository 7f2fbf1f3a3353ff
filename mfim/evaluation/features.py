"""The streaming pass of the `evaluate` stage: pairs and triplets in, features out, one batch of images at a time.

Three passes, each a sequence of batches whose results are written as one part file (``FeatureStore``):
  images    every distinct eval image once (CelebA-HQ draws each source ~20 times, each target ~10): the evaluation
            networks' features (``Features``: a few hundred numbers an image), and for the pairs' targets the
            self-swap with and without style maps, its L1 / LPIPS errors and the Fréchet features of the real set
  pairs     ``evaluate.batch_size`` consecutive (source, target) pairs: the swap, its features and Fréchet features
  triplets  the ID-mixing triplets: the local / mixed / global results' features
``collect`` then assembles per-pair and per-triplet features from the parts by key. A killed run keeps every part it
finished (each written atomically) and the rerun computes only the missing ones. Memory is one batch of images plus
the features, flat in the number of pairs.

Decoding runs in ``evaluate.workers`` DataLoader processes, which also take dlib's embeddings of the distinct
images (dlib is CPU-only, ~70 ms an image); the swaps' dlib embeddings are split over as many pool processes.
Images stay on the device from decoding to the last evaluator. The pair batches are the ones the in-memory evaluation
used, so every network sees the same inputs and the numbers are the same.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from mfim.evaluation.evaluators import Features
from mfim.nets.face_crops import from_uint8, resize_points, to_uint8
from mfim.runtime import LoaderWorkerInit
from mfim.tracking import log_progress

# the columns whose landmarks the features use: the images themselves, and each swap's target (a swap keeps its pose)
LANDMARK_COLUMNS = ("image", "target")
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

    def read_uint8(self, keys, paths) -> np.ndarray:
        """B×H×W×3 uint8."""
        from mfim.data.shards import resize_square
        from mfim.imageio import read_rgb

        images = []
        for k, p in zip(keys, paths):
            if self.index is not None and k in self.index.position_of:
                images.append(self.index.read(self.index.position_of[k], self.resolution).image)
            else:
                images.append(resize_square(read_rgb(p), self.resolution))
        return np.stack(images)

    def read(self, keys, paths) -> torch.Tensor:
        return from_uint8(self.read_uint8(keys, paths))

    def landmarks(self, keys) -> np.ndarray | None:
        """B×68×2 landmarks of the keys' images as read (pixel indices at ``resolution``; NaN rows where a shard has
        none or the image is not in the shards), or None when none has any: DECA places its crop with them, as in
        training and the threedmm table (mfim.data.threedmm_table.batch_landmarks)."""
        from mfim.data.shard_meta import shard_landmarks, stack_landmarks

        return stack_landmarks([shard_landmarks(self.index.metas[self.index.position_of[k]], self.resolution)
                                if self.index is not None and self.index.metas is not None
                                and k in self.index.position_of else None for k in keys])

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
    source: Features | RowsOf  # per pair
    target: Features | RowsOf
    swap: Features
    reconstruction: dict[str, np.ndarray]  # per pair: self-swap L1 / LPIPS, with and without style maps
    fd: dict  # mfim.nets.fid.FrechetDistance.report()
    grid: GridImages


@dataclass
class TripletFeatures:
    global_source: Features | RowsOf  # per triplet
    local_source: Features | RowsOf
    results: dict[str, Features]  # MIXING_ROWS -> features of that result
    grid: GridImages


def swap_without_style_maps(model, x_src, x_tgt):
    codes, _ = model.encode_target(x_tgt)
    codes.update(model.encode_codes(x_src, model.src_indices))
    return model.synthesize(codes, {})


def _progress(total: int, unit: str):
    from tqdm import tqdm

    return tqdm(total=total, desc=f"evaluate {unit}s", unit=unit, dynamic_ncols=True)


FEATURE_NAMES = [f.name for f in fields(Features)]


class FeatureStore:
    """The streaming pass's finished batches, one .npz part per batch under ``<root>/<pass>/``, each written
    atomically (mfim.atomic): a killed run leaves whole parts only, and the rerun computes the missing ones.

    ``fingerprint`` names what the parts were computed from (params, model, eval sets): a store of another fingerprint
    is emptied when opened, so changed inputs never mix with old features. Only the ``owner`` (torchrun's rank 0,
    before the other ranks open the store) empties and tidies it; the others find it ready."""

    def __init__(self, root, fingerprint: str, owner: bool = True):
        from mfim.atomic import atomic_write

        self.root, self.fingerprint = Path(root), fingerprint
        stamp = self.root / "fingerprint"
        stale = self.root.exists() and (not stamp.is_file() or stamp.read_text().strip() != fingerprint)
        if not owner:
            if stale or not stamp.is_file():
                raise RuntimeError(f"{self.root}: progress of other inputs, or none (rank 0 opens it first)")
            return
        if stale:
            shutil.rmtree(self.root)
        for leftover in self.root.glob("*/.*.part"):  # temp files of a write the kill interrupted
            leftover.unlink()
        if not stamp.is_file():
            atomic_write(stamp, lambda f: f.write(fingerprint.encode()))

    def path(self, kind: str, index: int) -> Path:
        return self.root / kind / f"{index:06d}.npz"

    def has(self, kind: str, index: int) -> bool:
        return self.path(kind, index).is_file()

    def write(self, kind: str, index: int, arrays: dict[str, np.ndarray]) -> None:
        from mfim.atomic import atomic_write

        atomic_write(self.path(kind, index), lambda f: np.savez(f, **arrays))

    def read(self, kind: str, index: int) -> dict[str, np.ndarray]:
        with np.load(self.path(kind, index), allow_pickle=False) as z:
            return {k: z[k] for k in z.files}

    def remove(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)


def distinct_images(pairs: pd.DataFrame, triplets: pd.DataFrame) -> tuple[pd.DataFrame, int]:
    """(key, path) of every image whose features the tables need, once each, and how many lead: the pairs' targets
    first (they also get the self-swap and the Fréchet real-set features), then the other sources (the pairs' and
    the triplets' global and local ones)."""
    def cols(df, c):
        return df[[f"{c}_key", f"{c}_path"]].set_axis(["key", "path"], axis=1)

    targets = cols(pairs, "target").drop_duplicates("key")
    others = pd.concat([cols(pairs, "source")] + [cols(triplets, c) for c in ("global", "local") if len(triplets)])
    others = others.drop_duplicates("key")
    others = others[~others.key.isin(targets.key)]
    return pd.concat([targets, others], ignore_index=True), len(targets)


def batch_bounds(n: int, batch: int, start: int = 0) -> list[tuple[int, int]]:
    return [(i, min(i + batch, n)) for i in range(start, n, batch)]


_DLIB = None


def _dlib():
    """This process's dlib embedder (a worker loads its own once)."""
    global _DLIB
    if _DLIB is None:
        from mfim.nets.identity import DlibIdentityEmbedder

        _DLIB = DlibIdentityEmbedder()
    return _DLIB


def dlib_embed(images: np.ndarray) -> np.ndarray:
    """dlib descriptors of B×H×W×3 uint8 aligned faces (Evaluators.features' own, from the [-1, 1] tensor)."""
    return _dlib().embed_aligned(list(images))


def _as_is(item):
    return item


class BatchReader(torch.utils.data.Dataset):
    """Item k: batch ``todo[k]`` of the named (keys, paths) columns decoded to uint8 -- in a DataLoader worker
    process when evaluate.workers > 0, where with ``dlib`` it also takes the images' dlib embeddings."""

    def __init__(self, pattern: str, resolution: int, columns: dict[str, tuple[np.ndarray, np.ndarray]],
                 bounds: list[tuple[int, int]], todo: list[int], dlib: bool = False):
        self.pattern, self.resolution, self.columns = pattern, resolution, columns
        self.bounds, self.todo, self.dlib = bounds, todo, dlib
        self._open: tuple[int, ImageReader] | None = None

    def __len__(self) -> int:
        return len(self.todo)

    def reader(self) -> ImageReader:
        if self._open is None or self._open[0] != os.getpid():  # a worker opens the shards itself
            self._open = (os.getpid(), ImageReader(self.pattern, self.resolution))
        return self._open[1]

    def __getitem__(self, k: int) -> dict:
        j = self.todo[k]
        a, b = self.bounds[j]
        images = {name: self.reader().read_uint8(keys[a:b], paths[a:b]) for name, (keys, paths) in self.columns.items()}
        landmarks = {name: self.reader().landmarks(keys[a:b]) for name, (keys, _) in self.columns.items()
                     if name in LANDMARK_COLUMNS}
        identity = {name: dlib_embed(x) for name, x in images.items()} if self.dlib else {}
        return {"index": j, "images": images, "landmarks": landmarks, "identity": identity}

    def close(self) -> None:
        if self._open is not None and self._open[0] == os.getpid():
            self._open[1].close()
        self._open = None


class SwapIdentity:
    """dlib embeddings of generated images split over ``workers`` spawned processes; without workers (or without dlib)
    ``submit`` returns a getter of None and the evaluators embed the images themselves, as before."""

    def __init__(self, evaluators, workers: int):
        self.pool, self.workers = None, workers
        if workers > 0 and getattr(evaluators, "dlib", None) is not None:
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor

            self.pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))

    def submit(self, x: torch.Tensor):
        if self.pool is None:
            return lambda: None
        futures = [self.pool.submit(dlib_embed, part) for part in np.array_split(to_uint8(x), self.workers)]
        return lambda: np.concatenate([f.result() for f in futures])

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(cancel_futures=True)


def fd_features(fd, images: torch.Tensor) -> np.ndarray:
    """The Fréchet network's features of a batch, as FrechetDistance.add computes them (kept, not accumulated: the
    statistics are summed when the parts are collected, in the order the pairs stream)."""
    from mfim.nets.fid import area_resize

    return fd.extractor(area_resize(images.to(fd.device, torch.float32), fd.resolution)).cpu().numpy()


def _features(evaluators, x: torch.Tensor, identity: np.ndarray | None, landmarks: np.ndarray | None = None
              ) -> Features:
    """``landmarks``: B×68×2 pixel indices of ``x`` (NaN rows unknown) where the shards hold them."""
    given = {k: v for k, v in (("identity", identity), ("landmarks", landmarks)) if v is not None}
    return evaluators.features(x, **given)


def resized_landmarks(landmarks: np.ndarray | None, from_size: int, to_size: int) -> np.ndarray | None:
    """A target's landmarks for its swap (the swap keeps the target's pose), at the swap's side."""
    return None if landmarks is None else resize_points(landmarks, from_size, to_size)


def _feature_arrays(f: Features) -> dict[str, np.ndarray]:
    return {n: getattr(f, n) for n in FEATURE_NAMES}


class RowsOf:
    """Features (the same attributes) of the distinct images at ``rows``, taken when read: the pairs' sources and
    targets are not held as one copy per pair (CelebA-HQ: 300k rows of ~700 float64 each, twice)."""

    def __init__(self, distinct: dict[str, np.ndarray], rows: np.ndarray):
        self._distinct, self._rows = distinct, rows

    def __getattr__(self, name: str) -> np.ndarray:
        if name.startswith("_") or name not in FEATURE_NAMES:
            raise AttributeError(name)
        return self._distinct[name][self._rows]


class Streamer:
    """The three passes over one evaluation (pairs, triplets, their distinct images) into a FeatureStore, and
    ``collect``, which turns the stored parts into the per-pair and per-triplet features the tables read.
    With ``world`` > 1 (torchrun ranks) this rank computes every world-th of the batches missing from the store when
    it is made (all ranks must list them before any writes: a barrier after __init__); parts are named by batch, so
    any number of ranks, or a rerun with another number, fills the same store, the work split evenly either way."""

    def __init__(self, model, pairs: pd.DataFrame, triplets: pd.DataFrame, shard_pattern: str, resolution: int,
                 evaluators, lpips, fd, batch: int, device, store: FeatureStore, workers: int = 0, rank: int = 0,
                 world: int = 1):
        self.model, self.pairs, self.triplets, self.pattern = model, pairs, triplets, shard_pattern
        self.res, self.evaluators, self.lpips, self.fd = resolution, evaluators, lpips, fd
        self.batch, self.device, self.store, self.workers = batch, torch.device(device), store, workers
        self.rank, self.world = rank, world
        self.images, self.n_targets = distinct_images(pairs, triplets)
        self.bounds = {"images": batch_bounds(self.n_targets, batch) + batch_bounds(len(self.images), batch,
                                                                                      self.n_targets),
                       "pairs": batch_bounds(len(pairs), batch), "triplets": batch_bounds(len(triplets), batch)}
        self.todo = {kind: [j for j in range(len(b)) if not store.has(kind, j)][rank::world]
                     for kind, b in self.bounds.items()}

    def _columns(self, kind: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        if kind == "images":
            return {"image": (self.images.key.to_numpy(), self.images.path.to_numpy())}
        df, names = (self.pairs, ("source", "target")) if kind == "pairs" else (self.triplets, ("target", "global",
                                                                                                 "local"))
        return {c: (df[f"{c}_key"].to_numpy(), df[f"{c}_path"].to_numpy()) for c in names}

    def run(self) -> None:
        swap_identity = SwapIdentity(self.evaluators, self.workers)
        try:
            for kind, compute in (("images", self._image_part), ("pairs", lambda item: self._pair_part(
                    item, swap_identity)), ("triplets", lambda item: self._triplet_part(item, swap_identity))):
                self._run_pass(kind, compute)
        finally:
            swap_identity.close()

    @torch.no_grad()
    def _run_pass(self, kind: str, compute) -> None:
        from torch.utils.data import DataLoader

        bounds, todo = self.bounds[kind], self.todo[kind]
        dlib = kind == "images" and self.workers > 0 and getattr(self.evaluators, "dlib", None) is not None
        reader = BatchReader(self.pattern, self.res, self._columns(kind), bounds, todo, dlib=dlib)
        loader = DataLoader(reader, batch_size=None, num_workers=self.workers, collate_fn=_as_is,
                            worker_init_fn=LoaderWorkerInit())
        done = 0
        with _progress(sum(bounds[j][1] - bounds[j][0] for j in todo), kind[:-1]) as bar:
            try:
                for item in loader:
                    part = compute(item)
                    self.store.write(kind, item["index"], part)
                    a, b = bounds[item["index"]]
                    done += b - a
                    bar.update(b - a)
                    # MLflow sees the stage move (a day at paper scale): rows done, the batch's self-swap errors
                    partial = {k: v for k, v in part.items() if k.startswith("self_swap_")}
                    log_progress(done, {kind: done, **partial}, prefix="progress.")
            finally:
                reader.close()

    def _on_device(self, item: dict, name: str) -> torch.Tensor:
        return from_uint8(item["images"][name]).to(self.device)

    def _image_part(self, item: dict) -> dict[str, np.ndarray]:
        j = item["index"]
        a, b = self.bounds["images"][j]
        x = self._on_device(item, "image")
        part = {"key": self.images.key.to_numpy()[a:b].astype(str),
                **_feature_arrays(_features(self.evaluators, x, item["identity"].get("image"),
                                            item["landmarks"]["image"]))}
        if a < self.n_targets:  # target batches hold targets only (bounds split there)
            part.update(self._self_swap_errors(x))
            part["fd_real"] = fd_features(self.fd, x)
        return part

    def _at_res(self, x: torch.Tensor) -> torch.Tensor:
        # errors are measured at the real images' resolution, as the paper's 256 px targets are
        return F.interpolate(x, size=(self.res, self.res), mode="area") if x.shape[-1] != self.res else x

    def _self_swap_errors(self, x_tgt: torch.Tensor) -> dict[str, np.ndarray]:
        x_rec = self.model.reconstruct(x_tgt).float()
        x_rec_nomaps = swap_without_style_maps(self.model, x_tgt, x_tgt).float()
        errors = {}
        for suffix, x in (("", x_rec), ("_without_style_maps", x_rec_nomaps)):
            x = self._at_res(x)
            errors[f"self_swap_l1{suffix}"] = (x - x_tgt).abs().flatten(1).mean(1).cpu().numpy()
            errors[f"self_swap_lpips{suffix}"] = self.lpips(x, x_tgt).flatten().float().cpu().numpy()
        return errors

    def _pair_part(self, item: dict, swap_identity: SwapIdentity) -> dict[str, np.ndarray]:
        x_swap = self.model.swap(self._on_device(item, "source"), self._on_device(item, "target")).float()
        identity = swap_identity.submit(x_swap)  # dlib on the CPU workers while the device does the rest
        fd_fake = fd_features(self.fd, x_swap)
        landmarks = resized_landmarks(item["landmarks"]["target"], self.res, x_swap.shape[-1])
        f = _features(self.evaluators, x_swap, identity(), landmarks)
        return {**_feature_arrays(f), "fd_fake": fd_fake, "size": np.array(x_swap.shape[-1])}

    def _triplet_part(self, item: dict, swap_identity: SwapIdentity) -> dict[str, np.ndarray]:
        t_tgt, t_gb, t_lc = (self._on_device(item, c) for c in ("target", "global", "local"))
        results = {"local": self.model.swap(t_lc, t_tgt), "id_mixing": self.model.mix(t_tgt, t_gb, t_lc),
                   "global": self.model.swap(t_gb, t_tgt)}
        identity = {row: swap_identity.submit(results[row].float()) for row in MIXING_ROWS}
        part = {}
        for row in MIXING_ROWS:  # each result keeps the target's pose: the target's landmarks
            landmarks = resized_landmarks(item["landmarks"]["target"], self.res, results[row].shape[-1])
            f = _features(self.evaluators, results[row].float(), identity[row](), landmarks)
            part.update({f"{row}.{n}": v for n, v in _feature_arrays(f).items()})
        return part

    def collect(self, keep: int = 8) -> tuple[PairFeatures, TripletFeatures | None]:
        """Per-pair / per-triplet features from the stored parts (every one must be there: ``run`` first)."""
        parts = [self.store.read("images", j) for j in range(len(self.bounds["images"]))]
        cat = lambda name, ps: np.concatenate([p[name] for p in ps])  # noqa: E731
        distinct = {n: cat(n, parts) for n in FEATURE_NAMES}
        row = {k: i for i, k in enumerate(cat("key", parts))}
        target_parts = [p for p in parts if "fd_real" in p]
        src_rows = self.pairs.source_key.map(row).to_numpy()
        tgt_rows = self.pairs.target_key.map(row).to_numpy()  # targets lead: these index the target parts too
        fd_real = cat("fd_real", target_parts) if target_parts else None
        recon = {n: cat(n, target_parts)[tgt_rows] for n in target_parts[0] if n.startswith("self_swap")} \
            if target_parts else {}
        swap = self._pair_parts(tgt_rows, fd_real)
        pf = PairFeatures(RowsOf(distinct, src_rows), RowsOf(distinct, tgt_rows), swap, recon, self.fd.report(),
                          self._pair_grid(keep))
        if not len(self.triplets):
            return pf, None
        results = {row_name: [] for row_name in MIXING_ROWS}
        for j in range(len(self.bounds["triplets"])):
            part = self.store.read("triplets", j)
            for r in MIXING_ROWS:
                results[r].append({n: part[f"{r}.{n}"] for n in FEATURE_NAMES})
        tf = TripletFeatures(RowsOf(distinct, self.triplets.global_key.map(row).to_numpy()),
                             RowsOf(distinct, self.triplets.local_key.map(row).to_numpy()),
                             {r: Features(**{n: cat(n, ps) for n in FEATURE_NAMES}) for r, ps in results.items()},
                             self._triplet_grid(keep))
        return pf, tf

    def _pair_parts(self, tgt_rows: np.ndarray, fd_real: np.ndarray | None) -> Features:
        """The swaps' features, and the Fréchet statistics summed a pair batch at a time (real: the batch's targets,
        repeats included, as the per-pair evaluation added them), one part in memory at a time."""
        self.fd.input_sizes["real"].add(self.res)
        swap = {n: [] for n in FEATURE_NAMES}
        for j, (a, b) in enumerate(self.bounds["pairs"]):
            part = self.store.read("pairs", j)
            for n in FEATURE_NAMES:
                swap[n].append(part[n])
            self.fd.stats["real"].update(fd_real[tgt_rows[a:b]])
            self.fd.stats["fake"].update(part["fd_fake"])
            self.fd.input_sizes["fake"].add(int(part["size"]))
        return Features(**{n: np.concatenate(v) for n, v in swap.items()})

    @torch.no_grad()
    def _grid(self, kind: str, keep: int, images_of) -> GridImages:
        """The first ``keep`` rows' images of a pass (``kind``: pairs or triplets) for the grids, made again in the
        batches the pass made them in: ``images_of(read)`` names the images of one batch of rows, ``read(c)`` reading
        column ``c`` (source, target, ...) of that batch onto the device."""
        df, grid = getattr(self, kind), GridImages(keep)
        with ImageReader(self.pattern, self.res) as reader:
            for a, b in self.bounds[kind]:
                if a >= keep:
                    break
                rows = df.iloc[a:b]
                read = lambda c: reader.read(rows[f"{c}_key"], rows[f"{c}_path"]).to(self.device)  # noqa: E731
                for name, x in images_of(read).items():
                    grid.add(name, x.float())
        return grid

    def _pair_grid(self, keep: int) -> GridImages:
        def images_of(read):
            x_src, x_tgt = read("source"), read("target")
            return {"source": x_src, "target": x_tgt, "swap": self.model.swap(x_src, x_tgt),
                    "self_swap": self.model.reconstruct(x_tgt),
                    "self_swap_without_style_maps": swap_without_style_maps(self.model, x_tgt, x_tgt)}

        return self._grid("pairs", keep, images_of)

    def _triplet_grid(self, keep: int) -> GridImages:
        def images_of(read):
            t_tgt, t_gb, t_lc = read("target"), read("global"), read("local")
            return {"global": t_gb, "local": t_lc, "target": t_tgt, "mix": self.model.mix(t_tgt, t_gb, t_lc)}

        return self._grid("triplets", keep, images_of)
