"""3DMM parameters of every shard sample, precomputed once and joined by key during training.

Table (``data/threedmm/params.parquet``), one row per sample: ``key``, ``split``, ``identity`` (-1 unknown),
``encoder`` (what made the estimate), ``shape``, ``exp`` (BFM: 40 / 10 coefficients; DECA's FLAME: 100 / 50), ``pose``
(3: yaw, pitch, roll in radians) -- the estimate -- and ``gt_shape``, ``gt_exp``, ``gt_pose`` beside it where the
synthetic ground truth (BFM) is known (null otherwise). Vectors are stored as float32 lists; a column's width is
whatever its 3DMM gives, the same on every row.

Precompute (:func:`run_precompute`). Samples are decoded in DataLoader worker processes (``workers``): chunk ``c`` of
``batch_size`` raw samples goes to worker ``c mod W`` and comes back in order, so the encoder sees the very batches
a one-process run gives. Each batch's rows are saved as a part (``<table stem>.parts/part-<split>-<n>.parquet``,
atomic) as soon as it is encoded; a rerun after a SIGKILL keeps the parts made under the same fingerprint (encoder,
its weights and code, batch size, the shard files) and continues with the next batch. The table is the parts
concatenated, written once at the end; then the parts are removed.

Beside the table, ``stats.json`` holds the per-coefficient mean and std of the estimate's shape and expression over
the training split (:func:`coefficient_stats`): DECA's FLAME codes are not standardised for a given data set, so
L_shape / L_exp standardise them with these (3DDFA_V2's BFM coefficients use 3DDFA_V2's own statistics).

:func:`group_errors` is the per-parameter-group comparison used for the precompute report and the fitted regressor's
validation: pose MAE in degrees (per angle and mean), shape/expression Pearson r (mean over coefficients, and over the
first ten, which carry most of the variance) and normalised RMSE (RMSE over the ground truth's own spread, pooled over
coefficients: 0 is exact, 1 is no better than predicting the mean).
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from mfim.data.shard_meta import shard_landmarks, stack_landmarks
from mfim.data.shards import CorruptSample, ShardSample, decode_sample, expand_shards, iter_samples, scan_members
from mfim.nets.face_crops import from_uint8
from mfim.nets.threedmm import encode as encode_3dmm
from mfim.nets.threedmm import read_stats  # noqa: F401  (the stats file's reader, beside its writer's module)
from mfim.nets.types import N_EXP, N_SHAPE, POSE_NAMES, ThreeDMMParams
from mfim.runtime import LoaderWorkerInit

log = logging.getLogger(__name__)

# BFM widths (3DDFA_V2, the fitted regressor, the synthetic ground truth); other 3DMMs keep their own (FLAME 100 / 50)
GROUPS = {"shape": N_SHAPE, "exp": N_EXP, "pose": 3}
COLUMN_SETS = {"estimate": ("shape", "exp", "pose"), "ground_truth": ("gt_shape", "gt_exp", "gt_pose")}


def _batches(samples: Iterable[ShardSample], size: int) -> Iterable[list[ShardSample]]:
    batch: list[ShardSample] = []
    for s in samples:
        batch.append(s)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def images_to_tensor(images: Sequence[np.ndarray] | np.ndarray) -> torch.Tensor:
    """N×H×W×3 uint8 -> N×3×H×W float32 in [-1, 1]."""
    return from_uint8(np.stack(images))


def batch_landmarks(batch: Sequence[ShardSample]) -> np.ndarray | None:
    """B×68×2 landmarks of the samples in their images' pixels (NaN rows where a shard has none), or None if none
    has any: an encoder that crops from landmarks (DECA) places its box with them, as in its own project."""
    return stack_landmarks([shard_landmarks(s.meta, s.image.shape[1]) for s in batch])


def precompute_threedmm(patterns: Sequence[str], encoder: Callable[[torch.Tensor], ThreeDMMParams],
                        encoder_name: str, batch_size: int = 64, device: str | torch.device = "cpu") -> pd.DataFrame:
    """Run ``encoder`` over every valid sample of the shards (corrupt ones are logged and left out), in this process."""
    frames = []
    for pattern in patterns:
        for batch in _batches(iter_samples(pattern), batch_size):
            x = images_to_tensor([s.image for s in batch]).to(device)
            with torch.no_grad():
                est = encode_3dmm(encoder, x, batch_landmarks(batch)).to("cpu")
            frames.append(_rows(batch, est, encoder_name))
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=TABLE_COLUMNS)


def _schema() -> pa.Schema:
    # variable-size lists: pyarrow mishandles null rows of fixed-size lists; lengths are checked on load
    vec = {name: pa.list_(pa.float32()) for name in GROUPS}
    return pa.schema([("key", pa.string()), ("split", pa.string()), ("identity", pa.int64()),
                      ("encoder", pa.string()),
                      *[(n, vec[n]) for n in GROUPS], *[(f"gt_{n}", vec[n]) for n in GROUPS]])


def write_table(df: pd.DataFrame, path: str | Path) -> Path:
    from mfim.atomic import atomic_write

    table = pa.Table.from_pandas(df, schema=_schema(), preserve_index=False)
    return atomic_write(path, lambda f: pq.write_table(table, f))


def read_table(path: str | Path) -> pd.DataFrame:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"3DMM table not found at {path} (made by the `threedmm` stage: `dvc repro threedmm`)")
    return pq.read_table(path).to_pandas()


def stack_column(df: pd.DataFrame, column: str, dim: int | None = None) -> np.ndarray:
    """A list column -> N×D float32. D is the rows' own width (every row must have the same), or ``dim`` when given
    (then checked). ValueError when a row is null or the widths disagree."""
    values = df[column].tolist()
    if any(v is None for v in values):
        raise ValueError(f"column {column!r} has null rows (no ground truth for real data?)")
    if not values:
        width = dim if dim is not None else GROUPS[column.removeprefix("gt_")]
        return np.zeros((0, width), np.float32)
    widths = {len(v) for v in values}
    if len(widths) > 1:
        raise ValueError(f"column {column!r} mixes rows of {sorted(widths)} values (two 3DMMs in one table?)")
    width = widths.pop()
    if column.removeprefix("gt_") == "pose" and width != 3:
        raise ValueError(f"column {column!r} holds {width} values per row, expected 3 (yaw, pitch, roll)")
    if dim is not None and width != dim:
        raise ValueError(f"column {column!r} holds {width} values per row, expected {dim}")
    return np.stack([np.asarray(v, np.float32) for v in values])


def has_ground_truth(df: pd.DataFrame) -> bool:
    return len(df) > 0 and all(df[f"gt_{n}"].notna().all() for n in GROUPS)


def load_threedmm_arrays(path: str | Path, columns: str = "estimate") -> dict:
    """{'key': [str], 'shape': N×S, 'exp': N×E, 'pose': N×3} from the table (``columns``: estimate | ground_truth);
    S / E are the table's 3DMM widths (BFM 40 / 10, FLAME 100 / 50)."""
    if columns not in COLUMN_SETS:
        raise ValueError(f"columns must be one of {sorted(COLUMN_SETS)}")
    df = read_table(path)
    out: dict = {"key": df["key"].tolist()}
    for name, column in zip(GROUPS, COLUMN_SETS[columns]):
        out[name] = stack_column(df, column)
    return out


