"""DVC stage `train`: the MFIM encoder (and D) against the frozen generator.

The stage runs it through ``python -m mfim.launch pipelines/train.py``: one process per GPU (torchrun), or this
script alone on CPU / one GPU. Run directly, it is one process (or one rank of a torchrun you started).
"""

from mfim.runtime import ensure_allocator_env

if __name__ == "__main__":
    ensure_allocator_env()  # no-op under mfim.launch, which decided the allocator settings already
    from mfim.config import exit_on_params_error, load_params
    from mfim.training.run import run_training

    with exit_on_params_error("train"):
        params = load_params()
    run_training(params)
