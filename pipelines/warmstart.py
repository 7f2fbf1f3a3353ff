"""DVC stage `warmstart`: GAN inversion of the frozen generator (latent regression, then reconstruction) as the
encoder's starting point for MFIM training (mfim/training/warmstart.py)."""

from mfim.runtime import ensure_allocator_env

if __name__ == "__main__":
    ensure_allocator_env()
    from mfim.config import load_params
    from mfim.training.warmstart import run_warmstart_stage

    run_warmstart_stage(load_params())
