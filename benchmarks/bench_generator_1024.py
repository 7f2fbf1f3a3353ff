"""One forward of the official FFHQ-1024 generator (config F, 30.37 M parameters) on CPU, against a wall-clock
limit: a speed check, so it lives here and not in the test suite (a loaded machine fails it for no fault of the code).

    python benchmarks/bench_generator_1024.py [--threads 2] [--limit 30]

Prints the seconds of one batch-1 forward (after one untimed warm-up) and exits 1 when they exceed ``--limit``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def forward_seconds(threads: int) -> float:
    import torch

    from mfim.models.stylegan2 import Generator

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    G = Generator(resolution=1024, style_dim=512, n_mlp=8, channel_base=32768, channel_max=512).eval()
    z = torch.randn(1, 512)
    with torch.no_grad():
        G(z)  # warm-up: first-call allocations and kernel selection are not the forward's cost
        t0 = time.perf_counter()
        img = G(z)
        elapsed = time.perf_counter() - t0
    assert img.shape == (1, 3, 1024, 1024) and torch.isfinite(img).all()
    return elapsed


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--limit", type=float, default=30.0, help="seconds one forward may take (default 30)")
    args = ap.parse_args(argv)
    seconds = forward_seconds(args.threads)
    ok = seconds < args.limit
    print(f"1024 px generator forward, batch 1, {args.threads} threads: {seconds:.1f} s "
          f"({'within' if ok else 'OVER'} the {args.limit:.0f} s limit)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
