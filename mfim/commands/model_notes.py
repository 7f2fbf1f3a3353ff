"""One-line notes on stderr about the model a command runs, so a user is not left to guess from the pictures.

- A model whose frozen generator is the embedded default's (checkpoints/generator_synth64.pt, trained by this
  repository on its synthetic BFM renders at 64 px) can only draw such renders: on a real photo `mfim swap` pastes a
  small, blurry synthetic face. Every model built on it says so (the shipped swapper, `make repro`'s
  data/train/mfim.pt, the generator itself). The test is the generator's weights, not a file name: MFIM keeps its
  generator frozen, so a swapper trained on the embedded default carries exactly those tensors.
- `mfim swap` / `mfim mix` default to the paper's feed-forward swap, while reports/ are made with the test-time
  source fit of params.yaml's `source_fit` group; when the two differ the command says how to get reports/'s swaps.
"""

from __future__ import annotations

import hashlib
import sys
from functools import lru_cache
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
# Generators this repository trained on its synthetic renders (pretrain_generator.shipped_checkpoint).
SYNTHETIC_GENERATORS = (REPO_ROOT / "checkpoints" / "generator_synth64.pt",)
PAPER_SCALE_HINT = "for photo-realistic results train at paper scale (configs/paper.yaml, docs/paper-scale/README.md)"


def weights_digest(state_dict) -> str:
    """sha256 over a state dict's names, dtypes, shapes and bytes: equal exactly when the tensors are."""
    import torch

    h = hashlib.sha256()
    for name in sorted(state_dict):
        t = state_dict[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


@lru_cache(maxsize=None)
def _file_generator_digest(path: str) -> str | None:
    """Digest of a shipped generator file's g_ema weights; None when the file is not there (e.g. a wheel install)."""
    import torch

    p = Path(path)
    if not p.is_file():
        return None
    try:  # a note must never stop a swap: an unreadable copy (e.g. a git-lfs pointer) just gives no note
        state = torch.load(p, map_location="cpu", weights_only=True)
        return weights_digest(state["g_ema"])
    except Exception:
        return None


def synthetic_note(generator, what: str) -> str | None:
    """The one line to print when ``generator`` is one this repository trained on synthetic renders, else None.
    ``what`` names the model file for the message."""
    digest = weights_digest(generator.state_dict())
    if not any(digest == _file_generator_digest(str(p)) for p in SYNTHETIC_GENERATORS):
        return None
    res = getattr(generator, "resolution", None)
    size = f"{res} px " if res else ""
    return (f"{what} is a {size}model trained on synthetic BFM renders (the embedded default): it draws such "
            f"renders, not photo-realistic faces (on a photo, a small synthetic face); {PAPER_SCALE_HINT}")


def announce_synthetic(command: str, generator, what: str) -> None:
    """Print the synthetic-model note on stderr (once per command run) when it applies."""
    note = synthetic_note(generator, what)
    if note:
        print(f"mfim {command}: {note}", file=sys.stderr)


def reports_source_fit(params_path: str | Path = "params.yaml") -> tuple[int, float] | None:
    """(steps, exp) of the `source_fit` group reports/ were made with, from the params.yaml of the working folder
    (where `make repro` runs); None when there is none to compare with."""
    from mfim.config import ParamsError, load_params

    p = Path(params_path)
    if not p.is_file():
        return None
    try:
        group = load_params(p)["source_fit"]
    except ParamsError:  # not a params file this code can read: nothing to compare with
        return None
    return int(group["steps"]), float(group["exp"])


def fit_difference_note(fit_steps: int, fit_exp: float, params_path: str | Path = "params.yaml") -> str | None:
    """The one line to print when the swap settings in effect differ from those reports/ were made with."""
    reports = reports_source_fit(params_path)
    if reports is None or reports == (int(fit_steps), float(fit_exp)):
        return None
    steps, exp = reports
    mode = "the paper's feed-forward swap" if fit_steps == 0 else f"{fit_steps} source-fit steps"
    return (f"--fit-steps {fit_steps} --fit-exp {fit_exp:g} ({mode}); reports/ use --fit-steps {steps} "
            f"--fit-exp {exp:g} (params.yaml source_fit): pass those for the swaps reports/ show"
            + (" (--fit-exp reads data/threedmm/regressor.pt, which `make repro` writes)" if exp > 0 else ""))
