"""Process-level settings that make CPU runs fast, and device selection."""

from __future__ import annotations

import os
import sys
import threading
import time

import torch

# glibc otherwise returns every >32 MB tensor to the OS and maps it again on the next op; at 128 px and up that was
# 45-90% of CPU time (../shared/PERFORMANCE.md). It must be set before the process starts, hence the re-exec.
GLIBC_TUNABLES = "glibc.malloc.mmap_threshold=4294967296:glibc.malloc.trim_threshold=17179869184"


def ensure_allocator_env() -> None:
    """Re-exec the current Python process once with GLIBC_TUNABLES set (no-op when set or not on Linux)."""
    if not sys.platform.startswith("linux") or os.environ.get("MFIM_NO_REEXEC"):
        return
    if "mmap_threshold" in os.environ.get("GLIBC_TUNABLES", ""):
        return
    env = dict(os.environ, GLIBC_TUNABLES=GLIBC_TUNABLES, MFIM_NO_REEXEC="1")
    os.execve(sys.executable, [sys.executable, *sys.argv], env)


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def configure_threads(n: int | None) -> None:
    if n and n > 0:
        torch.set_num_threads(int(n))


def release_free_memory() -> bool:
    """Give the pages glibc holds free back to the OS (``malloc_trim(0)``, every arena, also from the middle of the
    heap). With GLIBC_TUNABLES' trim threshold (16 GB) nothing freed is ever returned on its own, so a stage calls
    this once after building its networks, when the loading copies are gone (benchmarks/bench_memory.py). No-op
    (False) off glibc."""
    if not sys.platform.startswith("linux"):
        return False
    import ctypes

    try:
        return bool(ctypes.CDLL("libc.so.6").malloc_trim(0))
    except (OSError, AttributeError):
        return False


def exit_with_parent(parent: int | None = None, poll_s: float = 1.0) -> None:
    """End this process (``os._exit``) within ``poll_s`` once ``parent`` (default: today's parent) is gone.

    A SIGKILL of a stage (dvc, a scheduler, the user) reaches that one process only. torchrun's ranks run in their
    own sessions and would go on training beside the run the next `dvc repro` starts; a DataLoader worker's own
    watchdog leaves its loop but then hangs at exit, joining a queue feeder blocked on the pipe nobody reads any
    more (torch's worker cancels that join only on an orderly shutdown). Our writes are atomic, so ending at any
    point is safe. ``parent`` is the pid the caller saw before the child started: a parent already dead when this
    runs is seen at the first poll."""
    parent = os.getppid() if parent is None else parent

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(poll_s)
        os._exit(1)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


class LoaderWorkerInit:
    """``worker_init_fn`` for every DataLoader of the pipeline: the worker exits once the process that made the
    loader is gone. Built in that process, so it carries that process's pid to spawned and forked workers alike.
    (torch's worker loop already runs each worker on one intra-op thread.)"""

    def __init__(self):
        self.parent = os.getpid()

    def __call__(self, worker_id: int) -> None:
        exit_with_parent(self.parent)
