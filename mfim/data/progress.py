"""Saved progress of the long data stages (align, evalsets' FF++ frames, threedmm): what a killed run already did.

A stage's progress must outlive a SIGKILL at any instant and must never make a rerun keep a result whose inputs or
settings changed. Three pieces:

* :class:`Journal`: an append-only JSON-lines file, one record per finished unit of work, flushed as it is written.
  A kill can only tear the last line; reading drops a torn tail (and appending first cuts it off), so the journal
  is always the records of whole units. Appending costs O(1) per record -- the whole table is written once, at
  the end -- where rewriting a table every N files costs O(n²) over a run.
* :func:`source_stamp` / :func:`same_source`: what a result was made from (size, mtime and sha256 of the input
  file). A rerun keeps the result only when the input is the same: same size and mtime (the check DVC itself makes
  before trusting its hash), or, when the mtime moved (a copy, a ``dvc checkout``), the same sha256.
* :func:`fingerprint`: a hash of the settings that shape a result; records made under other settings are redone.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Iterable


def resolve_workers(value: Any) -> int:
    """``auto`` (or 0 / None / empty): the CPU cores this process may use; a positive int as given."""
    if value in (None, "", 0, "auto"):
        try:
            return max(1, len(os.sched_getaffinity(0)))
        except AttributeError:  # not on Linux
            return max(1, os.cpu_count() or 1)
    try:
        n = int(value)
    except (TypeError, ValueError):
        raise ValueError(f"workers must be 'auto' or a positive integer, got {value!r}") from None
    if n < 1:
        raise ValueError(f"workers must be 'auto' or a positive integer, got {value!r}")
    return n


def fingerprint(settings: Any) -> str:
    """sha256 of the settings as canonical JSON (key order does not matter)."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()


def sha256_of(path: str | os.PathLike) -> str:
    from mfim.assets import sha256_file

    return sha256_file(path)


def source_stamp(path: str | os.PathLike, sha256: str | None = None) -> dict:
    """{size, mtime_ns, sha256} of an input file (``sha256`` when the caller already hashed it)."""
    st = os.stat(path)  # before hashing: a file changed while being hashed then fails the mtime check next time
    return {"size": int(st.st_size), "mtime_ns": int(st.st_mtime_ns), "sha256": sha256 or sha256_of(path)}


def same_source(stamp: dict | None, path: str | os.PathLike) -> bool:
    """Whether ``path`` still holds the input ``stamp`` was taken of."""
    if not stamp:
        return False
    try:
        st = os.stat(path)
    except OSError:
        return False
    if int(st.st_size) != stamp.get("size"):
        return False
    if int(st.st_mtime_ns) == stamp.get("mtime_ns"):
        return True
    return sha256_of(path) == stamp.get("sha256")


class Journal:
    """Append-only JSON-lines progress file (see the module docstring)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._file = None

    def read(self) -> list[dict]:
        """Every whole record; a torn last line (a kill mid-write) is dropped."""
        return self._scan()[0]

    def _scan(self) -> tuple[list[dict], int]:
        if not self.path.is_file():
            return [], 0
        data = self.path.read_bytes()
        records, good = [], 0
        for line in data.splitlines(keepends=True):
            if not line.endswith(b"\n"):
                break
            try:
                records.append(json.loads(line))
            except (UnicodeDecodeError, json.JSONDecodeError):
                break  # nothing after a damaged line can be trusted to line up
            good += len(line)
        return records, good

    def append(self, record: dict) -> None:
        if self._file is None:
            _, good = self._scan()
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(self.path, "ab")
            self._file.truncate(good)  # cut a torn tail so the next record starts on its own line
        self._file.write(json.dumps(record, sort_keys=True, separators=(",", ":")).encode() + b"\n")
        self._file.flush()  # in the OS's hands: a killed process loses nothing written so far

    def rewrite(self, records: Iterable[dict]) -> None:
        """Replace the journal by ``records`` at once (atomic): drops superseded records between runs."""
        from mfim.atomic import atomic_write

        self.close()
        text = b"".join(json.dumps(r, sort_keys=True, separators=(",", ":")).encode() + b"\n" for r in records)
        atomic_write(self.path, lambda f: f.write(text))

    def remove(self) -> None:
        self.close()
        self.path.unlink(missing_ok=True)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
