"""Evaluation manifests: which (source, target) pairs and (target, global source, local source) triplets get swapped.

Three protocols (``evalsets.protocol``), all written as ``pairs.parquet`` + ``triplets.parquet`` + ``protocol.json``:

* ``synthetic`` (embedded default): the eval split of the shards -- identities never seen in training. Pairs take
  source and target from different identities; triplets from three different identities. Rows name shard keys (read
  them with ``mfim.data.shards.read_images``) and the aligned PNG each came from.
* ``ffpp``: FaceForensics++ ``original_sequences/youtube/<compression>/videos``; pair ``XXX_YYY`` gives target video
  XXX the face of YYY (the DeepFakes convention, /work/shared/PROTOCOLS.md §1). Per video, frames
  ``range(0, n, ceil(n / N))[:N]`` (N=10: ReliableSwap's ``frames[::step]``), FFHQ-aligned and written as PNGs.
  The target's j-th sampled frame gets the source video's j-th sampled frame (MegaFS swaps frame N onto frame N;
  ordinals keep both on their sampling grid), or the source's first aligned frame when that one has no face.
* ``celebahq``: a folder of CelebA-HQ images (used as distributed: already aligned by CelebA-HQ's own recipe).
  Every target gets ``pairs_per_target`` distinct random sources (30,000 × 10 = 300,000 as MegaFS/MFIM), and one
  triplet each (§4.4: one random global and one random local source per target, 30,000 triplets); ``pairs`` /
  ``triplets`` > 0 cap these to a seeded subset of targets, and protocol.json says so.

Manifest columns. pairs: ``pair_id, target_key, source_key, target_path, source_path, target_identity,
source_identity, frame_index, source_frame_index`` (identity -1 unknown, frame -1 for stills).
triplets: ``triplet_id, target_key, global_key, local_key, target_path, global_path, local_path, target_identity,
global_identity, local_identity``.
"""

from __future__ import annotations

import json
import logging
import math
import re
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import pandas as pd

log = logging.getLogger(__name__)

PAIR_COLUMNS = ["pair_id", "target_key", "source_key", "target_path", "source_path", "target_identity",
                "source_identity", "frame_index", "source_frame_index"]
TRIPLET_COLUMNS = ["triplet_id", "target_key", "global_key", "local_key", "target_path", "global_path", "local_path",
                   "target_identity", "global_identity", "local_identity"]

WHERE_TO_GET = {
    "ffpp": (
        "FaceForensics++: request access with the form linked from https://github.com/ondyari/FaceForensics, then run "
        "its download script, e.g. `python faceforensics_download_v4.py <root> -d original -c c23 -t videos` (and "
        "`-d Deepfakes` for the 1,000 pair names, or point evalsets.ffpp.splits_json at dataset/splits/test.json of "
        "that repository). Set evalsets.ffpp.root to <root>."
    ),
    "celebahq": (
        "CelebA-HQ (30,000 images): build it with dataset_tool.py create_celebahq from "
        "https://github.com/tkarras/progressive_growing_of_gans, or take CelebA-HQ-img/ from the CelebAMask-HQ release "
        "(https://github.com/switchablenorms/CelebAMask-HQ). Set evalsets.celebahq.root to that folder."
    ),
}


class MissingDatasetError(FileNotFoundError):
    """A real-data protocol was asked for and its data set is not where params.yaml says."""


# Aligner: RGB H×W×3 uint8 frame -> FFHQ-aligned RGB crop, or None when no face was found.
Aligner = Callable[[np.ndarray], "np.ndarray | None"]


def dlib_aligner(output_size: int, detector: str = "hog", upsample: int = 1, transform_size: int = 1024,
                 enable_padding: bool = True) -> Aligner:
    """The project's aligner (dlib 68 landmarks -> FFHQ recipe), largest face of the frame."""
    from mfim.nets.align import align_face
    from mfim.nets.landmarks import DlibFaceLandmarker

    landmarker = DlibFaceLandmarker(detector=detector, upsample=upsample)

    def align(frame: np.ndarray) -> np.ndarray | None:
        face = landmarker.largest(frame)
        if face is None:
            return None
        return align_face(frame, face.landmarks, output_size, transform_size, enable_padding).image

    return align


