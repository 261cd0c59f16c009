"""Geometry shared by the MRML and transform tests: an oblique, anisotropic grid and LPS<->RAS."""

from __future__ import annotations

import numpy as np
from meddl.volume import affine_from_geometry

#: RAS <-> LPS sign flip of the first two axes
FLIP = np.array([-1.0, -1.0, 1.0])


def rotation(ax: float, ay: float, az: float) -> np.ndarray:
    """``Rz @ Ry @ Rx`` for angles in radians."""
    cx, sx, cy, sy, cz, sz = np.cos(ax), np.sin(ax), np.cos(ay), np.sin(ay), np.cos(az), np.sin(az)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz @ ry @ rx


def oblique_affine(nd: int = 3) -> np.ndarray:
    """An oblique, anisotropic voxel-to-RAS affine with a non-zero origin (2D or 3D)."""
    if nd == 3:
        return affine_from_geometry((1.2, 0.8, 1.5), (-20.0, 13.0, 7.5), rotation(0.3, -0.2, 0.5))
    c, s = np.cos(0.4), np.sin(0.4)
    return affine_from_geometry((0.7, 1.3), (5.0, -9.0), np.array([[c, -s], [s, c]]))
