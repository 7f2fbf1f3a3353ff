"""Align every photo in a folder (the `align` stage and `mfim align`): FFHQ crops, a landmark/transform table, rejects.

One face per image: the largest, with a note when there were several. Bad input never stops the run; each file that
cannot be used gets a reason in the rejects table (file, reason). Runs in worker processes with a progress bar and
resumes: outputs already written by a run with the same settings are skipped.

Outputs (paths configurable; defaults inside ``out_dir``):
* ``out_dir/<relative path>.png`` -- the aligned crop, with an mfim provenance record (kind 'processed', or the
  input's own record when it was already 'synthetic') plus ``source_file``;
* the sidecar table (parquet): key, file, output, width, height, n_faces, rotation, box, score, landmarks (136 floats,
  aligned pixels), source_landmarks (136 floats, original pixels), transform (2×3 original -> aligned, row-major),
  size, padded, note;
* the rejects table (csv + parquet beside it): file, reason;
* optionally a JSON report; when the input is the synthetic set (``ground_truth.parquet`` beside the image folder),
  it includes the landmark error against the ground truth.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd

log = logging.getLogger(__name__)

TABLE_COLUMNS = [
    "key",
    "file",
    "output",
    "width",
    "height",
    "n_faces",
    "rotation",
    "box",
    "score",
    "landmarks",
    "source_landmarks",
    "transform",
    "size",
    "padded",
    "note",
]
REJECT_COLUMNS = ["file", "reason"]
_CONFIG_META_KEY = b"mfim_align_config"


@dataclass(frozen=True)
class AlignConfig:
    """Everything that changes an aligned output; a resumed run only reuses outputs made with the same values."""

    size: int = 256
    detector: str = "hog"
    upsample: int = 1
    transform_size: int = 1024
    enable_padding: bool = True
    try_rotations: bool = True
    max_detect_side: int = 1024


# --- one file (runs in a worker process) ----------------------------------------------------------------------------

_WORKER: dict = {}


def _init_worker(config: AlignConfig, out_dir: str) -> None:
    import cv2

    from mfim.nets.landmarks import DlibFaceLandmarker

    cv2.setNumThreads(1)  # parallelism comes from the worker processes
    _WORKER["landmarker"] = DlibFaceLandmarker(
        config.detector, config.upsample, max_side=config.max_detect_side, try_rotations=config.try_rotations
    )
    _WORKER["config"] = config
    _WORKER["out_dir"] = Path(out_dir)


def _output_record(path: Path, rel: str) -> dict:
    """Provenance for the aligned crop: the input's own record when it is synthetic, else 'processed'."""
    from mfim.provenance import provenance_record, read_record

    try:
        source = read_record(path)
    except Exception:  # unreadable metadata is not a reason to drop a readable image
        source = None
    if source and source.get("kind") == "synthetic":
        return {**source, "source_file": rel}
    return provenance_record("processed", source_file=rel)


def _process(task: tuple[str, str, str]) -> dict:
    """Align one image; returns {'ok': True, 'row': ...} or {'ok': False, 'file': ..., 'reason': ...}."""
    path, rel, out_rel = task
    try:
        return _process_unsafe(Path(path), rel, out_rel)
    except MemoryError:
        return {"ok": False, "file": rel, "reason": "out of memory while processing"}
    except Exception as e:  # one bad file must not end the run; its reason goes to the rejects table
        first_line = str(e).splitlines()[0] if str(e) else ""
        return {"ok": False, "file": rel, "reason": f"error: {type(e).__name__}: {first_line}"}


