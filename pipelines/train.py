"""DVC stage `train`: the MFIM encoder (and D) against the frozen generator. `torchrun` works too."""

from mfim.runtime import ensure_allocator_env

if __name__ == "__main__":
    ensure_allocator_env()
    from mfim.config import load_params
    from mfim.training.run import run_training

    run_training(load_params())