def pearson_per_column(pred: np.ndarray, gt: np.ndarray) -> np.ndarray:
    p = pred - pred.mean(0)
    g = gt - gt.mean(0)
    denom = np.sqrt((p**2).sum(0) * (g**2).sum(0))
    with np.errstate(invalid="ignore", divide="ignore"):
        r = (p * g).sum(0) / denom
    return r[np.isfinite(r)]


def group_errors(pred: dict, gt: dict) -> dict:
    """Per-group error of ``pred`` vs ``gt`` (dicts with 'shape', 'exp', 'pose' arrays N×D). A shape / expression
    group whose widths differ (DECA's FLAME estimate against BFM ground truth) holds a ``not_comparable`` note
    instead: coefficients of two different 3DMMs do not correspond one to one."""
    out: dict = {"n": int(len(gt["pose"]))}
    dp = np.degrees(np.abs(np.asarray(pred["pose"], np.float64) - np.asarray(gt["pose"], np.float64)))
    out["pose"] = {f"{name}_mae_deg": float(dp[:, i].mean()) for i, name in enumerate(POSE_NAMES)}
    out["pose"]["mae_deg"] = float(dp.mean())
    for name in ("shape", "exp"):
        p, g = np.asarray(pred[name], np.float64), np.asarray(gt[name], np.float64)
        if p.shape[1:] != g.shape[1:]:
            out[name] = {"not_comparable": f"{p.shape[1]} estimated vs {g.shape[1]} ground-truth coefficients "
                                           "(different 3DMMs)"}
            continue
        spread = ((g - g.mean(0)) ** 2).sum()
        r = pearson_per_column(p, g)
        # BFM coefficients are ordered by variance: the first ten carry what a 64 px face shows, the rest are
        # nearly invisible and pull the all-coefficient mean towards 0
        r_top = pearson_per_column(p[:, :10], g[:, :10])
        out[name] = {
            "pearson_r": float(r.mean()) if len(r) else float("nan"),
            "pearson_r_first10": float(r_top.mean()) if len(r_top) else float("nan"),
            "nrmse": float(np.sqrt(((p - g) ** 2).sum() / spread)) if spread > 0 else float("nan"),
            "rmse": float(np.sqrt(((p - g) ** 2).mean())),
        }
    return out


