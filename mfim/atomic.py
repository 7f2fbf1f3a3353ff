"""Crash-safe file writes: write to a temp file in the same folder, fsync, rename over the target, fsync the folder.

A process killed at any point leaves either the previous complete file or the new complete one under the final
name -- never a truncated file. Used for fetched assets, checkpoints and every stage output that is resumed from.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], object]) -> Path:
    """Call ``write(file)`` on a temp file next to ``path``, then move it into place atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    try:  # make the rename itself durable
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass
    return path


def atomic_copy(src: str | os.PathLike, dst: str | os.PathLike) -> Path:
    with open(src, "rb") as s:
        return atomic_write(dst, lambda f: shutil.copyfileobj(s, f))


def atomic_torch_save(obj, path: str | os.PathLike) -> Path:
    import torch

    return atomic_write(path, lambda f: torch.save(obj, f))
