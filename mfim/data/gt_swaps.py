"""Ground-truth face swaps of the synthetic protocol: (source, target, the exact swap) triples.

A real face swap has no ground truth, which is why eq. (6) supervises identity with an ID network and attributes
with 3DMM parameters. A rendered face does: the renderer draws a person (BFM shape, skin, lips, irises, brows) apart
from the scene (expression, pose, placement, light, background, sensor grain), so the source's person rendered in
the target's scene *is* the swap (``Synthesizer.render(..., scene=)``). ``loss.gt_swap`` (mfim.training.objective)
puts an L1 + LPIPS term on it: the one signal that says, pixel for pixel, which of the target's pixels must change
and into what. Not in the paper (it has no such data); 0 at paper scale.

Triples are drawn among the *training* people only (the swapper's own train split), on scenes the shards do not
hold (image indices from ``first_index``), and aligned from the renderer's exact landmarks as ``render_aligned_set``
does; the target and its swap share the target's crop, as a swap shares the target's frame. Deterministic from
``synthesize.seed`` and ``gt_swaps.seed``, whatever the worker count.
"""

from __future__ import annotations

import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path

import numpy as np
import torch

from mfim.data import synth as synth_module
from mfim.data.synth import SynthConfig, Synthesizer
from mfim.data.threedmm_table import images_to_tensor

ARRAYS = ("src", "tgt", "gt", "source_identity", "target_identity")


@dataclass(frozen=True)
class GtSwapConfig:
    """params.yaml group ``gt_swaps``."""

    pairs: int  # triples rendered (3 renders + 3 alignments each, ~0.35 s on one core); 0: an empty set
    first_index: int  # scene indices start here: above synthesize.images_per_identity, so no shard image
    seed: int
    size: int  # aligned output size (data.resolution)
    workers: int

    @classmethod
    def from_params(cls, group: dict, size: int) -> "GtSwapConfig":
        """From the validated ``gt_swaps`` group (every key present) and data.resolution."""
        return cls(**{k: int(group[k]) for k in ("pairs", "first_index", "seed", "workers")}, size=int(size))


def draw_triples(train_ids: list[int], cfg: GtSwapConfig) -> np.ndarray:
    """P×4 int64 (target id, source id, target scene index, source scene index): two different people each."""
    if len(train_ids) < 2:
        raise ValueError(f"gt_swaps needs at least 2 training people, got {len(train_ids)}")
    rng = np.random.default_rng([cfg.seed, 7])
    ids = np.asarray(train_ids, np.int64)
    tgt = rng.integers(len(ids), size=cfg.pairs)
    src = (tgt + rng.integers(1, len(ids), size=cfg.pairs)) % len(ids)  # never the target's person
    k = np.arange(cfg.pairs, dtype=np.int64)
    return np.stack([ids[tgt], ids[src], cfg.first_index + 2 * k, cfg.first_index + 2 * k + 1], 1)


