"""CPU-seconds per 150 px chip of dlib's face-recognition ResNet: dlib's own ``compute_face_descriptor`` (the wheel
has no BLAS) against the same network in torch (mfim.nets.dlib_resnet), in one process, on the same chips.

    .venv/bin/python benchmarks/bench_dlib_resnet.py [--chips 32] [--threads 2] [--json out.json]

Both run with ``--threads`` threads (dlib's DNN runs on one regardless), and torch once more the way
DlibIdentityEmbedder runs it (``describe_each``: a chip at a time, one thread); CPU-seconds are ``time.process_time``
of this process, far less noisy on shared cores than wall time. The chips are uniform noise: the cost does not
depend on the pixels. Also prints the largest |torch - dlib| over the descriptors.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def cpu_seconds(fn) -> tuple[float, object]:
    start = time.process_time()
    out = fn()
    return time.process_time() - start, out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--chips", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)

    import dlib
    import numpy as np
    import torch

    from mfim.assets import resolve
    from mfim.nets.dlib_resnet import DlibFaceResNet

    torch.set_num_threads(args.threads)
    chips = list(np.random.default_rng(0).integers(0, 256, (args.chips, 150, 150, 3), dtype=np.uint8))
    recognizer = dlib.face_recognition_model_v1(str(resolve("dlib_face_recognition")))
    network = DlibFaceResNet()
    network.describe(chips[:2])  # first-call set-up (oneDNN kernels) outside the timing
    t_dlib, want = cpu_seconds(lambda: np.asarray(recognizer.compute_face_descriptor(chips), np.float32))
    t_torch, got = cpu_seconds(lambda: network.describe(chips))
    t_each, each = cpu_seconds(lambda: network.describe_each(chips))
    result = {
        "chips": args.chips, "threads": args.threads, "dlib_blas": bool(dlib.DLIB_USE_BLAS),
        "dlib_cpu_s_per_chip": t_dlib / args.chips, "torch_cpu_s_per_chip": t_torch / args.chips,
        "ratio": t_dlib / t_torch, "max_abs_diff": float(np.abs(got - want).max()),
        # what DlibIdentityEmbedder runs: a chip at a time on one thread (batch-invariant bits)
        "torch_each_cpu_s_per_chip": t_each / args.chips, "ratio_each": t_dlib / t_each,
        "max_abs_diff_each": float(np.abs(each - want).max()),
    }  # fmt: skip
    print(json.dumps(result, indent=1))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
