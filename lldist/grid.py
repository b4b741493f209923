"""Grid coordinates, cell numbering and the chunk size. No torch, MPI or HDF5.

The axis convention, stated once for the whole project:
  * 1D grids: arrays have shape (nx,), cell k sits at x[k].
  * 2D grids: arrays have shape (ny, nx) -- rows follow y (beta), columns follow x (alpha) --
    and cell k = iy * nx + ix sits at (alpha, beta) = (x[ix], y[iy]).
This is what `matplotlib.contour(x, y, Z)` and `imshow(Z, origin="lower")` expect.
"""

from __future__ import annotations

import math
from typing import Optional

import numpy as np

from .config import Axis


class Grid:
    def __init__(self, x: Axis, y: Optional[Axis] = None):
        self.x = np.linspace(x.min, x.max, x.num)
        self.y = None if y is None else np.linspace(y.min, y.max, y.num)

    @property
    def ndim(self) -> int:
        return 1 if self.y is None else 2

    @property
    def shape(self) -> tuple:
        return (len(self.x),) if self.y is None else (len(self.y), len(self.x))

    @property
    def ncells(self) -> int:
        return math.prod(self.shape)

    def coords(self, k: int) -> tuple[float, float]:
        """(alpha, beta) of flat cell k; beta is 0.0 on a 1D grid."""
        if self.y is None:
            return float(self.x[k]), 0.0
        iy, ix = divmod(int(k), len(self.x))
        return float(self.x[ix]), float(self.y[iy])


def auto_chunk_size(npending: int, nworkers: int) -> int:
    """About 8 chunks per worker, so dynamic assignment can even out slow ranks, and at most
    32 cells so that a killed run loses little and the progress bar moves; at least 1."""
    if npending <= 0:
        return 1
    return max(1, min(32, npending // (8 * max(1, nworkers))))