def render_triple(synth: Synthesizer, row, size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(source, target, ground-truth swap), each size×size×3 uint8, FFHQ-aligned (the swap in the target's crop)."""
    from mfim.nets.align import align_face

    t_id, s_id, t_index, s_index = (int(v) for v in row)
    target_person, source_person = synth.identity(t_id), synth.identity(s_id)
    source_albedo = synth.albedo(source_person)
    tgt, _ = synth.render(target_person, t_index)
    gt, _ = synth.render(source_person, t_index, source_albedo, scene=t_id)
    src, _ = synth.render(source_person, s_index, source_albedo)
    # transform_size 4x the output: the recipe's own antialiasing, at a fraction of its 1024 px default cost
    kw = {"output_size": size, "transform_size": 4 * size}
    return (align_face(src.image, src.landmarks, **kw).image, align_face(tgt.image, tgt.landmarks, **kw).image,
            align_face(gt.image, tgt.landmarks, **kw).image)


def _render_rows(rows: np.ndarray, size: int) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    # the process's Synthesizer, made by synthesize's own worker initialiser
    return [render_triple(synth_module._worker, row, size) for row in rows]


def render_gt_swap_set(synth: SynthConfig, cfg: GtSwapConfig, log=print) -> dict[str, np.ndarray]:
    """{'src', 'tgt', 'gt': P×s×s×3 uint8; 'source_identity', 'target_identity': P int64} over the training people
    of ``synth`` (its eval people never appear)."""
    t0 = time.perf_counter()
    train_ids = [i for i, split in synth.identities() if split == "train"]
    table = draw_triples(train_ids, cfg)
    chunks = np.array_split(table, max(1, len(table) // 32))
    if cfg.workers > 1:
        ctx = get_context("spawn")  # not fork: a forked torch thread pool can deadlock
        with ProcessPoolExecutor(cfg.workers, mp_context=ctx, initializer=synth_module._init_worker,
                                 initargs=(synth,)) as pool:
            results = [t for part in pool.map(_render_rows, chunks, [cfg.size] * len(chunks)) for t in part]
    else:
        synth_module._init_worker(synth)
        results = [t for part in chunks for t in _render_rows(part, cfg.size)]
    out = {name: np.stack([r[i] for r in results]) for i, name in enumerate(("src", "tgt", "gt"))}
    out["target_identity"], out["source_identity"] = table[:, 0].copy(), table[:, 1].copy()
    log(f"gt_swaps: {len(table)} (source, target, swap) triples of {len(set(table[:, :2].ravel()))} training "
        f"people at {cfg.size} px in {time.perf_counter() - t0:.0f} s")
    return out


def empty_gt_swap_set(size: int) -> dict[str, np.ndarray]:
    """The set with no triples (real photos, or gt_swaps.pairs 0): the stage's output still exists."""
    images = np.zeros((0, size, size, 3), np.uint8)
    return {"src": images, "tgt": images, "gt": images, "source_identity": np.zeros(0, np.int64),
            "target_identity": np.zeros(0, np.int64)}


def save_gt_swap_set(data: dict[str, np.ndarray], path: str | Path) -> Path:
    from mfim.atomic import atomic_write

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write(path, lambda f: np.savez(f, **{k: data[k] for k in ARRAYS}))


def load_gt_swap_set(path: str | Path) -> dict[str, np.ndarray]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no ground-truth swap set; the `gt_swaps` stage writes it "
                                "(synthetic data only; set train.gt_swap_pairs: 0 for real photos)")
    with np.load(path, allow_pickle=False) as z:
        missing = [k for k in ARRAYS if k not in z.files]
        if missing:
            raise ValueError(f"{path}: not a ground-truth swap set, it lacks {missing}")
        data = {k: z[k] for k in ARRAYS}
    n = len(data["src"])
    if any(len(v) != n for v in data.values()) or data["src"].shape != data["gt"].shape != data["tgt"].shape:
        raise ValueError(f"{path}: arrays of different lengths or image sizes")
    return data


class GtSwapRows:
    """Draws ``k`` triples per batch as tensors in [-1, 1] (src, tgt, gt: k×3×H×W), seeded per draw so a resumed run
    continues the exact sequence from ``drawn`` alone. With ``flip`` each triple is mirrored with probability 1/2,
    target and swap together (a mirrored scene is still a scene), the source on its own."""

    def __init__(self, data: dict[str, np.ndarray], k: int, seed: int, flip: bool = True, drawn: int = 0):
        if len(data["src"]) < int(k):
            raise ValueError(f"the ground-truth swap set has {len(data['src'])} triples, fewer than the {k} a batch "
                             "takes (train.gt_swap_pairs): raise gt_swaps.pairs")
        self.data, self.k, self.seed, self.flip, self.drawn = data, int(k), int(seed), bool(flip), int(drawn)

    def next(self) -> dict[str, torch.Tensor]:
        rng = np.random.default_rng([self.seed, 11, self.drawn])
        self.drawn += 1
        rows = rng.choice(len(self.data["src"]), size=self.k, replace=False)
        src, tgt, gt = (self.data[n][rows] for n in ("src", "tgt", "gt"))
        if self.flip:
            f_pair, f_src = rng.random(self.k) < 0.5, rng.random(self.k) < 0.5
            tgt = np.where(f_pair[:, None, None, None], tgt[:, :, ::-1], tgt)
            gt = np.where(f_pair[:, None, None, None], gt[:, :, ::-1], gt)
            src = np.where(f_src[:, None, None, None], src[:, :, ::-1], src)
        return {"src": images_to_tensor(src), "tgt": images_to_tensor(tgt), "gt": images_to_tensor(gt)}


def with_gt_rows(batch: dict, rows: dict[str, torch.Tensor]) -> dict:
    """``batch`` (pair_batches) with the triples appended as cross-identity pairs; ``has_gt`` marks them."""
    n, k = len(batch["src"]), len(rows["src"])
    out = dict(batch)
    out["src"] = torch.cat([batch["src"], rows["src"].to(batch["src"].dtype)])
    out["tgt"] = torch.cat([batch["tgt"], rows["tgt"].to(batch["tgt"].dtype)])
    out["gt"] = torch.cat([torch.zeros_like(batch["tgt"]), rows["gt"].to(batch["tgt"].dtype)])
    out["has_gt"] = torch.cat([torch.zeros(n, dtype=torch.bool), torch.ones(k, dtype=torch.bool)])
    if "same_identity" in batch:
        same = torch.as_tensor(batch["same_identity"], dtype=torch.bool)
        out["same_identity"] = torch.cat([same, torch.zeros(k, dtype=torch.bool)])
    for key in ("src_key", "tgt_key"):
        if key in batch:
            out[key] = list(batch[key]) + [f"gt_swaps/{i}" for i in range(k)]
    return out


class BatchesWithGtRows:
    """``pair_batches``' iterator with ``rows.k`` triples appended to every batch (``with_gt_rows``). Its
    ``state_dict`` is the pairs' position; the triples resume from ``rows.drawn``, which the caller saves beside it."""

    def __init__(self, pairs, rows: GtSwapRows):
        self.pairs, self.rows = pairs, rows

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        return with_gt_rows(next(self.pairs), self.rows.next())

    def state_dict(self):
        return self.pairs.state_dict()
