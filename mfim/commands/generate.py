"""`mfim generate --checkpoint CKPT --seeds 0-3 [--trunc 1.0] [--noise-mode const] --outdir DIR`.

Draws z exactly as the official generate.py does (``np.random.RandomState(seed).randn(1, z_dim)``), so the same
checkpoint and seed give the same image as the reference code. Writes ``seed%04d.png`` per seed (with the provenance
record marking it synthetic, with the checkpoint's sha256), ``images.npy`` (float32 N×3×H×W, the generator's raw
output: nominal range [-1, 1], not clipped, so it can be compared with other implementations) and ``manifest.json``.

Before loading the checkpoint, --outdir is checked: a file the run would write that already exists (or is the
checkpoint itself) is refused unless --overwrite, and so is a folder that cannot be written (exit status 2, one line).
A checkpoint that cannot be used (unreadable, wrong kind, config out of bounds) is one line and exit status 3.
Every file is written atomically.
"""

from __future__ import annotations

import re

MAX_SEEDS = 100_000  # each seed is a PNG and a row of images.npy; the memory check after loading is the real bound


def parse_seeds(text: str) -> list[int]:
    """'0-3' -> [0, 1, 2, 3]; '1,5-7,10' -> [1, 5, 6, 7, 10] (the official range syntax)."""
    seeds: list[int] = []
    for part in str(text).split(","):
        part = part.strip()
        if not part:
            continue
        m = re.fullmatch(r"(\d+)\s*-\s*(\d+)", part)
        if m:
            lo, hi = int(m.group(1)), int(m.group(2))
            if hi < lo:
                raise ValueError(f"empty seed range {part!r}")
            if len(seeds) + hi - lo + 1 > MAX_SEEDS:
                raise ValueError(f"{part!r} is {hi - lo + 1} seeds; at most {MAX_SEEDS} per run")
            seeds.extend(range(lo, hi + 1))
        elif part.isdigit():
            seeds.append(int(part))
        else:
            raise ValueError(f"not a seed or seed range: {part!r}")
    if not seeds:
        raise ValueError("no seeds given")
    if len(seeds) > MAX_SEEDS:
        raise ValueError(f"{len(seeds)} seeds; at most {MAX_SEEDS} per run")
    return seeds


def register(sub) -> None:
    p = sub.add_parser("generate", help="sample images from a StyleGAN2 checkpoint (official seeds -> z)")
    p.add_argument("--checkpoint", required=True, help="official .pkl (G_ema), rosinality .pt, our StyleGAN2 .pt, or "
                   "an MFIM swapper (data/train/mfim.pt: its generator is used)")
    p.add_argument("--seeds", required=True, help="e.g. 0-3 or 1,5-7")
    p.add_argument("--outdir", required=True)
    p.add_argument("--trunc", type=float, default=1.0, help="truncation psi (default 1: none)")
    p.add_argument("--trunc-cutoff", type=int, default=None, help="truncate only the first N entries of W+")
    p.add_argument("--noise-mode", choices=["const", "random", "none"], default="const")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--overwrite", action="store_true", help="replace files an earlier run left in --outdir")
    p.set_defaults(func=run)


def output_names(seeds: list[int]) -> list[str]:
    return [f"seed{seed:04d}.png" for seed in seeds] + ["images.npy", "manifest.json"]


def check_outdir(checkpoint: str, seeds: list[int], outdir: str, overwrite: bool) -> None:
    """Raises mfim.outputs.OutputRefused before any work: existing outputs (unless overwrite), unwritable folder."""
    from pathlib import Path

    from mfim.outputs import ensure_writable_folder, refuse_replacing

    if not overwrite:
        outputs = [Path(outdir) / name for name in output_names(seeds)]
        refuse_replacing(outputs, {"--checkpoint": Path(checkpoint)}, "--outdir")
    ensure_writable_folder(outdir, "--outdir")


def z_for_seed(seed: int, z_dim: int):
    """The official latent for a seed: float64 N(0,1) from numpy's legacy RandomState."""
    import numpy as np
    import torch

    return torch.from_numpy(np.random.RandomState(seed).randn(1, z_dim))


def refuse_bad_request(checkpoint: str, seeds: list[int], outdir: str, overwrite: bool, device: str,
                       truncation_psi: float) -> None:
    """Everything that can be refused before the generator is loaded: the device, the truncation, the outputs."""
    import math

    from mfim.resources import device_problem

    problem = device_problem(device) if device != "auto" else None
    if problem:
        raise ValueError(problem)
    if not math.isfinite(truncation_psi):
        raise ValueError(f"--trunc must be a finite number, got {truncation_psi}")
    check_outdir(checkpoint, seeds, outdir, overwrite)


