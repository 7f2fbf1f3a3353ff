"""WebDataset shards of aligned faces: the sample format, the writer, an index for random access, and the reader.

Format. Each sample is two tar members, ``<key>.png`` (the aligned face at ``data.resolution``, RGB) and
``<key>.json`` (metadata: key, split, identity or null, source/aligned file, landmarks in shard pixels, ground-truth
3DMM or null, provenance). Shards are ``<dir>/{train,eval}-%06d.tar``, written with ``webdataset.ShardWriter`` and
readable by ``webdataset.WebDataset``.

Untrusted names. A member name is only ever parsed as ``<key>.<ext>`` with ``key`` matching :data:`KEY_RE` (letters,
digits, ``_``, ``-``, components joined by ``/``; no dots, no absolute paths, no ``..``) and must equal the key inside its
JSON. Nothing is ever extracted to disk; bytes are read at recorded offsets.

Reader. ``image_batches`` (here) and ``mfim.data.pairs.pair_batches`` share one scheme:

* Index: the tar headers and every JSON are read once; samples are ordered by key, so the order does not depend on
  how the shards were cut.
* Per-epoch order: epoch ``e`` uses the permutation ``default_rng([seed, e]).permutation(N)`` (identical on every rank);
  rank ``r`` of ``world`` takes ``perm[r::world][:N // world]``. Within an epoch a rank sees each of its samples once,
  ranks are disjoint, every rank gets the same count (DDP steps agree); the ``N mod world`` left over change every
  epoch. The stream is infinite (epoch after epoch); a batch may straddle two epochs.
* Randomness other than the order (augmentation, pair choice) is seeded per sample from ``(seed, rank, position)``.
* Workers: position chunks of one batch go round-robin to DataLoader workers (decoding only); the main process
  assembles batches in position order, so the output does not depend on the worker count.
* Corrupt samples (undecodable PNG, bad JSON, bad or missing member) are logged once per process and skipped; the
  batch is filled with the following samples. A whole epoch without one readable sample raises RuntimeError.
* Position: ``ReaderPosition(epoch, offset)`` names the first sample of this rank's stream not yet handed out.
  Guarantee: a reader built over the same shards with the same ``seed``, ``rank``, ``world`` (and for pairs the same
  fraction and table) and ``position=`` that value yields exactly the samples, with exactly the augmentations, that the
  interrupted reader would have yielded next -- with any worker count; with the same batch size the batches are equal.
"""

from __future__ import annotations

import glob
import hashlib
import io
import json
import logging
import os
import re
import tarfile
import time
from collections import deque
from dataclasses import dataclass, field
from itertools import count
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import braceexpand
import cv2
import numpy as np
import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from mfim.runtime import LoaderWorkerInit

log = logging.getLogger(__name__)

SPLITS = ("train", "eval")
KEY_RE = re.compile(r"[A-Za-z0-9_-]+(?:/[A-Za-z0-9_-]+)*")
IMAGE_EXT = "png"
META_EXT = "json"
_MEMBER_RE = re.compile(rf"({KEY_RE.pattern})\.(png|json)")
_TAR_BLOCK = 512
_TAR_RECORD = 20 * _TAR_BLOCK  # tarfile pads the archive end to a whole record
# Untrusted shards: a tar header can declare any member size and a PNG header any image size. An aligned face is
# a few MB at most; the limits keep a crafted 1.5 KB shard from making a reader seek or allocate without end.
MAX_MEMBER_BYTES = 64 * 2**20
MAX_IMAGE_PIXELS = 4096 * 4096


class CorruptSample(ValueError):
    """A shard sample that cannot be used; ``str(exc)`` is the reason that gets logged."""


# ----------------------------------------------------------------------------------------------------------- keys


def validate_key(key: str) -> str:
    if not isinstance(key, str) or not KEY_RE.fullmatch(key):
        raise ValueError(f"invalid sample key {key!r} (allowed: [A-Za-z0-9_-] components joined by '/')")
    return key


def make_key(relative_path: str | Path) -> str:
    """A valid key from a relative file path: suffix dropped, other characters outside the key alphabet -> '_'."""
    parts = Path(relative_path).with_suffix("").parts
    clean = [re.sub(r"[^A-Za-z0-9_-]", "_", p) or "_" for p in parts if p not in ("", ".", "..", "/")]
    return validate_key("/".join(clean) or "_")


def seeded_split(key: str, seed: int, eval_fraction: float) -> str:
    """'eval' for a stable pseudo-random ``eval_fraction`` of keys (a hash of seed and key: adding images moves none)."""
    h = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    return "eval" if int.from_bytes(h[:8], "big") / 2**64 < eval_fraction else "train"