def error_metrics(err: dict) -> dict[str, float]:
    """The headline numbers of a :func:`group_errors` result, for MLflow; groups that are not comparable (FLAME vs
    BFM) are left out."""
    out = {"pose_mae_deg": float(err["pose"]["mae_deg"])}
    for name in ("shape", "exp"):
        for k in ("pearson_r", "nrmse"):
            if k in err.get(name, {}):
                out[f"{name}_{k}"] = float(err[name][k])
    return out


def error_summary(err: dict | None) -> str:
    if not err:
        return "no ground truth"
    parts = [f"pose MAE {err['pose']['mae_deg']:.2f}°"]
    for name in ("shape", "exp"):
        g = err.get(name, {})
        parts.append(f"{name} r {g['pearson_r']:.3f}" if "pearson_r" in g else f"{name} not comparable")
    return ", ".join(parts)


def table_report(df: pd.DataFrame, encoder_name: str, seconds: float) -> dict:
    """Counts and, where ground truth exists, the estimate's error per split and overall."""
    report: dict = {"encoder": encoder_name, "rows": int(len(df)),
                    "rows_per_split": {k: int(v) for k, v in df["split"].value_counts().items()},
                    "seconds": round(seconds, 2)}
    if not has_ground_truth(df):
        report["error"] = None
        report["note"] = "no ground truth in the shards (real data): nothing to compare the estimate with"
        return report
    if encoder_name == "deca":
        report["note"] = "DECA gives FLAME coefficients: shape/exp are not comparable with BFM ground truth; pose is"

    def errors(part: pd.DataFrame) -> dict:
        return group_errors({n: stack_column(part, n) for n in GROUPS},
                            {n: stack_column(part, f"gt_{n}") for n in GROUPS})

    report["error"] = {"all": errors(df), **{s: errors(p) for s, p in df.groupby("split")}}
    return report


STATS_NAME = "stats.json"
# A coefficient that barely varies over the training set would be divided by ~0, and noise in it would then dominate
# the loss; floor each std at this fraction of the median std (it then weighs at most 1/floor as much as a typical
# coefficient would).
STD_FLOOR = 1e-2


def coefficient_stats(df: pd.DataFrame, split: str = "train") -> dict:
    """Mean / std per shape and expression coefficient of the estimate over ``split`` (all rows if it has none).

    Read from the list columns directly, whatever their width (FLAME: 100 / 50, BFM: 40 / 10)."""
    has_split = bool((df["split"] == split).any())
    part = df[df["split"] == split] if has_split else df
    stats: dict = {"encoder": str(df["encoder"].iloc[0]) if len(df) else "",
                   "split": split if has_split else "all", "rows": int(len(part))}
    for name in ("shape", "exp"):
        values = np.stack([np.asarray(v, np.float64) for v in part[name]]) if len(part) else np.zeros((0, 0))
        std = values.std(axis=0) if len(values) > 1 else np.ones(values.shape[1:])
        floor = STD_FLOOR * float(np.median(std)) if std.size else 0.0
        stats[f"{name}_mean"] = values.mean(axis=0).tolist() if len(values) else []
        stats[f"{name}_std"] = np.maximum(std, max(floor, 1e-12)).tolist()
    return stats


