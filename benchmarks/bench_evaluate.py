"""CPU-seconds per pair of the evaluate stage before / after caching by distinct image (issue 36: >= 3x fewer on
CelebA-HQ-like pairs), and its peak memory at 1× and 10× the pairs (issue 11: within 10 %).

    .venv/bin/python benchmarks/bench_evaluate.py [--cpu-pairs 40] [--pairs 30] [--scale 10] [--swap-res 512]
                                                  [--workers 2] [--json out.json]

CPU time (``cpu_time``): ``run_evaluation`` end to end, in one process, three ways on the same fixture: "before" is
the stage as it was when the target was set -- the former per-pair pass (tests/per_pair_evaluation.py, the code of
commit 05abea1, swapped in for mfim.evaluation.features.Streamer: each pair recomputes its source's and target's
features and the target's two extra self-swaps) with dlib's own recognition network on every chip; "after" today's
stage -- the cached pass, dlib's network run by its torch port (mfim.nets.dlib_resnet) -- in one process, and
"after, N workers" with decoding and dlib in worker processes. The swapper is a small random-weight MFIM (generator
at 4× the 64 px data resolution, like 1024 vs 256); the evaluation networks are the stubs of tests/stubs.py plus the
real dlib embedder (the CPU-only part, ~0.2 CPU-s a pair before), so the CPU-seconds are the stage's own and dlib's.
Pairs are drawn like CelebA-HQ's: each
source ~20 times, each target ~10 times. CPU-seconds count this process and its finished children (the workers)
(time.process_time + RUSAGE_CHILDREN); on shared cores wall times are noisy, CPU-seconds much less so.

Memory (``memory``):

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

from tests.defaults import EVAL_BASE, params_with  # noqa: E402  (run_evaluation reads full params, as the stage does)

DATA_RES, BATCH, IMAGES = 64, 8, 24
SOURCE_REPEATS, TARGET_REPEATS = 20, 10  # CelebA-HQ: 300k pairs over 30k images


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
        coarse_max_res, source_torgb_max_res, source_fitter = 8, 0, None
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
    # the peak so far once the streaming pass is over and its features collected: the part that holds the pairs
    stream_peak = {}
    collect = features.Streamer.collect

    def timed_collect(self, *a, **k):
        out = collect(self, *a, **k)
        stream_peak["mb"] = peak_rss_mb()
        return out

    features.Streamer.collect = timed_collect
    with tempfile.TemporaryDirectory() as tmp:
        evalsets = write_evalsets(Path(tmp) / "evalsets", n_images=IMAGES, n_pairs=pairs, n_triplets=pairs // 2,
                                  size=DATA_RES)
        params = params_with(EVAL_BASE, {"project": {"device": "cpu", "threads": threads},
                                         "evaluate": {"batch_size": BATCH, "bootstrap": 1000}})
        t0 = time.perf_counter()
        out = run_evaluation(params, model_path="fake", evalsets_dir=evalsets, shards_dir=Path(tmp) / "none",
                             raw_dir=Path(tmp) / "none", reports_dir=Path(tmp) / "reports")
        seconds = time.perf_counter() - t0
    return {"pairs": out["n_pairs"], "triplets": out["n_triplets"], "seconds": round(seconds, 2),
            "peak_rss_mb": peak_rss_mb(), "peak_rss_streaming_mb": stream_peak["mb"]}


def celebahq_like_evalsets(root: Path, n_pairs: int) -> Path:
    """write_evalsets' smooth random images, with pairs redrawn so that each source appears ~SOURCE_REPEATS times
    and each target ~TARGET_REPEATS times (sources and targets from one pool, as CelebA-HQ's)."""
    import numpy as np
    import pandas as pd

    from tests.stubs import write_evalsets

    n_images = max(2, n_pairs // TARGET_REPEATS)
    # few triplets (three results' features each, before and after): the figure is the pairs'
    root = write_evalsets(root, n_images=n_images, n_pairs=n_pairs, n_triplets=max(2, n_pairs // 20), size=DATA_RES)
    pairs = pd.read_parquet(root / "pairs.parquet")
    images = pd.concat([pairs[["source_key", "source_path", "source_identity"]].set_axis(["key", "path", "id"], axis=1),
                        pairs[["target_key", "target_path", "target_identity"]].set_axis(["key", "path", "id"], axis=1)]
                       ).drop_duplicates("key").sort_values("key").reset_index(drop=True)
    rng = np.random.default_rng(1)
    src = images.iloc[rng.integers(0, max(1, n_pairs // SOURCE_REPEATS), n_pairs)].reset_index(drop=True)
    tgt = images.iloc[rng.integers(0, len(images), n_pairs)].reset_index(drop=True)
    pd.DataFrame({"pair_id": np.arange(n_pairs), "source_key": src.key, "target_key": tgt.key,
                  "source_path": src.path, "target_path": tgt.path, "source_identity": src.id,
                  "target_identity": tgt.id, "source_frame_index": -1}).to_parquet(root / "pairs.parquet")
    return root


def small_swapper(path: Path) -> Path:
    """A random-weight MFIM whose generator makes 4x the data resolution (the paper: 1024 px swaps of 256 px faces)."""
    import torch

    from mfim.models.mfim import MFIM, save_swapper
    from mfim.models.stylegan2 import Generator

    torch.manual_seed(0)
    G = Generator(resolution=4 * DATA_RES, style_dim=32, n_mlp=2, channel_base=2048, channel_max=16)
    from tests.defaults import unit_encoder

    model = MFIM(G, unit_encoder(input_size=DATA_RES, width=8, code_channels=16), coarse_max_res=16)
    with torch.no_grad():  # a fresh encoder starts at the average codes: every swap would be the same image
        for q in model.encoder.parameters():
            q.add_(torch.randn_like(q) * 0.05)
    save_swapper(model, path, meta={"data_resolution": DATA_RES})
    return path


def cpu_seconds() -> float:
    """This process's CPU time and that of its children that have ended (the DataLoader and dlib workers)."""
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + children.ru_utime + children.ru_stime


def cpu_child(n_pairs: int, workers: int, threads: int) -> dict:
    """run_evaluation before / after / after with workers, on one fixture, in this process."""
    import numpy as np
    import torch

    import mfim.evaluation.features as features
    from mfim.evaluation.evaluate import run_evaluation
    from tests.per_pair_evaluation import PerPairStreamer
    from tests.stubs import StubEvaluators, stub_evaluation_networks

    torch.set_num_threads(threads)

    class DlibStubEvaluators(StubEvaluators):
        """The stubs, with the real dlib embedder as the identity network (Evaluators' contract: ``dlib`` set,
        ``identity`` given when workers took the embeddings). ``descriptor``: "dlib" runs dlib's own recognition
        network (what the stage ran when the target was set), "torch" today's port of it."""

        descriptor = "torch"

        def __init__(self, *a, **k):
            from mfim.nets.identity import DlibIdentityEmbedder

            super().__init__(*a, **k)
            self.dlib = DlibIdentityEmbedder(descriptor=self.descriptor)

        def features(self, images, identity=None, landmarks=None):
            f = super().features(images)
            f.identity = (np.asarray(identity) if identity is not None else self.dlib.embed_aligned(images.cpu())
                          ).astype(np.float64)
            return f

    stub_evaluation_networks(lambda obj, name, value: setattr(obj, name, value))
    import mfim.evaluation.evaluators as evaluators

    evaluators.Evaluators = DlibStubEvaluators
    cached = features.Streamer
    rows, outs, stream_cpu = [], {}, []

    def timed(cls):
        """``cls`` with the CPU-seconds of its run + collect (the pass over the images; the rest of the stage --
        tables, bootstrap, grid PNGs -- is the same for both) added to stream_cpu."""
        class Timed(cls):
            def run(self):
                self._c0 = cpu_seconds()
                super().run()

            def collect(self, *a, **k):
                out = super().collect(*a, **k)
                stream_cpu.append(cpu_seconds() - self._c0)
                return out

        return Timed

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = small_swapper(tmp / "mfim.pt")
        runs = [(n, name, streamer, w) for n in (n_pairs, 2 * n_pairs)
                for name, streamer, w in (("before (per pair)", PerPairStreamer, 0), ("after", cached, 0))]
        runs.append((2 * n_pairs, f"after, {workers} workers", cached, workers))
        for n, name, streamer, w in runs:
            evalsets = tmp / f"evalsets{n}"
            if not evalsets.exists():
                celebahq_like_evalsets(evalsets, n)
            features.Streamer = timed(streamer)
            # "before" is the stage as it was: the per-pair pass with dlib's own network on every chip
            DlibStubEvaluators.descriptor = "dlib" if streamer is PerPairStreamer else "torch"
            params = params_with(EVAL_BASE, {"project": {"device": "cpu", "threads": threads},
                                             "evaluate": {"batch_size": BATCH, "bootstrap": 100, "workers": w}})
            c0, t0 = cpu_seconds(), time.perf_counter()
            out = run_evaluation(params, model_path=model, evalsets_dir=evalsets, shards_dir=tmp / "none",
                                 raw_dir=tmp / "none", reports_dir=tmp / f"reports{len(rows)}")
            cpu, wall = cpu_seconds() - c0, time.perf_counter() - t0
            outs[name, n] = out["swap"]
            rows.append({"path": name, "workers": w, "pairs": out["n_pairs"], "triplets": out["n_triplets"],
                         "wall_s": round(wall, 2), "pairs_per_s": round(out["n_pairs"] / wall, 2),
                         "cpu_s": round(cpu, 2), "stream_cpu_s": round(stream_cpu[-1], 2)})
    # per pair at scale: the CPU-seconds the n extra pairs of the 2n run cost (fixed costs -- loading networks,
    # the grids, starting workers -- cancel)
    marginal = {r0["path"]: round((r1["cpu_s"] - r0["cpu_s"]) / n_pairs, 4)
                for r0, r1 in zip(rows[:2], rows[2:4])}
    before, after = marginal.values()
    # the torch descriptor equals dlib's within 5e-7 (tests/test_dlib_resnet.py): the metric within 1e-5 relative
    same = all(abs(outs["before (per pair)", n]["identity"] - outs["after", n]["identity"])
               <= 1e-5 * abs(outs["after", n]["identity"]) for n in (n_pairs, 2 * n_pairs))
    return {"rows": rows, "cpu_s_per_extra_pair": marginal, "cpu_ratio_before_after": round(before / after, 2),
            "same_identity_metric": bool(same)}


def run_cpu_child(n_pairs: int, workers: int, threads: int) -> dict:
    cmd = [sys.executable, __file__, "--cpu-child", "--cpu-pairs", str(n_pairs), "--workers", str(workers),
           "--threads", str(threads)]
    env = {**os.environ, "TQDM_DISABLE": "1", "OMP_NUM_THREADS": str(threads)}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        sys.stderr.write(done.stderr)
        raise SystemExit(f"CPU-time child failed ({done.returncode})")
    return json.loads(done.stdout.strip().splitlines()[-1])


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
    ap.add_argument("--cpu-pairs", type=int, default=20, help="n: the CPU-time runs take n and 2n pairs (0: skip)")
    ap.add_argument("--workers", type=int, default=2, help="evaluate.workers of the third CPU-time run")
    ap.add_argument("--pairs", type=int, default=30, help="pairs of the 1x memory run (0: skip the memory runs)")
    ap.add_argument("--scale", type=int, default=10)
    ap.add_argument("--swap-res", type=int, default=512)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default=None)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--cpu-child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.pairs, args.swap_res, args.threads)))
        return {}
    if args.cpu_child:
        print(json.dumps(cpu_child(args.cpu_pairs, args.workers, args.threads)))
        return {}

    result = {}
    if args.cpu_pairs:
        result["cpu_time"] = cpu = run_cpu_child(args.cpu_pairs, args.workers, args.threads)
        print(f"{'path':<22}{'pairs':>7}{'wall s':>9}{'pairs/s':>9}{'CPU s':>9}{'of which the pass':>19}")
        for r in cpu["rows"]:
            print(f"{r['path']:<22}{r['pairs']:>7}{r['wall_s']:>9.1f}{r['pairs_per_s']:>9.2f}{r['cpu_s']:>9.1f}"
                  f"{r['stream_cpu_s']:>19.1f}")
        per = cpu["cpu_s_per_extra_pair"]
        print("CPU-seconds per extra pair: " + ", ".join(f"{k} {v:.4f}" for k, v in per.items()) +
              f" -> {cpu['cpu_ratio_before_after']:.2f}x fewer (issue 36: >= 3); same metrics: "
              f"{cpu['same_identity_metric']}")
    if args.pairs:
        result["memory"] = memory(args)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return result


def memory(args) -> dict:
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
              f"{r['peak_rss_streaming_mb']:8.1f} MB through the streaming pass ({r['seconds']:.0f} s, "
              f"{r['pairs'] / max(r['seconds'], 0.1):.0f} pairs/s); the in-memory evaluation held {held:.0f} MB "
              "of images alone")
    print(f"peak RSS at {args.scale}x the pairs / at 1x: {result['peak_rss_ratio']:.3f} for the stage, "
          f"{result['peak_rss_streaming_ratio']:.3f} through the streaming pass (issue 11: within 1.10)")
    return result


if __name__ == "__main__":
    main()
