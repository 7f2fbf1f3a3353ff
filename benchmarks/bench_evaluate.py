"""Peak memory of the evaluate stage at 1× and 10× the pairs: streaming keeps it flat (issue 11: within 10 %).

    .venv/bin/python benchmarks/bench_evaluate.py [--pairs 30] [--scale 10] [--swap-res 512] [--json out.json]

``mfim.evaluation.evaluate.run_evaluation`` runs end to end (image reading, streaming pass, tables, grids, reports)
on a fixture of smooth random 64 px eval images, with a fake swapper that returns ``--swap-res`` px images (the
paper's swaps are 4× the real images' size) and the stub evaluation networks of tests/stubs.py, so the figure is the
stage's own memory, not the networks'. Each size runs in a fresh child process (peak RSS only grows within one), the
same fixture images and batch size for both; the ratio 10×/1× is the result, for the whole stage and for the part
up to the end of the streaming pass (after it, the grids' PNG writing has a fixed cost of its own). For scale, the
bytes the former in-memory evaluation held in float32 images at each size are printed beside it.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

DATA_RES, BATCH, IMAGES = 64, 8, 24


def in_memory_bytes(n_pairs: int, n_triplets: int, swap_res: int) -> int:
    """float32 images the former run_evaluation held at once: source, target (data res), swap, self-swap and
    self-swap without maps (swap res); triplets: three inputs and three results."""
    real, swap = 3 * DATA_RES**2 * 4, 3 * swap_res**2 * 4
    return n_pairs * (2 * real + 3 * swap) + n_triplets * 3 * (real + swap)


def child(pairs: int, swap_res: int, threads: int) -> dict:
    import torch
    import torch.nn.functional as F

    from mfim.evaluation.evaluate import run_evaluation
    from tests.stubs import stub_evaluation_networks, write_evalsets

    torch.set_num_threads(threads)

    class FakeSwapper:
        """The MFIM calls the evaluate stage makes, as cheap resizes of the inputs to ``swap_res``."""

        src_indices = [1]
        encoder = SimpleNamespace(cfg=SimpleNamespace(input_size=DATA_RES))

        def _out(self, x):
            return F.interpolate(x, size=(swap_res, swap_res), mode="bilinear", align_corners=False)

        def swap(self, x_src, x_tgt):
            return self._out(0.3 * x_src + 0.7 * x_tgt)

        def reconstruct(self, x):
            return self._out(x)

        def mix(self, x_tgt, x_global, x_local):
            return self._out(0.2 * x_global + 0.2 * x_local + 0.6 * x_tgt)

        def encode_target(self, x):
            return {0: x}, {}

        def encode_codes(self, x, indices):
            return {1: x}

        def synthesize(self, codes, maps):
            return self._out(0.5 * codes[0] + 0.5 * codes[1])

    import mfim.evaluation.features as features
    import mfim.models.mfim as mfim_model

    stub_evaluation_networks(lambda obj, name, value: setattr(obj, name, value))
    mfim_model.load_swapper = lambda path, device="cpu": (FakeSwapper(), {"data_resolution": DATA_RES})
    # the peak so far once the streaming pass is over (the triplets come last): the part that holds the pairs
    stream_peak = {}
    stream_triplets = features.stream_triplets

    def timed_triplets(*a, **k):
        out = stream_triplets(*a, **k)
        stream_peak["mb"] = peak_rss_mb()
        return out

    features.stream_triplets = timed_triplets
    with tempfile.TemporaryDirectory() as tmp:
        evalsets = write_evalsets(Path(tmp) / "evalsets", n_images=IMAGES, n_pairs=pairs, n_triplets=pairs // 2,
                                  size=DATA_RES)
        params = {"project": {"device": "cpu", "threads": threads},
                  "evaluate": {"batch_size": BATCH, "bootstrap": 1000}}
        t0 = time.perf_counter()
        out = run_evaluation(params, model_path="fake", evalsets_dir=evalsets, shards_dir=Path(tmp) / "none",
                             raw_dir=Path(tmp) / "none", reports_dir=Path(tmp) / "reports")
        seconds = time.perf_counter() - t0
    return {"pairs": out["n_pairs"], "triplets": out["n_triplets"], "seconds": round(seconds, 1),
            "peak_rss_mb": peak_rss_mb(), "peak_rss_streaming_mb": stream_peak["mb"]}


def peak_rss_mb() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def run_child(pairs: int, swap_res: int, threads: int) -> dict:
    cmd = [sys.executable, __file__, "--child", "--pairs", str(pairs), "--swap-res", str(swap_res),
           "--threads", str(threads)]
    from mfim.runtime import GLIBC_TUNABLES

    # the allocator settings the evaluate stage runs with (pipelines/evaluate.py: ensure_allocator_env)
    env = {**os.environ, "TQDM_DISABLE": "1", "GLIBC_TUNABLES": GLIBC_TUNABLES}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        sys.stderr.write(done.stderr)
        raise SystemExit(f"child with {pairs} pairs failed ({done.returncode})")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", type=int, default=30)
    ap.add_argument("--scale", type=int, default=10)
    ap.add_argument("--swap-res", type=int, default=512)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default=None)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.pairs, args.swap_res, args.threads)))
        return {}

    runs = [run_child(n, args.swap_res, args.threads) for n in (args.pairs, args.pairs * args.scale)]
    small, large = runs
    result = {
        "swap_resolution": args.swap_res,
        "data_resolution": DATA_RES,
        "batch": BATCH,
        "runs": runs,
        "in_memory_images_mb": [round(in_memory_bytes(r["pairs"], r["triplets"], args.swap_res) / 2**20, 1)
                                for r in runs],
        "peak_rss_ratio": round(large["peak_rss_mb"] / small["peak_rss_mb"], 3),
        "peak_rss_streaming_ratio": round(large["peak_rss_streaming_mb"] / small["peak_rss_streaming_mb"], 3),
    }
    for r, held in zip(runs, result["in_memory_images_mb"]):
        print(f"{r['pairs']:6d} pairs, {r['triplets']:5d} triplets: peak RSS {r['peak_rss_mb']:8.1f} MB, "
              f"{r['peak_rss_streaming_mb']:8.1f} MB through the streaming pass ({r['seconds']:.0f} s); "
              f"the in-memory evaluation held {held:.0f} MB of images alone")
    print(f"peak RSS at {args.scale}x the pairs / at 1x: {result['peak_rss_ratio']:.3f} for the stage, "
          f"{result['peak_rss_streaming_ratio']:.3f} through the streaming pass (issue 11: within 1.10)")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
