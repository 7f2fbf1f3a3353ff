"""(source, target) pairs for MFIM training, read from the shards.

Targets follow the rank's stream of ``mfim.data.shards`` (shuffled per epoch, disjoint across ranks, no duplicates
within an epoch, exact resume from ``.position``). Each target's source is drawn from the whole split with the
sample's own generator (seeded from ``(seed, rank, position)``):

* with probability ``self_pair_fraction``: the target itself, the very same (augmented) array -- FaceShifter's and
  SimSwap's reconstruction pairs (x_src = x_tgt), the one pair kind whose ideal swap is known pixel for pixel;
* else with probability ``same_identity_fraction``: another image of the target's identity, or the target itself when
  the identity is unknown or has a single image (``same_identity`` is then True for both kinds);
* otherwise: an image of a different identity (identities unknown: a different image; ``same_identity`` False).

When a 3DMM table is given (``mfim.data.threedmm_table``), each batch carries ``src_3dmm``/``tgt_3dmm`` as
:class:`~mfim.nets.types.ThreeDMMParams` joined by key (the ``estimate`` columns, or ``ground_truth``), flipped with the
image when the flip augmentation is on. A pair whose source fails to decode is skipped like a corrupt target.

Each batch also carries ``src_landmarks``/``tgt_landmarks`` (B×68×2 float32, pixel indices of the batch's images,
flipped with them; NaN where the shard has none): DECA places its crop box from them (``mfim.nets.deca``).
"""

from __future__ import annotations

import logging
from typing import Mapping, Sequence

import numpy as np

from mfim.data.shard_meta import shard_landmarks
from mfim.data.shards import (
    BatchIterator,
    CorruptSample,
    EpochPlan,
    ItemSource,
    ReaderPosition,
    ShardIndex,
    sample_rng,
)
from mfim.data.threedmm_table import load_threedmm_arrays
from mfim.nets.types import ThreeDMMParams

_TRIES = 64  # rejection sampling for a different identity: P(64 misses) is nil unless one identity dominates


class PairItems(ItemSource):
    image_fields = ("src", "tgt")

    def __init__(self, index: ShardIndex, plan: EpochPlan, resolution: int | None, same_identity_fraction: float,
                 augment=None, threedmm: Mapping[str, np.ndarray] | None = None, self_pair_fraction: float = 0.0):
        for name, f in (("same_identity_fraction", same_identity_fraction), ("self_pair_fraction", self_pair_fraction)):
            if not 0.0 <= f <= 1.0:
                raise ValueError(f"{name} must lie in [0, 1]")
        self.index, self.plan, self.resolution = index, plan, resolution
        self.fraction, self.augment, self.threedmm = float(same_identity_fraction), augment, threedmm
        self.self_fraction = float(self_pair_fraction)
        ids = index.identities
        self._members: dict[int, np.ndarray] = {}
        for ident in np.unique(ids[ids >= 0]):
            self._members[int(ident)] = np.flatnonzero(ids == ident)
        self._row = None
        if threedmm is not None:
            self._row = {k: i for i, k in enumerate(threedmm["key"])}
            missing = sum(k not in self._row for k in index.keys)
            if missing:
                logging.getLogger(__name__).warning(
                    "%d of %d shard samples have no row in the 3DMM table; pairs using them are skipped",
                    missing, len(index))

    def choose_source(self, t: int, rng: np.random.Generator) -> tuple[int, bool]:
        ids = self.index.identities
        ident = int(ids[t])
        if rng.random() < self.fraction:
            members = self._members.get(ident) if ident >= 0 else None
            if members is None or len(members) < 2:
                return t, True
            others = members[members != t]
            return int(others[rng.integers(len(others))]), True
        n = len(self.index)
        for _ in range(_TRIES):
            s = int(rng.integers(n))
            if (ids[s] != ident) if ident >= 0 else (s != t):
                return s, False
        labelled, unlabelled = len(self._members), int((ids < 0).sum())
        if labelled + unlabelled < 2:  # each unknown-identity image may be another person
            held = f"{labelled} identit{'y' if labelled == 1 else 'ies'}" + (
                f" and {unlabelled} image{'' if unlabelled == 1 else 's'} of unknown identity" if unlabelled else "")
            why = f"the split holds {held}; a pair of different people needs two (or same_identity_fraction 1)"
        else:
            why = f"none in {_TRIES} random draws"
        raise CorruptSample(f"no source of another identity than {ident} for {self.index.keys[t]!r}: {why}")

    def _labels(self, key: str) -> dict:
        row = self._row.get(key)
        if row is None:
            raise CorruptSample(f"{key!r} has no row in the 3DMM table")
        return {name: self.threedmm[name][row] for name in ("shape", "exp", "pose")}

    def _image(self, i: int, rng: np.random.Generator) -> tuple[np.ndarray, dict | None, np.ndarray]:
        key = self.index.keys[i]
        try:
            sample = self.index.read(i, self.resolution)
        except CorruptSample as e:
            raise CorruptSample(f"{key!r}: {e}") from None
        image, landmarks = sample.image, shard_landmarks(sample.meta, sample.image.shape[1])
        labels = self._labels(key) if self._row is not None else None
        if self.augment is not None:
            out = self.augment(image, rng, landmarks=landmarks, pose=None if labels is None else labels["pose"])
            image, landmarks = out.image, out.landmarks
            if labels is not None:
                labels = {**labels, "pose": out.pose}
        return image, labels, np.full((68, 2), np.nan, np.float32) if landmarks is None else landmarks

    def make(self, position: int) -> dict:
        t = self.plan.index_at(position)
        rng = sample_rng(self.plan.seed, self.plan.rank, position, 1)
        # no extra draw at 0, so the pairs of runs without self pairs stay what they were
        self_pair = self.self_fraction > 0 and rng.random() < self.self_fraction
        s, same = (t, True) if self_pair else self.choose_source(t, rng)
        tgt, tgt_labels, tgt_lm = self._image(t, rng)
        src, src_labels, src_lm = (tgt, tgt_labels, tgt_lm) if self_pair else self._image(s, rng)
        item = {"src": src, "tgt": tgt, "src_key": self.index.keys[s], "tgt_key": self.index.keys[t],
                "same_identity": np.bool_(same), "src_landmarks": src_lm, "tgt_landmarks": tgt_lm}
        if tgt_labels is not None:
            for role, labels in (("src", src_labels), ("tgt", tgt_labels)):
                for name, value in labels.items():
                    item[f"{role}_3dmm_{name}"] = np.asarray(value, np.float32)
        return item


