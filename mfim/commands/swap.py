"""`mfim swap` and `mfim mix`: the commands a person runs on their own photos and videos.

Inputs may be single files or folders:
- target a file: one output, written at --output (a file path, or a folder to write `<target stem>.png` into);
- target a folder: every image and video under it is processed and written under --output with the same relative
  path (images as .png, videos keep their container); a source (or --global / --local) given as a file is used for
  every target; given as a folder, each target is paired with the source file of the same relative name (any image
  suffix), and a target without one is rejected.
Every entry of an input folder ends as an output or as a reject with its reason (unknown file types, broken
symbolic links and link loops included; notes and tables such as .txt / .csv and hidden files are left alone). Each
reject is reported on stderr and, for folder runs, in `<output>/rejects.csv` (columns file, reason), which is
rewritten as rejects happen, so a run that dies midway leaves its outputs so far and a complete table of its rejects.
Animated GIFs (and other multi-frame images) are used by their first frame, and the output's record and stderr say so.

Nothing of the user's is replaced without `--overwrite`: an output that is an input file (through any symlink), an
output folder that is, lies inside or contains an input folder, and any file this run would write that already
exists are refused before work starts, as is an output location that cannot be written. Exit status: 0 when at least
one output was written, 1 when none was, 2 for usage errors (refused or unwritable outputs included), 3 when a model
file is missing.

Every image written goes through mfim.provenance.save_image with a synthetic record (checkpoint file and sha256,
software version, and the file name and sha256 of each input that made it), which also embeds the invisible
watermark; every frame of an output video carries the watermark and the video gets a `.mfim.json` provenance sidecar.
All writes are atomic (temp file + rename) and never replace a file another run wrote meanwhile.

Before any work, one line each on stderr when the model draws synthetic 64 px renders (the embedded default's
generator) and when the swap settings differ from the ones reports/ were made with (mfim/commands/model_notes.py).
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

MIN_OUTPUT_SIDE = 256  # aligned outputs of small models are upscaled to this, so the watermark has room to survive
IMAGE_OUTPUT_SUFFIXES = {".png", ".jpg", ".jpeg"}
REJECTS_CSV = "rejects.csv"
FRAME_REJECTS_SHOWN = 5  # per video on stderr; the csv lists them all

SWAP_HELP = """Swap the face of SOURCE into TARGET: detect, align, swap; with --roi paste the result back into the
full target photo (configuration E+). SOURCE and TARGET may be images or folders; TARGET may be a video
(.mp4/.avi/.mov), processed frame by frame."""
MIX_HELP = """ID mixing: the global identity (face shape) of GLOBAL and the local identity (eyes, nose, lips) of LOCAL,
on TARGET's pose, expression and background. Inputs may be files or folders, as for `mfim swap`."""


def register(sub) -> None:
    swap = sub.add_parser(
        "swap", help="swap a source face into target photos, folders or videos", description=SWAP_HELP
    )
    swap.add_argument("--source", "-s", required=True, help="source image (the identity), or a folder of them")
    swap.add_argument("--target", "-t", required=True, help="target image, video or folder")
    _add_common(swap)
    swap.set_defaults(func=run_swap)

    mix = sub.add_parser("mix", help="mix the global ID of one face with the local ID of another", description=MIX_HELP)
    mix.add_argument("--global", dest="global_source", required=True, help="image giving the global ID (face shape)")
    mix.add_argument("--local", dest="local_source", required=True, help="image giving the local ID (eyes, nose...)")
    mix.add_argument("--target", "-t", required=True, help="target image, video or folder")
    _add_common(mix)
    mix.set_defaults(func=run_mix)


def _add_common(p) -> None:
    p.add_argument("--output", "-o", required=True, help="output file (single target) or folder")
    p.add_argument("--checkpoint", default=None, help="trained MFIM checkpoint (default: data/train/mfim.pt)")
    p.add_argument("--model", default=None, help="an MLflow model instead of --checkpoint, e.g. models:/mfim@champion")
    p.add_argument("--roi", action="store_true", help="paste the face back into the original target photo (E+)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default cpu)")
    # The paper's feed-forward swap by default: it works with any checkpoint and no other file (the anchor needs
    # data/threedmm/regressor.pt; at 1024 px 50 fit steps are a GPU's job). When params.yaml's source_fit, which
    # reports/ use, differs, the command prints the flags that give reports/'s swaps (model_notes).
    p.add_argument("--fit-steps", type=int, default=0,
                   help="fit each source's ID codes for this many optimiser steps before swapping (default 0: the "
                        "paper's feed-forward encoder; reports/ use params.yaml's source_fit, 50 on the embedded "
                        "default: ~1.6 s a source batched in the evaluate stage; one source alone took 2-3 min on 2 "
                        "busy CPU cores)")
    p.add_argument("--fit-exp", type=float, default=0.0,
                   help="with --fit-steps: weight of the expression anchor (the fit keeps the expression of the "
                        "encoder's reconstruction, as read by the training 3DMM network data/threedmm/regressor.pt "
                        "that `make repro` writes; default 0, reports/ use 0.1)")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar or summary")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="allow replacing existing files, inputs included, and writing into or next to input folders",
    )


