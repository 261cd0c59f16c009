"""Shared fixtures: small seeded synthetic volumes on oblique, anisotropic grids."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from meddl.volume import Kind, Volume, affine_from_geometry
from scipy.spatial.transform import Rotation

# Keep the user's cache clean: samples built by tests go to a per-session folder.
os.environ.setdefault("MEDDL_CACHE_DIR", str(Path(__file__).resolve().parent.parent / ".pytest_cache" / "meddl-samples"))


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)


def oblique_affine(ndim: int = 3) -> np.ndarray:
    """An oblique, anisotropic grid with a non-zero origin."""
    if ndim == 3:
        rot = Rotation.from_euler("xyz", [17.0, -11.0, 33.0], degrees=True).as_matrix()
        return affine_from_geometry([0.7, 1.3, 2.5], [12.5, -30.25, 7.0], rot)
    c, s = np.cos(np.radians(25.0)), np.sin(np.radians(25.0))
    return affine_from_geometry([0.8, 1.6], [-5.0, 9.5], np.array([[c, -s], [s, c]]))


@pytest.fixture
def oblique() -> callable:
    return oblique_affine


def make_volume(kind: str, ndim: int, rng: np.random.Generator) -> Volume:
    """Synthetic volumes of every kind the converters must carry."""
    shape = (7, 9, 5) if ndim == 3 else (11, 6)
    if kind == "float":
        data = rng.normal(size=(1, *shape)).astype(np.float32)
        return Volume(data, oblique_affine(ndim), Kind.INTENSITY)
    if kind == "int16":
        data = rng.integers(-1000, 3000, size=(1, *shape)).astype(np.int16)
        return Volume(data, oblique_affine(ndim), Kind.INTENSITY)
    if kind == "rgb":
        data = rng.integers(0, 256, size=(3, *shape)).astype(np.uint8)
        return Volume(data, oblique_affine(ndim), Kind.INTENSITY)
    if kind == "label":
        data = rng.integers(0, 5, size=(1, *shape)).astype(np.uint8)
        return Volume(data, oblique_affine(ndim), Kind.LABEL)
    if kind == "complex":
        data = (rng.normal(size=(1, *shape)) + 1j * rng.normal(size=(1, *shape))).astype(np.complex64)
        return Volume(data, oblique_affine(ndim), Kind.COMPLEX)
    if kind == "displacement":
        data = rng.normal(size=(ndim, *shape))
        return Volume(data, oblique_affine(ndim), Kind.DISPLACEMENT)
    raise ValueError(kind)


@pytest.fixture
def volume_factory(rng):
    return lambda kind, ndim=3: make_volume(kind, ndim, rng)


def run_cli(*args: str, cwd: str | os.PathLike | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run ``python -m meddl ARGS`` as a real subprocess."""
    return subprocess.run(
        [sys.executable, "-m", "meddl", *args], capture_output=True, text=True, cwd=cwd, timeout=timeout
    )


@pytest.fixture
def cli():
    return run_cli