def write_stats(stats: dict, path: str | Path) -> Path:
    from mfim.atomic import atomic_write

    return atomic_write(path, lambda f: f.write(json.dumps(stats, indent=1).encode()))


# ------------------------------------------------------------------------------------- parallel, resumable precompute

TABLE_COLUMNS = ["key", "split", "identity", "encoder", "shape", "exp", "pose", "gt_shape", "gt_exp", "gt_pose"]


def _rows(batch: list[ShardSample], est: ThreeDMMParams, encoder_name: str) -> pd.DataFrame:
    rows = []
    for i, s in enumerate(batch):
        gt = s.meta.get("ground_truth") or {}
        ident = s.meta.get("identity")
        rows.append({
            "key": s.key,
            "split": s.meta.get("split", ""),
            "identity": int(ident) if isinstance(ident, int) else -1,
            "encoder": encoder_name,
            "shape": est.shape[i].numpy().astype(np.float32),
            "exp": est.exp[i].numpy().astype(np.float32),
            "pose": est.pose[i].numpy().astype(np.float32),
            "gt_shape": np.asarray(gt["shape"], np.float32) if "shape" in gt else None,
            "gt_exp": np.asarray(gt["exp"], np.float32) if "exp" in gt else None,
            "gt_pose": np.asarray(gt["pose"], np.float32) if "pose" in gt else None,
        })
    return pd.DataFrame(rows, columns=TABLE_COLUMNS)


def raw_samples(pattern: str | Sequence[str]) -> list[tuple[str, dict, str]]:
    """(key, {ext: (shard, offset, size)}, shard) of every sample, from the tar headers only (nothing decoded),
    grouped by webdataset's ``group_by_keys`` exactly as :func:`mfim.data.shards.iter_samples` groups them."""
    import webdataset as wds

    def members():
        for path in expand_shards(pattern):
            for name, offset, size in scan_members(path):
                yield {"fname": name, "data": (path, offset, size), "__url__": path}
            yield {}

    def handler(exn: Exception) -> bool:
        log.warning("skipping shard members: %s", str(exn)[:300])
        return True

    out = []
    for raw in wds.tariterators.group_by_keys(members(), handler=handler):
        out.append((raw.get("__key__", ""), {k: v for k, v in raw.items() if not k.startswith("__")}, raw["__url__"]))
    return out


def _decode_raw(key: str, where: dict, url: str) -> ShardSample | None:
    members = {}
    for ext, (path, offset, size) in where.items():
        with open(path, "rb") as f:
            f.seek(offset)
            members[ext] = f.read(size)
    try:
        return decode_sample(key, members)
    except CorruptSample as e:
        log.warning("skipping corrupt shard sample %r in %s: %s", key, url, e)
        return None


class _ChunkDecoder(torch.utils.data.IterableDataset):
    """Worker ``w`` of ``W`` decodes chunks ``w, w + W, ...`` (``size`` raw samples each) and yields each as the list
    of its valid samples; the DataLoader returns chunks in index order. Samples named in ``skip`` (done by an
    earlier run) are not decoded."""

    def __init__(self, raw: list, size: int, skip: set[str]):
        self.raw, self.size, self.skip = raw, size, skip

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        for start in range(worker * self.size, len(self.raw), workers * self.size):
            chunk = [_decode_raw(*r) for r in self.raw[start : start + self.size] if r[0] not in self.skip]
            yield [s for s in chunk if s is not None]


def _decoded_chunks(raw: list, size: int, skip: set[str], workers: int) -> Iterable[list[ShardSample]]:
    dataset = _ChunkDecoder(raw, size, skip)
    if workers <= 0:
        return iter(dataset)
    return torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=workers, collate_fn=_as_is,
                                       worker_init_fn=LoaderWorkerInit(), prefetch_factor=4)


def _as_is(chunk):
    return chunk


