"""Video in, video out, frame by frame, through OpenCV (no audio: OpenCV's writer has no audio track).

Frames cross this module's boundary as H×W×3 uint8 RGB, like every other image in the project; OpenCV's BGR stays
inside. The writer uses codecs that the pip OpenCV wheels can always encode (MPEG-4 Part 2 for .mp4/.mov, Motion-JPEG
for .avi), not H.264, which they ship without an encoder."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

VIDEO_SUFFIXES = {".mp4", ".avi", ".mov"}
# the same bound as a photo (mfim.imageio.MAX_PIXELS): a frame is decoded whole, several copies live at once
MAX_FRAME_PIXELS = 80_000_000
_FOURCC = {".mp4": "mp4v", ".mov": "mp4v", ".avi": "MJPG"}


class VideoError(RuntimeError):
    pass


def is_video(path: str | Path) -> bool:
    return Path(path).suffix.lower() in VIDEO_SUFFIXES


@dataclass
class VideoInfo:
    fps: float
    frame_count: int  # as the container reports it (may be approximate for some files)
    width: int
    height: int


def _open(path: str | Path) -> cv2.VideoCapture:
    if not Path(path).is_file():
        raise VideoError(f"{path}: file not found")
    cap = cv2.VideoCapture(str(path))
    if not cap.isOpened():
        raise VideoError(f"{path}: not a readable video")
    return cap


def probe(path: str | Path) -> VideoInfo:
    cap = _open(path)
    try:
        fps = cap.get(cv2.CAP_PROP_FPS)
        if not np.isfinite(fps):
            fps = 0.0
        return VideoInfo(
            fps=fps if fps and fps > 0 else 25.0,  # some containers report 0; 25 is the common default
            frame_count=int(cap.get(cv2.CAP_PROP_FRAME_COUNT)),
            width=int(cap.get(cv2.CAP_PROP_FRAME_WIDTH)),
            height=int(cap.get(cv2.CAP_PROP_FRAME_HEIGHT)),
        )
    finally:
        cap.release()


def read_frames(path: str | Path) -> Iterator[np.ndarray]:
    """Every frame as H×W×3 uint8 RGB, in order; VideoError for frames over MAX_FRAME_PIXELS."""
    cap = _open(path)
    try:
        w, h = int(cap.get(cv2.CAP_PROP_FRAME_WIDTH)), int(cap.get(cv2.CAP_PROP_FRAME_HEIGHT))
        check_frame_size(path, VideoInfo(0.0, 0, w, h))
        while True:
            ok, bgr = cap.read()
            if not ok:
                return
            yield cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
    finally:
        cap.release()


def sample_frames(path: str | Path, n: int) -> list[tuple[int, np.ndarray]]:
    """Up to n frames spread evenly over the video, as (index, RGB frame)."""
    total = probe(path).frame_count
    if total <= 0:
        return [(i, f) for i, f in zip(range(n), read_frames(path))]
    wanted = set(np.linspace(0, total - 1, min(n, total)).round().astype(int).tolist())
    return [(i, f) for i, f in enumerate(read_frames(path)) if i in wanted]


class VideoWriter:
    """Writes RGB frames; the size is fixed by the first frame (later frames of another size are an error)."""

    def __init__(self, path: str | Path, fps: float):
        self.path = Path(path)
        suffix = self.path.suffix.lower()
        if suffix not in _FOURCC:
            raise VideoError(f"{path}: unsupported video suffix (use one of {sorted(VIDEO_SUFFIXES)})")
        self.fourcc = cv2.VideoWriter_fourcc(*_FOURCC[suffix])
        self.fps = fps
        self.size: tuple[int, int] | None = None
        self.frames_written = 0
        self._writer: cv2.VideoWriter | None = None

    def write(self, frame: np.ndarray) -> None:
        h, w = frame.shape[:2]
        if self._writer is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._writer = cv2.VideoWriter(str(self.path), self.fourcc, self.fps, (w, h))
            if not self._writer.isOpened():
                raise VideoError(f"{self.path}: OpenCV could not open a video writer")
            self.size = (w, h)
        elif (w, h) != self.size:
            raise VideoError(f"frame size {w}x{h} differs from the video's {self.size[0]}x{self.size[1]}")
        self._writer.write(cv2.cvtColor(np.ascontiguousarray(frame), cv2.COLOR_RGB2BGR))
        self.frames_written += 1

    def close(self) -> None:
        if self._writer is not None:
            self._writer.release()
            self._writer = None

    def __enter__(self) -> VideoWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@dataclass
class VideoResult:
    frames_read: int = 0
    frames_processed: int = 0  # frames `process` succeeded on
    frames_written: int = 0
    rejects: list[tuple[int, str]] = field(default_factory=list)  # (frame index, reason)


def transform_video(
    src: str | Path,
    dst: str | Path,
    process: Callable[[np.ndarray], np.ndarray],
    on_reject: Callable[[np.ndarray], np.ndarray | None],
    rejected: tuple[type[BaseException], ...] = (ValueError,),
    progress: bool = True,
    desc: str | None = None,
    overwrite: bool = True,
) -> VideoResult:
    """Run `process` on every frame of `src` and write the results to `dst` at the same frame rate.

    A frame on which `process` raises one of `rejected` is recorded with the reason (str of the exception) and
    replaced by `on_reject(frame)` -- e.g. the untouched frame, so the video keeps its length and timing. When
    `on_reject` returns None the replacement is a black frame of the output size (frames rejected before the size is
    known are written once it is). If no frame could be processed, no file is left behind.

    The video is written under a temp name beside dst and renamed when complete, so dst is never a torn file;
    overwrite=False raises FileExistsError rather than replace a dst that exists by then."""
    from tqdm import tqdm

    from mfim.atomic import move_into_place, temp_path

    info = probe(src)
    check_frame_size(src, info)
    check_free_space(src, dst)
    result = VideoResult()
    pending_black = 0  # rejected frames that wait for the output size
    if Path(dst).suffix.lower() not in _FOURCC:
        raise VideoError(f"{dst}: unsupported video suffix (use one of {sorted(VIDEO_SUFFIXES)})")
    # OpenCV picks the container from the file name, so the temp name keeps dst's suffix
    tmp = temp_path(dst, suffix=".part" + Path(dst).suffix)
    writer = VideoWriter(tmp, info.fps)
    bar = tqdm(
        total=info.frame_count or None,
        desc=desc or Path(src).name,
        unit="frame",
        disable=not progress,
        leave=False,
    )
    done = False
    try:
        for index, frame in enumerate(read_frames(src)):
            result.frames_read += 1
            try:
                out = process(frame)
                result.frames_processed += 1
            except rejected as e:
                result.rejects.append((index, str(e)))
                out = on_reject(frame)
            if out is None:
                if writer.size is None:
                    pending_black += 1
                else:
                    writer.write(np.zeros((writer.size[1], writer.size[0], 3), np.uint8))
            else:
                if writer.size is None and pending_black:
                    black = np.zeros_like(out)
                    for _ in range(pending_black):
                        writer.write(black)
                    pending_black = 0
                writer.write(out)
            bar.update(1)
        done = True
    finally:
        bar.close()
        writer.close()
        if not done or result.frames_processed == 0:
            tmp.unlink(missing_ok=True)
    result.frames_written = writer.frames_written
    if result.frames_processed == 0:
        result.frames_written = 0
    else:
        try:
            verify_written(tmp, dst, writer.frames_written)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        move_into_place(tmp, dst, overwrite=overwrite)
    return result


def check_frame_size(src: str | Path, info: VideoInfo) -> None:
    """Frames are decoded whole (and copied by the swap), so a huge frame is refused like a huge photo."""
    if info.width * info.height > MAX_FRAME_PIXELS:
        raise VideoError(
            f"{Path(src).name}: frames too large ({info.width}x{info.height} > {MAX_FRAME_PIXELS} pixels, "
            "the limit for photos too)"
        )


def check_free_space(src: str | Path, dst: str | Path) -> None:
    """Refuse before any work when dst's disk has less free space than the source video takes: the re-encoded
    output is of the same order, and OpenCV's writer does not report a full disk (verify_written catches what
    this estimate misses)."""
    import shutil

    need = Path(src).stat().st_size
    try:
        free = shutil.disk_usage(Path(dst).parent).free
    except OSError:
        return  # cannot be known here; verify_written still checks the result
    if free < need:
        raise VideoError(
            f"not enough free space for {Path(dst).name}: {free / 1e6:.1f} MB free in {Path(dst).parent}, "
            f"the source video alone is {need / 1e6:.1f} MB"
        )


def verify_written(tmp: Path, dst: str | Path, frames: int) -> None:
    """OpenCV's VideoWriter swallows write errors (a full disk leaves a truncated file behind a normal return), so
    the temp file is read back before it may replace anything: it must open and hold every frame written."""
    name = Path(dst).name
    size = tmp.stat().st_size if tmp.exists() else 0
    if size == 0:
        raise VideoError(f"{name}: the video written is empty (disk full?); nothing was replaced")
    try:
        readable = sum(1 for _ in _grab_all(tmp))
    except VideoError:
        readable = -1
    if readable != frames:
        got = "unreadable" if readable < 0 else f"{readable} of {frames} frames readable"
        raise VideoError(f"{name}: the video written is incomplete ({got}, {size} bytes; disk full?); "
                         "nothing was replaced")


def _grab_all(path: Path) -> Iterator[None]:
    """One item per frame the file holds, demuxed and decoded by the same reader that will play it back."""
    cap = _open(path)
    try:
        while cap.grab():
            yield None
    finally:
        cap.release()
