"""Atomic checkpoints (mfim.atomic: temp file, fsync, rename), so a process killed at any point leaves either the
previous complete checkpoint or the new complete one, never a truncated file under the final name.

Loading uses torch.load(weights_only=True): checkpoints hold only tensors and plain Python containers (RNG states are
stored as tensors / ints for that reason).
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch

from mfim.atomic import atomic_torch_save

__all__ = ["atomic_torch_save", "load_checkpoint", "rng_state", "set_rng_state"]


def load_checkpoint(path: str | Path, map_location="cpu") -> dict:
    return torch.load(path, map_location=map_location, weights_only=True)


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