# ------------------------------------------------------------------------------------------------- sample codec


def encode_png(image: np.ndarray) -> bytes:
    """H×W×3 uint8 RGB -> PNG bytes (lossless)."""
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected H×W×3 uint8, got {image.dtype} {image.shape}")
    ok, buf = cv2.imencode(".png", np.ascontiguousarray(image[..., ::-1]), [cv2.IMWRITE_PNG_COMPRESSION, 3])
    if not ok:
        raise ValueError("PNG encoding failed")
    return buf.tobytes()


def decode_png(data: bytes, max_pixels: int = MAX_IMAGE_PIXELS) -> np.ndarray:
    """PNG bytes -> H×W×3 uint8 RGB; CorruptSample when the bytes are not a decodable colour image or declare more
    than ``max_pixels`` pixels (read from the header by PIL before anything is decoded)."""
    if not data:
        raise CorruptSample("empty image member")
    try:
        with Image.open(io.BytesIO(data)) as im:
            w, h = im.size
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise CorruptSample(f"undecodable image member ({type(e).__name__})") from None
    if w * h > max_pixels:
        raise CorruptSample(f"image member declares {w}x{h} pixels (limit {max_pixels})")
    arr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    if arr is None or arr.ndim != 3 or arr.shape[2] != 3:
        raise CorruptSample("undecodable image member")
    return cv2.cvtColor(arr, cv2.COLOR_BGR2RGB)


def encode_meta(meta: Mapping[str, Any]) -> bytes:
    return json.dumps(meta, sort_keys=True, separators=(",", ":"), allow_nan=False).encode("utf-8")


def decode_meta(data: bytes, member_key: str) -> dict:
    try:
        meta = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CorruptSample(f"unreadable JSON member ({type(e).__name__})") from None
    if not isinstance(meta, dict):
        raise CorruptSample("JSON member is not an object")
    if meta.get("key") != member_key:
        raise CorruptSample(f"JSON key {meta.get('key')!r} differs from member name {member_key!r}")
    return meta


def resize_square(image: np.ndarray, resolution: int) -> np.ndarray:
    """Resize to resolution² (area filter when shrinking, cubic when enlarging); unchanged when already that size."""
    h, w = image.shape[:2]
    if (h, w) == (resolution, resolution):
        return image
    interp = cv2.INTER_AREA if resolution < max(h, w) else cv2.INTER_CUBIC
    return cv2.resize(image, (resolution, resolution), interpolation=interp)


@dataclass
class ShardSample:
    key: str
    image: np.ndarray  # H×W×3 uint8 RGB
    meta: dict


def decode_sample(member_key: str, members: Mapping[str, bytes], resolution: int | None = None) -> ShardSample:
    """Validated sample from its raw members (``{'png': bytes, 'json': bytes}``); raises CorruptSample."""
    try:
        validate_key(member_key)
    except ValueError as e:
        raise CorruptSample(str(e)) from None
    for ext in (IMAGE_EXT, META_EXT):
        if ext not in members:
            raise CorruptSample(f"missing .{ext} member")
    meta = decode_meta(members[META_EXT], member_key)
    image = decode_png(members[IMAGE_EXT])
    if resolution is not None:
        image = resize_square(image, resolution)
    return ShardSample(member_key, image, meta)


# ------------------------------------------------------------------------------------------------------- writer


