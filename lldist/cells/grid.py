"""Grid coordinates, cell numbering and the chunk size. No torch, MPI or HDF5.

The axis convention, stated once for the whole project:
  * 1D grids: arrays have shape (nx,), cell k sits at x[k].
  * 2D grids: arrays have shape (ny, nx) -- rows follow y (beta), columns follow x (alpha) --
    and cell k = iy * nx + ix sits at (alpha, beta) = (x[ix], y[iy]).
This is what `matplotlib.contour(x, y, Z)` and `imshow(Z, origin="lower")` expect.
  * Several planes (directions.repeats: n): a leading axis of n planes, (n, nx) or (n, ny, nx);
    cell k is cell k % (cells of a plane) of plane k // (cells of a plane).
"""

from __future__ import annotations

import math
from typing import Optional

import numpy as np

from ..config import Axis


class Grid:
    def __init__(self, x: Axis, y: Optional[Axis] = None, planes: int = 1):
        self.x = np.linspace(x.min, x.max, x.num)
        self.y = None if y is None else np.linspace(y.min, y.max, y.num)
        self.planes = planes

    @property
    def ndim(self) -> int:
        """1 or 2: the plane's axes (the planes' own axis not counted)."""
        return 1 if self.y is None else 2

    @property
    def plane_shape(self) -> tuple:
        return (len(self.x),) if self.y is None else (len(self.y), len(self.x))

    @property
    def shape(self) -> tuple:
        """The arrays' shape: a plane's, after the planes' axis when there are several."""
        return self.plane_shape if self.planes == 1 else (self.planes,) + self.plane_shape

    @property
    def ncells(self) -> int:
        return math.prod(self.shape)

    @property
    def plane_cells(self) -> int:
        return math.prod(self.plane_shape)

    def plane(self, k: int) -> int:
        """The plane of flat cell k."""
        return int(k) // self.plane_cells

    def coords(self, k: int) -> tuple[float, float]:
        """(alpha, beta) of flat cell k (in its plane); beta is 0.0 on a 1D grid."""
        k = int(k) % self.plane_cells
        if self.y is None:
            return float(self.x[k]), 0.0
        iy, ix = divmod(k, len(self.x))
        return float(self.x[ix]), float(self.y[iy])


def auto_chunk_size(npending: int, nworkers: int) -> int:
    """About 8 chunks per worker, so dynamic assignment can even out slow ranks, and at most
    32 cells so that a killed run loses little and the progress bar moves; at least 1."""
    if npending <= 0:
        return 1
    return max(1, min(32, npending // (8 * max(1, nworkers))))