def _process_unsafe(path: Path, rel: str, out_rel: str) -> dict:
    from mfim.imageio import ImageRejected, read_rgb
    from mfim.nets.align import align_face
    from mfim.provenance import save_image

    config: AlignConfig = _WORKER["config"]
    try:
        img = read_rgb(path)
    except ImageRejected as e:
        return {"ok": False, "file": rel, "reason": str(e)}
    faces = _WORKER["landmarker"].detect(img)
    if not faces:
        tried = " (also tried 90/180/270° rotations)" if config.try_rotations else ""
        return {"ok": False, "file": rel, "reason": f"no face found{tried}"}
    face = faces[0]
    note = ""
    if len(faces) > 1:
        areas = ", ".join(f"{f.area:.0f}" for f in faces[:5])
        note = f"{len(faces)} faces found; kept the largest (box areas px²: {areas})"
    if face.rotation:
        turned = f"face found after rotating the image {face.rotation}° counter-clockwise"
        note = f"{note}; {turned}" if note else turned
    aligned = align_face(img, face.landmarks, config.size, config.transform_size, config.enable_padding)
    # Aligned crops are training/evaluation inputs: they keep the input's provenance record (synthetic for the
    # renders) but get no watermark of their own -- a pattern in every training image would be learned by the
    # generator. Generated outputs (swaps, samples, CLI results) carry the watermark.
    save_image(_WORKER["out_dir"] / out_rel, aligned.image, _output_record(path, rel), watermark=False)
    h, w = img.shape[:2]
    row = {
        "key": str(Path(rel).with_suffix("").as_posix()),
        "file": rel,
        "output": out_rel,
        "width": w,
        "height": h,
        "n_faces": len(faces),
        "rotation": int(face.rotation),
        "box": [float(v) for v in face.box],
        "score": float(face.score),
        "landmarks": aligned.landmarks.reshape(-1).astype(np.float32).tolist(),
        "source_landmarks": face.landmarks.reshape(-1).astype(np.float32).tolist(),
        "transform": aligned.transform.to_list(),
        "size": int(config.size),
        "padded": bool(aligned.padded),
        "note": note,
    }
    return {"ok": True, "row": row}


# --- tables -----------------------------------------------------------------------------------------------------------


def default_paths(out_dir: str | Path) -> tuple[Path, Path]:
    """(table, rejects csv) when the caller names none: both inside the output folder."""
    out_dir = Path(out_dir)
    return out_dir / "aligned.parquet", out_dir / "rejects.csv"


def _write_atomic_parquet(df: pd.DataFrame, path: Path, config: AlignConfig | None) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.Table.from_pandas(df, preserve_index=False)
    if config is not None:
        meta = dict(table.schema.metadata or {})
        meta[_CONFIG_META_KEY] = json.dumps(asdict(config), sort_keys=True).encode()
        table = table.replace_schema_metadata(meta)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    pq.write_table(table, tmp)
    os.replace(tmp, path)


def _write_tables(rows: list[dict], rejects: list[dict], table_path: Path, rejects_path: Path, config) -> None:
    df = pd.DataFrame(rows, columns=TABLE_COLUMNS).sort_values("file", kind="stable").reset_index(drop=True)
    _write_atomic_parquet(df, table_path, config)
    rj = pd.DataFrame(rejects, columns=REJECT_COLUMNS).sort_values("file", kind="stable").reset_index(drop=True)
    _write_atomic_parquet(rj, rejects_path.with_suffix(".parquet"), config)
    tmp = rejects_path.with_name(rejects_path.name + ".tmp")
    rj.to_csv(tmp, index=False)
    os.replace(tmp, rejects_path)


def _read_previous(table_path: Path, rejects_path: Path, config: AlignConfig) -> tuple[dict, dict]:
    """Rows and rejects of an earlier run with the same config, keyed by file ({} when none or config differs)."""
    import pyarrow.parquet as pq

    if not table_path.is_file():
        return {}, {}
    try:
        meta = pq.read_schema(table_path).metadata or {}
        previous = json.loads(meta.get(_CONFIG_META_KEY, b"{}"))
        if previous != asdict(config):
            log.warning("align: settings changed since the last run in this folder; re-aligning everything")
            return {}, {}
        rows = {r["file"]: r for r in pd.read_parquet(table_path).to_dict("records")}
        rejects = {}
        rj_parquet = rejects_path.with_suffix(".parquet")
        if rj_parquet.is_file():
            rejects = {r["file"]: r for r in pd.read_parquet(rj_parquet).to_dict("records")}
    except Exception as e:  # a damaged table only costs a full re-run
        log.warning("align: could not read the previous table (%s); re-aligning everything", e)
        return {}, {}
    for r in rows.values():  # parquet gives numpy arrays back; keep plain lists like fresh rows
        for k in ("box", "landmarks", "source_landmarks", "transform"):
            r[k] = [float(v) for v in r[k]]
    return rows, rejects


# --- ground truth (synthetic set) -------------------------------------------------------------------------------------


def find_ground_truth(in_dir: str | Path) -> Path | None:
    """``ground_truth.parquet`` beside the image folder (the synthetic set's layout), or None."""
    p = Path(in_dir).resolve().parent / "ground_truth.parquet"
    return p if p.is_file() else None


