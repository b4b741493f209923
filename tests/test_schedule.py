"""The schedules on their own (no torch, no MPI): a sweep's chunks, and the adaptive grid's
choice of cells against surfaces whose full grid is known."""

import numpy as np
import pytest

from lldist.analysis.figures import PlotOptions, _levels
from lldist.cells.interpolation import axis_levels, survey
from lldist.config import auto_coarse
from lldist.cells.schedule import Adaptive, Sweep, lattice, reconstruct


def drain(s, values, rng=None, batch=1):
    """Run a schedule to its end as a coordinator would, feeding `values` back; with `rng`,
    results come back in a random order, `batch` chunks at a time out of those handed out."""
    flat = values.reshape(-1)
    out, order = [], []
    while True:
        while True:
            c = s.take()
            if c is None:
                break
            out.append(c)
        if not out:
            assert s.exhausted, "the schedule waits with nothing out"
            return order
        if rng is not None:
            rng.shuffle(out)
        for c in out[:batch]:
            order.append(c)
            s.returned(c, flat[c])
        out = out[batch:]


def test_sweep_hands_each_pending_cell_once_in_order():
    done = np.zeros((7, 9), bool)
    done[2, 3:8] = True
    done[5] = True
    s = Sweep(done, 4)
    got = drain(s, np.zeros(done.shape))
    cells = np.concatenate(got)
    assert cells.tolist() == np.flatnonzero(~done.reshape(-1)).tolist()
    assert all(len(c) == 4 for c in got[:-1]) and s.total == (~done).sum()
    assert Sweep(np.ones(5, bool), 2).take() is None


def test_sweep_windows_longer_than_the_scan_step():
    Sweep.WINDOW, old = 3, Sweep.WINDOW
    try:
        done = np.zeros(50, bool)
        done[::3] = True
        cells = np.concatenate(drain(Sweep(done, 7), np.zeros(50)))
        assert cells.tolist() == np.flatnonzero(~done).tolist()
    finally:
        Sweep.WINDOW = old


def bowl(n, rough=0.0, seed=0):
    """A loss-like surface: a tilted quadratic basin (values 0.05 to ~5), plus optional
    small-scale roughness."""
    t = np.linspace(-1, 1, n)
    X, Y = np.meshgrid(t, t)
    z = 0.05 + 2.0 * (X - 0.1) ** 2 + 3.0 * (Y + 0.2) ** 2 + 0.3 * X * Y
    if rough:
        rng = np.random.default_rng(seed)
        z = z * (1 + rough * np.sin(17 * X + rng.uniform()) * np.cos(13 * Y))
    return z


def level_mismatch(full, approx, levels=30, **kind):
    lev = _levels(full, PlotOptions(levels=levels, **kind), "loss")
    return np.mean(np.digitize(full, lev) != np.digitize(approx, lev))


def make(z, chunk=32, planes=1, done=None, known=None, **kw):
    """An Adaptive schedule for surface z (one plane, or `planes` stacked), defaults as a job's."""
    shape = z.shape[1:] if planes > 1 else z.shape
    kw.setdefault("coarse", auto_coarse(max(shape)))
    kw.setdefault("tolerance", 0.02)
    kw.setdefault("levels", 30)
    done = np.zeros(z.size, bool) if done is None else done
    known = np.full(z.size, np.nan) if known is None else known
    return Adaptive(shape, planes, done, known, chunk, kw["coarse"], kw["tolerance"], kw["levels"],
                    kw.get("budget"), kw.get("workers", 1))


def mask(z, cells):
    done = np.zeros(z.size, bool)
    done[np.concatenate(cells) if isinstance(cells, list) and cells and np.ndim(cells[0]) else cells] = True
    return done.reshape(z.shape)


def mismatches(full, rec):
    """Band mismatches at the figures' default levels, 30 linear, 30 geometric and 12 linear
    over the full range."""
    out = [level_mismatch(full, rec, **kind) for kind in ({}, {"linear": True}, {"log": True})]
    even = np.linspace(full.min(), full.max(), 12)
    return out + [np.mean(np.digitize(full, even) != np.digitize(rec, even))]


