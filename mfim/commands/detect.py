"""`mfim detect IMAGE...`: was this made by MFIM? Reports, per file, the provenance metadata (if any survived) and the
invisible-watermark verdict with its score. Folders are searched for images and videos; a video is judged on frames
spread over it (watermarked when most sampled frames are). Exit status 0 when every file could be read, else 1."""

from __future__ import annotations

import sys
from pathlib import Path

VIDEO_FRAMES_SAMPLED = 8


def register(sub) -> None:
    p = sub.add_parser("detect", help="report MFIM provenance metadata and the invisible watermark of images")
    p.add_argument("paths", nargs="+", metavar="IMAGE", help="images, videos or folders of them")
    p.add_argument("--json", action="store_true", help="one JSON list of per-file reports on stdout")
    p.set_defaults(func=run)


def inspect_video(path: Path, frames: int = VIDEO_FRAMES_SAMPLED) -> dict:
    from mfim.provenance import read_record
    from mfim.watermark import THRESHOLD, detect

    verdicts = [detect(frame) for _, frame in _sample(path, frames)]
    if not verdicts:
        raise ValueError("no frame could be read")
    scores = sorted(v["score"] for v in verdicts)
    marked = sum(v["watermarked"] for v in verdicts)
    return {
        "file": str(path),
        "record": read_record(path),
        "watermark": {
            "watermarked": marked * 2 > len(verdicts),
            "score": scores[len(scores) // 2],  # median over the sampled frames
            "threshold": THRESHOLD,
            "frames_sampled": len(verdicts),
            "frames_watermarked": marked,
            "scheme": verdicts[0]["scheme"],
        },
    }


def _sample(path, n):
    from mfim.video import sample_frames

    return sample_frames(path, n)


def expand(paths: list[str]) -> tuple[list[Path], list[dict]]:
    """(files to inspect, error reports for folder entries that cannot be: broken links, unknown types...)."""
    from mfim.commands.swap import scan_media

    out: list[Path] = []
    errors: list[dict] = []
    for p in map(Path, paths):
        if p.is_dir():
            scan = scan_media(p)
            out.extend(scan.files)
            errors.extend({"file": str(p / rel), "error": reason} for rel, reason in scan.rejects)
        else:
            out.append(p)
    return out, errors


def inspect_any(path: Path) -> dict:
    from mfim.provenance import inspect
    from mfim.video import VideoError, is_video

    try:
        if is_video(path):
            return inspect_video(path)
        return inspect(path)
    except (ValueError, VideoError) as e:  # ImageRejected is a ValueError
        return {"file": str(path), "error": str(e)}


def describe(report: dict) -> str:
    lines = [report["file"]]
    if "error" in report:
        return f"{report['file']}\n  unreadable: {report['error']}"
    rec = report["record"]
    if rec is None:
        lines.append("  metadata:  none (no MFIM provenance record; metadata may have been stripped)")
    else:
        label = "synthetic (AI-generated)" if rec.get("synthetic") else rec.get("kind", "?")
        lines.append(f"  metadata:  {label}, made by {rec.get('software', '?')}")
        lines.append(f"             checkpoint sha256 {rec.get('checkpoint_sha256') or 'not recorded'}")
        if rec.get("operation"):
            roi = " (pasted back, --roi)" if rec.get("roi") else ""
            lines.append(f"             operation {rec['operation']}{roi}")
        for role, made_from in (rec.get("inputs") or {}).items():
            lines.append(f"             {role} {made_from.get('file')} (sha256 {made_from.get('sha256')})")
    wm = report["watermark"]
    verdict = "DETECTED" if wm["watermarked"] else "not detected"
    detail = f"score {wm['score']:.3f}, threshold {wm['threshold']:.3f}"
    if "frames_sampled" in wm:
        detail += f", {wm['frames_watermarked']}/{wm['frames_sampled']} sampled frames marked"
    elif wm["watermarked"]:
        bound = wm["false_positive_bound"]
        detail += ", chance on an unmarked image " + (f"<= {bound:.1e}" if bound >= 1e-12 else "< 1e-12")
    lines.append(f"  watermark: {verdict} ({detail})")
    return "\n".join(lines)


def run(args) -> int:
    import itertools
    import json

    files, errors = expand(args.paths)
    reports = []
    for report in itertools.chain(map(inspect_any, files), errors):
        reports.append(report)
        if not args.json:
            print(describe(report))
    if args.json:
        print(json.dumps(reports, indent=2))
    failed = [r for r in reports if "error" in r]
    for r in failed if args.json else []:  # the text report already says it
        print(f"mfim detect: {r['file']}: {r['error']}", file=sys.stderr)
    return 1 if failed or not reports else 0