def _tar_member_bytes(payload: int) -> int:
    return _TAR_BLOCK + -(-payload // _TAR_BLOCK) * _TAR_BLOCK


def write_split_shards(
    samples: Iterable[tuple[str, np.ndarray, dict]], out_dir: str | Path, split: str, max_shard_bytes: int
) -> list[Path]:
    """Write (key, image, meta) samples to ``out_dir/<split>-%06d.tar``; returns the shard paths. ``image``: H×W×3
    uint8, or its PNG bytes from :func:`encode_png` (encoded elsewhere, e.g. in a worker process).

    Earlier shards of this split are removed first (a stale ``-000007.tar`` would otherwise join the glob). Every tar
    file stays within ``max_shard_bytes`` (tar headers and padding counted) unless a single sample is larger. Tars are
    byte-reproducible (fixed mtime/owner), so DVC sees an unchanged output as unchanged.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for old in out_dir.glob(f"{split}-*.tar"):
        old.unlink()
    writer = None
    used = 0
    paths: list[Path] = []
    try:
        for key, image, meta in samples:
            validate_key(key)
            png = image if isinstance(image, bytes) else encode_png(image)  # bytes: encoded by a worker process
            sample = {"__key__": key, IMAGE_EXT: png, META_EXT: encode_meta({**meta, "key": key})}
            need = sum(_tar_member_bytes(len(sample[e])) for e in (IMAGE_EXT, META_EXT))
            if writer is None:
                # ShardWriter opens its first file on construction, so it is made only once there is a sample;
                # its own size rule (payload only, checked after the fact) is disabled in favour of ours.
                writer = wds.ShardWriter(str(out_dir / f"{split}-%06d.tar"), maxcount=10**12, maxsize=float("inf"),
                                         verbose=0, encoder=False, mtime=0.0, user="mfim", group="mfim")
                paths.append(Path(writer.fname))
            elif used > 0 and used + need + 2 * _TAR_RECORD > max_shard_bytes:
                writer.next_stream()
                paths.append(Path(writer.fname))
                used = 0
            writer.write(sample)
            used += need
    finally:
        if writer is not None:
            writer.close()
    return paths


# ------------------------------------------------------------------------------------------------------- shards


def expand_shards(pattern: str | Path | Sequence[str | Path]) -> list[str]:
    """Shard paths from a glob (``data/shards/train-*.tar``), a brace pattern (``train-{000000..000003}.tar``) or a list."""
    items = [str(p) for p in pattern] if isinstance(pattern, (list, tuple)) else [str(pattern)]
    paths: list[str] = []
    for item in items:
        for p in braceexpand.braceexpand(item):
            paths.extend(sorted(glob.glob(p)) if glob.has_magic(p) else [p] if os.path.isfile(p) else [])
    paths = sorted(dict.fromkeys(paths))
    if not paths:
        raise FileNotFoundError(f"no shards match {pattern!r} (made by the `shard` stage: `dvc repro shard`)")
    return paths


def split_pattern(shards_dir: str | Path, split: str) -> str:
    return str(Path(shards_dir) / f"{split}-*.tar")


_warned: set[str] = set()


def _warn_once(what: str, reason: str) -> None:
    # Corrupt samples come back every epoch; one line per sample and process is enough.
    if what not in _warned:
        _warned.add(what)
        log.warning("skipping corrupt shard sample %s: %s", what, reason)


def scan_members(path: str, max_member_bytes: int = MAX_MEMBER_BYTES) -> Iterator[tuple[str, int, int]]:
    """(name, data offset, size) of every regular member whose header fits the file and the size limit.

    Only headers are read (random access), so a member that declares more bytes than the file has is refused at
    once -- a streaming tar reader would instead try to skip past it, which for a declared 2**62 bytes never ends.
    Bad members and unreadable headers are logged and skipped; the headers after a bad size cannot be trusted, so
    the scan of that shard stops at the first unreadable one.
    """
    size = os.path.getsize(path)
    try:
        tf = tarfile.open(path, mode="r:")
    except (tarfile.TarError, OSError) as e:
        _warn_once(f"shard {path}", f"unreadable tar ({e})")
        return
    with tf:
        while True:
            try:
                info = tf.next()
            except (tarfile.TarError, OSError) as e:
                _warn_once(f"shard {path}", f"tar headers unreadable after {len(tf.members)} members ({e})")
                return
            if info is None:
                return
            if not info.isreg():
                continue
            if info.offset_data + info.size > size:
                _warn_once(f"member {info.name!r} in {path}", f"truncated member (declares {info.size} bytes)")
                continue
            if info.size > max_member_bytes:
                _warn_once(f"member {info.name!r} in {path}", f"member of {info.size} bytes (limit {max_member_bytes})")
                continue
            yield info.name, info.offset_data, info.size


def _stream_members(shards: Sequence[str], max_member_bytes: int) -> Iterator[dict]:
    """The members of each shard as webdataset's tar expander yields them ({fname, data, __url__}), from validated
    headers; ``{}`` between shards so a sample never spans two of them."""
    for path in shards:
        with open(path, "rb") as f:
            for name, offset, size in scan_members(path, max_member_bytes):
                f.seek(offset)
                yield {"fname": name, "data": f.read(size), "__url__": path}
        yield {}


def iter_samples(pattern: str | Sequence[str], resolution: int | None = None,
                 max_member_bytes: int = MAX_MEMBER_BYTES) -> Iterator[ShardSample]:
    """Every valid sample once, in shard order, streamed (members grouped into samples by webdataset's own
    ``group_by_keys``, from headers checked by :func:`scan_members`); corrupt ones logged, skipped."""

    def handler(exn: Exception) -> bool:
        _warn_once(f"{type(exn).__name__}: {str(exn)[:300]}", "tar read error")
        return True

    members = _stream_members(expand_shards(pattern), max_member_bytes)
    for raw in wds.tariterators.group_by_keys(members, handler=handler):
        member_key = raw.get("__key__", "")
        members = {k: v for k, v in raw.items() if not k.startswith("__")}
        try:
            yield decode_sample(member_key, members, resolution)
        except CorruptSample as e:
            _warn_once(f"{member_key!r} in {raw.get('__url__')}", str(e))


@dataclass
class _Member:
    shard: int
    offset: int
    size: int


class ShardIndex:
    """Random access to the samples of a set of shards, from their tar headers (read once, no data extracted).

    ``keys`` (sorted), ``metas`` (parsed JSON, validated) and ``identities`` (int, -1 when unknown) line up;
    ``read(i)`` decodes sample ``i``. Picklable: open file descriptors are per process and reopened after fork.

    ``keep_metas=False`` (training: each rank and worker holds an index) keeps keys, identities and member offsets
    only; ``metas`` is then None and ``read`` decodes the sample's JSON again (0.77 GB of parsed JSON per index for
    63k samples otherwise).
    """

    def __init__(self, pattern: str | Sequence[str], max_member_bytes: int = MAX_MEMBER_BYTES,
                 keep_metas: bool = True):
        self.shards = expand_shards(pattern)
        members: dict[str, dict[str, _Member]] = {}
        for s, path in enumerate(self.shards):
            for name, offset, size in scan_members(path, max_member_bytes):
                member = _Member(s, offset, size)
                m = _MEMBER_RE.fullmatch(name)
                if m is None:
                    _warn_once(f"member {name!r} in {path}", "untrusted member name (not <key>.png|json)")
                    continue
                key, ext = m.group(1), m.group(2)
                entry = members.setdefault(key, {})
                if ext in entry:
                    _warn_once(f"{key!r} in {path}", f"duplicate .{ext} member; the first one is kept")
                    continue
                entry[ext] = member
        self._fds: dict[int, int] = {}
        self._pid = os.getpid()
        self.keys: list[str] = []
        self.metas: list[dict] | None = []
        self._members: list[dict[str, _Member]] = []
        identities: list[int] = []
        for key in sorted(members):
            entry = members[key]
            try:
                if IMAGE_EXT not in entry or META_EXT not in entry:
                    raise CorruptSample("missing .png or .json member")
                meta = decode_meta(self._read_member(entry[META_EXT]), key)
            except CorruptSample as e:
                _warn_once(f"{key!r}", str(e))
                continue
            self.keys.append(key)
            if keep_metas:
                self.metas.append(meta)
            identities.append(meta["identity"] if isinstance(meta.get("identity"), int) else -1)
            self._members.append(entry)
        if not keep_metas:
            self.metas = None
        self.position_of = {k: i for i, k in enumerate(self.keys)}
        self.identities = np.array(identities, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.keys)

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_fds"] = {}
        return state

    def _read_member(self, member: _Member) -> bytes:
        if self._pid != os.getpid():  # forked into a DataLoader worker: descriptors are shared offsets, reopen
            self._fds, self._pid = {}, os.getpid()
        fd = self._fds.get(member.shard)
        if fd is None:
            fd = self._fds[member.shard] = os.open(self.shards[member.shard], os.O_RDONLY)
        data = os.pread(fd, member.size, member.offset)
        if len(data) != member.size:
            raise CorruptSample("short read")
        return data

    def read(self, i: int, resolution: int | None = None) -> ShardSample:
        """Sample ``i`` decoded (and resized); raises CorruptSample."""
        key = self.keys[i]
        image = decode_png(self._read_member(self._members[i][IMAGE_EXT]))
        if resolution is not None:
            image = resize_square(image, resolution)
        meta = self.metas[i] if self.metas is not None else decode_meta(self._read_member(self._members[i][META_EXT]),
                                                                         key)
        return ShardSample(key, image, meta)

    def read_png_bytes(self, i: int) -> bytes:
        return self._read_member(self._members[i][IMAGE_EXT])

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds = {}


def read_images(pattern: str | Sequence[str], keys: Sequence[str], resolution: int | None = None) -> np.ndarray:
    """N×H×W×3 uint8 for the given keys (e.g. an evaluation manifest); KeyError names a key the shards lack."""
    index = ShardIndex(pattern)
    try:
        return np.stack([index.read(index.position_of[k], resolution).image for k in keys])
    finally:
        index.close()


# ------------------------------------------------------------------------------------------------------- reader


@dataclass(frozen=True)
class ReaderPosition:
    """The first sample of a rank's stream not yet handed out: ``offset`` within ``epoch``. Save ``as_dict()``."""

    epoch: int = 0
    offset: int = 0

    def as_dict(self) -> dict:
        return {"epoch": int(self.epoch), "offset": int(self.offset)}

    @classmethod
    def from_dict(cls, d: Mapping[str, int] | "ReaderPosition" | None) -> "ReaderPosition":
        if d is None:
            return cls()
        if isinstance(d, ReaderPosition):
            return d
        return cls(int(d["epoch"]), int(d["offset"]))