def dlib_aligner_settings(output_size: int, detector: str = "hog", upsample: int = 1, transform_size: int = 1024,
                          enable_padding: bool = True) -> dict:
    """What shapes :func:`dlib_aligner`'s crops: its arguments, the align code and the landmark model (the align
    stage's fingerprint of the same settings)."""
    from mfim.data.align_folder import AlignConfig, run_fingerprint

    return {"dlib_align": run_fingerprint(AlignConfig(int(output_size), detector, int(upsample), int(transform_size),
                                                      bool(enable_padding)))}


def _pairs_frame(rows: list[dict]) -> pd.DataFrame:
    df = pd.DataFrame(rows, columns=PAIR_COLUMNS)
    return df.astype({"target_identity": "int64", "source_identity": "int64", "frame_index": "int64",
                      "source_frame_index": "int64"})


def _triplets_frame(rows: list[dict]) -> pd.DataFrame:
    df = pd.DataFrame(rows, columns=TRIPLET_COLUMNS)
    return df.astype({"target_identity": "int64", "global_identity": "int64", "local_identity": "int64"})


# ---------------------------------------------------------------------------------------------- synthetic / shards


def _draw_other(rng: np.random.Generator, identities: np.ndarray, exclude: Sequence[int]) -> int:
    """A random row whose identity is none of ``exclude``."""
    allowed = np.flatnonzero(~np.isin(identities, list(exclude)))
    if len(allowed) == 0:
        raise ValueError(f"need images of more identities than {len(set(exclude))}")
    return int(allowed[rng.integers(len(allowed))])


def _target_order(rng: np.random.Generator, n: int, count: int) -> np.ndarray:
    """``count`` targets: every image once in a random order before any repeats."""
    reps = math.ceil(count / n)
    return np.concatenate([rng.permutation(n) for _ in range(reps)])[:count]


