"""Listing an input folder so that no entry vanishes: each one becomes a file to process, a reject with its reason
(unknown file type, broken symbolic link, symbolic-link loop, unreadable folder, not a regular file), or is left
alone on purpose (hidden files such as temp files, and notes / tables that live beside photos)."""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass, field
from pathlib import Path

# files that commonly sit beside photos and are nobody's input: skipped without a reject
SIDE_FILE_SUFFIXES = {".parquet", ".csv", ".json", ".txt", ".md", ".yaml", ".yml"}


@dataclass
class FolderScan:
    files: list[Path] = field(default_factory=list)  # root / relative path, in sorted order
    rejects: list[tuple[str, str]] = field(default_factory=list)  # (relative posix path, reason)


def scan_folder(root: str | Path, wanted: set[str], kind: str = "an image", exclude: str | Path | None = None):
    """Every entry under root. Symbolic links to files are followed; links to folders are followed too, except
    those leading back to a folder already listed (a loop), which are rejected. exclude: a folder (the output folder
    inside the input) whose contents are not inputs."""
    root = Path(root)
    scan = FolderScan()
    skip = os.path.realpath(exclude) if exclude is not None else None
    # an explicit stack, not recursion: a tree thousands of folders deep is listed, not a RecursionError
    stack = [(root, {os.path.realpath(root): "."})]
    while stack:
        folder, visited = stack.pop()
        sub = _list(root, folder, visited, wanted, kind, skip, scan)
        stack.extend(reversed(sub))  # depth first, in sorted order, as a recursive walk would go
    return scan


def _list(root: Path, folder: Path, visited: dict, wanted: set[str], kind: str, skip, scan: FolderScan) -> list:
    """Files and rejects of one folder into scan; returns its sub-folders to visit, each with its ancestors."""
    try:
        entries = sorted(os.scandir(folder), key=lambda e: e.name)
    except OSError as e:
        scan.rejects.append((folder.relative_to(root).as_posix(), f"folder not readable ({e.strerror})"))
        return []
    folders = []
    for entry in entries:
        if entry.name.startswith("."):
            continue
        path = folder / entry.name
        rel = path.relative_to(root).as_posix()
        if entry.is_symlink() and not os.path.exists(path):
            scan.rejects.append((rel, _dangling_reason(path)))
        elif entry.is_dir():
            real = os.path.realpath(path)
            if real == skip:
                continue
            if real in visited:
                scan.rejects.append((rel, f"symbolic link loop (leads back to {visited[real]})"))
                continue
            folders.append((path, {**visited, real: rel}))
        elif not entry.is_file():
            scan.rejects.append((rel, "not a regular file"))
        elif path.suffix.lower() in wanted:
            scan.files.append(path)
        elif path.suffix.lower() not in SIDE_FILE_SUFFIXES:
            scan.rejects.append((rel, f"not {kind} file type ({path.suffix or 'no extension'})"))
    return folders


def _dangling_reason(path: Path) -> str:
    try:
        os.stat(path)
    except OSError as e:
        if e.errno == errno.ELOOP:
            return "symbolic link loop"
    return f"broken symbolic link (target {os.readlink(path)} not found)"
