"""Align every photo in a folder (the `align` stage and `mfim align`): FFHQ crops, a landmark/transform table, rejects.

One face per image: the largest, with a note when there were several. Bad input never stops the run; each file that
cannot be used gets a reason in the rejects table (file, reason). Runs in worker processes (``workers``: a number or
``auto``, the usable cores) with a progress bar, and resumes from a journal (see below).

Progress. Each finished file appends one line to ``<table>.journal.jsonl`` beside the table (mfim.data.progress): the
row or the reject reason, the source's size / mtime / sha256 and a fingerprint of the settings and of the code and
landmark model that shape a crop. The tables are written once, at the end (O(n); rewriting them every few hundred
files was O(n²)). A rerun -- after a SIGKILL at any point, or with files added -- keeps a journal entry only when its
source file, settings and code are unchanged and (for a row) its crop still exists; everything else is redone, and
crops whose source left the folder or is now rejected are removed. So an interrupted run followed by a rerun gives
the same crops and tables as one uninterrupted run.

Outputs (paths configurable; defaults inside ``out_dir``):
* ``out_dir/<relative path>.png`` -- the aligned crop, with an mfim provenance record (kind 'processed', or the
  input's own record when it was already 'synthetic') plus ``source_file``;
* the sidecar table (parquet): key, file, output, width, height, n_faces, rotation, box, score, landmarks (136 floats,
  aligned pixels), source_landmarks (136 floats, original pixels), transform (2×3 original -> aligned, row-major),
  size, padded, note;
* the rejects table (csv + parquet beside it): file, reason;
* optionally a JSON report; when the input is the synthetic set (``ground_truth.parquet`` beside the image folder),
  it includes the landmark error against the ground truth.

Every entry under in_dir ends as an aligned row or a reject (mfim.scan: unknown types, broken links, link loops);
multi-frame images (animated GIF) are aligned from their first frame and their note says so. Before any work the
output location is checked (mfim.outputs): unless ``overwrite``, an out_dir that is, lies inside or contains in_dir
is refused, and so is any existing file the run would replace that an earlier align run did not write (its tables
carry the align config; its crops a provenance record naming their source file). All files are written atomically.
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

from mfim.atomic import atomic_write
from mfim.data.progress import Journal, fingerprint, resolve_workers, same_source, source_stamp

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


def _output_record(path: Path, rel: str, sha256: str) -> dict:
    """Provenance for the aligned crop: the input's own record when it is synthetic, else 'processed'; either way
    naming the file it was made from, with its hash."""
    from mfim.provenance import provenance_record, read_record

    try:
        source = read_record(path)
    except Exception:  # unreadable metadata is not a reason to drop a readable image
        source = None
    made_from = {"source_file": rel, "source_sha256": sha256}
    if source and source.get("kind") == "synthetic":
        return {**source, **made_from}
    return provenance_record("processed", **made_from)


def _process(task: tuple[str, str, str]) -> dict:
    """Align one image; returns {'ok': True, 'row': ...} or {'ok': False, 'file': ..., 'reason': ...}, with
    'source': the input's stamp (None when it could not be read: such a result is not journaled)."""
    path, rel, out_rel = task
    try:
        stamp = source_stamp(path)
    except OSError:
        stamp = None
    try:
        result = _process_unsafe(Path(path), rel, out_rel, stamp["sha256"] if stamp else "")
    except MemoryError:
        result = {"ok": False, "file": rel, "reason": "out of memory while processing"}
    except Exception as e:  # one bad file must not end the run; its reason goes to the rejects table
        first_line = str(e).splitlines()[0] if str(e) else ""
        result = {"ok": False, "file": rel, "reason": f"error: {type(e).__name__}: {first_line}"}
    return {**result, "source": stamp}


