"""Atomic checkpoints (mfim.atomic: temp file, fsync, rename), so a process killed at any point leaves either the
previous complete checkpoint or the new complete one, never a truncated file under the final name.

Loading uses torch.load(weights_only=True): checkpoints hold only tensors and plain Python containers (RNG states are
stored as tensors / ints for that reason). It memory-maps the file (mmap=True): the ranks of a node that resume from
one checkpoint share its pages in the page cache instead of each reading a private copy into RAM (6.4 GB each at
paper scale), and nothing is read that is not used.
"""

from __future__ import annotations

import logging
import pickle
import random
import time
import zipfile
from pathlib import Path

import numpy as np
import torch

from mfim.atomic import atomic_torch_save

__all__ = ["atomic_torch_save", "load_checkpoint", "load_resumable", "remove_stale_parts", "reseed", "rng_state",
           "set_rng_state"]

log = logging.getLogger(__name__)


def load_checkpoint(path: str | Path, map_location="cpu") -> dict:
    return torch.load(path, map_location=map_location, weights_only=True, mmap=True)


def remove_stale_parts(*paths: str | Path) -> list[Path]:
    """Delete the temp files (``.<name>.*.part``, see mfim.atomic) a killed write of these outputs left behind.

    Call at stage start, before this run writes any: a .part is never read, so without this each kill during a
    checkpoint write would leave a checkpoint-sized file in the output folder for good.
    """
    removed = []
    for path in map(Path, paths):
        for part in sorted(path.parent.glob(f".{path.name}.*.part")):
            size = part.stat().st_size
            part.unlink(missing_ok=True)
            log.warning("removed %s (%d bytes), left by an interrupted write of %s", part, size, path.name)
            removed.append(part)
    return removed


def load_resumable(path: str | Path, map_location="cpu") -> dict | None:
    """The checkpoint at ``path``, or None when there is none or it cannot be read.

    An unreadable one (truncated, not a torch file, refused pickle, not a dict) is kept across runs by DVC's
    ``persist``, so failing on it would fail every later run; it is moved aside to ``<name>.corrupt-<time>``
    (kept for inspection, never deleted) with a warning, and the caller starts over.
    """
    path = Path(path)
    if not path.is_file():
        return None
    try:
        state = load_checkpoint(path, map_location)
        if not isinstance(state, dict):
            raise ValueError(f"top level is a {type(state).__name__}, not a dict")
        return state
    except (RuntimeError, ValueError, EOFError, OSError, KeyError, pickle.UnpicklingError, zipfile.BadZipFile) as e:
        aside = path.with_name(f"{path.name}.corrupt-{time.strftime('%Y%m%d-%H%M%S')}")
        n = 1
        while aside.exists():
            aside, n = path.with_name(f"{path.name}.corrupt-{time.strftime('%Y%m%d-%H%M%S')}-{n}"), n + 1
        try:
            path.rename(aside)
        except FileNotFoundError:  # another rank of this run moved it first
            return None
        first = (str(e).strip().splitlines() or [""])[0][:200]
        log.warning("%s is unreadable (%s: %s); moved it to %s and starting over", path, type(e).__name__, first,
                    aside.name)
        return None


def rng_state() -> dict:
    """Every RNG the training loop touches, in a weights_only-loadable form."""
    py = random.getstate()
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": [py[0], list(py[1]), py[2]],
        "numpy": {
            "keys": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "gauss": float(np_state[4]),
        },
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"].cpu())
    v, internal, gauss = state["python"]
    random.setstate((v, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].cpu().numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([t.cpu() for t in state["cuda"]])


def reseed(seed: int, step: int, rank: int) -> None:
    """Every RNG of this process (torch CPU and CUDA, NumPy, Python) from (seed, step, rank) alone: a resume whose
    process count differs from the checkpoint's has no saved state for its ranks, and this makes it repeatable."""
    a, b, c = np.random.SeedSequence([seed % 2**63, step, rank]).generate_state(3, dtype=np.uint64)
    torch.manual_seed(int(a))  # CUDA generators included
    np.random.seed(int(b) % 2**32)
    random.seed(int(c))
