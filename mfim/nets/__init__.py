"""Frozen auxiliary face networks: landmarks/alignment, identity, 3DMM, head pose, LPIPS, FID.

All networks that act on generated faces take FFHQ-aligned crops as B×3×H×W float tensors in [-1, 1] (RGB), at any H,
and do their own (differentiable) crop/resize to their native input. See docs/CONVENTIONS.md.
"""
