"""How an adaptive grid is read between its computed cells, and how wrong that reading may be.
Numpy only: the schedule decides with it, the store's reader fills the picture with it.

The cells form a hierarchy. Level 0 is a lattice of every `coarse`-th cell along each axis (and
the last); level k + 1 adds the midpoints of level k's intervals along each axis. The picture is
read level by level: level k + 1's points are predicted from level k's by cubic Lagrange
interpolation through the four nearest points, along x and then along y, and replaced by their
computed values wherever there are any. A smooth surface is read with an error of order h^4 in
the spacing h, against h^2 for bilinear interpolation: most of the savings of an adaptive grid.

Errors are measured in contour spacings, in both scales a picture may be drawn on: `levels`
round linear levels over the lattice's range and, for a positive quantity, `levels` round
geometric ones. A picture drawn with levels at least that far apart is right to within that
fraction of a level, wherever its levels lie. The error inside a box not refined further is
estimated from how far the cubic stencils shifted by one node disagree at its midpoints (KAPPA
times that), and at least RHO times the surplus (a computed value's difference from its
prediction: the error the reading made there at the coarser scale) of its corners that came in
at its level (the lattice's own: read off every other lattice point). Interpolation is in the
log of a positive quantity: a loss basin is far closer to quadratic there.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

from .levels import round_levels

# The error at half the spacing, as a fraction of the error at the spacing: cubic interpolation
# of a smooth surface gives 1/16; 1/4 is the margin for surfaces not yet smooth at the scale of
# the cells. It is the second estimate, a floor under the stencils' disagreement (KAPPA).
RHO = 0.25
# The error of the centred cubic stencil at a midpoint, as a fraction of its disagreement with a
# stencil shifted by one node: 3/8 for a smooth surface (the two error terms are 3/128 and
# -5/128 of h^4 times the fourth derivative); 1/2 leaves a margin.
KAPPA = 0.5


def lattice(n: int, stride: int) -> list:
    """Coarse indices along an axis of n points: every `stride`-th, and the last."""
    idx = list(range(0, n, stride))
    if idx[-1] != n - 1:
        idx.append(n - 1)
    return idx


def axis_levels(n: int, coarse: int) -> list:
    """The points of each level along an axis: the lattice, then each level adds the midpoints
    of the previous level's intervals of two cells or more, until every point is in."""
    out = [np.array(lattice(n, coarse), dtype=np.int64)]
    while len(out[-1]) < n:
        a = out[-1]
        wide = (a[1:] - a[:-1]) >= 2
        out.append(np.union1d(a, ((a[:-1] + a[1:]) // 2)[wide]))
    return out


def _below(a: np.ndarray) -> np.ndarray:
    """The level below the lattice: every other lattice point and the last (what the lattice's
    own surpluses are read from)."""
    b = a[::2]
    return b if b[-1] == a[-1] else np.append(b, a[-1])


def _stencils(nodes: np.ndarray, at: np.ndarray) -> tuple:
    """For each position in `at`: its left node, and the first node of the cubic stencil through
    the four nearest nodes (one-sided at the ends), the stencil's width (4, or fewer nodes)."""
    m = len(nodes)
    left = np.searchsorted(nodes, at) - 1
    w = min(4, m)
    return left, np.clip(left - (1 if w == 4 else 0), 0, m - w), w


def _lagrange(nodes, at, v, start, w) -> np.ndarray:
    idx = start[:, None] + np.arange(w)[None, :]  # (len(at), w)
    xs = nodes[idx].astype(float)
    t = at.astype(float)
    weights = np.ones_like(xs)
    for j in range(w):
        for k in range(w):
            if j != k:
                weights[:, j] *= (t - xs[:, k]) / (xs[:, j] - xs[:, k])
    stencil = v[..., idx]  # (..., len(at), w)
    with np.errstate(all="ignore"):
        out = np.einsum("...aw,aw->...a", np.nan_to_num(stencil, nan=0.0, posinf=0.0, neginf=0.0), weights)
    return np.where(np.all(np.isfinite(stencil), axis=-1), out, np.nan)


def predict(nodes: np.ndarray, at: np.ndarray, v: np.ndarray, others: bool = False):
    """Values at positions `at` (each strictly between two nodes) from values `v` (..., len(nodes))
    at the sorted `nodes`: cubic Lagrange through the four nearest nodes (one-sided at the ends;
    quadratic or linear when there are fewer), linear where the stencil holds a value that is
    not finite. With `others`, also the predictions of the stencils shifted one node either way
    (NaN where they do not fit), and for where neither does the quartic's through five nodes (or
    the line's): how far they are from the prediction is the error estimate at this scale."""
    left, start, w = _stencils(nodes, at)
    with np.errstate(all="ignore"):
        tl = (at - nodes[left]) / (nodes[left + 1] - nodes[left])
        linear = v[..., left] * (1 - tl) + v[..., left + 1] * tl
    cubic = _lagrange(nodes, at, v, start, w)
    best = np.where(np.isnan(cubic), linear, cubic)
    if not others:
        return best
    alts = []
    for shift in (-1, 1):
        s2 = start + shift
        ok = (s2 >= 0) & (s2 <= len(nodes) - w) & (s2 <= left) & (s2 + w - 1 >= left + 1)
        if w == 4 and ok.any():
            alts.append(np.where(ok, _lagrange(nodes, at, v, np.clip(s2, 0, len(nodes) - w), w), np.nan))
    # where no shifted cubic fits (the ends): the quartic through five nodes; else the line
    fallback = _lagrange(nodes, at, v, np.clip(left - 2, 0, len(nodes) - 5), 5) if len(nodes) >= 5 else linear
    return best, alts, np.where(np.isnan(fallback), linear, fallback)


class Units(NamedTuple):
    """The scales errors are measured in: the spacing of `levels` round linear levels over
    [lo, hi] and, when lo > 0, of `levels` round geometric ones (levels.round_levels: the
    figures' own rule, whatever the levels' positions); interpolation runs in the log of a
    positive quantity."""
    lo: float
    hi: float
    levels: int

    @property
    def positive(self) -> bool:
        return self.lo > 0

    @property
    def linear_spacing(self) -> float:
        """The finest gap of `levels` round linear levels over [lo, hi] (what the figures draw:
        a 1-2-2.5-5 step, up to 1.4 times finer than an even split)."""
        if not self.hi > self.lo:
            return 1e-12 * max(1.0, abs(self.hi))
        return float(np.min(np.diff(round_levels(self.lo, self.hi, self.levels, False))))

    @property
    def log_spacing(self) -> float:
        """The finest gap, in the log, of `levels` round geometric levels (R10/R20-like series:
        up to twice finer than an even split of the log)."""
        if not self.positive:
            return math.nan
        if not self.hi > self.lo:
            return 1e-12
        return float(np.min(np.diff(np.log(round_levels(self.lo, self.hi, self.levels, True)))))

    def to(self, f: np.ndarray) -> np.ndarray:
        if not self.positive:
            return f
        with np.errstate(all="ignore"):
            return np.where(f > 0, np.log(np.where(f > 0, f, 1.0)), -np.inf)

    def back(self, u: np.ndarray) -> np.ndarray:
        if not self.positive:
            return u
        with np.errstate(all="ignore"):
            return np.exp(u)

    def error(self, u_true: np.ndarray, u_read: np.ndarray) -> np.ndarray:
        """|read - true| in contour spacings, the larger of the two scales' (inf where not finite)."""
        with np.errstate(all="ignore"):
            e = np.abs(self.back(u_read) - self.back(u_true)) / self.linear_spacing
            if self.positive:
                e = np.maximum(e, np.abs(u_read - u_true) / self.log_spacing)
        return np.where(np.isfinite(e), e, np.inf)


def units_of(values: np.ndarray, known: np.ndarray, coarse: int, levels: int) -> Units:
    """The lattice's range (finite values of the computed lattice points) as Units."""
    ny, nx = values.shape
    ix, iy = lattice(nx, coarse), lattice(ny, coarse)
    lat = values[np.ix_(iy, ix)][known[np.ix_(iy, ix)]]
    lat = lat[np.isfinite(lat)]
    lo, hi = (float(lat.min()), float(lat.max())) if lat.size else (0.0, 1.0)
    return Units(lo, hi, levels)


class Leaf(NamedTuple):
    """A box not refined further: its level, its lower-left corner, its estimated error in
    contour spacings, and the points refining it would compute (flat indices in its plane)."""
    level: int
    x0: int
    y0: int
    error: float
    cells: int  # grid cells inside it or on its edges
    new: tuple


class Survey(NamedTuple):
    """An adaptive grid read from its computed cells."""
    surface: np.ndarray  # every cell: computed values as they are, the rest read by interpolation
    leaves: list  # Leaf: the boxes that could still be refined
    units: Units

    @property
    def error(self) -> float:
        """The largest estimated error of a cell not computed, in contour spacings (0.0 when
        every cell that could be refined is)."""
        return max((lf.error for lf in self.leaves), default=0.0)

    @property
    def mean_error(self) -> float:
        """The estimated error averaged over the grid's cells (a box's estimate for each of its
        cells): about the share of cells a picture drawn at `levels` levels puts in another band."""
        return sum(lf.error * lf.cells for lf in self.leaves) / max(1, self.surface.size)


def survey(values: np.ndarray, known: np.ndarray, coarse: int, levels: int, rho: float = RHO) -> Survey:
    """Read one plane (shape (ny, nx) or (nx,)) from its `known` cells; see the module's text.
    Works on any mask; where the lattice itself is incomplete, what cannot be read is NaN."""
    shape = values.shape
    f = np.asarray(values, dtype=float).reshape(1 if len(shape) == 1 else shape[0], shape[-1])
    k = np.asarray(known, dtype=bool).reshape(f.shape)
    ny, nx = f.shape
    units = units_of(f, k, coarse, levels)
    u = units.to(f)
    lx, ly = axis_levels(nx, coarse), axis_levels(ny, coarse)
    nlev = max(len(lx), len(ly))
    lx += [lx[-1]] * (nlev - len(lx))
    ly += [ly[-1]] * (nlev - len(ly))
    v = np.full(f.shape, np.nan)
    surplus = np.full(f.shape, np.nan)  # in contour spacings, at computed points with a prediction
    spread = (np.full(f.shape, np.nan), np.full(f.shape, np.nan))  # the stencils' disagreement, along y and x
    v[np.ix_(ly[0], lx[0])] = np.where(k[np.ix_(ly[0], lx[0])], u[np.ix_(ly[0], lx[0])], np.nan)
    # the lattice's own surpluses: read from the level below it
    _level(v, u, k, surplus, spread, units, _below(lx[0]), _below(ly[0]), lx[0], ly[0])
    for lev in range(nlev - 1):
        _level(v, u, k, surplus, spread, units, lx[lev], ly[lev], lx[lev + 1], ly[lev + 1])
    surface = np.where(k, f, units.back(v))
    leaves = _leaves(k, f, surplus, spread, lx, ly, _came_in(lx, nx), _came_in(ly, ny), rho)
    return Survey(surface.reshape(shape), leaves, units)


def _level(v, u, k, surplus, spread, units, x, y, x2, y2) -> None:
    """Predict level (x2, y2)'s new points from level (x, y) (along x on level y's rows, then
    along y on the new columns' full length), keep computed values, record their surpluses and,
    at every new point, how far the shifted stencils' predictions are from the one used."""
    newx, newy = np.setdiff1d(x2, x), np.setdiff1d(y2, y)
    for axis, rows, cols in ((1, y, newx), (0, newy, x2)):
        if not (len(rows) and len(cols)):
            continue
        if axis == 1:
            p, alts, fallback = predict(x, newx, v[np.ix_(y, x)], others=True)
        else:
            p, alts, fallback = predict(y, newy, v[np.ix_(y, x2)].T, others=True)
            p, alts, fallback = p.T, [a.T for a in alts], fallback.T
        at = np.ix_(rows, cols)
        kk, uu = k[at], u[at]
        surplus[at] = np.where(kk, units.error(uu, p), np.nan)
        d = np.full(p.shape, np.nan)
        for a in alts:
            d = np.where(np.isnan(a), d, np.fmax(d, units.error(a, p)))
        spread[axis][at] = np.where(np.isnan(d), units.error(fallback, p), d)
        v[at] = np.where(kk, uu, p)


def _intervals(points: np.ndarray) -> tuple:
    """(starts, ends, midpoints or -1) of an axis level's intervals; one empty interval [0, 0] on
    an axis of one point (a 1D grid's y)."""
    if len(points) == 1:
        return points[:1], points[:1], np.array([-1])
    a, b = points[:-1], points[1:]
    return a, b, np.where(b - a >= 2, (a + b) // 2, -1)


def _came_in(levels: list, n: int) -> np.ndarray:
    """The level each point of an axis came in at (0 for the lattice)."""
    out = np.full(n, len(levels), dtype=np.int64)
    for lev in range(len(levels) - 1, -1, -1):
        out[levels[lev]] = lev
    return out


def _leaves(k, f, surplus, spread, lx, ly, inx, iny, rho) -> list:
    """The boxes not refined, level by level: a box of level lev + 1 exists inside a box of level
    lev whose new points are all computed (refined)."""
    nx = f.shape[1]
    out = []
    exists = None  # boxes of the current level whose parent was refined
    for lev in range(len(lx)):
        x0, x1, mx = _intervals(lx[lev])
        y0, y1, my = _intervals(ly[lev])
        if exists is None:
            exists = np.ones((len(y0), len(x0)), bool)
        refined = np.zeros_like(exists)
        for j, i in zip(*np.nonzero(exists)):
            xa, xb, xm, ya, yb, ym = x0[i], x1[i], mx[i], y0[j], y1[j], my[j]
            if xm < 0 and ym < 0:
                continue  # a box of single cells: nothing inside to read
            # its edge midpoints and centre (a 1D grid's y interval is [0, 0]: one point each)
            new = sorted({(x, y) for y in ((ya, ym, yb) if ym >= 0 else (ya, yb))
                          for x in ((xa, xm, xb) if xm >= 0 else (xa, xb)) if x == xm or y == ym},
                         key=lambda p: (p[1], p[0]))
            if all(k[y, x] for x, y in new):
                refined[j, i] = True  # its children are judged at the next level
                continue
            corners = {(xa, ya), (xb, ya), (xa, yb), (xb, yb)}
            vals = [f[y, x] for x, y in corners]
            if not all(k[y, x] for x, y in corners) or not all(np.isfinite(vals)):
                err = math.inf  # a corner missing (a run stopped early) or overflowing: look closer
            else:
                # the reading at this scale: the shifted stencils' disagreement at the new points,
                # along each axis (the centre's error holds both); and the coarser scale's
                # measured error, shrunk by RHO, where the disagreement underrates it
                along = [max((spread[ax][y, x] for x, y in new if not np.isnan(spread[ax][y, x])), default=0.0)
                         for ax in (0, 1)]
                s = [surplus[y, x] for x, y in corners if not np.isnan(surplus[y, x])
                     and max(inx[x], iny[y]) == lev]
                err = max(KAPPA * sum(along), rho * max(s) if s else 0.0)
            out.append(Leaf(lev, int(xa), int(ya), float(err), int((xb - xa + 1) * (yb - ya + 1)),
                            tuple(int(y * nx + x) for x, y in new)))
        if lev + 1 < len(lx):  # the next level's boxes: those inside a refined box
            px = np.searchsorted(x0, _intervals(lx[lev + 1])[0], side="right") - 1
            py = np.searchsorted(y0, _intervals(ly[lev + 1])[0], side="right") - 1
            exists = refined[np.ix_(py, px)]
    return out
