"""DVC stage `warmstart`: GAN inversion of the frozen generator (latent regression, then reconstruction) as the
encoder's starting point for MFIM training (mfim/training/warmstart.py).

`python pipelines/warmstart.py` (the stage's command) on a machine with several GPUs starts itself again under
torchrun, one process per GPU (DDP); run it under torchrun yourself to choose the count. CPU runs stay one process.
"""

from mfim.runtime import ensure_allocator_env


def feeds_train(params: dict) -> bool:
    """Whether train starts from this stage's output. When it does not, the stage only writes its skip record (one
    process is plenty)."""
    from pathlib import Path

    from mfim.config import lookup

    return Path(str(lookup(params, "train.init_checkpoint") or "")) == Path("data/warmstart/encoder.pt")


if __name__ == "__main__":
    ensure_allocator_env()
    from mfim.config import exit_on_params_error, load_params
    from mfim.launch import relaunch_on_every_gpu

    with exit_on_params_error("warmstart"):
        params = load_params()  # before torchrun: bad params are one line here, not one traceback per rank
    if feeds_train(params):
        relaunch_on_every_gpu(params, __file__)  # every visible GPU; returns where one process runs
    from mfim.training.warmstart import run_warmstart_stage

    run_warmstart_stage(params)