class EpochPlan:
    """Which index a rank reads at each position of its infinite stream (see the module docstring)."""

    def __init__(self, n: int, seed: int, rank: int = 0, world: int = 1):
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} outside world size {world}")
        if n < world:
            raise ValueError(f"{n} samples cannot be split over {world} ranks")
        self.n, self.seed, self.rank, self.world = n, int(seed), rank, world
        self.epoch_length = n // world
        self._cache: dict[int, np.ndarray] = {}

    def epoch_indices(self, epoch: int) -> np.ndarray:
        if epoch not in self._cache:
            if len(self._cache) > 2:
                self._cache.pop(min(self._cache))
            perm = np.random.default_rng([self.seed, epoch]).permutation(self.n)
            self._cache[epoch] = perm[self.rank :: self.world][: self.epoch_length]
        return self._cache[epoch]

    def index_at(self, position: int) -> int:
        epoch, offset = divmod(position, self.epoch_length)
        return int(self.epoch_indices(epoch)[offset])

    def to_position(self, p: ReaderPosition) -> int:
        if not 0 <= p.offset < self.epoch_length:
            raise ValueError(f"offset {p.offset} outside an epoch of {self.epoch_length} samples")
        return p.epoch * self.epoch_length + p.offset

    def from_position(self, position: int) -> ReaderPosition:
        return ReaderPosition(*divmod(position, self.epoch_length))


