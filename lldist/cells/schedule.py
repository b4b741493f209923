"""Which cells to compute, chunk by chunk: the whole grid (Sweep) or where the surface needs
them (Adaptive), and how an adaptive grid is read back (reconstruct, cells/interpolation.py's
reading of each plane). No torch, MPI or HDF5: the coordinator asks `take()` for the next chunk
and tells `returned()` what came back; the store's reader calls `reconstruct`.

Both work from the done mask (and, for Adaptive, the values already computed), so a resumed
run continues where the killed one stopped, and what is computed never depends on which rank
computed what or in which order results arrived.
"""

from __future__ import annotations

import math
from collections import deque
from typing import Optional

import numpy as np

from .interpolation import axis_levels, lattice, survey


class Sweep:
    """Every pending cell, in row-major order, `chunk` at a time. Nothing but a cursor over the
    done mask: no list of pending cells (8 bytes a cell: 800 MB at 10001 x 10001)."""

    WINDOW = 1 << 16  # cells scanned per step of the cursor

    def __init__(self, done: np.ndarray, chunk: int):
        self._done = done.reshape(-1)  # read only ahead of the cursor: cells not yet handed out
        self.chunk = chunk
        self.total = int(self._done.size - np.count_nonzero(self._done))  # cells to compute
        self._cursor, self._ahead = 0, np.empty(0, dtype=np.int64)
        self.nchunks = math.ceil(self.total / chunk) if chunk else 0

    def take(self) -> Optional[np.ndarray]:
        while len(self._ahead) < self.chunk and self._cursor < self._done.size:
            hi = min(self._done.size, self._cursor + max(self.WINDOW, self.chunk))
            found = np.flatnonzero(~self._done[self._cursor:hi]) + self._cursor
            self._ahead = np.concatenate([self._ahead, found])
            self._cursor = hi
        if not len(self._ahead):
            return None
        out, self._ahead = self._ahead[:self.chunk], self._ahead[self.chunk:]
        return out

    def returned(self, cells: np.ndarray, values: np.ndarray) -> None:
        pass

    @property
    def exhausted(self) -> bool:
        """take() will never give a cell again."""
        return not len(self._ahead) and self._cursor >= self._done.size

    def describe(self) -> str:
        return f"{self.total} to compute in {self.nchunks} chunks of {self.chunk}"


# ----------------------------------------------------------------------------- adaptive