@pytest.mark.parametrize("n,share", [(101, 0.20), (201, 0.08)])
def test_adaptive_reproduces_the_contour_picture_from_few_cells(n, share):
    z = bowl(n)
    s = make(z)
    cells = np.concatenate(drain(s, z))
    assert len(cells) == len(set(cells.tolist()))  # each cell once
    done = mask(z, cells)
    c = auto_coarse(n)
    assert done[np.ix_(lattice(n, c), lattice(n, c))].all()  # the coarse lattice is always computed
    rec = reconstruct(np.where(done, z, np.nan), done, c, 30)
    assert np.array_equal(rec[done], z[done])  # computed cells are the truth
    assert np.isfinite(rec).all()
    assert done.mean() <= share, done.mean()
    assert max(mismatches(z, rec)) <= 0.005  # at every level choice


def test_the_estimated_error_bounds_the_true_error():
    """What the schedule believes of the cells it leaves to interpolation holds: the true error,
    in contour spacings, is within the estimate on a smooth bowl and on one with ripples a few
    lattice cells wide. (Ripples narrower than the lattice are invisible to it: docs/ADAPTIVE.md.)"""
    t = np.linspace(-1, 1, 101)
    X, Y = np.meshgrid(t, t)
    for z in (bowl(101), bowl(101) * (1 + 0.1 * np.sin(5 * X) * np.cos(4 * Y)), bowl(201)):
        done = mask(z, drain(make(z), z))
        sv = survey(np.where(done, z, np.nan), done, auto_coarse(z.shape[0]), 30)
        true = sv.units.error(sv.units.to(z), sv.units.to(sv.surface))
        assert true.max() <= sv.error, (true.max(), sv.error)
        assert true[~done].mean() > 0  # the test could fail: some cells are read, not computed


def test_adaptive_refines_more_where_the_surface_is_rough():
    z0, z1 = bowl(101), bowl(101, rough=0.2)
    n0 = len(np.concatenate(drain(make(z0, 16), z0)))
    n1 = len(np.concatenate(drain(make(z1, 16), z1)))
    assert n1 > n0


def test_a_cubic_surface_needs_only_the_lattice_and_is_read_exactly():
    """Cubic interpolation reproduces a cubic: the lattice's surpluses are zero, nothing is
    refined, and every cell is read to round-off. (Through zero, so the grid is read in linear
    units: a positive surface is read in its log, where a cubic is not one.)"""
    t = np.linspace(-1, 1, 41)
    X, Y = np.meshgrid(t, t)
    z = X ** 3 - 0.5 * X * Y ** 2 + 0.3 * Y - 0.1
    s = make(z, 8, coarse=8)
    cells = np.concatenate(drain(s, z))
    assert sorted(cells.tolist()) == sorted(s.coarse_cells.tolist())
    done = mask(z, cells)
    np.testing.assert_allclose(reconstruct(np.where(done, z, np.nan), done, 8, 30), z, rtol=0, atol=1e-12)
    assert survey(np.where(done, z, np.nan), done, 8, 30).error < 1e-9


def test_the_cells_do_not_depend_on_the_order_results_arrive_in():
    z = bowl(61, rough=0.1)
    sets = []
    for seed, chunk, batch, budget in ((None, 32, 1, None), (0, 5, 3, None), (1, 1, 7, None), (2, 64, 2, None),
                                       (None, 32, 1, 700), (3, 3, 5, 700)):
        rng = None if seed is None else np.random.default_rng(seed)
        s = make(z, chunk, budget=budget, tolerance=0.005, workers=3, coarse=4)
        sets.append((budget, sorted(np.concatenate(drain(s, z, rng, batch)).tolist())))
    full = [c for b, c in sets if b is None]
    cut = [c for b, c in sets if b is not None]
    assert all(x == full[0] for x in full) and all(x == cut[0] for x in cut)
    assert len(cut[0]) == 700 and len(full[0]) > 700  # the budget cut, at the same cells every time


