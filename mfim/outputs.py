"""Where a command may write, checked before any work starts: never onto its inputs, never over a file it did not
make (unless the user passes --overwrite), and only where writing actually works -- so a bad output location costs
one line of error and no lost work. Every refusal is an OutputRefused with a one-line message (exit status 2)."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable
from pathlib import Path


class OutputRefused(ValueError):
    """The output location is unusable or would destroy a file; str(exc) is the one line to show."""


def _real(path: str | Path) -> Path:
    return Path(os.path.realpath(path))


def _relation(out: Path, folder: Path) -> str | None:
    if out == folder:
        return "is"
    if folder in out.parents:
        return "is inside"
    if out in folder.parents:
        return "contains"
    return None


def refuse_folder_overlap(output: str | Path, input_folders: dict[str, Path], flag: str = "--output") -> None:
    """An output folder that is, lies inside, or contains an input folder would mix outputs with the user's files
    (and a rerun would take the outputs for inputs)."""
    out = _real(output)
    for name, folder in input_folders.items():
        relation = _relation(out, _real(folder))
        if relation:
            raise OutputRefused(
                f"{flag} {output} {relation} the {name} folder {folder}; choose a separate output folder "
                f"(or pass --overwrite to write there anyway)"
            )


def refuse_replacing(paths: Iterable[Path], inputs: dict[str, Path], flag: str = "--output") -> None:
    """Refuse when a file this run would write is one of its inputs (through any symlink) or already exists."""
    by_real = {_real(p): name for name, p in inputs.items()}
    existing = []
    for p in paths:
        if _real(p) in by_real:
            raise OutputRefused(
                f"{flag} {p} is the {by_real[_real(p)]} file itself; refusing to replace an input "
                f"(choose another {flag}, or pass --overwrite)"
            )
        if os.path.lexists(p):
            existing.append(p)
    if existing:
        more = f" (and {len(existing) - 1} more files this run would write)" if len(existing) > 1 else ""
        raise OutputRefused(f"{existing[0]} already exists{more}; pass --overwrite to replace it")


def ensure_writable_folder(folder: str | Path, flag: str = "--output") -> Path:
    """Create folder (and parents) and prove a file can be written in it."""
    folder = Path(folder)
    for p in (folder, *folder.parents):
        if os.path.lexists(p):
            if not p.is_dir():
                raise OutputRefused(f"{flag}: {p} is a file, not a folder, so nothing can be written under it")
            break
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        raise OutputRefused(f"{flag}: cannot write in {folder} ({e.strerror or type(e).__name__})") from None
    return folder


# mfim.atomic.temp_path names a temp file "." + name + "." + 8 random characters + ".part" (+ a video's suffix)
TEMP_NAME_EXTRA = len("..") + 8 + len(".part") + len(".mp4")


def name_too_long(p: Path) -> str | None:
    """Why the file p cannot be written through a temp name here, or None. A name the filesystem would take but
    whose hidden temp name it would not fails only after the work. The limit is the filesystem's NAME_MAX (255
    bytes on most) less what the temp name adds."""
    folder = next((q for q in (p.parent, *p.parent.parents) if q.exists()), Path("."))
    try:
        name_max = os.pathconf(folder, "PC_NAME_MAX")
    except (OSError, ValueError):
        name_max = 255
    size = len(os.fsencode(p.name))
    if size + TEMP_NAME_EXTRA <= name_max:
        return None
    return (f"output name too long ({size} bytes; up to {name_max - TEMP_NAME_EXTRA} can be written here: the "
            f"filesystem allows {name_max}, the temp name adds {TEMP_NAME_EXTRA})")


def refuse_long_names(paths: Iterable[Path], flag: str = "--output") -> None:
    for p in paths:
        why = name_too_long(p)
        if why:
            raise OutputRefused(f"{flag} {p.name[:40]}...: {why}")
