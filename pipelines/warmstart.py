"""DVC stage `warmstart`: GAN inversion of the frozen generator (latent regression, then reconstruction) as the
encoder's starting point for MFIM training (mfim/training/warmstart.py).

`python pipelines/warmstart.py` (the stage's command) on a machine with several GPUs starts itself again under
torchrun, one process per GPU (DDP); run it under torchrun yourself to choose the count. CPU runs stay one process.
"""

import os
import sys

from mfim.runtime import ensure_allocator_env


def torchrun_argv() -> list[str] | None:
    """The torchrun command line for this script on every visible GPU, or None: one GPU or none, already under
    torchrun, project.device other than auto / cuda, or the stage is skipped (train starts from another file)."""
    if "WORLD_SIZE" in os.environ:
        return None
    from pathlib import Path

    import torch

    from mfim.config import load_params, lookup

    params = load_params()
    if Path(str(lookup(params, "train.init_checkpoint") or "")) != Path("data/warmstart/encoder.pt"):
        return None
    device = str(lookup(params, "project.device"))
    n = torch.cuda.device_count() if device in ("auto", "cuda") else 0
    if n < 2:
        return None
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}",
            os.path.abspath(__file__)]


if __name__ == "__main__":
    ensure_allocator_env()
    from mfim.config import exit_on_params_error, load_params

    with exit_on_params_error("warmstart"):
        params = load_params()  # before torchrun: bad params are one line here, not one traceback per rank
    argv = torchrun_argv()
    if argv is not None:
        print(f"warmstart: {argv[4].split('=')[1]} GPUs, starting under torchrun", flush=True)
        os.execv(argv[0], argv)
    from mfim.training.warmstart import run_warmstart_stage

    run_warmstart_stage(params)