# ------------------------------------------------------------------------------------------------------- planning


@dataclass
class Job:
    target: Path
    sources: dict[str, Path]  # role ('source', or 'global' and 'local') -> image
    output: Path
    label: str  # how messages and the rejects table name this target

    @property
    def is_video(self) -> bool:
        from mfim.video import is_video

        return is_video(self.target)


@dataclass
class Plan:
    jobs: list[Job]
    rejects: list[tuple[str, str]]  # (file, reason) found while planning
    folder: bool  # folder run: output is a folder with a rejects table
    output: Path  # the output file (single target) or folder

    @property
    def rejects_table(self) -> Path | None:
        return self.output / REJECTS_CSV if self.folder else None

    def writes(self) -> list[Path]:
        """Every file the run may write, for the checks before it starts."""
        from mfim.provenance import sidecar_path

        paths = [self.rejects_table] if self.folder else []
        for job in self.jobs:
            paths.append(job.output)
            if job.is_video:
                paths.append(sidecar_path(job.output))
                if not self.folder:
                    paths.append(frame_rejects_path(job.output))
        return paths


class UsageError(ValueError):
    pass


def scan_media(folder: Path, exclude: Path | None = None):
    """The images and videos under folder, and a reject for every other entry a user might expect to be used."""
    from mfim.imageio import IMAGE_SUFFIXES
    from mfim.scan import scan_folder
    from mfim.video import VIDEO_SUFFIXES

    return scan_folder(folder, IMAGE_SUFFIXES | VIDEO_SUFFIXES, "an image or video", exclude=exclude)


def media_files(folder: Path) -> list[Path]:
    return scan_media(folder).files


def frame_rejects_path(video_output: Path) -> Path:
    return video_output.with_name(video_output.name + ".rejects.csv")


def _same_name(folder: Path, rel: Path) -> Path | None:
    """The image in `folder` with the relative path `rel` up to its suffix."""
    from mfim.imageio import IMAGE_SUFFIXES

    # names are compared as data: a glob of the stem would read [, ], *, ? in a user's file name as a pattern
    try:
        names = sorted(os.listdir(folder / rel.parent))
    except OSError:
        return None
    for name in names:
        p = folder / rel.parent / name
        if p.stem == rel.stem and p.suffix.lower() in IMAGE_SUFFIXES and p.is_file():
            return p
    return None


