"""Checkpoint formats for the StyleGAN2 networks: reading, writing and converting weight files."""