def _process_unsafe(path: Path, rel: str, out_rel: str, sha256: str) -> dict:
    from mfim.imageio import ImageRejected, read_image
    from mfim.nets.align import align_face
    from mfim.provenance import save_image

    config: AlignConfig = _WORKER["config"]
    try:
        img, frames_note = read_image(path)
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
    if frames_note:
        note = f"{note}; {frames_note}" if note else frames_note
    aligned = align_face(img, face.landmarks, config.size, config.transform_size, config.enable_padding)
    # Aligned crops are training/evaluation inputs: they keep the input's provenance record (synthetic for the
    # renders) but get no watermark of their own -- a pattern in every training image would be learned by the
    # generator. Generated outputs (swaps, samples, CLI results) carry the watermark.
    save_image(_WORKER["out_dir"] / out_rel, aligned.image, _output_record(path, rel, sha256), watermark=False)
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
    atomic_write(path, lambda f: pq.write_table(table, f))


def _made_by_align(table_path: Path) -> set[str] | None:
    """The outputs listed by an align table at table_path (any settings), or None when there is no such table."""
    import pyarrow.parquet as pq

    try:
        if _CONFIG_META_KEY not in (pq.read_schema(table_path).metadata or {}):
            return None
        return set(pd.read_parquet(table_path, columns=["output"])["output"])
    except Exception:  # absent, or not a parquet file at all
        return None


def _check_outputs(in_dir, out_dir, tasks, table_path, rejects_path, report_path, overwrite) -> None:
    """Raise OutputRefused before any work when the run would mix with in_dir, replace a file no align run wrote,
    or cannot write."""
    from mfim.outputs import OutputRefused, ensure_writable_folder, refuse_folder_overlap
    from mfim.provenance import read_record

    if not overwrite:
        refuse_folder_overlap(out_dir, {"IN_DIR": in_dir}, flag="OUT_DIR")
        ours = _made_by_align(table_path)
        tables = [table_path, rejects_path, rejects_path.with_suffix(".parquet")]
        tables += [report_path] if report_path else []
        foreign = [] if ours is not None else [p for p in tables if os.path.lexists(p)]
        # crops a killed run journaled are ours too (its table is written only at the end): no need to open them
        journaled = {(r.get("row") or {}).get("output") for r in Journal(journal_path(table_path)).read()}
        for _, rel, out_rel in tasks:
            out = out_dir / out_rel
            if os.path.lexists(out) and out_rel not in (ours or ()) and out_rel not in journaled:
                try:  # a crop written just before an interrupted run could record it in the table
                    record = read_record(out)
                except Exception:
                    record = None
                if not record or record.get("source_file") != rel:
                    foreign.append(out)
        if foreign:
            more = f" (and {len(foreign) - 1} more)" if len(foreign) > 1 else ""
            raise OutputRefused(
                f"{foreign[0]}{more} already exists and was not written by mfim align; "
                "pass --overwrite to replace it, or choose another OUT_DIR"
            )
    for folder in {out_dir, table_path.parent, rejects_path.parent, *([report_path.parent] if report_path else [])}:
        ensure_writable_folder(folder, flag="OUT_DIR" if folder == out_dir else str(folder))


def _write_tables(rows: list[dict], rejects: list[dict], table_path: Path, rejects_path: Path, config) -> None:
    df = pd.DataFrame(rows, columns=TABLE_COLUMNS).sort_values("file", kind="stable").reset_index(drop=True)
    _write_atomic_parquet(df, table_path, config)
    rj = pd.DataFrame(rejects, columns=REJECT_COLUMNS).sort_values("file", kind="stable").reset_index(drop=True)
    _write_atomic_parquet(rj, rejects_path.with_suffix(".parquet"), config)
    atomic_write(rejects_path, lambda f: f.write(rj.to_csv(index=False).encode()))


# Bump when _process_unsafe changes what it writes for the same input: journaled results of older code are redone.
_RESULT_VERSION = 1
# Code beside the settings that shapes a crop or a row (the align stage's code deps in dvc.yaml, and the decoder).
_CODE = ("nets/align.py", "nets/landmarks.py", "imageio.py")


