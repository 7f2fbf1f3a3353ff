"""Provenance of every image MFIM writes: PNG/JPEG metadata marking it as synthetic (or processed), with the model
checkpoint hash and the software version, plus -- for synthetic images -- the invisible watermark of mfim.watermark,
which survives where metadata does not (screenshots, re-encoding, social-media uploads strip metadata)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image, PngImagePlugin, UnidentifiedImageError

from mfim import __version__

KEY = "mfim"
SIDECAR_SUFFIX = ".mfim.json"  # provenance of a video (containers written through OpenCV carry no text metadata)


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


def save_image(
    path: str | Path,
    image: np.ndarray,
    record: dict | None = None,
    quality: int = 95,
    watermark: bool | None = None,
    overwrite: bool = True,
) -> Path:
    """Write an H×W×3 uint8 image with the provenance record embedded (PNG tEXt / JPEG COM + EXIF description).

    watermark: None (default) embeds the invisible watermark exactly when the record says synthetic; False skips it
    (only for internal files that are not synthetic anyway, e.g. aligned crops of real photos); True forces it.
    The written record then names the watermark scheme. The file appears atomically (temp file + rename, see
    mfim.atomic); overwrite=False raises FileExistsError rather than replace an existing file."""
    from mfim.atomic import atomic_write

    path = Path(path)
    record = dict(record or provenance_record())
    if watermark is None:
        watermark = bool(record.get("synthetic"))
    if watermark:
        from mfim.watermark import SCHEME, embed

        image = embed(image)
        record["watermark"] = SCHEME
    text = json.dumps(record, sort_keys=True)
    img = Image.fromarray(np.ascontiguousarray(image))
    suffix = path.suffix.lower()
    # the temp file's name ends in .part, so PIL is told the format the final name asks for
    fmt = Image.registered_extensions().get(suffix)
    if fmt is None:
        raise ValueError(f"{path.name}: unknown image suffix {suffix or '(none)'}")
    if suffix == ".png":
        info = PngImagePlugin.PngInfo()
        info.add_text(KEY, text)
        info.add_text("Software", record.get("software", "mfim"))
        if record.get("synthetic"):
            info.add_text("Description", "AI-generated (synthetic) image made with MFIM")
        options = {"pnginfo": info}
    elif suffix in (".jpg", ".jpeg"):
        exif = Image.Exif()
        exif[0x010E] = text  # ImageDescription
        exif[0x0131] = record.get("software", "mfim")  # Software
        options = {"quality": quality, "exif": exif, "comment": text.encode()}
    else:
        options = {}
    return atomic_write(path, lambda f: img.save(f, format=fmt, **options), overwrite=overwrite)


def read_record(path: str | Path) -> dict | None:
    """The provenance record of an image MFIM wrote (or of a video, from its sidecar), or None."""
    path = Path(path)
    sidecar = sidecar_path(path)
    if sidecar.is_file():
        return _parse(sidecar.read_text())
    try:
        img = Image.open(path)
    except UnidentifiedImageError:  # not an image (a video without its sidecar, say): no record
        return None
    with img:
        text = img.info.get(KEY)
        if text is None and "comment" in img.info:
            c = img.info["comment"]
            text = c.decode(errors="ignore") if isinstance(c, bytes) else c
        if text is None:
            desc = img.getexif().get(0x010E)
            text = desc
    return _parse(text)


def _parse(text) -> dict | None:
    if not text:
        return None
    try:
        rec = json.loads(text)
    except json.JSONDecodeError:
        return None
    return rec if isinstance(rec, dict) and "software" in rec else None


def sidecar_path(path: str | Path) -> Path:
    path = Path(path)
    return path.with_name(path.name + SIDECAR_SUFFIX)


def write_sidecar(path: str | Path, record: dict, overwrite: bool = True) -> Path:
    """Provenance of a non-image file (a video) as JSON beside it: `clip.mp4` -> `clip.mp4.mfim.json` (atomic)."""
    from mfim.atomic import atomic_write

    text = json.dumps(record, sort_keys=True, indent=2) + "\n"
    return atomic_write(sidecar_path(path), lambda f: f.write(text.encode()), overwrite=overwrite)


def inspect(path: str | Path, image: np.ndarray | None = None) -> dict:
    """What `mfim detect` reports for one image: its metadata record (or None) and the watermark verdict.
    Raises mfim.imageio.ImageRejected for unreadable files."""
    from mfim.imageio import read_rgb
    from mfim.watermark import detect

    if image is None:
        image = read_rgb(path)
    try:
        record = read_record(path)
    except OSError:
        record = None
    return {"file": str(path), "record": record, "watermark": detect(image)}