def plan(target: str | Path, sources: dict[str, str | Path], output: str | Path) -> Plan:
    from mfim.outputs import name_too_long
    from mfim.video import VIDEO_SUFFIXES, is_video

    target, output = Path(target), Path(output)
    sources = {role: Path(p) for role, p in sources.items()}
    for role, p in sources.items():
        if not p.exists():
            raise UsageError(f"--{role}: {p} not found")
    if not target.exists():
        raise UsageError(f"--target: {target} not found")

    if not target.is_dir():
        for role, p in sources.items():
            if p.is_dir():
                raise UsageError(f"--{role} is a folder, so --target must be a folder of the same names too")
        video = is_video(target)
        default_suffix = target.suffix.lower() if video else ".png"
        if output.is_dir() or not output.suffix:
            output = output / (target.stem + default_suffix)
        allowed = VIDEO_SUFFIXES if video else IMAGE_OUTPUT_SUFFIXES
        if output.suffix.lower() not in allowed:
            kind = "a video" if video else "an image"
            raise UsageError(f"--output for {kind} target must end in one of {sorted(allowed)}, got {output.name}")
        return Plan([Job(target, sources, output, target.name)], [], folder=False, output=output)

    if output.exists() and not output.is_dir():
        raise UsageError(f"--target is a folder, so --output must be a folder ({output} is a file)")
    jobs, used = [], set()
    scan = scan_media(target, exclude=output)  # an output folder inside the target folder holds no inputs
    rejects = list(scan.rejects)
    # with --overwrite into an input folder, a.jpg's output a.png must not replace the input a.png (read later)
    inputs = {os.path.realpath(t) for t in scan.files}
    for src in sources.values():
        inputs |= {os.path.realpath(p) for p in media_files(src)} if src.is_dir() else {os.path.realpath(src)}
    for t in scan.files:
        rel = t.relative_to(target)
        paired: dict[str, Path] = {}
        for role, src in sources.items():
            match = src if not src.is_dir() else _same_name(src, rel)
            if match is None:
                rejects.append((str(rel), f"no {role} image named {rel.with_suffix('')}.* in {src}"))
                break
            paired[role] = match
        else:
            out_rel = rel if is_video(t) else rel.with_suffix(".png")
            clobbers = os.path.realpath(output / out_rel) in inputs - {os.path.realpath(t)}
            if out_rel in used or clobbers:  # a.jpg and a.png in one folder: the second keeps its suffix in the name
                out_rel = rel.with_name(rel.name + ".png")
            used.add(out_rel)
            longest = output / (out_rel.as_posix() + (".mfim.json" if is_video(t) else ""))  # a video's sidecar
            too_long = name_too_long(longest)
            if too_long:  # a reject before the work, not a failed write after it
                rejects.append((str(rel), too_long))
                continue
            jobs.append(Job(t, paired, output / out_rel, str(rel)))
    return Plan(jobs, rejects, folder=True, output=output)


def check_outputs(the_plan: Plan, target, sources: dict, overwrite: bool) -> None:
    """Raises OutputRefused before any work when the run would replace a user's file or cannot write at all."""
    from mfim.outputs import ensure_writable_folder, refuse_folder_overlap, refuse_long_names, refuse_replacing

    inputs = {f"--{role}": Path(p) for role, p in {"target": target, **sources}.items()}
    if not overwrite:
        if the_plan.folder:
            refuse_folder_overlap(the_plan.output, {k: p for k, p in inputs.items() if p.is_dir()})
        refuse_replacing(the_plan.writes(), {k: p for k, p in inputs.items() if not p.is_dir()})
    ensure_writable_folder(the_plan.output if the_plan.folder else the_plan.output.parent)
    refuse_long_names(the_plan.writes())


# -------------------------------------------------------------------------------------------------------- running


def model_checkpoint(uri: str, checkpoint: str | None) -> str:
    """The local file of an MLflow model URI (models:/mfim@champion), fetched from the store params.yaml names."""
    if checkpoint:
        raise UsageError("give --model or --checkpoint, not both")
    from mlflow.exceptions import MlflowException

    from mfim.tracking import resolve_checkpoint

    try:
        return str(resolve_checkpoint(uri))
    except (MlflowException, OSError) as e:
        raise UsageError(f"--model {uri}: {str(e).splitlines()[0]}") from None


def load_swapper(checkpoint: str | None, device: str, fit_steps: int = 0, fit_exp: float = 0.0):
    """The model (tests replace this function with a fake)."""
    try:
        from mfim.inference import FaceSwapper
    except ModuleNotFoundError as e:
        if e.name != "mfim.inference":
            raise
        raise UsageError("this build has no mfim.inference (the trained model's inference code)") from None
    if fit_exp > 0:
        from mfim.training.build import FITTED_REGRESSOR

        if not FITTED_REGRESSOR.is_file():  # a relative path: found only from the repository folder
            raise UsageError(f"--fit-exp needs the 3DMM network {FITTED_REGRESSOR}, not found under {Path.cwd()}; "
                             "run from the repository folder after `make repro`")
    return FaceSwapper.from_checkpoint(checkpoint, device=device, fit_steps=fit_steps, fit_exp=fit_exp)