def build_synthetic(keys: Sequence[str], identities: Sequence[int], paths: Sequence[str], n_pairs: int,
                    n_triplets: int, seed: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Pairs with source and target of different identities; triplets of three different identities."""
    ids = np.asarray(identities, np.int64)
    if (ids < 0).any():
        raise ValueError("the synthetic protocol needs known identities for every eval image")
    if len(np.unique(ids)) < 3:
        raise ValueError("the synthetic protocol needs at least 3 eval identities")
    rng = np.random.default_rng([seed, 0])
    pairs = []
    for j, t in enumerate(_target_order(rng, len(keys), n_pairs)):
        s = _draw_other(rng, ids, [ids[t]])
        pairs.append({"pair_id": f"p{j:06d}", "target_key": keys[t], "source_key": keys[s],
                      "target_path": paths[t], "source_path": paths[s], "target_identity": ids[t],
                      "source_identity": ids[s], "frame_index": -1, "source_frame_index": -1})
    rng = np.random.default_rng([seed, 1])
    triplets = []
    for j, t in enumerate(_target_order(rng, len(keys), n_triplets)):
        g = _draw_other(rng, ids, [ids[t]])
        lc = _draw_other(rng, ids, [ids[t], ids[g]])
        triplets.append({"triplet_id": f"t{j:06d}", "target_key": keys[t], "global_key": keys[g],
                         "local_key": keys[lc], "target_path": paths[t], "global_path": paths[g],
                         "local_path": paths[lc], "target_identity": ids[t], "global_identity": ids[g],
                         "local_identity": ids[lc]})
    return _pairs_frame(pairs), _triplets_frame(triplets)


def synthetic_from_shards(shard_pattern: str, aligned_dir: str | Path, n_pairs: int, n_triplets: int,
                          seed: int) -> tuple[pd.DataFrame, pd.DataFrame, dict]:
    from mfim.data.shards import ShardIndex

    index = ShardIndex(shard_pattern)
    paths = [str(Path(aligned_dir) / m.get("aligned_file", f"{k}.png")) for k, m in zip(index.keys, index.metas)]
    pairs, triplets = build_synthetic(index.keys, index.identities, paths, n_pairs, n_triplets, seed)
    protocol = {
        "protocol": "synthetic",
        "images": f"eval split of the shards ({len(index)} images, {len(np.unique(index.identities))} identities "
                  "never seen in training)",
        "image_reference": "target_key/source_key are shard keys (mfim.data.shards.read_images); *_path the aligned "
                           "PNG each shard image was resized from",
        "pairs": f"{len(pairs)}: targets cycle through the eval images in a seeded random order; each source is a "
                 "uniformly drawn image of a different identity",
        "triplets": f"{len(triplets)}: (target, global source, local source) with three different identities, "
                    "as §4.4 of the paper",
        "alignment": "FFHQ recipe from dlib landmarks (align stage), resized to data.resolution in the shards",
        "ground_truth": "3DMM shape/exp/pose of every image in its shard metadata (pose in the aligned frame)",
        "seed": seed,
    }
    index.close()
    return pairs, triplets, protocol


# ---------------------------------------------------------------------------------------------------------- FF++


def evenly_spaced_frames(n_frames: int, count: int = 10) -> list[int]:
    """``range(0, n, ceil(n / count))[:count]``: ReliableSwap's ``frames[::step]`` from frame 0 (PROTOCOLS.md §1).
    Gives fewer than ``count`` frames when ceil rounds the step up far enough (e.g. n=81 -> 9 frames)."""
    if n_frames <= 0:
        return []
    step = max(1, math.ceil(n_frames / count))
    return list(range(0, n_frames, step))[:count]


def count_frames(video: str | Path) -> int:
    """Frames actually decodable (container frame counts can be wrong)."""
    import cv2

    cap = cv2.VideoCapture(str(video))
    n = 0
    try:
        while cap.grab():
            n += 1
    finally:
        cap.release()
    return n


def read_frames(video: str | Path, indices: Sequence[int]) -> dict[int, np.ndarray]:
    """{index: H×W×3 uint8 RGB} for the wanted frame indices (sequential decode; missing ones are left out)."""
    import cv2

    wanted = set(int(i) for i in indices)
    out: dict[int, np.ndarray] = {}
    cap = cv2.VideoCapture(str(video))
    try:
        i = 0
        while wanted and i <= max(wanted) and cap.grab():
            if i in wanted:
                ok, frame = cap.retrieve()
                if ok and frame is not None:
                    out[i] = cv2.cvtColor(frame, cv2.COLOR_BGR2RGB)
                wanted.discard(i)
            i += 1
    finally:
        cap.release()
    return out


_PAIR_RE = re.compile(r"([A-Za-z0-9-]+)_([A-Za-z0-9-]+)")


def ffpp_video_dir(root: str | Path, compression: str) -> Path:
    return Path(root) / "original_sequences" / "youtube" / compression / "videos"


def ffpp_pair_names(root: str | Path, compression: str, splits_json: str | Path | None = None) -> tuple[list[str], str]:
    """['XXX_YYY', ...] and where they came from: a split JSON (each [A, B] gives A_B and B_A, as the DeepFakes
    generator makes both), else the file names under manipulated_sequences/Deepfakes/<c>/videos, else
    dataset/splits/*.json under the root."""
    if splits_json:
        files = [Path(splits_json)]
    else:
        fake_dir = Path(root) / "manipulated_sequences" / "Deepfakes" / compression / "videos"
        names = sorted(p.stem for p in fake_dir.glob("*.mp4") if _PAIR_RE.fullmatch(p.stem))
        if names:
            return names, str(fake_dir)
        files = sorted((Path(root) / "dataset" / "splits").glob("*.json")) + sorted(
            (Path(root) / "splits").glob("*.json"))
    if not files or not all(f.is_file() for f in files):
        raise MissingDatasetError(
            f"no FF++ pair list: expected {Path(root) / 'manipulated_sequences/Deepfakes' / compression / 'videos'} "
            f"or a split JSON (evalsets.ffpp.splits_json). {WHERE_TO_GET['ffpp']}")
    names: set[str] = set()
    for f in files:
        for pair in json.loads(Path(f).read_text()):
            a, b = (str(v) for v in pair)
            names.update({f"{a}_{b}", f"{b}_{a}"})
    return sorted(names), ", ".join(str(f) for f in files)


def _save_aligned(path: Path, image: np.ndarray) -> None:
    from mfim.provenance import provenance_record, save_image

    save_image(path, image, provenance_record("processed", stage="evalsets"))


def _read_frames_record(path: Path) -> dict:
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):  # absent, or damaged by hand: the video is redone
        return {}
    return record if isinstance(record, dict) else {}


def _write_frames_record(path: Path, record: dict) -> None:
    from mfim.atomic import atomic_write

    text = json.dumps(record).encode()
    atomic_write(path, lambda f: f.write(text))


def extract_ffpp_frames(video: Path, out_dir: Path, frames_per_video: int, aligner: Aligner,
                        rejects: list[dict], settings: dict | None = None) -> dict[int, Path]:
    """Align the evenly spaced frames of one video into ``out_dir/<frame:04d>.png``; {frame index: path}.

    Resumable after a kill at any point: ``frames.json`` is written (atomically) before the first frame -- the video's
    size / mtime / sha256, a fingerprint of ``frames_per_video`` and the aligner ``settings``, the sampled indices --
    and again after each frame that fails (with the reason). A rerun under the same record decodes only frames
    that have neither a PNG nor a recorded failure; when the video or the settings changed, the folder's frames are
    all redone.
    """
    from mfim.data.progress import fingerprint, same_source, source_stamp

    record_path = out_dir / "frames.json"
    fp = fingerprint({"frames_per_video": frames_per_video, "aligner": settings or {}})
    record = _read_frames_record(record_path)
    if record.get("fingerprint") == fp and same_source(record.get("source"), video):
        indices, failed = record["indices"], {int(k): v for k, v in record.get("failed", {}).items()}
    else:
        for old in out_dir.glob("*.png"):  # made from another video or by another aligner
            old.unlink()
        indices, failed = evenly_spaced_frames(count_frames(video), frames_per_video), {}
        record = {"video": str(video), "source": source_stamp(video), "fingerprint": fp,
                  "frames_per_video": frames_per_video, "indices": indices, "failed": {}}
        out_dir.mkdir(parents=True, exist_ok=True)
        _write_frames_record(record_path, record)
    todo = [i for i in indices if i not in failed and not (out_dir / f"{i:04d}.png").is_file()]
    frames = read_frames(video, todo) if todo else {}
    out: dict[int, Path] = {}
    for i in indices:
        path = out_dir / f"{i:04d}.png"
        if i in todo:
            aligned = aligner(frames[i]) if i in frames else None
            if aligned is None:
                failed[i] = "frame could not be decoded" if i not in frames else "no face found"
                # saved at once, as a PNG is: a rerun after a kill does not try this frame again
                _write_frames_record(record_path, {**record, "failed": {str(k): v for k, v in sorted(failed.items())}})
            else:
                _save_aligned(path, aligned)
        if i in failed:
            rejects.append({"file": f"{video}#{i}", "reason": failed[i]})
        elif path.is_file():
            out[i] = path
    return out


def _remove_unused_frames(frames_dir: Path, used: set[str]) -> None:
    """Drop frame folders of videos no pair uses any more, and those of other compressions (a persisted output
    folder keeps whatever an earlier run wrote)."""
    import shutil

    if frames_dir.parent.is_dir():
        for other in frames_dir.parent.iterdir():
            if other.is_dir() and other != frames_dir:
                shutil.rmtree(other)
    if frames_dir.is_dir():
        for folder in frames_dir.iterdir():
            if folder.is_dir() and folder.name not in used:
                shutil.rmtree(folder)


def build_ffpp(root: str | Path, out_dir: str | Path, compression: str = "c23", frames_per_video: int = 10,
               splits_json: str | Path | None = None, aligner: Aligner | None = None,
               aligner_factory: Callable[[], Aligner] | None = None,
               aligner_settings: dict | None = None) -> tuple[pd.DataFrame, pd.DataFrame, dict, list]:
    """Pairs manifest for FF++ (no triplets: the paper's ID-mixing analysis uses CelebA-HQ). ``aligner_settings``:
    what shapes the aligner's crops (see :func:`dlib_aligner_settings`); frames aligned under other settings are
    redone. Resumable video by video (:func:`extract_ffpp_frames`)."""
    root = Path(root) if root else None
    if root is None or not ffpp_video_dir(root, compression).is_dir():
        where = ffpp_video_dir(root, compression) if root else "evalsets.ffpp.root (empty)"
        raise MissingDatasetError(f"FaceForensics++ videos not found at {where}. {WHERE_TO_GET['ffpp']}")
    video_dir = ffpp_video_dir(root, compression)
    names, pair_source = ffpp_pair_names(root, compression, splits_json)
    if aligner is None:
        aligner = (aligner_factory or (lambda: dlib_aligner(1024)))()
    frames_dir = Path(out_dir) / "ffpp" / compression
    rejects: list[dict] = []
    cache: dict[str, dict[int, Path]] = {}

    def frames_of(video_id: str) -> dict[int, Path] | None:
        if video_id not in cache:
            video = video_dir / f"{video_id}.mp4"
            if not video.is_file():
                rejects.append({"file": str(video), "reason": "video missing"})
                cache[video_id] = {}
            else:
                cache[video_id] = extract_ffpp_frames(video, frames_dir / video_id, frames_per_video, aligner,
                                                      rejects, aligner_settings)
        return cache[video_id]

    rows = []
    for name in names:
        target_id, source_id = _PAIR_RE.fullmatch(name).groups()
        tgt, src = frames_of(target_id), frames_of(source_id)
        if not tgt or not src:
            rejects.append({"file": name, "reason": "no aligned frame in " + ("target" if not tgt else "source")})
            continue
        src_sorted = sorted(src)
        src_grid = json.loads((frames_dir / source_id / "frames.json").read_text())["indices"]
        for j, t_idx in enumerate(json.loads((frames_dir / target_id / "frames.json").read_text())["indices"]):
            if t_idx not in tgt:
                continue
            s_idx = src_grid[j] if j < len(src_grid) and src_grid[j] in src else src_sorted[0]
            rows.append({"pair_id": name, "target_key": f"ffpp/{target_id}/{t_idx:04d}",
                         "source_key": f"ffpp/{source_id}/{s_idx:04d}", "target_path": str(tgt[t_idx]),
                         "source_path": str(src[s_idx]), "target_identity": -1, "source_identity": -1,
                         "frame_index": t_idx, "source_frame_index": s_idx})
    _remove_unused_frames(frames_dir, set(cache))
    pairs = _pairs_frame(rows)
    protocol = {
        "protocol": "ffpp",
        "videos": str(video_dir),
        "compression": compression,
        "pair_list": pair_source,
        "pair_convention": "XXX_YYY: target video XXX receives the face of source video YYY (DeepFakes convention)",
        "pairs_requested": len(names),
        "pairs_with_frames": int(pairs["pair_id"].nunique()),
        "frames_per_video": frames_per_video,
        "frame_rule": "step = ceil(n / frames_per_video), frames range(0, n, step)[:frames_per_video], from frame 0",
        "source_frame_rule": "the source video's j-th sampled frame for the target's j-th; the source's first "
                             "aligned sampled frame when that one has no face",
        "alignment": "dlib 68 landmarks, FFHQ recipe, largest face per frame",
        "swaps": int(len(pairs)),
        "triplets": "none: the paper's ID-mixing analysis (§4.4) uses CelebA-HQ",
    }
    return pairs, _triplets_frame([]), protocol, rejects


# ----------------------------------------------------------------------------------------------------- CelebA-HQ


def _index_of(path: Path) -> int | None:
    m = re.search(r"(\d+)$", path.stem)
    return int(m.group(1)) if m else None


def celebahq_images(root: str | Path) -> list[Path]:
    """Image files of a CelebA-HQ folder, in numeric order of their index (0.jpg .. 29999.jpg or 00000.png ..)."""
    from mfim.imageio import list_images

    root = Path(root) if root else None
    if root is None or not root.is_dir():
        raise MissingDatasetError(f"CelebA-HQ not found at {root or 'evalsets.celebahq.root (empty)'}. "
                                  f"{WHERE_TO_GET['celebahq']}")
    images = list_images(root)
    if len(images) < 3:
        raise MissingDatasetError(f"{root} holds {len(images)} images; CelebA-HQ has 30,000. {WHERE_TO_GET['celebahq']}")
    return sorted(images, key=lambda p: (_index_of(p) is None, _index_of(p) or 0, str(p)))


def build_celebahq(root: str | Path, pairs_per_target: int = 10, seed: int = 0, max_pairs: int = 0,
                   max_triplets: int = 0) -> tuple[pd.DataFrame, pd.DataFrame, dict]:
    images = celebahq_images(root)
    n = len(images)
    if pairs_per_target >= n:
        raise ValueError(f"pairs_per_target={pairs_per_target} needs more than {n} images")
    keys = [f"celebahq/{_index_of(p) if _index_of(p) is not None else i}" for i, p in enumerate(images)]
    rng = np.random.default_rng([seed, 0])
    full_pairs = n * pairs_per_target
    targets = np.arange(n)
    if 0 < max_pairs < full_pairs:
        targets = np.sort(rng.choice(n, max(1, max_pairs // pairs_per_target), replace=False))
    rows = []
    for t in targets:
        # distinct sources, none the target itself (CelebA-HQ has no identity labels: another image of the same
        # person can still be drawn, as in the MegaFS protocol)
        sources = rng.choice(n - 1, pairs_per_target, replace=False)
        sources = sources + (sources >= t)
        for s in sources:
            rows.append({"pair_id": f"{keys[t]}_{keys[s]}".replace("celebahq/", ""), "target_key": keys[t],
                         "source_key": keys[s], "target_path": str(images[t]), "source_path": str(images[s]),
                         "target_identity": -1, "source_identity": -1, "frame_index": -1,
                         "source_frame_index": -1})
    rng = np.random.default_rng([seed, 1])
    trip_targets = np.arange(n)
    if 0 < max_triplets < n:
        trip_targets = np.sort(rng.choice(n, max_triplets, replace=False))
    trows = []
    for t in trip_targets:
        g, lc = rng.choice(n - 1, 2, replace=False)
        g, lc = g + (g >= t), lc + (lc >= t)
        trows.append({"triplet_id": f"t{len(trows):06d}", "target_key": keys[t], "global_key": keys[g],
                      "local_key": keys[lc], "target_path": str(images[t]), "global_path": str(images[g]),
                      "local_path": str(images[lc]), "target_identity": -1, "global_identity": -1,
                      "local_identity": -1})
    pairs, triplets = _pairs_frame(rows), _triplets_frame(trows)
    protocol = {
        "protocol": "celebahq",
        "images": f"{n} images in {root}, used as distributed (CelebA-HQ's own alignment, not re-aligned)",
        "pairs": f"{len(pairs)}: each of {len(targets)} targets gets {pairs_per_target} distinct random sources other "
                 "than itself (MegaFS/MFIM: 30,000 × 10 = 300,000)",
        "pairs_subsampled": bool(len(targets) < n),
        "triplets": f"{len(triplets)}: one random global and one random local source per target (§4.4: 30,000)",
        "triplets_subsampled": bool(len(trip_targets) < n),
        "identities": "unknown (no identity labels): sources differ from the target image only",
        "seed": seed,
    }
    return pairs, triplets, protocol


# --------------------------------------------------------------------------------------------------------- output


def write_evalsets(out_dir: str | Path, pairs: pd.DataFrame, triplets: pd.DataFrame, protocol: dict) -> dict:
    from mfim.atomic import atomic_write

    out_dir = Path(out_dir)
    atomic_write(out_dir / "pairs.parquet", lambda f: pairs.to_parquet(f, index=False))
    atomic_write(out_dir / "triplets.parquet", lambda f: triplets.to_parquet(f, index=False))
    text = json.dumps(protocol, indent=1).encode()
    atomic_write(out_dir / "protocol.json", lambda f: f.write(text))
    return {"pairs": int(len(pairs)), "triplets": int(len(triplets)), "protocol": protocol["protocol"]}