def sample_rng(seed: int, rank: int, position: int, stream: int) -> np.random.Generator:
    """The generator for one sample's randomness (``stream`` tells apart uses within a sample)."""
    return np.random.default_rng([int(seed), int(rank), int(position), int(stream)])


class ItemSource:
    """What one stream position becomes: ``make(position) -> dict`` of arrays/strings/bools, or raise CorruptSample.
    ``image_fields`` name the H×W×3 uint8 entries, which reach the batch as B×3×H×W float in [-1, 1]."""

    plan: EpochPlan
    image_fields: tuple[str, ...] = ()

    def make(self, position: int) -> dict:  # pragma: no cover - interface
        raise NotImplementedError


class _ChunkStream(IterableDataset):
    """Worker side: chunk ``c`` = positions ``[start + c·size, start + (c+1)·size)`` goes to worker ``c mod W``."""

    def __init__(self, source: ItemSource, start: int, size: int):
        self.source, self.start, self.size = source, start, size

    def __iter__(self):
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        for c in count(worker, workers):
            lo = self.start + c * self.size
            items, positions = [], []
            for p in range(lo, lo + self.size):
                try:
                    items.append(self.source.make(p))
                    positions.append(p)
                except CorruptSample as e:
                    _warn_once(f"at stream position {p}", str(e))
            chunk = _stack_items(items, positions, lo + self.size)
            # float conversion here, in the worker: the main (training) process only concatenates
            for name in self.source.image_fields:
                if name in chunk:
                    chunk[name] = to_float_images(torch.from_numpy(chunk[name]))
            yield chunk


def _stack_items(items: list[dict], positions: list[int], end: int) -> dict:
    chunk: dict[str, Any] = {"_positions": np.asarray(positions, dtype=np.int64), "_end": end}
    if items:
        for name, first in items[0].items():
            values = [it[name] for it in items]
            chunk[name] = values if isinstance(first, str) else np.stack([np.asarray(v) for v in values])
    return chunk


# How DataLoader workers start: "spawn", a fresh interpreter that holds only the reader. A fork made after the caller
# built its models (train and warmstart start their readers then) shares every page of them copy-on-write, and each
# page the trainer then writes (weights, EMA, Adam moments, activations reusing freed heap) is copied for the writer
# while the worker keeps the old one: each worker ends up holding a snapshot of the whole training process (7 GB at
# paper scale, issue 36; benchmarks/bench_memory.py). Not "forkserver": its workers are the server's children, so
# they never see the trainer die and outlive a SIGKILL; a spawned worker's watchdog sees its parent gone and exits.
WORKER_CONTEXT = "spawn"


