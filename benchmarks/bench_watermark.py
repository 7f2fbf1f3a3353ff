"""Robustness of the MFIM watermark: detection rate on marked images and false-positive rate on unmarked ones,
after JPEG quality 75, a resize to half, a central 70% crop, and all three combined.

    .venv/bin/python benchmarks/bench_watermark.py [--keys 20] [--renders DIR] [--json out.json]

Images: the real test photos (face_recognition's obama/obama2/obama3/biden/obama_partial_face, via the asset zoo),
the sample photos that matplotlib and scikit-learn ship when installed, and procedural renders (shaded spheres on
gradients, a checkerboard, stripes -- clean or periodic content is where a tiled-pattern detector could be fooled),
plus any images under --renders (e.g. data/raw/images, the pipeline's BFM renders). Each appears at its own size, and
the real photos also as 1024, 512 and 256 px square crops (the sizes of aligned outputs).

False positives are measured twice: with the default key on every unmarked image (as `mfim detect` runs), and with
--keys further random keys per unmarked image, which multiplies the number of independent null trials cheaply
(the folding is shared across keys).
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

from mfim import watermark as wm
from mfim.imageio import list_images, read_rgb


def jpeg(img, quality=75):
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, "JPEG", quality=quality)
    return np.asarray(Image.open(buf).convert("RGB"))


def half(img):
    h, w = img.shape[:2]
    return np.asarray(Image.fromarray(img).resize((w // 2, h // 2), Image.BICUBIC))


def crop70(img):
    h, w = img.shape[:2]
    ch, cw = int(h * 0.7), int(w * 0.7)
    y, x = (h - ch) // 2, (w - cw) // 2
    return np.ascontiguousarray(img[y : y + ch, x : x + cw])


ATTACKS = {
    "none": lambda a: a,
    "JPEG q75": jpeg,
    "resize 1/2": half,
    "crop 70%": crop70,
    "crop+resize+JPEG": lambda a: jpeg(half(crop70(a))),
}


def square(img, side):
    h, w = img.shape[:2]
    s = min(h, w)
    y, x = (h - s) // 4, (w - s) // 2  # faces sit in the upper half of these portraits
    return np.asarray(Image.fromarray(img[y : y + s, x : x + s]).resize((side, side), Image.LANCZOS))


def procedural_renders(rng) -> dict[str, np.ndarray]:
    out = {}
    for i, (h, w) in enumerate([(512, 512), (768, 1024), (256, 256)]):
        y, x = np.mgrid[0:h, 0:w].astype(np.float32)
        bg = np.stack([x / w, y / h, 1 - x / w], -1) * 160 + 40
        img = bg.copy()
        for _ in range(3):  # Lambert-shaded spheres
            cx, cy, r = rng.uniform(0.2, 0.8) * w, rng.uniform(0.2, 0.8) * h, rng.uniform(0.1, 0.3) * min(h, w)
            d2 = ((x - cx) ** 2 + (y - cy) ** 2) / r**2
            inside = d2 < 1
            nz = np.sqrt(np.clip(1 - d2, 0, 1))
            nx, ny = (x - cx) / r, (y - cy) / r
            shade = np.clip(0.2 + 0.8 * (0.5 * nx - 0.5 * ny + 0.7 * nz), 0, 1)
            color = rng.uniform(80, 255, 3)
            img[inside] = shade[inside, None] * color
        out[f"render_spheres_{i}_{w}x{h}"] = np.clip(img, 0, 255).astype(np.uint8)
    y, x = np.mgrid[0:600, 0:800]
    out["render_checker_16px"] = np.repeat((((x // 16 + y // 16) % 2) * 200 + 30).astype(np.uint8)[..., None], 3, 2)
    out["render_stripes_40px"] = np.repeat((127 + 90 * np.sin(2 * np.pi * x / 40)).astype(np.uint8)[..., None], 3, 2)
    return out


def load_images(renders_dir: str | None) -> dict[str, tuple[str, np.ndarray]]:
    """name -> (group, image)."""
    from mfim.assets import fetch

    images = {}
    for name in ["obama", "obama2", "obama3", "biden", "obama_partial_face"]:
        img = read_rgb(fetch(f"photo_{name}", progress=False))
        images[name] = ("photo (full size)", img)
        images[f"{name}_1024"] = ("photo crop 1024 px", square(img, 1024))
        images[f"{name}_512"] = ("photo crop 512 px", square(img, 512))
        images[f"{name}_256"] = ("photo crop 256 px", square(img, 256))
    extra = []
    try:
        import matplotlib

        extra.append(Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg")
    except ImportError:
        pass
    try:
        import sklearn

        extra += sorted((Path(sklearn.__file__).parent / "datasets" / "images").glob("*.jpg"))
    except ImportError:
        pass
    for p in extra:
        if p.is_file():
            images[p.stem] = ("other photo (full size)", read_rgb(p))
    for name, img in procedural_renders(np.random.default_rng(0)).items():
        images[name] = ("procedural render", img)
    if renders_dir:
        for p in list_images(renders_dir)[:50]:
            images[f"render:{p.name}"] = ("pipeline render", read_rgb(p))
    return images


def null_scores(img, keys) -> np.ndarray:
    """Detection score of an unmarked image under each of many keys (folds shared: they do not depend on the key)."""
    residual = wm.whitened_residual(wm.luminance(img))
    if not residual.any():
        return np.zeros(len(keys))
    folds = [wm.fold(residual, p) for p in wm.period_candidates(residual)]
    return np.array([max(float(wm.correlate_with_key(f, k).max()) for f in folds) for k in keys])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--keys", type=int, default=20, help="random keys per unmarked image for the null trials")
    ap.add_argument("--renders", default=None, help="folder of extra unmarked renders (e.g. data/raw/images)")
    ap.add_argument("--json", default=None, help="write the numbers here too")
    args = ap.parse_args(argv)

    t0 = time.time()
    images = load_images(args.renders)
    keys = [f"null-{i}" for i in range(args.keys)]
    rows = []  # one per (image, attack)
    psnrs = {}
    for name, (group, img) in images.items():
        marked = wm.embed(img)
        psnrs[name] = wm.psnr(marked, img)
        for attack, f in ATTACKS.items():
            m, u = wm.detect(f(marked)), wm.detect(f(img))
            nulls = null_scores(f(img), keys) if keys else np.zeros(0)
            rows.append(dict(image=name, group=group, attack=attack, marked_score=m["score"],
                             detected=m["watermarked"], unmarked_score=u["score"], false_positive=u["watermarked"],
                             null_max=float(nulls.max()) if len(nulls) else None,
                             null_hits=int((nulls >= wm.THRESHOLD).sum()), null_trials=len(nulls)))
        print(f"  {name:28s} {img.shape[1]}x{img.shape[0]}  PSNR {psnrs[name]:.1f} dB", file=sys.stderr, flush=True)

    groups = list(dict.fromkeys(r["group"] for r in rows))
    print(f"\nMFIM watermark ({wm.SCHEME}), default strength {wm.DEFAULT_PSNR_DB:.0f} dB PSNR, "
          f"threshold {wm.THRESHOLD} (per-image false-positive bound {wm.TARGET_FALSE_POSITIVE_RATE:g})")
    p = np.array([psnrs[n] for n in psnrs])
    print(f"PSNR of marked images: median {np.median(p):.1f} dB, min {p.min():.1f} dB ({len(p)} images)\n")

    print("Detection rate on marked images (min / median score)\n")
    print("| images | " + " | ".join(ATTACKS) + " |")
    print("|---|" + "---|" * len(ATTACKS))
    for g in groups + ["all"]:
        cells = []
        for a in ATTACKS:
            sel = [r for r in rows if r["attack"] == a and (g == "all" or r["group"] == g)]
            s = np.array([r["marked_score"] for r in sel])
            rate = np.mean([r["detected"] for r in sel])
            cells.append(f"{rate:.0%} ({s.min():.2f} / {np.median(s):.2f})")
        n = len({r["image"] for r in rows if g == "all" or r["group"] == g})
        print(f"| {g} ({n}) | " + " | ".join(cells) + " |")

    print("\nFalse positives on unmarked images: default key (hits/trials, max score); "
          f"then {args.keys} random keys per image\n")
    print("| images | " + " | ".join(ATTACKS) + " |")
    print("|---|" + "---|" * len(ATTACKS))
    for g in groups + ["all"]:
        cells = []
        for a in ATTACKS:
            sel = [r for r in rows if r["attack"] == a and (g == "all" or r["group"] == g)]
            fp = sum(r["false_positive"] for r in sel)
            cell = f"{fp}/{len(sel)} ({max(r['unmarked_score'] for r in sel):.2f})"
            if keys:
                hits = sum(r["null_hits"] for r in sel)
                trials = sum(r["null_trials"] for r in sel)
                cell += f"; {hits}/{trials} ({max(r['null_max'] for r in sel):.2f})"
            cells.append(cell)
        n = len({r["image"] for r in rows if g == "all" or r["group"] == g})
        print(f"| {g} ({n}) | " + " | ".join(cells) + " |")
    trials = sum(r["null_trials"] + 1 for r in rows)
    hits = sum(r["null_hits"] + r["false_positive"] for r in rows)
    measured = f"95% upper bound {3.0 / trials:.1e} by the rule of three" if hits == 0 else f"rate {hits / trials:.1e}"
    print(f"\nAll null trials: {hits} false positives in {trials} ({measured}); "
          f"model bound {wm.TARGET_FALSE_POSITIVE_RATE:g}. {time.time() - t0:.0f} s.")
    if args.json:
        Path(args.json).write_text(json.dumps({"psnr": psnrs, "rows": rows, "threshold": wm.THRESHOLD}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