def _escaped(name: str) -> str:
    """A file name as UTF-8 text: bytes that are not valid UTF-8 (surrogates in Python's str) written as \\xNN."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def journal_path(table_path: str | Path) -> Path:
    """The progress journal of the align run whose table is ``table_path``: ``<table stem>.journal.jsonl`` beside it."""
    table_path = Path(table_path)
    return table_path.with_name(table_path.stem + ".journal.jsonl")


def run_fingerprint(config: AlignConfig) -> str:
    """Settings, code and landmark model of a run: a journaled result is reused only under the same fingerprint."""
    import cv2
    import dlib

    from mfim.assets import get
    from mfim.data.progress import sha256_of

    package = Path(__file__).resolve().parent.parent
    models = ["dlib_landmarks68"] + (["dlib_cnn_detector"] if config.detector == "cnn" else [])
    return fingerprint({
        "config": asdict(config),
        "version": _RESULT_VERSION,
        "code": {name: sha256_of(package / name) for name in _CODE},
        "models": {name: get(name).sha256 for name in models},
        "libraries": {"dlib": dlib.__version__, "cv2": cv2.__version__, "numpy": np.__version__},
    })


def _journaled(journal: Journal, fp: str) -> dict[str, dict]:
    """The latest journal record of each file, when made under fingerprint ``fp`` (a later record of the file made
    under other settings replaced its crop, so an earlier matching one no longer describes what is on disk)."""
    latest: dict[str, dict] = {}
    for record in journal.read():
        if isinstance(record, dict) and isinstance(record.get("file"), str):
            latest[record["file"]] = record
    return {f: r for f, r in latest.items() if r.get("fp") == fp}


def _reusable(record: dict | None, path: str, out_dir: Path, out_rel: str, retry_rejects: bool) -> bool:
    """Whether a journaled result still holds: same source file, and its crop on disk (rows) or no retry (rejects)."""
    if record is None:
        return False
    if "row" in record:
        if record["row"].get("output") != out_rel or not (out_dir / out_rel).is_file():
            return False
    elif "reject" not in record or retry_rejects:
        return False
    return same_source(record.get("source"), path)


def _journal_record(res: dict, fp: str) -> dict:
    base = {"fp": fp, "source": res["source"]}
    if res["ok"]:
        return {**base, "file": res["row"]["file"], "row": res["row"]}
    return {**base, "file": res["file"], "reject": res["reason"]}


def _prune_stale(out_dir: Path, records: list[dict], rows: dict[str, dict]) -> int:
    """Remove crops an earlier run wrote whose source is gone from the input or now rejected (a persisted output
    folder would otherwise hand them to the shard stage). Only crops whose provenance names that source are removed."""
    from mfim.provenance import read_record

    current = {r["output"] for r in rows.values()}
    removed = 0
    for record in records:
        out_rel = (record.get("row") or {}).get("output")
        if not out_rel or record["file"] in rows or out_rel in current or not (out_dir / out_rel).is_file():
            continue
        try:
            written_for = (read_record(out_dir / out_rel) or {}).get("source_file")
        except Exception:
            written_for = None
        if written_for == record["file"]:
            (out_dir / out_rel).unlink()
            removed += 1
    return removed


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


# long: the align stage's run in its order (scan, plan, resume from the journal, align in workers, tables, summary);
# the steps with logic of their own are the helpers above, and the rest shares one set of local tables.
def align_folder(
    in_dir: str | Path,
    out_dir: str | Path,
    size: int = 256,
    detector: str = "hog",
    workers: int | str = 2,
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
    overwrite: bool = False,
) -> dict:
    """Align every image under in_dir into out_dir (mirrored relative paths, .png). Returns a summary dict.

    workers: worker processes, or 'auto' (the usable cores). ground_truth: True looks for ``ground_truth.parquet``
    beside in_dir; a path uses that table; False/None skips the landmark-error report. resume: skip files aligned (or
    rejected, unless retry_rejects) by an earlier run -- finished or killed -- from the same source file under the same
    settings and code, whose crop still exists (the journal, see the module docstring). overwrite: allow replacing
    files no align run wrote and an out_dir that overlaps in_dir. Raises mfim.outputs.OutputRefused (before any work) otherwise, or when out_dir is unwritable.
    """
    from tqdm import tqdm

    from mfim.imageio import IMAGE_SUFFIXES
    from mfim.scan import scan_folder

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
    report_path = Path(report_path) if report_path else None

    # Every entry under in_dir is considered: an unknown type or a broken link is a reject with a reason.
    scan = scan_folder(in_dir, IMAGE_SUFFIXES, "an image", exclude=out_dir)  # an out_dir inside in_dir: no inputs
    rejects: dict[str, dict] = {}
    for rel, reason in scan.rejects:
        rejects[_escaped(rel)] = {"file": _escaped(rel), "reason": reason}
    files = scan.files
    tasks, outputs_seen = [], {}
    for p in files:
        rel = p.relative_to(in_dir).as_posix()
        if _escaped(rel) != rel:  # parquet / csv tables hold UTF-8 text only: one reject, not a failed run
            rejects[_escaped(rel)] = {"file": _escaped(rel), "reason": "file name is not valid UTF-8 (its odd bytes "
                                      "are shown escaped); rename it to align it"}
            continue
        out_rel = Path(rel).with_suffix(".png").as_posix()
        if out_rel in outputs_seen:
            rejects[rel] = {"file": rel, "reason": f"output name {out_rel} already used by {outputs_seen[out_rel]}"}
            continue
        outputs_seen[out_rel] = rel
        tasks.append((str(p), rel, out_rel))

    _check_outputs(in_dir, out_dir, tasks, table_path, rejects_path, report_path, overwrite)
    journal = Journal(journal_path(table_path))
    fp = run_fingerprint(config)
    journaled = _journaled(journal, fp) if resume else {}
    rows: dict[str, dict] = {}
    kept: dict[str, dict] = {}  # the journal records behind this run's results
    todo = []
    for path, rel, out_rel in tasks:
        record = journaled.get(rel)
        if _reusable(record, path, out_dir, out_rel, retry_rejects):
            kept[rel] = record
            if "row" in record:
                rows[rel] = record["row"]
            else:
                rejects[rel] = {"file": rel, "reason": record["reject"]}
        else:
            todo.append((path, rel, out_rel))
    n_skipped = len(kept)
    log.info("align: %d files, %d to do, %d done by an earlier run", len(files), len(todo), n_skipped)

    def consume(results):
        bar = tqdm(total=len(todo), desc="align", unit="img", disable=not progress or not todo, smoothing=0.05)
        for res in results:
            if res["ok"]:
                rows[res["row"]["file"]] = res["row"]
                if res["row"]["note"]:
                    log.info("align: %s: %s", res["row"]["file"], res["row"]["note"])
            else:
                rejects[res["file"]] = {"file": res["file"], "reason": res["reason"]}
                log.info("align: rejected %s: %s", res["file"], res["reason"])
            if res["source"] is not None:  # the crop is already in place (written atomically by the worker)
                record = _journal_record(res, fp)
                journal.append(record)
                kept[record["file"]] = record
            bar.update(1)
        bar.close()

    workers = resolve_workers(workers)
    try:
        if workers == 1 or len(todo) <= 2:
            _init_worker(config, str(out_dir))
            consume(map(_process, todo))
        else:
            import multiprocessing as mp

            # spawn: dlib objects are not fork-safe to share, and the parent may hold torch/MLflow threads.
            ctx = mp.get_context("spawn")
            with ctx.Pool(workers, initializer=_init_worker, initargs=(config, str(out_dir))) as pool:
                consume(pool.imap_unordered(_process, todo, chunksize=4))
    finally:
        journal.close()

    _write_tables(list(rows.values()), list(rejects.values()), table_path, rejects_path, config)
    n_pruned = _prune_stale(out_dir, journal.read(), rows)
    journal.rewrite(kept[f] for f in sorted(kept))  # this run's results only: the journal stays O(files)

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
        "n_files": len(files) + len(scan.rejects),
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
    if n_pruned:
        summary["n_stale_removed"] = n_pruned
    gt_path = find_ground_truth(in_dir) if ground_truth is True else (Path(ground_truth) if ground_truth else None)
    if gt_path is not None and gt_path.is_file():
        gt = pd.read_parquet(gt_path, columns=["key", "landmarks"])
        input_keys = [Path(t[1]).with_suffix("").as_posix() for t in tasks]
        summary["ground_truth"] = {"table": str(gt_path), **landmark_error_report(row_list, gt, input_keys)}
    if report_path:
        text = json.dumps(summary, indent=2) + "\n"
        atomic_write(report_path, lambda f: f.write(text.encode()))
    return summary
