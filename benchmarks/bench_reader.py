"""Shard reader throughput against a plain folder-of-PNG torch DataLoader (batch 32, 2 workers, same process).

    .venv/bin/python benchmarks/bench_reader.py [--shards data/shards] [--aligned data/aligned] [--batches 40]
                                                [--rounds 3] [--json out.json]

Baselines, both a ``torch.utils.data.DataLoader`` over a Dataset of PNG paths (PIL decode, per-sample tensor,
default collate, shuffle, batch 32, 2 workers):
* ``aligned folder``: the align stage's output (256 px crops), resized to ``data.resolution`` per sample -- what a
  trainer reads when there are no shards (the ratio the issue's ≥3× target refers to);
* ``pre-resized folder``: the same images already at the training resolution -- the pure container/loader cost.
Ours: ``mfim.data.shards.image_batches`` over the shards (same batch, same worker count).

Without --shards/--aligned (or when they do not exist) it builds a fixture: 1,600 smooth 256 px "aligned" PNGs and
their 64 px shards in a temporary folder. Each measurement skips 3 warm-up batches (worker start-up), then times
``--batches`` batches; rounds alternate the readers and the median images/s is reported (the machine is shared).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mfim.data.shards import ShardInputs, build_shards, image_batches, split_pattern  # noqa: E402
from mfim.imageio import list_images  # noqa: E402

BATCH, WORKERS, WARMUP = 32, 2, 3


class PngFolder(Dataset):
    """The plain baseline: one PNG file per sample, decoded with PIL, resized when needed."""

    def __init__(self, paths, resolution):
        self.paths, self.resolution = list(paths), resolution

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        img = Image.open(self.paths[i]).convert("RGB")
        if img.size != (self.resolution, self.resolution):
            img = img.resize((self.resolution, self.resolution), Image.Resampling.BILINEAR)
        x = torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1).float()
        return x / 127.5 - 1.0


def _infinite(loader):
    while True:
        yield from loader


def folder_batches(paths, resolution):
    loader = DataLoader(PngFolder(paths, resolution), batch_size=BATCH, shuffle=True, num_workers=WORKERS,
                        drop_last=True, persistent_workers=True)
    return _infinite(loader)


def images_per_second(batches, n) -> float:
    for _ in range(WARMUP):
        next(batches)
    t0 = time.perf_counter()
    for _ in range(n):
        b = next(batches)
        assert b.shape[0] == BATCH
    return n * BATCH / (time.perf_counter() - t0)


def build_fixture(root: Path, n=1600, size=256, resolution=64):
    """Smooth random 'aligned faces' (PNG-compressible like real crops) and their shards."""
    from mfim.provenance import provenance_record, save_image

    aligned = root / "aligned"
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:size, 0:size] / size
    record = provenance_record("synthetic", stage="bench")
    for i in range(n):
        a, b, c = rng.uniform(2, 9, 3)
        img = np.stack([np.sin(a * xx + c), np.cos(b * yy - c), np.sin(a * xx * yy + b)], -1) * 0.4 + 0.5
        img = np.clip(img * 255 + rng.normal(0, 3, img.shape), 0, 255).astype(np.uint8)
        save_image(aligned / "train" / f"{i // 8:05d}_{i % 8:02d}.png", img, record)
    inputs = ShardInputs(aligned, None, None, source="folder", eval_fraction=0.0)
    build_shards(inputs, root / "shards", resolution, 50_000_000)
    return root / "shards", aligned


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shards", default="data/shards")
    ap.add_argument("--aligned", default="data/aligned")
    ap.add_argument("--resolution", type=int, default=64)
    ap.add_argument("--batches", type=int, default=40)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(2)

    tmp = None
    shards, aligned = Path(args.shards), Path(args.aligned)
    if not list(shards.glob("train-*.tar")) or not aligned.is_dir():
        tmp = tempfile.TemporaryDirectory()
        print("no shards/aligned folder given: building a 1,600-image fixture ...", flush=True)
        shards, aligned = build_fixture(Path(tmp.name), resolution=args.resolution)
    pattern = split_pattern(shards, "train")
    folder = [p for p in list_images(aligned) if "train" in p.parts] or list_images(aligned)

    # the same images pre-resized to the training resolution, for the container-only comparison
    small_dir = Path(tempfile.mkdtemp())
    small = []
    for i, p in enumerate(folder):
        q = small_dir / f"{i:06d}.png"
        Image.open(p).convert("RGB").resize((args.resolution,) * 2, Image.Resampling.BILINEAR).save(q)
        small.append(q)

    readers = {
        "aligned folder (PNG + resize)": lambda: folder_batches(folder, args.resolution),
        "pre-resized folder (PNG)": lambda: folder_batches(small, args.resolution),
        "shards (image_batches)": lambda: image_batches(pattern, args.resolution, BATCH, seed=0, workers=WORKERS),
    }
    rates = {name: [] for name in readers}
    for r in range(args.rounds):
        for name, make in readers.items():
            it = make()
            rates[name].append(images_per_second(it, args.batches))
            del it
    med = {k: statistics.median(v) for k, v in rates.items()}
    ours = med["shards (image_batches)"]
    result = {
        "images": len(folder),
        "resolution": args.resolution,
        "batch": BATCH,
        "workers": WORKERS,
        "cpu_count": os.cpu_count(),
        "images_per_s": {k: round(v, 1) for k, v in med.items()},
        "all_rounds": {k: [round(x, 1) for x in v] for k, v in rates.items()},
        "ratio_vs_aligned_folder": round(ours / med["aligned folder (PNG + resize)"], 2),
        "ratio_vs_pre_resized_folder": round(ours / med["pre-resized folder (PNG)"], 2),
    }
    for k, v in med.items():
        print(f"{k:32s} {v:9.1f} images/s")
    print(f"ratio shards / aligned folder      : {result['ratio_vs_aligned_folder']:.2f}x  (target >= 3x)")
    print(f"ratio shards / pre-resized folder  : {result['ratio_vs_pre_resized_folder']:.2f}x")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=1))
    if tmp is not None:
        tmp.cleanup()
    return result


if __name__ == "__main__":
    main()