class _ReaderWorkerInit(LoaderWorkerInit):
    """Also one OpenCV thread per worker (decoding is the work; 2 workers on 2 cores must not oversubscribe). Only
    in these spawned workers: a forked worker inherits the parent's OpenCV thread pool, whose locks a fork can leave
    held, so the forked loaders leave OpenCV alone (as they did before this init)."""

    def __call__(self, worker_id: int) -> None:
        super().__call__(worker_id)
        cv2.setNumThreads(1)


class BatchIterator:
    """Infinite iterator of batches assembled in stream order; ``position`` is what to save for an exact resume."""

    def __init__(self, source: ItemSource, batch_size: int, workers: int = 0,
                 position: ReaderPosition | Mapping | None = None,
                 finish: Callable[[dict], Any] = lambda b: b):
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        self.source, self.batch_size, self.finish = source, batch_size, finish
        start = source.plan.to_position(ReaderPosition.from_dict(position))
        stream = _ChunkStream(source, start, batch_size)
        if workers > 0:
            loader = DataLoader(stream, batch_size=None, num_workers=workers, worker_init_fn=_ReaderWorkerInit(),
                                prefetch_factor=4, persistent_workers=False, multiprocessing_context=WORKER_CONTEXT)
            self._chunks = iter(loader)
        else:
            self._chunks = (_to_tensors(c) for c in stream)
        self._pending: deque[tuple[dict, int]] = deque()  # (chunk, first unused row)
        self._next = start  # first position not yet handed out

    @property
    def position(self) -> ReaderPosition:
        return self.source.plan.from_position(self._next)

    def state_dict(self) -> dict:
        return self.position.as_dict()

    def close(self) -> None:
        """Stop the workers and close the shard files (also happens when the iterator is garbage-collected)."""
        self._chunks = iter(())
        index = getattr(self.source, "index", None)
        if index is not None:
            index.close()

    def __iter__(self):
        return self

    def _available(self) -> int:
        return sum(len(c["_positions"]) - r for c, r in self._pending)

    def __next__(self):
        barren = 0  # positions in a row that gave no sample: a whole epoch of them means nothing is readable
        while self._available() < self.batch_size:
            chunk = next(self._chunks)
            self._pending.append((chunk, 0))
            barren = 0 if len(chunk["_positions"]) else barren + self.batch_size
            if barren >= max(self.source.plan.epoch_length, self.batch_size):
                raise RuntimeError("no readable sample in a whole epoch of the shards (see the warnings above)")
        parts, need = [], self.batch_size
        while need:
            chunk, row = self._pending[0]
            take = min(need, len(chunk["_positions"]) - row)
            if take:
                parts.append({k: v[row : row + take] for k, v in chunk.items() if not k.startswith("_")})
                need -= take
            self._pending[0] = (chunk, row + take)
            if row + take == len(chunk["_positions"]):
                self._pending.popleft()
                self._next = chunk["_end"]
        # The position is the first unused row; chunks left with nothing unused (all corrupt) are passed over.
        while self._pending and len(self._pending[0][0]["_positions"]) == self._pending[0][1]:
            self._next = self._pending.popleft()[0]["_end"]
        if self._pending:
            chunk, row = self._pending[0]
            self._next = int(chunk["_positions"][row])
        batch = parts[0] if len(parts) == 1 else {
            k: (sum((p[k] for p in parts), []) if isinstance(parts[0][k], list) else torch.cat([p[k] for p in parts]))
            for k in parts[0]}
        return self.finish(batch)


def _to_tensors(chunk: dict) -> dict:
    return {k: torch.from_numpy(v) if isinstance(v, np.ndarray) else v for k, v in chunk.items()}


def to_float_images(images: torch.Tensor) -> torch.Tensor:
    """B×H×W×3 uint8 -> B×3×H×W float32 in [-1, 1] (channel-first while still uint8: a quarter of the bytes)."""
    return images.permute(0, 3, 1, 2).contiguous().float().mul_(1.0 / 127.5).sub_(1.0)


class ImageItems(ItemSource):
    """Stream position -> one decoded (optionally augmented) image."""

    image_fields = ("image",)

    def __init__(self, index: ShardIndex, plan: EpochPlan, resolution: int, augment=None):
        self.index, self.plan, self.resolution, self.augment = index, plan, resolution, augment

    def make(self, position: int) -> dict:
        i = self.plan.index_at(position)
        try:
            image = self.index.read(i, self.resolution).image
        except CorruptSample as e:
            raise CorruptSample(f"{self.index.keys[i]!r}: {e}") from None
        if self.augment is not None:
            image = self.augment(image, sample_rng(self.plan.seed, self.plan.rank, position, 0)).image
        return {"image": image}


