"""`mfim align IN_DIR OUT_DIR --size N`: FFHQ-aligned crops of every photo in a folder, plus a rejects table.

Exit status: 0 when the run completed (bad photos are rejects, not failures), 2 for usage errors: IN_DIR missing,
OUT_DIR unwritable, or an OUT_DIR that overlaps IN_DIR / holds files no align run wrote (unless --overwrite)."""

from __future__ import annotations


def register(sub) -> None:
    from mfim.resources import MAX_CROP, MAX_UPSAMPLE, bounded_int, crop_bytes

    p = sub.add_parser(
        "align",
        help="FFHQ-align every photo in a folder (aligned crops + landmark table + rejects table)",
        description="Detect the largest face in every image under IN_DIR, align it with the FFHQ recipe and write "
        "OUT_DIR/<same relative path>.png, OUT_DIR/aligned.parquet (landmarks, transforms) and OUT_DIR/rejects.csv "
        "(file, reason) for files that could not be used. Re-running skips files already done.",
    )
    p.add_argument("in_dir", metavar="IN_DIR")
    p.add_argument("out_dir", metavar="OUT_DIR")
    p.add_argument("--size", type=bounded_int(16, MAX_CROP, crop_bytes), default=1024,
                   help=f"aligned crop size in pixels (16 to {MAX_CROP}; default 1024, as FFHQ)")
    p.add_argument("--detector", choices=["hog", "cnn"], default="hog", help="dlib face detector (default hog)")
    p.add_argument("--upsample", type=bounded_int(0, MAX_UPSAMPLE), default=1,
                   help=f"detector upsampling passes, each doubles the side (0 to {MAX_UPSAMPLE}; default 1)")
    p.add_argument("--workers", type=int, default=2, help="worker processes (default 2)")
    p.add_argument(
        "--transform-size", type=int, default=4096, help="FFHQ quad render size, capped at 4× --size (default 4096)"
    )
    p.add_argument(
        "--max-detect-side",
        type=int,
        default=1024,
        help="search faces on a copy at most this many pixels on its longer side (landmarks use full resolution; "
        "raise it for small faces in large photos; default 1024)",
    )
    p.add_argument("--no-padding", action="store_true", help="leave areas outside the photo black")
    p.add_argument("--no-rotations", action="store_true", help="do not search 90/180/270° rotated images")
    p.add_argument("--no-resume", action="store_true", help="redo every file even if its output exists")
    p.add_argument("--retry-rejects", action="store_true", help="try files an earlier run rejected again")
    p.add_argument("--table", help="landmark/transform table path (default OUT_DIR/aligned.parquet)")
    p.add_argument("--rejects", help="rejects table path, csv (default OUT_DIR/rejects.csv; parquet beside it)")
    p.add_argument("--report", help="also write the summary as JSON here")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="allow OUT_DIR to be or overlap IN_DIR and replace files that no earlier align run wrote",
    )
    p.set_defaults(func=run)


def run(args) -> int:
    import logging
    import sys
    from pathlib import Path

    from mfim.data.align_folder import align_folder
    from mfim.outputs import OutputRefused

    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    if not Path(args.in_dir).is_dir():
        print(f"mfim align: IN_DIR {args.in_dir} is not a folder", file=sys.stderr)
        return 2
    try:
        summary = align_folder(
            args.in_dir,
            args.out_dir,
            size=args.size,
            detector=args.detector,
            workers=args.workers,
            upsample=args.upsample,
            transform_size=args.transform_size,
            enable_padding=not args.no_padding,
            try_rotations=not args.no_rotations,
            max_detect_side=args.max_detect_side,
            table_path=args.table,
            rejects_path=args.rejects,
            report_path=args.report,
            resume=not args.no_resume,
            retry_rejects=args.retry_rejects,
            progress=not args.quiet,
            overwrite=args.overwrite,
        )
    except OutputRefused as e:  # found before any work: nothing was written
        print(f"mfim align: {e}", file=sys.stderr)
        return 2
    _print_summary(summary)
    return 0


def _print_summary(summary: dict) -> None:
    import json

    print(
        f"aligned {summary['n_aligned']} of {summary['n_files']} files "
        f"({summary['n_processed']} processed now, {summary['n_skipped_resume']} done earlier); "
        f"{summary['n_rejected']} rejected -> {summary['rejects']}"
    )
    if summary["n_multi_face"]:
        print(
            f"{summary['n_multi_face']} image(s) had several faces: the largest was kept "
            f"(see the note column of {summary['table']})"
        )
    if summary["reject_reasons"]:
        print("reject reasons: " + json.dumps(summary["reject_reasons"]))
    if "ground_truth" in summary:
        g = summary["ground_truth"]
        nme = g["nme_iod"]["median"] if g["nme_iod"] else float("nan")
        print(f"ground truth: detection rate {g['detection_rate']:.3f}, median NME (inter-ocular) {nme:.4f}")