@pytest.mark.parametrize("budget", [None, 500])
def test_resuming_from_any_point_gives_the_same_cells(budget):
    z = bowl(61, rough=0.1)
    s = make(z, 8, budget=budget, tolerance=0.005, coarse=4)
    order = drain(s, z)
    full = sorted(np.concatenate(order).tolist())
    for k in (1, len(order) // 3, len(order) - 1):
        done = np.zeros(z.size, bool)
        done[np.concatenate(order[:k])] = True
        known = np.where(done, z.reshape(-1), np.nan)
        r = make(z, 8, done=done, known=known, budget=budget, tolerance=0.005, coarse=4)
        rest = np.concatenate(drain(r, z)) if not r.exhausted else np.empty(0, int)
        assert not done[rest].any()  # nothing computed twice
        assert sorted(np.flatnonzero(done).tolist() + rest.tolist()) == full


def test_a_budget_is_spent_in_order_of_the_error_and_every_prefix_is_a_picture():
    """A smaller budget computes a prefix of a larger one's cells; the estimated error and the
    true one fall as the budget grows, and a run stopped anywhere reads back."""
    z = bowl(101, rough=0.05)
    order = np.concatenate(drain(make(z, 4, budget=z.size, tolerance=0.0), z)).tolist()
    lat = len(make(z).coarse_cells)
    prev_est, prev_true = np.inf, np.inf
    for b in (lat, 900, 1400, 2000, 3000):
        cells = np.concatenate(drain(make(z, 4, budget=b, tolerance=0.0), z)).tolist()
        assert cells == order[:b]  # handed out in the same order: a prefix
        done = mask(z, cells)
        sv = survey(np.where(done, z, np.nan), done, 4, 30)
        true = sv.units.error(sv.units.to(z), sv.units.to(sv.surface)).mean()
        assert sv.error <= prev_est and true < prev_true, (b, sv.error, prev_est, true, prev_true)
        prev_est, prev_true = sv.error, true
    # stopped mid-tier: still a full picture
    done = mask(z, order[:1234])
    assert np.isfinite(reconstruct(np.where(done, z, np.nan), done, 4, 30)).all()


def test_planes_are_refined_each_on_its_own_cells():
    z = np.stack([bowl(61), bowl(61, rough=0.2)])
    s = make(z, 16, planes=2)
    got = np.concatenate(drain(s, z, np.random.default_rng(0), 2))
    for p in range(2):
        alone = np.concatenate(drain(make(z[p], 16), z[p]))
        mine = got[(got >= p * z[0].size) & (got < (p + 1) * z[0].size)] - p * z[0].size
        assert sorted(mine.tolist()) == sorted(alone.tolist())


def test_non_finite_corners_are_refined_to_the_finest_cells():
    z = bowl(41)
    z[20:23, 20:23] = np.inf  # an overflow around one place
    done = mask(z, drain(make(z, 8), z))
    assert done[19:24, 19:24].all()  # the gap and its border are computed, not interpolated


def test_one_dimensional_grids():
    t = np.linspace(-1, 1, 201)
    z = 0.1 + t ** 2 + 0.05 * np.sin(9 * t)
    done = mask(z, drain(make(z, 4), z))
    rec = reconstruct(np.where(done, z, np.nan), done, auto_coarse(201), 30)
    assert done.mean() < 0.3 and max(mismatches(z, rec)) <= 0.01
    b = np.concatenate(drain(make(z, 4, budget=40, tolerance=0.0), z))
    assert len(b) == 40


def test_axis_levels_add_midpoints_until_every_point():
    lv = axis_levels(11, 4)
    assert [x.tolist() for x in lv] == [[0, 4, 8, 10], [0, 2, 4, 6, 8, 9, 10], list(range(11))]
    assert auto_coarse(101) == 4 and auto_coarse(201) == 8 and auto_coarse(501) == 16 and auto_coarse(41) == 2