def landmark_error_report(rows: list[dict], ground_truth: pd.DataFrame, input_keys: list[str] | None = None) -> dict:
    """Detected vs ground-truth landmarks in the original images.

    Ground-truth rows are matched to aligned rows by key (relative path without suffix) or, failing that, by file
    stem. NME: mean point-to-point distance divided by the inter-ocular distance (outer eye corners 36 and 45, the
    300-W convention), per image, summarised over images. Also on the 51 inner points (no jaw line, whose 2D
    annotation convention differs most from projected 3D model points) and on the five points that drive the crop.
    detection_rate: matched images / ground-truth images present in the input (input_keys; default: all of them).
    """
    from mfim.nets.align import five_points

    truth_by_key = {
        str(k): np.asarray(v, dtype=np.float64).reshape(68, 2)
        for k, v in zip(ground_truth["key"], ground_truth["landmarks"])
    }
    key_by_stem = {Path(k).name: k for k in truth_by_key}

    def gt_key(key: str) -> str | None:
        if key in truth_by_key:
            return key
        return key_by_stem.get(Path(key).name)

    present = set(truth_by_key) if input_keys is None else {gt_key(k) for k in input_keys} - {None}
    nme, nme_inner, nme_five = [], [], []
    for r in rows:
        k = gt_key(r["key"])
        if k is None or k not in present:
            continue
        truth = truth_by_key[k]
        found = np.asarray(r["source_landmarks"], dtype=np.float64).reshape(68, 2)
        iod = np.linalg.norm(truth[45] - truth[36])
        d = np.linalg.norm(found - truth, axis=1) / iod
        nme.append(d.mean())
        nme_inner.append(d[17:].mean())
        nme_five.append((np.linalg.norm(five_points(found) - five_points(truth), axis=1) / iod).mean())

    def stats(values):
        a = np.asarray(values, dtype=np.float64)
        if not len(a):
            return None
        return {"mean": float(a.mean()), "median": float(np.median(a)), "p90": float(np.percentile(a, 90))}

    return {
        "n_ground_truth_images": len(present),
        "n_matched": len(nme),
        "detection_rate": float(len(nme) / len(present)) if present else None,
        "nme_iod": stats(nme),
        "nme_iod_inner51": stats(nme_inner),
        "nme_iod_five_points": stats(nme_five),
        "normalisation": "inter-ocular distance (outer eye corners 36-45) of the ground truth",
    }


# --- the folder run ---------------------------------------------------------------------------------------------------


