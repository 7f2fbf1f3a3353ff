"""Render sets for fitting 3DMM regressors: many BFM faces, aligned from their known landmarks, kept in memory.

The ``synthesize`` + ``align`` stages make a few thousand photo-like renders and align them with dlib, which is what
the swapper trains and is evaluated on. A 3DMM regressor needs far more faces than that to see BFM shape (1,360
renders gave shape r 0.17 on held-out identities), and it does not need the detour through dlib: the renderer knows
the 68 landmarks exactly, so each face goes straight through the FFHQ alignment recipe at the regressor's input size.

Identities are drawn by the renderer's own per-identity seed sequence from an ``identity_offset`` far above the
swapper's identities (0 .. train + eval), so a render set never shares a person with the training or evaluation data,
and two sets with different offsets never share one with each other (the loss network and the independent shape
evaluator are fitted on disjoint people).
"""

from __future__ import annotations

import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, replace
from multiprocessing import get_context

import numpy as np

from mfim.data.synth import SynthConfig, Synthesizer

_worker: Synthesizer | None = None


@dataclass(frozen=True)
class RenderSetConfig:
    identities: int = 1600
    images_per_identity: int = 5
    identity_offset: int = 100_000  # first identity id; the swapper's data uses 0 .. identities_train + eval
    size: int = 64  # aligned output size (the regressor's input)
    workers: int = 2


def _init(cfg: SynthConfig) -> None:
    import torch

    global _worker
    torch.set_num_threads(1)
    _worker = Synthesizer(cfg)


def _render_identity(identity: int, images_per_identity: int, size: int):
    from mfim.nets.align import align_face

    synth = _worker
    who = synth.identity(identity)
    albedo = synth.albedo(who)
    images, landmarks, exps, poses = [], [], [], []
    for index in range(images_per_identity):
        out, spec = synth.render(who, index, albedo)
        # transform_size 4x the output: the recipe's own antialiasing, at a fraction of its 1024 px default cost
        aligned = align_face(out.image, out.landmarks, size, transform_size=4 * size)
        images.append(aligned.image)
        landmarks.append(aligned.landmarks)
        exps.append(spec.exp)
        poses.append(spec.pose)
    return identity, np.stack(images), who.shape, np.stack(exps), np.stack(poses), np.stack(landmarks)


def stack_renders(results: list, images_per_identity: int) -> dict[str, np.ndarray]:
    """Per-identity results of ``_render_identity`` (in the order given) -> the render-set arrays."""
    n = images_per_identity
    return {
        "images": np.concatenate([r[1] for r in results]),
        "shape": np.concatenate([np.repeat(r[2][None], n, 0) for r in results]).astype(np.float32),
        "exp": np.concatenate([r[3] for r in results]).astype(np.float32),
        "pose": np.concatenate([r[4] for r in results]).astype(np.float32),
        "identity": np.concatenate([np.full(n, r[0], np.int64) for r in results]),
        "landmarks": np.concatenate([r[5] for r in results]).astype(np.float32),
    }


def render_aligned_set(synth: SynthConfig, cfg: RenderSetConfig, log=print) -> dict[str, np.ndarray]:
    """{'images': N×s×s×3 uint8, 'shape': N×40, 'exp': N×10, 'pose': N×3 (radians), 'identity': N, 'landmarks':
    N×68×2 (the true BFM landmark vertices in aligned pixels)} in identity order; deterministic from ``synth.seed``
    and the identity ids (not from the worker count)."""
    t0 = time.perf_counter()
    synth = replace(synth, images_per_identity=cfg.images_per_identity)
    ids = list(range(cfg.identity_offset, cfg.identity_offset + cfg.identities))
    if cfg.workers > 1:
        ctx = get_context("spawn")
        with ProcessPoolExecutor(cfg.workers, mp_context=ctx, initializer=_init, initargs=(synth,)) as pool:
            results = list(pool.map(_render_identity, ids, [cfg.images_per_identity] * len(ids),
                                    [cfg.size] * len(ids), chunksize=16))
    else:
        _init(synth)
        results = [_render_identity(i, cfg.images_per_identity, cfg.size) for i in ids]
    out = stack_renders(results, cfg.images_per_identity)
    log(f"render set: {len(out['images'])} aligned {cfg.size} px faces of {cfg.identities} identities "
        f"in {time.perf_counter() - t0:.0f} s")
    return out
