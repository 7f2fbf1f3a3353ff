"""Run a stage script on every GPU of the machine: ``python -m mfim.launch [--gpus-key KEY] SCRIPT [args...]``.

The `train` stage's command (dvc.yaml), so that ``dvc repro`` itself trains across GPUs and the run it records is
the run that was made. How many processes: the param KEY (default ``train.gpus``; a key of the stage's own group, so
that no other stage's params change with it) from the params file (MFIM_PARAMS, else params.yaml) when the stage runs
on CUDA (``project.device`` auto with a GPU present, or cuda): ``auto`` = every visible GPU (torch.cuda.device_count(),
so CUDA_VISIBLE_DEVICES narrows it), an integer = that many; on CPU always one process.

* more than one: torch.distributed.run (torchrun) starts them, one per GPU, ``--standalone`` (a local rendezvous) on
  one machine. Across machines, torchrun's own environment variables configure it instead (PET_NNODES,
  PET_NODE_RANK, PET_RDZV_BACKEND, PET_RDZV_ENDPOINT, PET_RDZV_ID, ... = its --nnodes, --node-rank, ... flags); when
  PET_NNODES or PET_RDZV_ENDPOINT is set, --standalone is left out (docs/paper-scale/ddp.md).
* one: the script replaces this process (exec), as ``python script`` would run it.

The warmstart and evaluate stages start themselves again the same way (``relaunch_on_every_gpu``: the same process
count and torchrun flags, every visible GPU).

CPU runs get glibc's allocator tunables (mfim.runtime.GLIBC_TUNABLES: large freed blocks stay mapped, which is
what makes CPU training fast); GPU runs do not, since there they only keep freed host memory (checkpoint loads and
snapshots) resident.
"""

from __future__ import annotations

import os
import sys

from mfim.config import lookup

MULTI_NODE_ENV = ("PET_NNODES", "PET_RDZV_ENDPOINT")
GPUS_KEY = "train.gpus"


def uses_cuda(params: dict) -> bool:
    import torch

    device = str(lookup(params, "project.device"))
    if device == "auto":
        return torch.cuda.is_available()
    return device.startswith("cuda")


def process_count(params: dict, key: str | None = GPUS_KEY) -> int:
    """Processes on this machine: 1 on CPU, else the param ``key`` (auto: the visible GPUs; ``key`` None: auto)."""
    if not uses_cuda(params):
        return 1
    import torch

    visible = torch.cuda.device_count()
    value = lookup(params, key) if key else "auto"
    if value in (None, "auto"):
        return max(visible, 1)
    try:
        n = int(value)
    except (TypeError, ValueError):
        raise ValueError(f"{key} must be auto or a positive integer, not {value!r}") from None
    if not 1 <= n <= visible:
        raise ValueError(f"{key} is {n} but this machine has {visible} visible GPUs; set {key}: auto")
    return n


def torchrun_args(n: int, script: str, args: list[str], env: dict) -> list[str]:
    rendezvous = [] if any(env.get(k) for k in MULTI_NODE_ENV) else ["--standalone"]
    return [*rendezvous, f"--nproc-per-node={n}", script, *args]


def torchrun_command(params: dict, script: str, args: list[str] = (), key: str | None = GPUS_KEY) -> list[str] | None:
    """``python -m torch.distributed.run ... script args`` for ``process_count`` processes (or a multi-node
    rendezvous from the environment); None where ``script`` runs as one process: on CPU, on one GPU, or when this
    process is already one of torchrun's (WORLD_SIZE set)."""
    if "WORLD_SIZE" in os.environ:
        return None
    n = process_count(params, key)
    if n <= 1 and not any(os.environ.get(k) for k in MULTI_NODE_ENV):
        return None
    return [sys.executable, "-m", "torch.distributed.run", *torchrun_args(n, script, list(args), os.environ)]


def relaunch_on_every_gpu(params: dict, script: str, key: str | None = None) -> None:
    """For a stage script that starts itself (warmstart, evaluate): replace this process by ``torchrun_command``'s
    when there is one; else return and run as one process. ``key`` None: every visible GPU (those stages have no
    gpus key of their own: a new key in their params groups would make DVC re-run them)."""
    argv = torchrun_command(params, os.path.abspath(script), key=key)
    if argv is not None:
        print(f"launch: torchrun, {process_count(params, key)} processes on this machine: {script}", flush=True)
        os.execv(argv[0], argv)


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    key = GPUS_KEY
    if argv[:1] == ["--gpus-key"] and len(argv) > 1:
        key, argv = argv[1], argv[2:]
    if not argv:
        raise SystemExit("usage: python -m mfim.launch [--gpus-key KEY] SCRIPT [ARGS...]")
    script, args = argv[0], argv[1:]
    from mfim.config import exit_on_params_error, load_params

    with exit_on_params_error("launch"):  # one line before any process starts, not a traceback per rank
        params = load_params(os.environ.get("MFIM_PARAMS", "params.yaml"))
    n = process_count(params, key)
    multi_node = any(os.environ.get(k) for k in MULTI_NODE_ENV)
    env = dict(os.environ, MFIM_NO_REEXEC="1")  # the tunables are decided here, not re-decided by the script
    if n > 1 or multi_node:
        from torch.distributed import run as torchrun

        os.environ.update(env)
        print(f"launch: torchrun, {n} processes on this machine: {script}", flush=True)
        torchrun.main(torchrun_args(n, script, args, os.environ))
        return
    if not uses_cuda(params) and sys.platform.startswith("linux") and "mmap_threshold" not in env.get(
            "GLIBC_TUNABLES", ""):
        from mfim.runtime import GLIBC_TUNABLES

        env["GLIBC_TUNABLES"] = GLIBC_TUNABLES
    os.execve(sys.executable, [sys.executable, script, *args], env)


if __name__ == "__main__":
    main()
