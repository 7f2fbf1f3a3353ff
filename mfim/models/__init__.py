"""MFIM networks (the paper's section 3): StyleGAN2 (generator with an explicit S space, discriminator) and the
facial attribute encoder / MFIM wrapper (mfim.models.encoder, mfim.models.mfim). Reading and writing weight files,
official or ours, is mfim.weights."""

from mfim.models.stylegan2 import (
    Discriminator,
    Generator,
    NoiseLayer,
    StyleLayer,
    discriminator_for,
    generator_from_params,
)

__all__ = [
    "Discriminator",
    "Generator",
    "NoiseLayer",
    "StyleLayer",
    "discriminator_for",
    "generator_from_params",
]
