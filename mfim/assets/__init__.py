"""Pretrained-asset zoo: one registry of named files, fetched by code, checksum-verified, cached in MFIM_HOME."""

from mfim.assets.registry import REGISTRY, Asset, get
from mfim.assets.store import (
    AssetChecksumError,
    MissingAssetError,
    cached_path,
    fetch,
    fetch_many,
    is_present,
    mfim_home,
    missing_error,
    resolve,
    sha256_file,
    status,
)

__all__ = [
    "REGISTRY",
    "Asset",
    "get",
    "AssetChecksumError",
    "MissingAssetError",
    "cached_path",
    "fetch",
    "fetch_many",
    "is_present",
    "mfim_home",
    "missing_error",
    "resolve",
    "sha256_file",
    "status",
]
