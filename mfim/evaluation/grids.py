"""Sample grids: one row per example, one column per image kind (e.g. source | target | swap | mix), and the
evaluate stage's grids (write_grids) from the images its streaming pass kept."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

from mfim.imageio import ImageRejected, read_rgb
from mfim.inference import FaceSwapper
from mfim.models.roi import roi_blend, roi_masks
from mfim.nets.align import canonical_landmarks
from mfim.nets.face_crops import from_uint8, to_uint8  # noqa: F401  (from_uint8: imported from here too)
from mfim.provenance import provenance_record, save_image


def image_grid(columns: list[torch.Tensor], size: int | None = None, pad: int = 2) -> np.ndarray:
    """columns: equal-length batches B×3×H×W in [-1, 1] (sizes may differ: all are resized to ``size``)."""
    size = size or max(c.shape[-1] for c in columns)
    cols = [c if c.shape[-1] == size else F.interpolate(c.float(), size=(size, size), mode="bilinear",
                                                       align_corners=False, antialias=True) for c in columns]
    b = cols[0].shape[0]
    h = b * size + (b + 1) * pad
    w = len(cols) * size + (len(cols) + 1) * pad
    out = np.full((h, w, 3), 255, np.uint8)
    for j, c in enumerate(cols):
        imgs = to_uint8(c)
        for i in range(b):
            y, x = pad + i * (size + pad), pad + j * (size + pad)
            out[y : y + size, x : x + size] = imgs[i]
    return out


def save_grid(path: str | Path, columns: list[torch.Tensor], record: dict | None = None, size: int | None = None):
    return save_image(path, image_grid(columns, size=size), record or provenance_record("synthetic"))


def write_grids(model, meta: dict, out_dir: Path, pair_images, triplet_images, pairs, raw_dir, device,
                protocol: str = "") -> list[Path]:
    """source | target | swap | E+ (ROI-only) ; global | local | target | mix ; target | self-swap | without maps;
    and raw target photo | E+ pasted back into it. ``pair_images`` / ``triplet_images``: the first rows the
    evaluation kept (mfim.evaluation.features.GridImages); ``triplet_images`` None when the protocol has no
    ID-mixing triplets (FF++), and id_mixing.png then says so instead."""
    p = pair_images
    roi = roi_swaps(p["swap"], p["target"])
    paths = [save_grid(out_dir / "swaps.png", [p["source"], p["target"], p["swap"], roi])]
    t = triplet_images
    if t is None:
        paths.append(notice_image(out_dir / "id_mixing.png",
                                  f"no ID-mixing triplets in the {protocol or 'this'} protocol"))
    else:
        paths.append(save_grid(out_dir / "id_mixing.png", [t["global"], t["local"], t["target"], t["mix"]]))
    paths.append(save_grid(out_dir / "style_maps.png",
                           [p["target"], p["self_swap"], p["self_swap_without_style_maps"]]))
    paths.append(paste_back_examples(model, meta, pairs.head(4), raw_dir, device, out_dir / "paste_back.png", roi))
    return paths


def notice_image(path: Path, text: str, width: int = 480, height: int = 48) -> Path:
    """A plain image with one line of text, where a grid has nothing to show (the file is a declared output)."""
    img = Image.new("RGB", (width, height), (255, 255, 255))
    ImageDraw.Draw(img).text((8, height // 2 - 6), text, fill=(0, 0, 0))
    return save_image(path, np.asarray(img), provenance_record("synthetic", note=text))


def roi_swaps(x_swap: torch.Tensor, x_tgt: torch.Tensor) -> torch.Tensor:
    """E+ in aligned space, with the canonical FFHQ face mask (the aligned target's own landmarks are used when
    pasting into photos, see paste_back_examples)."""
    size = x_swap.shape[-1]
    masks = roi_masks(np.repeat(canonical_landmarks(size)[None], len(x_swap), axis=0), size)
    return roi_blend(x_swap, x_tgt, masks)


def paste_back_examples(model, meta: dict, pairs: pd.DataFrame, raw_dir, device, out_path: Path,
                        roi_aligned: torch.Tensor) -> Path:
    """E+ on the unaligned raw photos: detect + align the raw target and source, swap, paste back; one row per pair
    (raw target | result). Without raw photos (real-data protocols keep only aligned frames) the aligned-space E+
    column stands in, so the file always exists."""
    raw_dir = Path(raw_dir)
    rows = []
    if raw_dir.is_dir():
        swapper = FaceSwapper(model, meta, checkpoint_sha256="", device=device)
        for _, r in pairs.iterrows():
            src_p, tgt_p = raw_dir / f"{r.source_key}.png", raw_dir / f"{r.target_key}.png"
            try:
                src, tgt = swapper.prepare(read_rgb(src_p)), swapper.prepare(read_rgb(tgt_p))
            except (ImageRejected, FileNotFoundError):
                continue
            rows.append(np.concatenate([tgt.photo, swapper.swap(src, tgt, roi=True)], axis=1))
    if not rows:
        return save_grid(out_path, [roi_aligned[:4]])
    w = max(r.shape[1] for r in rows)
    rows = [np.pad(r, ((0, 0), (0, w - r.shape[1]), (0, 0)), constant_values=255) for r in rows]
    return save_image(out_path, np.concatenate(rows, axis=0), provenance_record("synthetic"))
