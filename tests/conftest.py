"""Shared fixtures. Real photos come from the face_recognition sdist via the asset zoo (fetched, never committed)."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

# MFIM_TEST_THREADS: fewer intra-op threads when several suites share the machine's cores
torch.set_num_threads(int(os.environ.get("MFIM_TEST_THREADS", min(2, os.cpu_count() or 1))))

PHOTOS = ["obama", "obama2", "obama3", "biden", "obama_partial_face"]


@pytest.fixture(scope="session")
def photo_paths() -> dict:
    """{'obama': Path, 'obama2': Path, ..., 'biden': Path} -- real photos, faces 250-320 px."""
    from mfim.assets import fetch

    return {name: fetch(f"photo_{name}", progress=False) for name in PHOTOS}


@pytest.fixture(scope="session")
def photos(photo_paths) -> dict:
    """The same photos as H×W×3 uint8 RGB arrays."""
    from mfim.imageio import read_rgb

    return {name: read_rgb(p) for name, p in photo_paths.items()}


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)


@pytest.fixture
def one_thread():
    """For modules of tiny networks: one intra-op thread is as fast, and immune to spin-waiting when cores are shared."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