class Adaptive:
    """Compute each plane's lattice, then refine, tier by tier, the boxes whose estimated
    interpolation error (cells/interpolation.py: in contour spacings of `levels` linear or
    geometric levels, wherever the levels lie) is largest, until every box is within
    `tolerance` or the plane has had `budget` cells.

    A tier refines every box whose estimate exceeds half the largest (and the tolerance), in
    order of their estimates, largest first: a run stopped at any moment holds the cells that
    reduce the estimated error most, and every prefix is a surface the reader can fill. A tier is
    decided from the values of the cells of the tiers before it, all computed: so the same cells
    are computed whatever the number of ranks or the order results arrive in, and a resumed run
    replays the decisions from the file and continues. A budget cut falls inside a tier at the
    same cell every time, because the tier's order is decided before any of its cells is.

    Planes (directions.repeats) are refined each on its own cells, from its own loss: their
    landscapes differ, and a cell one plane needs says nothing about another's. While one plane
    waits for the end of its tier, the others' cells keep the workers busy."""

    def __init__(self, plane_shape: tuple, planes: int, done: np.ndarray, known: np.ndarray, chunk: int,
                 coarse: int, tolerance: float, levels: int, budget: Optional[int] = None, workers: int = 1):
        self.plane_shape, self.planes = tuple(plane_shape), planes
        self.nx = plane_shape[-1]
        self.ny = plane_shape[0] if len(plane_shape) == 2 else 1
        self.cells = self.nx * self.ny
        self.chunk, self.coarse, self.tolerance, self.levels = chunk, coarse, tolerance, levels
        self.budget, self.workers = budget, max(1, workers)
        self._done = done.reshape(-1).copy()  # this object's own view: computed cells
        self._val = known.reshape(-1).astype(float).copy()
        self._chosen = np.zeros(self._done.size, bool)  # decided on: the tiers so far
        self._left = [0] * planes  # cells of each plane's current tier not yet computed
        self._finished = [False] * planes
        self.errors = [float("inf")] * planes  # each plane's estimated error after its last tier
        self.tiers = [0] * planes
        self._ready = deque()  # cells to hand out
        self._outstanding = 0
        xs, ys = lattice(self.nx, coarse), (lattice(self.ny, coarse) if self.ny > 1 else [0])
        self.coarse_cells = np.array([y * self.nx + x for y in ys for x in xs], dtype=np.int64)
        for p in range(planes):
            self._add(p, (p * self.cells + self.coarse_cells).tolist())
            self._advance(p)

    # -------------------------------------------------------------- bookkeeping
    def _add(self, p: int, cells: list) -> None:
        """Make `cells` (flat, in the file) plane p's tier, in this order."""
        for c in cells:
            self._chosen[c] = True
            if not self._done[c]:
                self._left[p] += 1
                self._ready.append(c)

    def _advance(self, p: int) -> None:
        """Decide plane p's tiers for as long as each is already computed (a resumed run)."""
        while self._left[p] == 0 and not self._finished[p]:
            self._decide(p)

    # -------------------------------------------------------------- the coordinator's side
    def take(self) -> Optional[np.ndarray]:
        if not self._ready:
            return None
        # near a tier's end, share what is left among the workers rather than give it to one
        n = min(self.chunk, max(1, math.ceil(len(self._ready) / self.workers)), len(self._ready))
        out = np.array([self._ready.popleft() for _ in range(n)], dtype=np.int64)
        self._outstanding += len(out)
        return out

    def returned(self, cells: np.ndarray, values: np.ndarray) -> None:
        """`values`: the deciding quantity (the first split's loss) for `cells`."""
        self._outstanding -= len(cells)
        touched = set()
        for c, v in zip(cells.tolist(), np.asarray(values, dtype=float).tolist()):
            if self._done[c]:
                continue
            self._val[c], self._done[c] = v, True
            p = c // self.cells
            self._left[p] -= 1
            touched.add(p)
        for p in sorted(touched):
            self._advance(p)

    @property
    def exhausted(self) -> bool:
        return not self._ready and self._outstanding == 0 and all(self._finished)

    def queued(self) -> int:
        """Cells decided on and not yet returned: a floor on what remains (refinement adds more)."""
        return len(self._ready) + self._outstanding

    def describe(self) -> str:
        cap = f", at most {self.budget} cells a plane" if self.budget is not None else ""
        return (f"adaptive: a lattice of {len(self.coarse_cells)} cells (every {self.coarse}th), then refinement "
                f"to {self.tolerance:g} of a contour spacing{cap}, in chunks of up to {self.chunk}")

    # -------------------------------------------------------------- decisions
    def _decide(self, p: int) -> None:
        """Plane p's next tier, from the cells of its tiers so far (all computed)."""
        lo, hi = p * self.cells, (p + 1) * self.cells
        known = self._chosen[lo:hi].reshape(self.ny, self.nx)
        sv = survey(self._val[lo:hi].reshape(self.ny, self.nx), known, self.coarse, self.levels)
        self.errors[p] = sv.error
        room = math.inf if self.budget is None else self.budget - int(np.count_nonzero(known))
        over = [lf for lf in sv.leaves if lf.error > self.tolerance]
        if not over or room <= 0:
            self._finished[p] = True
            return
        top = max(lf.error for lf in over)
        bar = max(self.tolerance, top / 2) if math.isfinite(top) else math.inf
        tier = [lf for lf in over if lf.error > bar or (math.isinf(bar) and math.isinf(lf.error))]
        tier.sort(key=lambda lf: (-lf.error, lf.level, lf.y0, lf.x0))
        cells, seen = [], set()
        for lf in tier:
            for c in lf.new:
                c += lo
                if not self._chosen[c] and c not in seen and len(cells) < room:
                    seen.add(c)  # one box's new point may be its neighbour's: computed once
                    cells.append(c)
        self._add(p, cells)
        self.tiers[p] += 1
        if len(cells) >= room:
            self._finished[p] = True  # the budget ends inside this tier: computed, then stop


def surveys(values: np.ndarray, done: np.ndarray, coarse: int, levels: int, planes: int = 1) -> list:
    """Each plane's Survey (cells/interpolation.py): its reading, and its estimated error in
    contour spacings. Works on any done mask (a run killed halfway too)."""
    if planes == 1:
        return [survey(values, done, coarse, levels)]
    return [survey(values[p], done[p], coarse, levels) for p in range(planes)]


def joined(read: list) -> np.ndarray:
    """The planes' readings (surveys) as one array: a plane's shape, after the planes' axis when
    there are several."""
    return read[0].surface if len(read) == 1 else np.stack([sv.surface for sv in read])


def reconstruct(values: np.ndarray, done: np.ndarray, coarse: int, levels: int, planes: int = 1) -> np.ndarray:
    """The full surface of an adaptive grid: computed cells as they are, the others read by
    cubic interpolation between them, plane by plane; NaN where the lattice around a cell is
    not computed."""
    return joined(surveys(values, done, coarse, levels, planes))


__all__ = ["Sweep", "Adaptive", "reconstruct", "surveys", "joined", "lattice", "axis_levels"]
