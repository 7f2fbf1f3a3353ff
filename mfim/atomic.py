"""Crash-safe file writes: write to a temp file in the same folder, fsync, rename over the target, fsync the folder.

A process killed at any point leaves either the previous complete file or the new complete one under the final
name -- never a truncated file. Used for fetched assets, checkpoints, every stage output that is resumed from and every
file the CLI writes. With ``overwrite=False`` the final step refuses to replace a file that appeared meanwhile (another
run writing into the same folder), so two runs can never silently interleave their outputs under one name.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO


def temp_path(path: str | os.PathLike, suffix: str = ".part") -> Path:
    """A fresh, empty temp file beside ``path`` (same folder, so the final rename cannot cross filesystems)."""
    path = Path(path)
    make_folders(path.parent)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=suffix)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it 0600; the final file gets the permissions open() would give
    return Path(tmp)


def make_folders(folder: Path) -> None:
    """mkdir -p without recursion: pathlib's and os.makedirs recurse once per level, so an output tree mirroring an
    input thousands of folders deep would end in a RecursionError."""
    missing = []
    while not folder.is_dir() and folder != folder.parent:
        missing.append(folder)
        folder = folder.parent
    for f in reversed(missing):
        f.mkdir(exist_ok=True)


TEMP_NAME = re.compile(r"\.(?P<name>.+)\.[a-z0-9_]{8}\.part(\.[A-Za-z0-9]+)?")  # temp_path's names
STALE_TEMP_SECONDS = 600  # a temp file untouched this long belongs to a killed run, not a live writer


def clean_leftover_temps(paths) -> tuple[int, int]:
    """Temp files that temp_path made for these final paths and a killed run left behind: the stale ones are
    removed, fresh ones (a run writing now?) are left. Returns (removed, left)."""
    import time

    wanted: dict[Path, set[str]] = {}
    for p in paths:
        wanted.setdefault(Path(p).parent, set()).add(Path(p).name)
    removed = left = 0
    for folder, names in wanted.items():
        try:
            entries = list(os.scandir(folder))
        except OSError:
            continue
        for entry in entries:
            m = TEMP_NAME.fullmatch(entry.name)
            if not m or m.group("name") not in names or not entry.is_file(follow_symlinks=False):
                continue
            if time.time() - entry.stat(follow_symlinks=False).st_mtime > STALE_TEMP_SECONDS:
                Path(entry.path).unlink(missing_ok=True)
                removed += 1
            else:
                left += 1
    return removed, left


def _umask() -> int:
    mask = os.umask(0o022)  # the only way to read it is to set it
    os.umask(mask)
    return mask


def move_into_place(tmp: str | os.PathLike, path: str | os.PathLike, overwrite: bool = True) -> Path:
    """Rename a finished temp file to ``path``. overwrite=False raises FileExistsError (and removes the temp file)
    when ``path`` exists, atomically: a hard link fails if the name is taken, where exists-then-rename would race."""
    tmp, path = Path(tmp), Path(path)
    try:
        if overwrite:
            os.replace(tmp, path)
        else:
            try:
                os.link(tmp, path)
            except FileExistsError:
                raise FileExistsError(errno.EEXIST, "File exists", str(path)) from None  # name the target, not tmp
            except OSError:  # a filesystem without hard links (FAT, some network mounts): best effort
                if os.path.lexists(path):
                    raise FileExistsError(errno.EEXIST, "File exists", str(path)) from None
                os.replace(tmp, path)
            else:
                tmp.unlink()
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return path


def _fsync_dir(folder: Path) -> None:
    try:  # make the rename itself durable
        dfd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], object], overwrite: bool = True) -> Path:
    """Call ``write(file)`` on a temp file next to ``path``, then move it into place atomically.
    overwrite=False: raise FileExistsError instead of replacing an existing ``path``."""
    path = Path(path)
    tmp = temp_path(path)
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return move_into_place(tmp, path, overwrite=overwrite)


def atomic_copy(src: str | os.PathLike, dst: str | os.PathLike) -> Path:
    with open(src, "rb") as s:
        return atomic_write(dst, lambda f: shutil.copyfileobj(s, f))


def atomic_torch_save(obj, path: str | os.PathLike) -> Path:
    import torch

    return atomic_write(path, lambda f: torch.save(obj, f))