def _finish(batch: dict) -> dict:
    out = {"src": batch["src"], "tgt": batch["tgt"],
           "src_key": list(batch["src_key"]), "tgt_key": list(batch["tgt_key"]),
           "same_identity": batch["same_identity"].bool()}
    for role in ("src", "tgt"):
        if f"{role}_landmarks" in batch:
            out[f"{role}_landmarks"] = batch[f"{role}_landmarks"]
        if f"{role}_3dmm_shape" in batch:
            out[f"{role}_3dmm"] = ThreeDMMParams(batch[f"{role}_3dmm_shape"], batch[f"{role}_3dmm_exp"],
                                                 batch[f"{role}_3dmm_pose"])
    return out


def pair_batches(pattern: str | Sequence[str], threedmm_table: str | None, batch_size: int, seed: int,
                 rank: int = 0, world: int = 1, same_identity_fraction: float = 0.2, augment: bool = False, *,
                 workers: int = 0, position: ReaderPosition | Mapping | None = None, resolution: int | None = None,
                 threedmm_columns: str = "estimate", flip_probability: float = 0.0,
                 self_pair_fraction: float = 0.0) -> BatchIterator:
    """Infinite iterator of dict(src, tgt: B×3×H×W in [-1, 1]; src_key, tgt_key: lists; same_identity: B bool;
    src_landmarks, tgt_landmarks: B×68×2; src_3dmm, tgt_3dmm: ThreeDMMParams when ``threedmm_table`` is given).
    ``.position`` resumes it exactly.

    ``threedmm_columns``: 'estimate' (the precomputed encoder output) or 'ground_truth' (synthetic data only).
    ``flip_probability`` > 0 adds the label-flipping horizontal flip to the augmentation (needs ``augment``).
    """
    # here, not at the top: albumentations only when augmenting (the GPU check's machine does not carry it)
    from mfim.data.augment import FaceAugment

    index = ShardIndex(pattern, keep_metas=False)  # pairs need keys, identities and offsets, not the JSON
    labels = load_threedmm_arrays(threedmm_table, threedmm_columns) if threedmm_table else None
    augmenter = FaceAugment(flip_probability=flip_probability) if augment else None
    source = PairItems(index, EpochPlan(len(index), seed, rank, world), resolution, same_identity_fraction,
                       augmenter, labels, self_pair_fraction)
    return BatchIterator(source, batch_size, workers, position, finish=_finish)