class _Parts:
    """The saved batches of one precompute (a folder of parquet parts and the fingerprint they were made under)."""

    def __init__(self, folder: Path, fingerprint: str):
        self.folder = folder
        stamp = folder / "fingerprint.txt"
        if folder.is_dir() and (not stamp.is_file() or stamp.read_text() != fingerprint):
            import shutil

            log.warning("threedmm: saved batches in %s were made under other settings or shards; starting over", folder)
            shutil.rmtree(folder)
        if not stamp.is_file():
            from mfim.atomic import atomic_write

            atomic_write(stamp, lambda f: f.write(fingerprint.encode()))

    def path(self, split_no: int, batch_no: int) -> Path:
        return self.folder / f"part-{split_no:02d}-{batch_no:06d}.parquet"

    def done(self, split_no: int) -> list[pd.DataFrame]:
        """The saved batches of pattern ``split_no``, in order (a prefix: batches are saved in order)."""
        frames = []
        while self.path(split_no, len(frames)).is_file():
            frames.append(pq.read_table(self.path(split_no, len(frames))).to_pandas())
        return frames

    def save(self, split_no: int, batch_no: int, df: pd.DataFrame) -> None:
        from mfim.atomic import atomic_write

        table = pa.Table.from_pandas(df, schema=_schema(), preserve_index=False)
        atomic_write(self.path(split_no, batch_no), lambda f: pq.write_table(table, f))


def precompute_resumable(patterns: Sequence[str], encoder, encoder_name: str, parts: _Parts, batch_size: int = 64,
                         device="cpu", workers: int = 0) -> pd.DataFrame:
    """:func:`precompute_threedmm` with decoding in ``workers`` processes and every batch saved to ``parts``."""
    frames: list[pd.DataFrame] = []
    for split_no, pattern in enumerate(patterns):
        done = parts.done(split_no)
        frames += done
        skip = {k for df in done for k in df["key"]}
        batch_no, batch = len(done), []

        def encode(batch_no: int, batch: list[ShardSample]) -> None:
            x = images_to_tensor([s.image for s in batch]).to(device)
            with torch.no_grad():
                est = encode_3dmm(encoder, x, batch_landmarks(batch)).to("cpu")
            df = _rows(batch, est, encoder_name)
            parts.save(split_no, batch_no, df)
            frames.append(df)

        for chunk in _decoded_chunks(raw_samples(pattern), batch_size, skip, workers):
            for sample in chunk:
                batch.append(sample)
                if len(batch) == batch_size:
                    encode(batch_no, batch)
                    batch_no, batch = batch_no + 1, []
        if batch:
            encode(batch_no, batch)
    if not frames:
        return pd.DataFrame(columns=TABLE_COLUMNS)
    return pd.concat(frames, ignore_index=True)


def code_fingerprint() -> dict:
    """sha256 of the code that turns a shard image into a table row (this module, the 3DMM networks)."""
    from mfim.data.progress import sha256_of

    package = Path(__file__).resolve().parent.parent
    files = [Path(__file__).resolve(), *sorted((package / "nets").rglob("*.py"))]
    return {str(p.relative_to(package)): sha256_of(p) for p in files}


def run_precompute(patterns: Sequence[str], encoder, encoder_name: str, out_path: str | Path,
                   batch_size: int = 64, device="cpu", workers: int = 0, settings: dict | None = None) -> dict:
    """The table and stats.json at ``out_path``; resumable (see the module docstring). ``settings``: everything
    else that shapes an estimate (the encoder's weights, params) -- it joins the fingerprint of the saved batches."""
    import shutil

    from mfim.data.progress import fingerprint

    t0 = time.time()
    out_path = Path(out_path)
    shards = [p for pattern in patterns for p in expand_shards(pattern)]
    fp = fingerprint({"encoder": encoder_name, "batch_size": int(batch_size), "settings": settings or {},
                      "code": code_fingerprint(), "patterns": [str(p) for p in patterns],
                      "shards": [(p, os.stat(p).st_size, os.stat(p).st_mtime_ns) for p in shards]})
    parts = _Parts(out_path.with_name(out_path.stem + ".parts"), fp)
    df = precompute_resumable(patterns, encoder, encoder_name, parts, batch_size, device, workers)
    if df["key"].duplicated().any():
        raise ValueError("duplicate sample keys across shards")
    write_table(df, out_path)
    if len(df):
        write_stats(coefficient_stats(df), out_path.with_name(STATS_NAME))
    shutil.rmtree(parts.folder, ignore_errors=True)
    return table_report(df, encoder_name, time.time() - t0)
