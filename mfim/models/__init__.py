"""MFIM networks: StyleGAN2 (generator with an explicit S space, discriminator, official-weight loading) and the
facial attribute encoder / MFIM wrapper (mfim.models.encoder, mfim.models.mfim)."""

from mfim.models.checkpoints import (
    CheckpointError,
    load_discriminator,
    load_generator,
    save_checkpoint,
)
from mfim.models.stylegan2 import (
    Discriminator,
    Generator,
    NoiseLayer,
    StyleLayer,
    discriminator_for,
    generator_from_params,
)

__all__ = [
    "CheckpointError",
    "Discriminator",
    "Generator",
    "NoiseLayer",
    "StyleLayer",
    "discriminator_for",
    "generator_from_params",
    "load_discriminator",
    "load_generator",
    "save_checkpoint",
]