def generate(
    checkpoint: str,
    seeds: list[int],
    outdir: str,
    truncation_psi: float = 1.0,
    truncation_cutoff: int | None = None,
    noise_mode: str = "const",
    device: str = "auto",
    overwrite: bool = True,
) -> dict:
    """Library form of the command; returns the manifest it writes. overwrite=False refuses (OutputRefused) before
    loading anything when an output already exists."""
    import json
    from pathlib import Path

    import numpy as np
    import torch

    from mfim.assets import sha256_file
    from mfim.atomic import atomic_write
    from mfim.commands.model_notes import announce_synthetic
    from mfim.weights import CheckpointError, load_generator
    from mfim.nets.face_crops import to_uint8
    from mfim.provenance import provenance_record, save_image
    from mfim.resources import refuse_over_budget
    from mfim.runtime import pick_device

    refuse_bad_request(checkpoint, seeds, outdir, overwrite, device, truncation_psi)
    dev = pick_device(device)
    G = load_generator(checkpoint, device=dev)
    # every image is kept for images.npy: refuse a count this machine cannot hold before drawing any
    refuse_over_budget(f"{len(seeds)} seeds at {G.resolution} px", len(seeds) * 3 * G.resolution**2 * 4)
    announce_synthetic("generate", G, str(checkpoint))
    digest = sha256_file(checkpoint)
    out = Path(outdir)
    images = []
    files = []
    with torch.no_grad():
        for seed in seeds:
            z = z_for_seed(seed, G.z_dim).to(dev)
            img = G(z, truncation_psi=truncation_psi, truncation_cutoff=truncation_cutoff, noise_mode=noise_mode)
            if not bool(torch.isfinite(img).all()):  # 8-bit conversion would make it a plausible black image
                raise CheckpointError(f"{checkpoint}: the generator gave NaN/Inf pixels for seed {seed}; "
                                      "nothing is written for it or after it")
            images.append(img.cpu().to(torch.float32))
            u8 = to_uint8(img, stylegan=True)[0]  # the official script's 8-bit conversion
            rec = provenance_record(
                "synthetic",
                checkpoint_sha256=digest,
                checkpoint=Path(checkpoint).name,
                generator="stylegan2",
                seed=seed,
                truncation_psi=truncation_psi,
                noise_mode=noise_mode,
            )
            name = f"seed{seed:04d}.png"
            save_image(out / name, u8, rec, overwrite=overwrite)
            files.append(name)
    array = torch.cat(images).numpy().astype(np.float32)
    atomic_write(out / "images.npy", lambda f: np.save(f, array), overwrite=overwrite)
    manifest = {
        "checkpoint": str(checkpoint),
        "checkpoint_sha256": digest,
        "seeds": list(seeds),
        "truncation_psi": truncation_psi,
        "truncation_cutoff": truncation_cutoff,
        "noise_mode": noise_mode,
        "resolution": G.resolution,
        "images": files,
        "array": "images.npy",
        "array_shape": list(array.shape),
    }
    text = json.dumps(manifest, indent=2, allow_nan=False) + "\n"
    atomic_write(out / "manifest.json", lambda f: f.write(text.encode()), overwrite=overwrite)
    return manifest


def run(args) -> int:
    import sys

    from mfim.weights import CheckpointError
    from mfim.outputs import OutputRefused

    try:
        seeds = parse_seeds(args.seeds)
    except ValueError as e:
        print(f"mfim generate: --seeds: {e}", file=sys.stderr)
        return 2
    try:
        m = generate(
            args.checkpoint,
            seeds,
            args.outdir,
            truncation_psi=args.trunc,
            truncation_cutoff=args.trunc_cutoff,
            noise_mode=args.noise_mode,
            device=args.device,
            overwrite=args.overwrite,
        )
    except (OutputRefused, FileExistsError) as e:  # FileExistsError: another run wrote one of them meanwhile
        print(f"mfim generate: {e}", file=sys.stderr)
        return 2
    except CheckpointError as e:  # a model-file problem: exit 3, as `mfim swap` / `mfim mix` (mfim.cli)
        print(f"mfim generate: {e}", file=sys.stderr)
        return 3
    except ValueError as e:  # a value out of bounds (--trunc, a seed count this machine cannot hold)
        print(f"mfim generate: {e}", file=sys.stderr)
        return 2
    print(f"wrote {len(m['images'])} images and images.npy {tuple(m['array_shape'])} to {args.outdir}")
    return 0