class Runner:
    """Prepares each face once, makes the outputs, writes them with provenance, collects the rejects."""

    def __init__(
        self,
        swapper,
        operation: str,
        roi: bool,
        progress: bool,
        keep_going: bool = False,
        overwrite: bool = False,
        rejects_table: Path | None = None,
        checkpoint: str | None = None,
    ):
        from mfim.provenance import provenance_record

        self.swapper = swapper
        self.keep_going = keep_going  # folder runs: an unexpected error on one file is reported, the rest go on
        self.operation = operation
        self.roi = roi
        self.progress = progress
        self.overwrite = overwrite
        self.rejects_table = rejects_table  # rewritten after every reject, so a run killed midway keeps them
        self.record = provenance_record(
            "synthetic",
            checkpoint_sha256=getattr(swapper, "checkpoint_sha256", None),
            checkpoint=checkpoint,
            operation=operation,
            roi=roi,
        )
        self._sources: dict[Path, object] = {}
        self.target_note = ""  # the last target's faces_note
        self._inputs: dict[Path, dict] = {}
        self.rejects: list[tuple[str, str]] = []
        self.written: list[Path] = []

    def start(self) -> None:
        """Claim the rejects table (a folder run's marker) before any work: a file that appeared since the checks
        means another run is writing here."""
        if self.rejects_table is not None:
            try:
                write_rejects(self.rejects_table, [], overwrite=self.overwrite)
            except FileExistsError:
                raise UsageError(
                    f"{self.rejects_table} appeared after the checks (another run writing to this folder?); "
                    "pass --overwrite to write there anyway"
                ) from None

    def read(self, role: str, path: Path):
        """The image, with a line on stderr when only its first frame could be used; remembers the input's name,
        hash and note for the provenance record."""
        from mfim.assets import sha256_file
        from mfim.imageio import read_image

        image, note = read_image(path)
        if self.roi and role == "target":
            check_roi_memory(image)
        if path not in self._inputs:
            self._inputs[path] = {"file": path.name, "sha256": sha256_file(path), **({"note": note} if note else {})}
            if note:
                say(f"mfim {self.operation}: {role} {path.name}: {note}")
        return image

    def input_record(self, job: Job) -> dict:
        """The shared record plus which files made this output."""
        from mfim.assets import sha256_file

        files = {**job.sources, "target": job.target}
        for path in files.values():
            if path not in self._inputs:  # a video target: hashed here, not read as an image
                self._inputs[path] = {"file": path.name, "sha256": sha256_file(path)}
        return {**self.record, "inputs": {role: self._inputs[path] for role, path in files.items()}}

    def source_face(self, role: str, path: Path):
        """Prepared face of a source image, computed once; raises ImageRejected naming the source."""
        from mfim.imageio import ImageRejected

        if path not in self._sources:
            try:
                self._sources[path] = self.swapper.prepare(self.read(role, path))
                note = faces_note(self._sources[path], "its identity is used")
                if note:
                    self._inputs[path]["faces"] = note
                    say(f"mfim {self.operation}: {role} {path.name}: {note}")
            except ImageRejected as e:
                self._sources[path] = ImageRejected(f"{role} {path.name}: {e}")
        face = self._sources[path]
        if isinstance(face, ImageRejected):
            raise face
        return face

    def make(self, target_image, sources: dict):
        """One output image (uint8 RGB) from a target image and the prepared sources."""
        import numpy as np

        tgt = self.swapper.prepare(target_image)
        self.target_note = faces_note(tgt, "it was swapped, the others were left as they are")
        if self.operation == "swap":
            out = self.swapper.swap(sources["source"], tgt, roi=self.roi)
        else:
            out = self.swapper.mix(tgt, sources["global"], sources["local"], roi=self.roi)
        out = np.asarray(out)
        if not self.roi:
            out = upscale_to(out, MIN_OUTPUT_SIDE)
        return out

    def run(self, job: Job) -> None:
        from mfim.assets import MissingAssetError

        try:
            self._run(job)
        except MissingAssetError:
            raise
        except FileExistsError as e:  # the final no-replace rename lost a race with another run
            self.reject(job.label, f"output {Path(e.filename).name} appeared meanwhile (another run?); not replaced")
        except OSError as e:  # a full or read-only disk: the atomic write left any earlier file as it was
            self.reject(job.label, f"could not write {job.output.name} ({e.strerror or e}); nothing was replaced")
        except Exception as e:
            if not self.keep_going:
                raise
            self.reject(job.label, f"error: {type(e).__name__}: {e}")

    def _run(self, job: Job) -> None:
        from mfim.imageio import ImageRejected
        from mfim.provenance import save_image

        try:
            sources = {role: self.source_face(role, p) for role, p in job.sources.items()}
            if job.is_video:
                self.run_video(job, sources)
                return
            out = self.make(self.read("target", job.target), sources)
        except ImageRejected as e:
            self.reject(job.label, str(e))
            return
        record = self.input_record(job)
        if self.target_note:  # a group photo: say which face changed, in the record and on stderr
            record["inputs"]["target"] = {**record["inputs"]["target"], "faces": self.target_note}
            say(f"mfim {self.operation}: target {job.label}: {self.target_note}")
        self.written.append(save_image(job.output, out, record, overwrite=self.overwrite))

    def run_video(self, job: Job, sources: dict) -> None:
        from mfim.imageio import ImageRejected
        from mfim.provenance import write_sidecar
        from mfim.video import VideoError, transform_video
        from mfim.watermark import SCHEME, embed

        def process(frame):
            return embed(self.make(frame, sources))

        # with --roi a frame without a face stays the original frame (marked: it is part of a synthetic video);
        # without --roi there is no aligned crop to show, so it becomes a black frame
        on_reject = (lambda frame: embed(frame)) if self.roi else (lambda frame: None)
        try:
            result = transform_video(
                job.target,
                job.output,
                process,
                on_reject,
                rejected=(ImageRejected,),
                progress=self.progress,
                overwrite=self.overwrite,
            )
        except VideoError as e:
            self.reject(job.label, str(e))
            return
        for n, (index, reason) in enumerate(result.rejects):
            self.reject(f"{job.label}#frame{index}", reason, echo=n < FRAME_REJECTS_SHOWN)
        if len(result.rejects) > FRAME_REJECTS_SHOWN:
            more = len(result.rejects) - FRAME_REJECTS_SHOWN
            say(f"mfim {self.operation}: ... and {more} more frames of {job.label} (see the rejects csv)")
        if result.frames_processed == 0:
            self.reject(job.label, f"no frame could be processed ({result.frames_read} frames read)")
            return
        counts = {"frames": result.frames_written, "frames_swapped": result.frames_processed}
        record = {**self.input_record(job), **counts, "watermark": SCHEME}  # the mark is on every frame
        write_sidecar(job.output, record, overwrite=self.overwrite)
        self.written.append(job.output)

    def reject(self, label: str, reason: str, echo: bool = True) -> None:
        self.rejects.append((label, reason))
        if self.rejects_table is not None:
            write_rejects(self.rejects_table, self.rejects)
        if echo:
            say(f"mfim {self.operation}: skipped {label}: {reason}")