def image_batches(pattern: str | Sequence[str], resolution: int, batch_size: int, seed: int, rank: int = 0,
                  world: int = 1, augment: bool = False, *, workers: int = 0,
                  position: ReaderPosition | Mapping | None = None) -> BatchIterator:
    """Infinite iterator of B×3×H×W float32 in [-1, 1] (generator pretraining). ``.position`` resumes it exactly."""
    from mfim.data.augment import FaceAugment

    index = ShardIndex(pattern)
    source = ImageItems(index, EpochPlan(len(index), seed, rank, world), resolution,
                        FaceAugment() if augment else None)
    return BatchIterator(source, batch_size, workers, position, finish=lambda b: b["image"])


# ---------------------------------------------------------------------------------------- building from aligned


@dataclass
class ShardInputs:
    """What the shard stage reads. ``ground_truth``: the synthetic table (key, file, identity, split, shape, exp, yaw,
    pitch, roll, ...) or None for a real folder; ``landmarks``: key -> (68, 2) in aligned-image pixels, or None;
    ``transforms``: key -> the 2×3 original -> aligned matrix of the align stage (its in-plane rotation moves the
    ground-truth roll), or None."""

    aligned_dir: Path
    ground_truth: "Any | None" = None  # pandas.DataFrame
    landmarks: Mapping[str, np.ndarray] | None = None
    transforms: Mapping[str, np.ndarray] | None = None
    source: str = "synthetic"
    eval_fraction: float = 0.1
    seed: int = 0
    extra_rejects: list[dict] = field(default_factory=list)


def alignment_rotation(transform) -> float:
    """In-plane angle (radians) of a 2×3 original -> aligned similarity, atan2(m10, m00) in image coordinates."""
    m = np.asarray(transform, np.float64).reshape(2, 3)
    return float(np.arctan2(m[1, 0], m[0, 0]))


def _gt_record(row, transform=None) -> dict:
    """Ground truth as it holds in the *aligned* image. The synthetic pose is the face's pose in the raw render; the
    FFHQ alignment is a similarity transform, i.e. a rotation about the camera axis, which in the 3DDFA_V2
    convention R = Rz(roll) Ry(yaw) Rx(pitch) leaves yaw and pitch alone and moves roll by minus its angle."""
    yaw, pitch, roll = float(row["yaw"]), float(row["pitch"]), float(row["roll"])
    frame = "raw"
    if transform is not None:
        roll = float(np.angle(np.exp(1j * (roll - alignment_rotation(transform)))))  # wrapped to (-pi, pi]
        frame = "aligned"
    # pose both as the (yaw, pitch, roll) vector and by name, for readers that want either
    return {"shape": [float(v) for v in row["shape"]], "exp": [float(v) for v in row["exp"]],
            "pose": [yaw, pitch, roll], "yaw": yaw, "pitch": pitch, "roll": roll, "pose_frame": frame,
            "raw_roll": float(row["roll"])}


def _plan_samples(inputs: ShardInputs, image_paths: list[Path]) -> tuple[dict[str, list], list[dict]]:
    """Split the aligned files into {'train': [(key, path, meta)], 'eval': [...]} plus rejects."""
    gt = None
    if inputs.ground_truth is not None:
        gt = {str(r["key"]): r for r in inputs.ground_truth.to_dict("records")}
    plan: dict[str, list] = {s: [] for s in SPLITS}
    rejects: list[dict] = []
    used: set[str] = set()
    for path in image_paths:
        rel = path.relative_to(inputs.aligned_dir)
        key = make_key(rel)
        if key in used:  # two files that sanitise to one key: keep both, tell them apart
            key = next(f"{key}_{n}" for n in count(2) if f"{key}_{n}" not in used)
        used.add(key)
        row = gt.get(key) if gt is not None else None
        if gt is not None and row is None:
            rejects.append({"file": str(rel), "reason": "no ground-truth row for this key"})
            continue
        split = str(row["split"]) if row is not None else seeded_split(key, inputs.seed, inputs.eval_fraction)
        if split not in SPLITS:
            rejects.append({"file": str(rel), "reason": f"unknown split {split!r}"})
            continue
        meta = {
            "key": key,
            "split": split,
            "identity": int(row["identity"]) if row is not None and row.get("identity") is not None else None,
            "source_file": str(row["file"]) if row is not None and row.get("file") is not None else str(rel),
            "aligned_file": str(rel),
            "ground_truth": _gt_record(row, (inputs.transforms or {}).get(key)) if row is not None else None,
            "provenance": "synthetic" if inputs.source == "synthetic" else "processed",
        }
        plan[split].append((key, path, meta))
    return plan, rejects


