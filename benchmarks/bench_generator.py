"""Generator / discriminator speed on CPU: our StyleGAN2 (FIR filters as depthwise convolutions) against the same
networks with a loop-style upfirdn2d (zero insertion + a multiply-add per filter tap), in one process.

    python benchmarks/bench_generator.py [--repeats 5] [--threads 2] [--configs 64,256]

Prints, per configuration: G forward (inference), G forward+backward (training mode), D forward+backward, and one
full pretraining iteration (G step, D step, EMA; R1 and path length as configured), each as ms for ours and for the
baseline and the speed-up. Timings interleave ours and the baseline and keep the best of N runs (other processes on
shared machines only ever add time), so load affects both alike. The script re-executes itself with the allocator
setting (GLIBC_TUNABLES, see mfim/runtime.py) unless given --no-reexec.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def loop_upfirdn2d(x, kernel, up=1, down=1, pad=(0, 0, 0, 0), gain=1.0):
    """Textbook upfirdn: insert zeros, pad (negative crops), convolve as a sum of shifted copies, decimate."""
    import torch.nn.functional as F

    b, c, h, w = x.shape
    px0, px1, py0, py1 = pad
    if up > 1:
        z = x.new_zeros(b, c, h * up, w * up)
        z[:, :, ::up, ::up] = x
    else:
        z = x
    z = F.pad(z, [max(px0, 0), max(px1, 0), max(py0, 0), max(py1, 0)])
    z = z[:, :, max(-py0, 0) : z.shape[2] - max(-py1, 0), max(-px0, 0) : z.shape[3] - max(-px1, 0)]
    kh, kw = kernel.shape
    oh, ow = z.shape[2] - kh + 1, z.shape[3] - kw + 1
    k = (kernel * gain).tolist()
    out = None
    for i in range(kh):
        for j in range(kw):
            term = z[:, :, i : i + oh, j : j + ow] * k[kh - 1 - i][kw - 1 - j]
            out = term if out is None else out + term
    return out[:, :, ::down, ::down] if down > 1 else out


@contextlib.contextmanager
def baseline_fir():
    """Swap the FIR implementation used by every layer for the loop-style one."""
    import mfim.models.layers as layers

    fast = layers.upfirdn2d
    layers.upfirdn2d = loop_upfirdn2d
    try:
        yield
    finally:
        layers.upfirdn2d = fast


def _time(fn, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def bench_config(resolution: int, channel_max: int, batch: int, repeats: int) -> list[tuple[str, float, float]]:
    import torch

    from mfim.models.stylegan2 import Discriminator, Generator
    from mfim.training.pretrain import StyleGAN2Trainer

    torch.manual_seed(0)
    G = Generator(resolution, style_dim=256, n_mlp=4, channel_base=16384, channel_max=channel_max)
    D = Discriminator(resolution, channel_base=16384, channel_max=channel_max)
    z = torch.randn(batch, G.z_dim)
    real = torch.rand(batch, 3, resolution, resolution) * 2 - 1
    trainer = StyleGAN2Trainer(G, D, dict(batch_size=batch, r1_every=16, mixing_prob=0.9, progress=False))

    def g_forward():
        G.eval()
        with torch.no_grad():
            G(z)
        G.train()

    def g_backward():
        G.zero_grad(set_to_none=True)
        G(z, noise_mode="random").square().mean().backward()

    def d_backward():
        D.zero_grad(set_to_none=True)
        D(real).mean().backward()

    def iteration():  # R1 on every 16th: amortise by running it 1/16 of the time as in training
        trainer.step = 1
        trainer.train_step(real)

    def r1_step():
        trainer.d_r1_step(real)

    tasks = [
        ("G forward (eval, fused)", g_forward),
        ("G forward+backward (train)", g_backward),
        ("D forward+backward", d_backward),
        ("train iteration w/o R1", iteration),
        ("R1 step", r1_step),
    ]
    rows = []
    for name, fn in tasks:
        fn()  # warm-up both variants
        with baseline_fir():
            fn()
        ours, base = [], []
        for _ in range(repeats):
            ours += _time(fn, 1)
            with baseline_fir():
                base += _time(fn, 1)
        rows.append((name, min(ours), min(base)))
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--configs", default="64,256", help="resolutions to run (64: cap 64 batch 8; 256: cap 64 batch 4)")
    args = p.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    configs = {64: (64, 64, 8), 256: (256, 64, 4), 128: (128, 64, 8)}
    tunables = "set" if "mmap_threshold" in os.environ.get("GLIBC_TUNABLES", "") else "unset"
    print(f"torch {torch.__version__}, {args.threads} threads, GLIBC_TUNABLES {tunables}")
    for r in [int(s) for s in args.configs.split(",")]:
        res, cmax, batch = configs[r]
        print(f"\n{res} px, channel cap {cmax}, batch {batch}: best of {args.repeats}")
        print(f"{'':30s} {'ours ms':>10s} {'loop-FIR ms':>12s} {'speed-up':>9s}")
        rows = bench_config(res, cmax, batch, args.repeats)
        for name, ours, base in rows:
            print(f"{name:30s} {ours * 1e3:10.1f} {base * 1e3:12.1f} {base / ours:8.2f}x")
        it = dict((n, o) for n, o, _ in rows)
        per_iter = it["train iteration w/o R1"] + it["R1 step"] / 16
        print(f"{'-> training img/s (R1 every 16)':30s} {batch / per_iter:10.1f}")
    return 0


if __name__ == "__main__":
    if "--no-reexec" not in sys.argv:
        from mfim.runtime import ensure_allocator_env

        ensure_allocator_env()
    else:
        sys.argv.remove("--no-reexec")
    sys.exit(main())
