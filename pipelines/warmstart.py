"""DVC stage `warmstart`: GAN inversion of the frozen generator (latent regression, then reconstruction) as the
encoder's starting point for MFIM training (mfim/training/warmstart.py).

`python pipelines/warmstart.py` (the stage's command) on a machine with several GPUs starts itself again under
torchrun, one process per GPU (DDP); run it under torchrun yourself to choose the count. CPU runs stay one process.
"""

import os

from mfim.runtime import ensure_allocator_env


def torchrun_argv() -> list[str] | None:
    """The torchrun command line for this script on every visible GPU (mfim.launch.torchrun_command), or None: one
    GPU or none, already under torchrun, project.device cpu, or the stage is skipped (train starts from another
    file)."""
    from pathlib import Path

    from mfim.config import load_params, lookup
    from mfim.launch import torchrun_command

    params = load_params()
    if Path(str(lookup(params, "train.init_checkpoint") or "")) != Path("data/warmstart/encoder.pt"):
        return None
    return torchrun_command(params, os.path.abspath(__file__), key=None)


if __name__ == "__main__":
    ensure_allocator_env()
    from mfim.config import exit_on_params_error, load_params

    with exit_on_params_error("warmstart"):
        params = load_params()  # before torchrun: bad params are one line here, not one traceback per rank
    argv = torchrun_argv()
    if argv is not None:
        print(f"warmstart: starting under torchrun: {' '.join(argv[3:-1])}", flush=True)
        os.execv(argv[0], argv)
    from mfim.training.warmstart import run_warmstart_stage

    run_warmstart_stage(params)
