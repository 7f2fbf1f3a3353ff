"""Per-image cost of the data stages at paper settings, and what it projects to for FFHQ (70,000 photos).

    .venv/bin/python benchmarks/bench_stages.py [--photos N] [--repeat R] [--deca-batch B] [--cores 2,16,64]
                                                [--json out.json]

Measured here, one thread per process (CPU-seconds from ``time.process_time``, so other load on a shared machine
does not inflate them), on the face_recognition test photos of the asset zoo (the ones tests/conftest.py uses):

* align: one photo through the align stage's own worker function -- decode, dlib HOG detection (image capped at
  1024 px), 68 landmarks, FFHQ warp at ``transform_size`` 4096 down to 1024, PNG write with its provenance record;
* shard: one 1024 px crop through the shard stage's worker function -- PNG decode, area resize to 256, PNG encode;
* threedmm: the threedmm stage's work per sample -- PNG decode of a 256 px shard image (a DataLoader worker), then
  DECA's coarse encoder (ResNet-50 at 224, the paper's L_shape network; random weights in DECA's file layout: the
  cost does not depend on the values) on a CPU core.

Projection: wall time = 70,000 x CPU-s per image / N, assuming the work is spread over N worker processes on N
cores and scales linearly up to the core count (each image is independent; the writers in the parent process --
journal line, tar append, parquet part -- cost well under 1 % of an image here). Disk: bytes each stage writes
per image (measured) x 70,000. Quick by default (well under a minute); timings on shared cores are noisy.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

FFHQ = 70_000
PAPER = {"output_size": 1024, "transform_size": 4096, "shard_resolution": 256}


def _cpu_seconds(fn, repeat: int) -> tuple[float, object]:
    """Median CPU-seconds of ``fn()`` over ``repeat`` calls, and the last result."""
    times, out = [], None
    for _ in range(repeat):
        t0 = time.process_time()
        out = fn()
        times.append(time.process_time() - t0)
    return statistics.median(times), out


def bench_align(photos: list[Path], out_dir: Path, repeat: int) -> dict:
    from mfim.data import align_folder as A

    config = A.AlignConfig(size=PAPER["output_size"], transform_size=PAPER["transform_size"])
    A._init_worker(config, str(out_dir))
    per, sizes, pixels = [], [], []
    for i, photo in enumerate(photos):
        seconds, res = _cpu_seconds(lambda: A._process((str(photo), photo.name, f"{i}.png")), repeat)
        if not res["ok"]:
            continue
        per.append(seconds)
        sizes.append((out_dir / f"{i}.png").stat().st_size)
        pixels.append(res["row"]["width"] * res["row"]["height"])
    # a journal line and a table row per photo: measured from the record the worker returns
    row_bytes = len(json.dumps(res["row"])) if per else 0
    return {"cpu_s": statistics.mean(per), "photos": len(per), "mean_megapixels": statistics.mean(pixels) / 1e6,
            "bytes": statistics.mean(sizes) + row_bytes, "note": "crop PNG + journal line / table row"}


def bench_shard(crops: list[Path], repeat: int) -> dict:
    from mfim.data.shards import _prepare_sample, _tar_member_bytes, encode_meta

    per, sizes = [], []
    for crop in crops:
        meta = {"key": crop.stem, "split": "train", "identity": None, "aligned_file": crop.name,
                "source_file": crop.name, "ground_truth": None, "provenance": "processed"}
        landmarks = np.random.default_rng(0).uniform(0, 1024, (68, 2))
        seconds, (key, png, full_meta) = _cpu_seconds(
            lambda: _prepare_sample((crop.stem, crop, meta, landmarks, PAPER["shard_resolution"])), repeat)
        per.append(seconds)
        sizes.append(_tar_member_bytes(len(png)) + _tar_member_bytes(len(encode_meta(full_meta))))
    return {"cpu_s": statistics.mean(per), "bytes": statistics.mean(sizes),
            "note": "tar members (PNG at 256 px + JSON with landmarks) with headers and padding"}


def bench_threedmm(crops: list[Path], batch: int, repeat: int) -> dict:
    import cv2

    from mfim.data.shards import decode_png, encode_png
    from mfim.data.threedmm_table import images_to_tensor
    from mfim.imageio import read_rgb
    from mfim.nets.deca import DECAEncoder
    from tests.official_files import write_deca_tar

    pngs = [encode_png(cv2.resize(read_rgb(c), (256, 256), interpolation=cv2.INTER_AREA)) for c in crops]
    pngs = (pngs * (batch // len(pngs) + 1))[:batch]
    decode_s, images = _cpu_seconds(lambda: [decode_png(p) for p in pngs], repeat)
    with tempfile.TemporaryDirectory() as tmp:
        write_deca_tar(Path(tmp) / "deca_model.tar")
        encoder = DECAEncoder(Path(tmp) / "deca_model.tar")
    x = images_to_tensor(images)
    with torch.no_grad():
        encoder(x[:1])  # first call: allocations, kernel choice
        net_s, est = _cpu_seconds(lambda: encoder(x), repeat)
    row = 4 * (est.shape.shape[1] + est.exp.shape[1] + 3) + 64  # float32 vectors + key, split, identity, encoder
    return {"decode_cpu_s": decode_s / batch, "network_cpu_s": net_s / batch, "cpu_s": (decode_s + net_s) / batch,
            "bytes": row, "note": "table row (shape 100 + exp 50 + pose 3 float32, key, split); no ground truth"}


def _hms(seconds: float) -> str:
    h, rem = divmod(int(round(seconds)), 3600)
    return f"{h}:{rem // 60:02d}:{rem % 60:02d}"


def table(results: dict, cores: list[int]) -> str:
    walls = " | ".join(f"wall, 70k @ {n} cores" for n in cores)
    head = f"| stage | CPU-s / image | {walls} | disk / image | disk, 70k |"
    lines = [head, "|" + "---|" * (4 + len(cores))]
    for name, r in results.items():
        walls = " | ".join(_hms(FFHQ * r["cpu_s"] / n) for n in cores)
        lines.append(f"| {name} | {r['cpu_s']:.3f} | {walls} | {r['bytes'] / 1e3:.1f} kB | "
                     f"{FFHQ * r['bytes'] / 1e9:.2f} GB |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--photos", type=int, default=5, help="test photos to align (default: all 5)")
    ap.add_argument("--repeat", type=int, default=1, help="timed calls per image (median)")
    ap.add_argument("--deca-batch", type=int, default=8, help="images per DECA batch")
    ap.add_argument("--cores", default="2,16,64")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    import cv2

    from mfim.assets import fetch

    torch.set_num_threads(1)
    cv2.setNumThreads(1)
    cores = [int(c) for c in args.cores.split(",")]
    names = ["obama", "obama2", "obama3", "biden", "obama_partial_face"][: args.photos]
    photos = [fetch(f"photo_{n}", progress=False) for n in names]
    t0 = time.time()
    tmp = Path(tempfile.mkdtemp(prefix="bench_stages_"))
    try:
        results = {"align (1024 px crop)": bench_align(photos, tmp, args.repeat)}
        crops = sorted(tmp.glob("*.png"))
        results["shard (256 px PNG)"] = bench_shard(crops, args.repeat)
        results["threedmm (decode + DECA, CPU)"] = bench_threedmm(crops, args.deca_batch, args.repeat)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    r3 = results["threedmm (decode + DECA, CPU)"]
    results["threedmm decode only (workers; DECA on a GPU)"] = {
        "cpu_s": r3["decode_cpu_s"], "bytes": r3["bytes"], "note": "the CPU share when DECA runs on a GPU"}
    a = results["align (1024 px crop)"]
    print(f"align: {a['photos']} photos of {a['mean_megapixels']:.2f} MP on average (FFHQ's in-the-wild photos are "
          "larger; detection runs on a copy capped at 1024 px, the warp reads the full image)")
    print(f"threedmm: decode {r3['decode_cpu_s'] * 1e3:.1f} ms + DECA {r3['network_cpu_s'] * 1e3:.0f} ms per image "
          f"(batch {args.deca_batch}, 1 CPU thread)")
    print(f"host: {os.cpu_count()} CPUs visible; one thread per measurement; {time.time() - t0:.0f} s in all\n")
    print(table(results, cores))
    if args.json:
        args.json.write_text(json.dumps({"results": results, "cores": cores, "images": FFHQ}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