ROI_BYTES_PER_PIXEL = 60  # measured: a 79 MP photo took 4.7 GB with --roi (float copies for mask and blend)


def check_roi_memory(image) -> None:
    """ImageRejected, naming the limit, for a photo too large to paste back into on this machine."""
    from mfim.imageio import ImageRejected
    from mfim.resources import refuse_over_budget

    h, w = image.shape[:2]
    try:
        refuse_over_budget(f"with --roi this {w}x{h} photo", h * w * ROI_BYTES_PER_PIXEL)
    except ValueError as e:
        raise ImageRejected(str(e)) from None


def faces_note(face, what: str) -> str:
    """'' for a photo with one face; else which face was used (the largest: FaceSwapper.prepare's choice) and that
    the others were not."""
    found = getattr(face, "faces_found", 1)
    if found <= 1:
        return ""
    return f"{found} faces found; only the largest was used ({what})"


def say(message: str) -> None:
    """A line on stderr that does not tear a running progress bar."""
    from tqdm import tqdm

    tqdm.write(printable(message), file=sys.stderr)


def printable(text) -> str:
    """A file name that is not valid UTF-8 (its odd bytes arrive as surrogates) with those bytes escaped, so that
    printing it cannot fail whatever the stream's error handler."""
    return str(text).encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def upscale_to(image, min_side: int):
    """Upscale (Lanczos) so the short side is at least min_side; larger images are returned as they are."""
    import cv2

    h, w = image.shape[:2]
    if min(h, w) >= min_side:
        return image
    scale = min_side / min(h, w)
    return cv2.resize(image, (round(w * scale), round(h * scale)), interpolation=cv2.INTER_LANCZOS4)


def write_rejects(path: Path, rejects: list[tuple[str, str]], overwrite: bool = True) -> Path:
    """The rejects table, written atomically (a reader or a kill never sees half a table)."""
    import csv
    import io

    from mfim.atomic import atomic_write

    text = io.StringIO()
    w = csv.writer(text)
    w.writerow(["file", "reason"])
    w.writerows(rejects)
    # a file name that is not valid UTF-8 is written with its odd bytes escaped (\\xff), the table stays UTF-8
    data = printable(text.getvalue()).encode("utf-8")
    return atomic_write(path, lambda f: f.write(data), overwrite=overwrite)


def checkpoint_name(checkpoint: str | None) -> str | None:
    """The checkpoint file as the provenance record names it (the default one when none was given)."""
    if checkpoint:
        return Path(checkpoint).name
    try:
        from mfim.inference import DEFAULT_CHECKPOINT
    except ImportError:
        return None
    return Path(DEFAULT_CHECKPOINT).name


