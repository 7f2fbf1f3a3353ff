"""Provenance of every image MFIM writes: PNG/JPEG metadata marking it as synthetic (or processed), with the model
checkpoint hash and the software version. The invisible watermark lives in mfim.watermark."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image, PngImagePlugin

from mfim import __version__

KEY = "mfim"


def provenance_record(kind: str = "synthetic", checkpoint_sha256: str | None = None, **extra) -> dict:
    """kind: 'synthetic' (made by a generator: swaps, mixes, renders, samples) or 'processed' (a real photo aligned)."""
    rec = {
        "software": f"mfim {__version__}",
        "kind": kind,
        "synthetic": kind == "synthetic",
        "checkpoint_sha256": checkpoint_sha256,
    }
    rec.update({k: v for k, v in extra.items() if v is not None})
    return rec


def save_image(path: str | Path, image: np.ndarray, record: dict | None = None, quality: int = 95) -> Path:
    """Write an H×W×3 uint8 image with the provenance record embedded (PNG tEXt / JPEG COM + EXIF description)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    record = record or provenance_record()
    text = json.dumps(record, sort_keys=True)
    img = Image.fromarray(np.ascontiguousarray(image))
    suffix = path.suffix.lower()
    if suffix == ".png":
        info = PngImagePlugin.PngInfo()
        info.add_text(KEY, text)
        info.add_text("Software", record.get("software", "mfim"))
        if record.get("synthetic"):
            info.add_text("Description", "AI-generated (synthetic) image made with MFIM")
        img.save(path, pnginfo=info)
    elif suffix in (".jpg", ".jpeg"):
        exif = Image.Exif()
        exif[0x010E] = text  # ImageDescription
        exif[0x0131] = record.get("software", "mfim")  # Software
        img.save(path, quality=quality, exif=exif, comment=text.encode())
    else:
        img.save(path)
    return path


def read_record(path: str | Path) -> dict | None:
    """The provenance record of an image MFIM wrote, or None."""
    with Image.open(path) as img:
        text = img.info.get(KEY)
        if text is None and "comment" in img.info:
            c = img.info["comment"]
            text = c.decode(errors="ignore") if isinstance(c, bytes) else c
        if text is None:
            desc = img.getexif().get(0x010E)
            text = desc
    if not text:
        return None
    try:
        rec = json.loads(text)
    except json.JSONDecodeError:
        return None
    return rec if isinstance(rec, dict) and "software" in rec else None
