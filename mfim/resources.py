"""What this machine can hold, for limits that are sized by it rather than fixed: command-line values that decide
how much is allocated are refused with the limit in the message before anything is allocated."""

from __future__ import annotations

import os

MAX_CROP = 4096  # aligned crop side (--size): 4x FFHQ's 1024
MAX_UPSAMPLE = 3  # detector upsampling passes: each quadruples the pixels dlib scans (3: 64x)


def available_memory() -> int:
    """Bytes of memory available now (psutil when installed, else the physical total), at least 1 GiB."""
    try:
        import psutil

        avail = psutil.virtual_memory().available
    except ImportError:
        avail = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return max(int(avail), 2**30)


def memory_budget(fraction: float = 0.5) -> int:
    """The share of available memory one allocation decided by a user's value may take."""
    return int(available_memory() * fraction)


def refuse_over_budget(what: str, nbytes: int, fraction: float = 0.5) -> None:
    """ValueError naming the limit when ``nbytes`` is over the budget."""
    budget = memory_budget(fraction)
    if nbytes > budget:
        raise ValueError(f"{what} needs about {nbytes / 2**30:.1f} GiB of memory; the limit on this machine is "
                         f"{budget / 2**30:.1f} GiB (half of what is available now)")


def device_problem(name: str) -> str | None:
    """Why --device NAME cannot be used here (one line), or None. Checked before a model is loaded, so a missing
    GPU is not reported as a broken checkpoint."""
    import torch

    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError):
        return f"--device {name}: not a device name (use cpu, cuda or cuda:N)"
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            return f"--device {name}: no CUDA GPU is available on this machine (use --device cpu)"
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            return f"--device {name}: this machine has {torch.cuda.device_count()} CUDA GPU(s)"
    elif dev.type not in ("cpu", "mps"):
        return f"--device {name}: unsupported device type {dev.type} (use cpu or cuda)"
    return None


def bounded_int(lo: int, hi: int, bytes_each=None):
    """An argparse type: an integer in [lo, hi], and, when ``bytes_each(value)`` is given, one whose allocation
    fits memory_budget(); the message names the limit (argparse prints it as a usage error, exit status 2)."""
    import argparse

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
        if not lo <= value <= hi:
            raise argparse.ArgumentTypeError(f"{value} is out of range: {lo} to {hi}")
        if bytes_each is not None:
            try:
                refuse_over_budget(f"{value}", bytes_each(value))
            except ValueError as e:
                raise argparse.ArgumentTypeError(str(e)) from None
        return value

    return parse


def crop_bytes(size: int) -> int:
    """Memory one aligned crop of ``size`` px takes while it is made: the supersampled transform (4x the side,
    float32 RGB) plus the crop and its copies."""
    return (4 * size) ** 2 * 3 * 4 + 4 * size**2 * 3