def announce_model(operation: str, swapper, checkpoint: str | None, fit_steps: int, fit_exp: float) -> None:
    """Once per run, on stderr: that the model draws synthetic renders, when it does, and how this run's swap
    settings differ from reports/'s, when they do."""
    from mfim.commands.model_notes import announce_synthetic, fit_difference_note

    model = getattr(swapper, "model", None)  # the real FaceSwapper; the tests' stand-ins have none
    if model is not None:
        from mfim.inference import DEFAULT_CHECKPOINT

        announce_synthetic(operation, model.generator, str(checkpoint or DEFAULT_CHECKPOINT))
    note = fit_difference_note(fit_steps, fit_exp)
    if note:
        say(f"mfim {operation}: {note}")


def report_leftover_temps(operation: str, paths: list[Path]) -> None:
    """Hidden temp files of this run's outputs that a killed run left: removed (stale) or named (fresh)."""
    from mfim.atomic import STALE_TEMP_SECONDS, clean_leftover_temps

    removed, left = clean_leftover_temps(paths)
    if removed:
        say(f"mfim {operation}: removed {removed} hidden .part temp file(s) an interrupted run left beside the outputs")
    if left:
        say(f"mfim {operation}: left {left} hidden .part temp file(s) beside the outputs: written in the last "
            f"{STALE_TEMP_SECONDS // 60} minutes (another run writing?)")


def execute(operation: str, target, sources: dict, args) -> int:
    from mfim.outputs import OutputRefused

    overwrite = getattr(args, "overwrite", False)
    try:
        fit_steps = getattr(args, "fit_steps", 0)
        if fit_steps < 0:
            raise UsageError(f"--fit-steps must be >= 0, got {fit_steps}")
        fit_exp = getattr(args, "fit_exp", 0.0)
        if fit_exp < 0 or (fit_exp > 0 and fit_steps == 0):
            raise UsageError(f"--fit-exp must be >= 0 and needs --fit-steps > 0, got {fit_exp} with {fit_steps} steps")
        from mfim.resources import device_problem

        if device_problem(args.device):
            raise UsageError(device_problem(args.device))
        the_plan = plan(target, sources, args.output)
        check_outputs(the_plan, target, sources, overwrite)
        if getattr(args, "model", None):
            args.checkpoint = model_checkpoint(args.model, args.checkpoint)
        swapper = load_swapper(args.checkpoint, args.device, fit_steps, fit_exp)
        announce_model(operation, swapper, args.checkpoint, fit_steps, fit_exp)
        runner = Runner(
            swapper,
            operation,
            roi=args.roi,
            progress=not args.quiet,
            keep_going=the_plan.folder,
            overwrite=overwrite,
            rejects_table=the_plan.rejects_table,
            checkpoint=checkpoint_name(args.checkpoint),
        )
        runner.start()
    except (UsageError, OutputRefused) as e:
        print(f"mfim {operation}: {e}", file=sys.stderr)
        return 2
    report_leftover_temps(operation, the_plan.writes())
    for label, reason in the_plan.rejects:
        runner.reject(label, reason)
    jobs = the_plan.jobs
    if the_plan.folder and not args.quiet:
        from tqdm import tqdm

        jobs = tqdm(jobs, desc=operation, unit="file")
    for job in jobs:
        runner.run(job)

    if the_plan.folder:
        table = the_plan.rejects_table
        if not args.quiet:
            total = len(the_plan.jobs) + len(the_plan.rejects)
            frames = sum("#frame" in label for label, _ in runner.rejects)
            files = len(runner.rejects) - frames
            summary = f"wrote {len(runner.written)} of {total} files to {args.output}; {files} rejected"
            if frames:
                summary += f", and {frames} video frames could not be swapped"
            print(printable(f"{summary} (see {table})"))
    else:
        job = the_plan.jobs[0]
        frame_rejects = [r for r in runner.rejects if r[0].startswith(f"{job.label}#frame")]
        if frame_rejects:
            write_rejects(frame_rejects_path(job.output), frame_rejects, overwrite=overwrite)
        if runner.written and not args.quiet:
            print(printable(runner.written[0]))
    return 0 if runner.written else 1


def run_swap(args) -> int:
    return execute("swap", args.target, {"source": args.source}, args)


def run_mix(args) -> int:
    return execute("mix", args.target, {"global": args.global_source, "local": args.local_source}, args)
