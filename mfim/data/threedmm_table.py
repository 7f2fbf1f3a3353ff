"""3DMM parameters of every shard sample, precomputed once and joined by key during training.

Table (``data/threedmm/params.parquet``), one row per sample: ``key``, ``split``, ``identity`` (-1 unknown),
``encoder`` (what made the estimate), ``shape``, ``exp`` (BFM: 40 / 10 coefficients; DECA's FLAME: 100 / 50), ``pose``
(3: yaw, pitch, roll in radians) -- the estimate -- and ``gt_shape``, ``gt_exp``, ``gt_pose`` beside it where the
synthetic ground truth (BFM) is known (null otherwise). Vectors are stored as float32 lists; a column's width is
whatever its 3DMM gives, the same on every row.

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
import time
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from mfim.data.pairs import shard_landmarks
from mfim.data.shards import ShardSample, iter_samples
from mfim.nets.threedmm import encode
from mfim.nets.types import N_EXP, N_SHAPE, POSE_NAMES, ThreeDMMParams

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
    arr = torch.from_numpy(np.ascontiguousarray(np.stack(images)))
    return arr.permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def batch_landmarks(batch: Sequence[ShardSample]) -> np.ndarray | None:
    """B×68×2 landmarks of the samples in their images' pixels (NaN rows where a shard has none), or None if none
    has any: an encoder that crops from landmarks (DECA) places its box with them, as in its own project."""
    rows = [shard_landmarks(s.meta, s.image.shape[1]) for s in batch]
    if all(r is None for r in rows):
        return None
    return np.stack([np.full((68, 2), np.nan, np.float32) if r is None else r for r in rows])


def precompute_threedmm(patterns: Sequence[str], encoder: Callable[[torch.Tensor], ThreeDMMParams],
                        encoder_name: str, batch_size: int = 64, device: str | torch.device = "cpu") -> pd.DataFrame:
    """Run ``encoder`` over every valid sample of the shards (corrupt ones are logged and left out)."""
    rows: list[dict] = []
    for pattern in patterns:
        for batch in _batches(iter_samples(pattern), batch_size):
            x = images_to_tensor([s.image for s in batch]).to(device)
            with torch.no_grad():
                est = encode(encoder, x, batch_landmarks(batch)).to("cpu")
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
    return pd.DataFrame(rows, columns=["key", "split", "identity", "encoder", "shape", "exp", "pose",
                                       "gt_shape", "gt_exp", "gt_pose"])


def _schema() -> pa.Schema:
    # variable-size lists: pyarrow mishandles null rows of fixed-size lists; lengths are checked on load
    vec = {name: pa.list_(pa.float32()) for name in GROUPS}
    return pa.schema([("key", pa.string()), ("split", pa.string()), ("identity", pa.int64()),
                      ("encoder", pa.string()),
                      *[(n, vec[n]) for n in GROUPS], *[(f"gt_{n}", vec[n]) for n in GROUPS]])


def write_table(df: pd.DataFrame, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    table = pa.Table.from_pandas(df, schema=_schema(), preserve_index=False)
    pq.write_table(table, path)
    return path


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


def read_stats(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"3DMM coefficient statistics not found at {path} (written beside the table by the "
                                "`threedmm` stage: `dvc repro threedmm`)")
    return json.loads(path.read_text())


def run_precompute(patterns: Sequence[str], encoder, encoder_name: str, out_path: str | Path,
                   batch_size: int = 64, device="cpu") -> dict:
    t0 = time.time()
    df = precompute_threedmm(patterns, encoder, encoder_name, batch_size, device)
    if df["key"].duplicated().any():
        raise ValueError("duplicate sample keys across shards")
    write_table(df, out_path)
    if len(df):
        write_stats(coefficient_stats(df), Path(out_path).with_name(STATS_NAME))
    return table_report(df, encoder_name, time.time() - t0)
