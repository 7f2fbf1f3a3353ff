"""Reading user images robustly: EXIF orientation, odd modes, size limits, one clear reason per rejected file."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

# .gif is read like the others (first frame); multi-frame files say so through read_image's note
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif"}
if ".avif" in Image.registered_extensions():  # Pillow >= 11.3 reads AVIF (a single target always worked)
    IMAGE_SUFFIXES.add(".avif")
MIN_SIDE = 32
MAX_PIXELS = 80_000_000  # 12000×12000 = 144 MP is refused with a reason, not an out-of-memory crash


class ImageRejected(ValueError):
    """A file that cannot be used; ``str(exc)`` is the reason written to a rejects table."""


def list_images(folder: str | Path) -> list[Path]:
    folder = Path(folder)
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def _to_rgb8(img: Image.Image) -> np.ndarray:
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(img, dtype=np.float64)
        hi = 65535.0 if arr.max() > 255 else 255.0
        arr = np.clip(arr / hi * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return np.repeat(arr[..., None], 3, axis=2)
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))  # composite on white, as a viewer shows it
        return np.asarray(Image.alpha_composite(bg, rgba).convert("RGB"))
    return np.asarray(img.convert("RGB"))


def read_rgb(path: str | Path, max_pixels: int = MAX_PIXELS, min_side: int = MIN_SIDE) -> np.ndarray:
    """H×W×3 uint8 RGB, EXIF orientation applied. Raises ImageRejected with a short reason."""
    return read_image(path, max_pixels, min_side)[0]


def read_image(path: str | Path, max_pixels: int = MAX_PIXELS, min_side: int = MIN_SIDE) -> tuple[np.ndarray, str]:
    """(read_rgb's array, note): the note is '' or says that only the first frame of an animated / multi-page file
    (GIF, APNG, WebP, TIFF) was used, so callers can tell the user instead of silently dropping the rest."""
    path = Path(path)
    if not path.is_file():
        raise ImageRejected("file not found")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                w, h = img.size
                if w * h > max_pixels:
                    raise ImageRejected(f"image too large ({w}x{h} > {max_pixels} pixels)")
                if min(w, h) < min_side:
                    raise ImageRejected(f"image too small ({w}x{h}; need at least {min_side} px per side)")
                frames = getattr(img, "n_frames", 1)
                note = f"{frames} frames; only the first frame was used" if frames > 1 else ""
                img.seek(0)
                img.load()
                img = ImageOps.exif_transpose(img)
                return _to_rgb8(img), note
    except ImageRejected:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        # PIL refuses > ~89 MP inside Image.open, before our own size check can read the header
        raise ImageRejected(f"image too large ({str(e).split(',')[0]})") from None
    except UnidentifiedImageError as e:
        raise ImageRejected(f"not a readable image ({type(e).__name__})") from None
    except (OSError, SyntaxError, ValueError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ImageRejected(f"corrupt or truncated image ({msg})") from None