def _prepare_sample(task: tuple) -> tuple:
    """One aligned file -> (key, PNG bytes at the shard resolution, meta), or (None, file, reject reason). Pure (the
    same bytes in any process), so worker processes give the shards the one-process writer gives."""
    from mfim.imageio import ImageRejected, read_rgb

    key, path, meta, lms, resolution = task
    try:
        image = read_rgb(path)
    except ImageRejected as e:
        return None, meta["aligned_file"], str(e)
    h, w = image.shape[:2]
    if h != w:
        return None, meta["aligned_file"], f"aligned image is not square ({w}x{h})"
    if lms is not None:
        # pixel centres map as (x + 0.5)·s - 0.5 under a resize by s
        s = resolution / w
        lms = (np.asarray(lms, np.float64).reshape(68, 2) + 0.5) * s - 0.5
        meta = {**meta, "landmarks": [[float(np.float32(x)), float(np.float32(y))] for x, y in lms]}
    else:
        meta = {**meta, "landmarks": None}
    return key, encode_png(resize_square(image, resolution)), {**meta, "resolution": resolution}


def _init_encoder_worker() -> None:
    cv2.setNumThreads(1)  # parallelism comes from the worker processes


def build_shards(inputs: ShardInputs, out_dir: str | Path, resolution: int, max_shard_bytes: int,
                 workers: int = 1) -> dict:
    """Aligned images -> ``out_dir/{train,eval}-%06d.tar`` + ``out_dir/index.json``; returns the report dict.

    workers > 1: images are read, resized and PNG-encoded in that many processes; the tars are still written in
    sample order by this process, so they are byte-identical to ``workers=1``."""
    import multiprocessing as mp

    from mfim.imageio import list_images

    t0 = time.time()
    out_dir = Path(out_dir)
    aligned_dir = Path(inputs.aligned_dir)
    if not aligned_dir.is_dir():
        raise FileNotFoundError(f"aligned images not found at {aligned_dir} (made by the `align` stage)")
    inputs.aligned_dir = aligned_dir
    plan, rejects = _plan_samples(inputs, list_images(aligned_dir))
    rejects += inputs.extra_rejects
    missing_landmarks = 0
    # spawn: the parent holds torch; forked children of a threaded parent can deadlock
    pool = mp.get_context("spawn").Pool(workers, _init_encoder_worker) if workers > 1 else None

    def samples(entries):
        nonlocal missing_landmarks
        tasks = ((key, path, meta, inputs.landmarks.get(key) if inputs.landmarks is not None else None, resolution)
                 for key, path, meta in entries)
        results = pool.imap(_prepare_sample, tasks, chunksize=8) if pool is not None else map(_prepare_sample, tasks)
        for key, image, meta in results:
            if key is None:
                rejects.append({"file": image, "reason": meta})
                continue
            missing_landmarks += meta["landmarks"] is None
            yield key, image, meta

    index: dict[str, Any] = {"resolution": resolution, "splits": {}}
    for split in SPLITS:
        entries = plan[split]
        try:
            paths = write_split_shards(samples(entries), out_dir, split, max_shard_bytes)
        except BaseException:
            if pool is not None:
                pool.terminate()
            raise
        written = ShardIndex([str(p) for p in paths]) if paths else None
        keys = written.keys if written else []
        ids = {int(i) for i in written.identities if i >= 0} if written else set()
        index["splits"][split] = {
            "count": len(keys),
            "identities": len(ids),
            "shards": [p.name for p in paths],
            "shard_bytes": [p.stat().st_size for p in paths],
            "keys": keys,
        }
        if written:
            written.close()
    if pool is not None:
        pool.close()
        pool.join()
    (out_dir / "index.json").write_text(json.dumps(index, indent=1))
    report = {
        "resolution": resolution,
        "max_shard_bytes": max_shard_bytes,
        "source": inputs.source,
        "counts": {s: index["splits"][s]["count"] for s in SPLITS},
        "identities": {s: index["splits"][s]["identities"] for s in SPLITS},
        "shards": {s: len(index["splits"][s]["shards"]) for s in SPLITS},
        "bytes": {s: int(sum(index["splits"][s]["shard_bytes"])) for s in SPLITS},
        "rejected": len(rejects),
        "rejects": rejects[:200],
        "samples_without_landmarks": missing_landmarks,
        # ground-truth pose left in the raw image's frame because the align table had no transform for the key
        "ground_truth_pose_not_aligned": sum(
            1 for split in SPLITS for _, _, m in plan[split]
            if m["ground_truth"] is not None and m["ground_truth"]["pose_frame"] != "aligned"),
        "seconds": round(time.time() - t0, 2),
    }
    return report