def align_folder(
    in_dir: str | Path,
    out_dir: str | Path,
    size: int = 256,
    detector: str = "hog",
    workers: int = 2,
    *,
    upsample: int = 1,
    transform_size: int = 1024,
    enable_padding: bool = True,
    try_rotations: bool = True,
    max_detect_side: int = 1024,
    table_path: str | Path | None = None,
    rejects_path: str | Path | None = None,
    report_path: str | Path | None = None,
    ground_truth: str | Path | None | bool = True,
    resume: bool = True,
    retry_rejects: bool = False,
    progress: bool = True,
    checkpoint_every: int = 200,
) -> dict:
    """Align every image under in_dir into out_dir (mirrored relative paths, .png). Returns a summary dict.

    ground_truth: True looks for ``ground_truth.parquet`` beside in_dir; a path uses that table; False/None skips
    the landmark-error report. resume: skip files aligned (or rejected, unless retry_rejects) by an earlier run with
    the same settings whose output still exists.
    """
    from tqdm import tqdm

    from mfim.imageio import IMAGE_SUFFIXES

    t0 = time.time()
    in_dir, out_dir = Path(in_dir), Path(out_dir)
    if not in_dir.is_dir():
        raise FileNotFoundError(f"input folder not found: {in_dir}")
    default_table, default_rejects = default_paths(out_dir)
    table_path = Path(table_path) if table_path else default_table
    rejects_path = Path(rejects_path) if rejects_path else default_rejects
    config = AlignConfig(
        int(size), detector, int(upsample), int(transform_size), bool(enable_padding), bool(try_rotations),
        int(max_detect_side),
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    out_resolved = out_dir.resolve()

    # Every file under in_dir is considered: an unknown extension is a reject with a reason, not silently skipped.
    files = []
    for p in sorted(in_dir.rglob("*")):
        if not p.is_file() or p.name.startswith("."):
            continue
        if out_resolved in p.resolve().parents:  # an output folder inside the input folder
            continue
        files.append(p)
    rejects: dict[str, dict] = {}
    tasks, outputs_seen = [], {}
    for p in files:
        rel = p.relative_to(in_dir).as_posix()
        if p.suffix.lower() not in IMAGE_SUFFIXES:
            if p.suffix.lower() in (".parquet", ".csv", ".json", ".txt", ".md", ".yaml", ".yml"):
                continue  # tables and notes that live beside images are not inputs
            rejects[rel] = {"file": rel, "reason": f"not an image file type ({p.suffix or 'no extension'})"}
            continue
        out_rel = Path(rel).with_suffix(".png").as_posix()
        if out_rel in outputs_seen:
            rejects[rel] = {"file": rel, "reason": f"output name {out_rel} already used by {outputs_seen[out_rel]}"}
            continue
        outputs_seen[out_rel] = rel
        tasks.append((str(p), rel, out_rel))

    previous_rows, previous_rejects = _read_previous(table_path, rejects_path, config) if resume else ({}, {})
    rows: dict[str, dict] = {}
    todo = []
    for path, rel, out_rel in tasks:
        if rel in previous_rows and (out_dir / out_rel).is_file():
            rows[rel] = previous_rows[rel]
        elif rel in previous_rejects and not retry_rejects:
            rejects[rel] = previous_rejects[rel]
        else:
            todo.append((path, rel, out_rel))
    n_skipped = len(rows) + sum(1 for t in tasks if t[1] in rejects)
    log.info("align: %d files, %d to do, %d done by an earlier run", len(files), len(todo), n_skipped)

    def consume(results):
        last = time.time()
        bar = tqdm(total=len(todo), desc="align", unit="img", disable=not progress or not todo, smoothing=0.05)
        for done, res in enumerate(results, 1):
            if res["ok"]:
                rows[res["row"]["file"]] = res["row"]
                if res["row"]["note"]:
                    log.info("align: %s: %s", res["row"]["file"], res["row"]["note"])
            else:
                rejects[res["file"]] = {"file": res["file"], "reason": res["reason"]}
                log.info("align: rejected %s: %s", res["file"], res["reason"])
            bar.update(1)
            # Periodic tables make an interrupted run resumable without redoing finished files.
            if done % checkpoint_every == 0 or time.time() - last > 120:
                _write_tables(list(rows.values()), list(rejects.values()), table_path, rejects_path, config)
                last = time.time()
        bar.close()

    workers = max(1, int(workers))
    if workers == 1 or len(todo) <= 2:
        _init_worker(config, str(out_dir))
        consume(map(_process, todo))
    else:
        import multiprocessing as mp

        # spawn: dlib objects are not fork-safe to share, and the parent may hold torch/MLflow threads.
        ctx = mp.get_context("spawn")
        with ctx.Pool(workers, initializer=_init_worker, initargs=(config, str(out_dir))) as pool:
            consume(pool.imap_unordered(_process, todo, chunksize=4))

    _write_tables(list(rows.values()), list(rejects.values()), table_path, rejects_path, config)

    reasons: dict[str, int] = {}
    for r in rejects.values():
        category = r["reason"].split(" (")[0]
        reasons[category] = reasons.get(category, 0) + 1
    row_list = list(rows.values())
    summary = {
        "input_dir": str(in_dir),
        "output_dir": str(out_dir),
        "table": str(table_path),
        "rejects": str(rejects_path),
        "config": asdict(config),
        "n_files": len(files),
        "n_aligned": len(rows),
        "n_rejected": len(rejects),
        "n_skipped_resume": int(n_skipped),
        "n_processed": len(todo),
        "n_multi_face": sum(1 for r in row_list if r["n_faces"] > 1),
        "n_rotated": sum(1 for r in row_list if r["rotation"]),
        "n_padded": sum(1 for r in row_list if r["padded"]),
        "reject_reasons": dict(sorted(reasons.items())),
        "seconds": round(time.time() - t0, 2),
    }
    gt_path = find_ground_truth(in_dir) if ground_truth is True else (Path(ground_truth) if ground_truth else None)
    if gt_path is not None and gt_path.is_file():
        gt = pd.read_parquet(gt_path, columns=["key", "landmarks"])
        input_keys = [Path(t[1]).with_suffix("").as_posix() for t in tasks]
        summary["ground_truth"] = {"table": str(gt_path), **landmark_error_report(row_list, gt, input_keys)}
    if report_path:
        report_path = Path(report_path)
        report_path.parent.mkdir(parents=True, exist_ok=True)
        report_path.write_text(json.dumps(summary, indent=2) + "\n")
    return summary
