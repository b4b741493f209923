"""Which cells to compute, chunk by chunk: the whole grid (Sweep) or where the surface needs
them (Adaptive), and how an adaptive grid is read back (reconstruct). No torch, MPI or HDF5:
the coordinator asks `take()` for the next chunk and tells `returned()` what came back; the
store's reader calls `reconstruct`.

Both work from the done mask (and, for Adaptive, the values already computed), so a resumed
run continues where the killed one stopped, and what is computed never depends on which rank
computed what or in which order results arrived.
"""

from __future__ import annotations

import math
from collections import deque
from typing import Optional

import numpy as np

from .levels import geometric_span, level_scales


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

def lattice(n: int, stride: int) -> list:
    """Coarse indices along an axis of n points: every `stride`-th, and the last."""
    idx = list(range(0, n, stride))
    if idx[-1] != n - 1:
        idx.append(n - 1)
    return idx


ERR_MARGIN = 2.0


class Box:
    """A rectangle of the grid (x0..x1, y0..y1 inclusive; y0 = y1 = 0 on 1D grids) whose
    corners are computed. Refining it computes its edge midpoints and centre."""

    __slots__ = ("x0", "x1", "y0", "y1")

    def __init__(self, x0, x1, y0, y1):
        self.x0, self.x1, self.y0, self.y1 = x0, x1, y0, y1

    def splits(self) -> tuple:
        xs = [self.x0, (self.x0 + self.x1) // 2, self.x1] if self.x1 - self.x0 >= 2 else [self.x0, self.x1]
        ys = [self.y0, (self.y0 + self.y1) // 2, self.y1] if self.y1 - self.y0 >= 2 else [self.y0, self.y1]
        return xs, ys

    def can_split(self) -> bool:
        return self.x1 - self.x0 >= 2 or self.y1 - self.y0 >= 2

    def children(self) -> list:
        xs, ys = self.splits()
        return [Box(xs[i], xs[i + 1], ys[j], ys[j + 1]) for j in range(max(1, len(ys) - 1))
                for i in range(len(xs) - 1)]

    def corners(self) -> list:
        return [(self.x0, self.y0), (self.x1, self.y0), (self.x0, self.y1), (self.x1, self.y1)]

    def new_points(self) -> list:
        """Points a refinement computes: the split lines' points that are not corners."""
        xs, ys = self.splits()
        pts = {(x, y) for x in xs for y in ys} - set(self.corners())
        return sorted(pts, key=lambda p: (p[1], p[0]))


def interpolate(box: Box, v: dict, x: int, y: int) -> float:
    """Bilinear (linear on 1D) interpolation inside `box` from its corner values `v`."""
    tx = (x - box.x0) / (box.x1 - box.x0) if box.x1 > box.x0 else 0.0
    ty = (y - box.y0) / (box.y1 - box.y0) if box.y1 > box.y0 else 0.0
    a = v[(box.x0, box.y0)] * (1 - tx) + v[(box.x1, box.y0)] * tx
    b = v[(box.x0, box.y1)] * (1 - tx) + v[(box.x1, box.y1)] * tx
    return a * (1 - ty) + b * ty


class Adaptive:
    """Compute a coarse lattice, then refine box by box only where interpolating the surface
    could put a cell on the wrong side of one of the plot's contour levels.

    The lattice: every `coarse`-th cell along each axis, and the last. Its values fix the
    contour levels for the whole run: the round levels the figures draw (levels.round_levels),
    linear ones and, for a positive quantity, geometric ones too (whatever `plot --log` or
    `--linear` chooses; levels.level_scales), each judged in its own units. So every later
    decision depends only on the values of named cells: the same cells are computed whatever
    the number of ranks or the order results arrive in, and a resumed run replays the
    decisions from the file and continues.

    A box is refined (its edge midpoints and centre computed, then its four children judged in
    turn) when, in either scale, its interpolation error may exceed `tolerance` level spacings
    and a level of that scale lies within that error of its corner values, or when a corner is
    not finite. The error of a
    coarse box is estimated from the lattice's second differences at its corners (midpoint error
    of linear interpolation: |f(i-h) - 2 f(i) + f(i+h)| / 8); a child's from the error its
    parent's refinement actually made at the new points, halved (quadratic convergence gives a
    quarter; the factor 2 is a margin).

    Cells are handed out as soon as their box is judged: ranks never wait for a round to end,
    except once, for the last coarse cells, because the levels need the whole lattice."""

    def __init__(self, shape: tuple, done: np.ndarray, known: np.ndarray, chunk: int,
                 coarse: int = 4, tolerance: float = 0.05, levels: int = 30):
        self.nx = shape[-1]
        self.ny = shape[0] if len(shape) == 2 else 1
        self.chunk, self.coarse, self.tolerance, self.levels = chunk, coarse, tolerance, levels
        self._done = done.reshape(-1).copy()  # this object's own view: computed cells
        self._val = known.reshape(-1).astype(float).copy()
        self._queued = self._done.copy()  # queued, handed out or computed
        self._ready = deque()  # cells to hand out
        self._outstanding = 0
        self._waiting = {}  # cell -> [pending judgement ids]
        self._judgements = {}  # id -> [cells still missing, callback]
        self._next_id = 0
        self._scales = []  # levels.Scale: the level sets the picture is judged against
        xs = lattice(self.nx, coarse)
        ys = lattice(self.ny, coarse) if self.ny > 1 else [0]
        self.coarse_cells = np.array([y * self.nx + x for y in ys for x in xs], dtype=np.int64)
        self._coarse_x, self._coarse_y = xs, ys
        for c in self.coarse_cells:
            self._need(int(c))
        self._after(self.coarse_cells.tolist(), self._coarse_done)

    # -------------------------------------------------------------- bookkeeping
    def _need(self, cell: int) -> None:
        if not self._queued[cell]:
            self._queued[cell] = True
            self._ready.append(cell)

    def _after(self, cells: list, callback) -> None:
        """Call `callback()` once every cell in `cells` is computed."""
        missing = [c for c in cells if not self._done[c]]
        if not missing:
            callback()
            return
        jid = self._next_id
        self._next_id += 1
        self._judgements[jid] = [len(missing), callback]
        for c in missing:
            self._waiting.setdefault(c, []).append(jid)

    def _v(self, x: int, y: int) -> float:
        return self._val[y * self.nx + x]

    # -------------------------------------------------------------- the coordinator's side
    def take(self) -> Optional[np.ndarray]:
        if not self._ready:
            return None
        n = min(self.chunk, len(self._ready))
        out = np.array([self._ready.popleft() for _ in range(n)], dtype=np.int64)
        self._outstanding += len(out)
        return out

    def returned(self, cells: np.ndarray, values: np.ndarray) -> None:
        """`values`: the deciding quantity (the first split's loss) for `cells`."""
        self._outstanding -= len(cells)
        self._val[cells] = values
        self._done[cells] = True
        for c in cells.tolist():
            for jid in self._waiting.pop(c, ()):
                j = self._judgements[jid]
                j[0] -= 1
                if j[0] == 0:
                    del self._judgements[jid]
                    j[1]()

    @property
    def exhausted(self) -> bool:
        return not self._ready and self._outstanding == 0 and not self._judgements

    def queued(self) -> int:
        """Cells decided on and not yet returned: a floor on what remains (refinement adds more)."""
        return len(self._ready) + self._outstanding

    def describe(self) -> str:
        return (f"adaptive: a lattice of {len(self.coarse_cells)} cells (every {self.coarse}th), then refinement "
                f"to {self.tolerance:g} of a contour spacing, in chunks of up to {self.chunk}")

    # -------------------------------------------------------------- decisions
    def _coarse_done(self) -> None:
        v = self._val[self.coarse_cells]
        finite = v[np.isfinite(v)]
        lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
        self._scales = level_scales(lo, max(hi, lo + 1e-12), self.levels)
        xs, ys = self._coarse_x, self._coarse_y
        for j in range(max(1, len(ys) - 1)):
            for i in range(len(xs) - 1):
                box = Box(xs[i], xs[i + 1], ys[j], ys[j + 1] if len(ys) > 1 else ys[j])
                self._judge(box, self._lattice_error(box, i, j))

    def _lattice_error(self, box: Box, i: int, j: int) -> list:
        """Estimated interpolation error in a coarse box, in each scale's units, from the second
        differences of the lattice at its corners along each axis."""
        return [self._lattice_error_in(box, i, j, sc.transform) for sc in self._scales]

    def _lattice_error_in(self, box: Box, i: int, j: int, transform) -> float:
        xs, ys = self._coarse_x, self._coarse_y
        u = lambda x, y: _apply(transform, self._v(x, y))  # noqa: E731
        per_axis = [0.0, 0.0]
        for (ci, cj) in ((i, j), (i + 1, j), (i, j + 1), (i + 1, j + 1)):
            if cj >= len(ys) or ci >= len(xs):
                continue
            um = u(xs[ci], ys[cj])
            for axis, (a, b) in enumerate((((ci - 1, cj), (ci + 1, cj)), ((ci, cj - 1), (ci, cj + 1)))):
                if 0 <= a[0] and b[0] < len(xs) and 0 <= a[1] and b[1] < len(ys):
                    d2 = abs(u(xs[a[0]], ys[a[1]]) - 2 * um + u(xs[b[0]], ys[b[1]]))
                    per_axis[axis] = max(per_axis[axis], d2 if math.isfinite(d2) else math.inf)
        # a box's centre sees both axes' curvature at once; the margin covers curvature that
        # changes within the box (the log of a loss near its minimum)
        return ERR_MARGIN * sum(per_axis) / 8

    def _judge(self, box: Box, errs: list) -> None:
        """Refine `box` or leave it to interpolation; see the class docstring. `errs`: the
        estimated interpolation error in each scale's units."""
        if not box.can_split():
            return
        refine = False
        for sc, err in zip(self._scales, errs):
            u = [_apply(sc.transform, self._v(x, y)) for x, y in box.corners()]
            if not all(math.isfinite(t) for t in u):
                refine = True
                break
            if err <= self.tolerance * sc.spacing:
                continue  # interpolation is within the tolerance in this scale
            lo, hi = min(u) - err, max(u) + err
            if np.any((sc.levels >= lo) & (sc.levels <= hi)):
                refine = True  # a level within reach of the error: a cell may change its band
                break
        if not refine:
            return
        new = box.new_points()
        for x, y in new:
            self._need(y * self.nx + x)
        self._after([y * self.nx + x for x, y in new], lambda: self._refined(box, new))

    def _refined(self, box: Box, new: list) -> None:
        errs = []
        for sc in self._scales:
            corners = {(x, y): _apply(sc.transform, self._v(x, y)) for x, y in box.corners()}
            err = 0.0
            if all(math.isfinite(t) for t in corners.values()):
                for x, y in new:
                    e = abs(_apply(sc.transform, self._v(x, y)) - interpolate(box, corners, x, y))
                    err = max(err, e if math.isfinite(e) else math.inf)
            else:
                err = math.inf
            errs.append(err / 2)
        for child in box.children():
            self._judge(child, errs)


def _apply(transform, value: float) -> float:
    """A value in a scale's units; -inf for the log of what is not positive."""
    if transform is np.log and not value > 0:
        return -math.inf
    with np.errstate(all="ignore"):
        return float(transform(value))


# ----------------------------------------------------------------------------- reading back

def reconstruct(values: np.ndarray, done: np.ndarray, coarse: int, level_units: bool = True) -> np.ndarray:
    """The full surface of an adaptive grid: computed cells as they are, the others
    interpolated (bilinear) inside the smallest box of the refinement whose new points were
    not computed, in the units the schedule judged errors in (the log of a loss whose lattice
    spans more than levels.GEOMETRIC_SPAN, as the figures' default; `level_units=False`: the values as they
    are). Works on any done mask (a run killed halfway too): a box counts as refined
    when all its new points are done. NaN where a box's corners are not all computed."""
    shape = values.shape
    nx = shape[-1]
    ny = shape[0] if len(shape) == 2 else 1
    v = values.reshape(ny, nx).astype(float)
    d = done.reshape(ny, nx)
    xs = lattice(nx, coarse)
    ys = lattice(ny, coarse) if ny > 1 else [0]
    if level_units:
        # interpolate in the units the levels are spaced in (the log of a loss spanning
        # decades), as the schedule judged the error: a basin is far closer to linear there
        lat = v[np.ix_(ys, xs)]
        lat = lat[np.isfinite(lat)]
        if lat.size and geometric_span(lat.min(), lat.max()):
            with np.errstate(all="ignore"):
                out = np.exp(reconstruct(np.log(values), done, coarse, False))
            return np.where(done, values, out)  # computed cells bit for bit
    out = np.where(d, v, np.nan)
    stack = [Box(xs[i], xs[i + 1], ys[j], ys[j + 1] if len(ys) > 1 else ys[j])
             for j in range(max(1, len(ys) - 1)) for i in range(len(xs) - 1)]
    while stack:
        box = stack.pop()
        if not all(d[y, x] for x, y in box.corners()):
            continue
        if box.can_split() and all(d[y, x] for x, y in box.new_points()):
            stack.extend(box.children())
            continue
        ys_, xs_ = slice(box.y0, box.y1 + 1), slice(box.x0, box.x1 + 1)
        tx = (np.arange(box.x0, box.x1 + 1) - box.x0) / max(1, box.x1 - box.x0)
        ty = (np.arange(box.y0, box.y1 + 1) - box.y0) / max(1, box.y1 - box.y0)
        c00, c10, c01, c11 = (v[y, x] for x, y in box.corners())
        block = ((c00 * (1 - tx) + c10 * tx)[None, :] * (1 - ty)[:, None]
                 + (c01 * (1 - tx) + c11 * tx)[None, :] * ty[:, None])
        region = out[ys_, xs_]
        fill = ~d[ys_, xs_]
        region[fill] = block[fill]
    return out.reshape(shape)
