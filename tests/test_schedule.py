"""The schedules on their own (no torch, no MPI): a sweep's chunks, and the adaptive grid's
choice of cells against surfaces whose full grid is known."""

import numpy as np
import pytest

from lldist.analysis.figures import PlotOptions, _levels
from lldist.cells.schedule import Adaptive, Box, Sweep, lattice, reconstruct


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


@pytest.mark.parametrize("n", [101, 201])
def test_adaptive_reproduces_the_contour_picture_from_few_cells(n):
    z = bowl(n)
    s = Adaptive(z.shape, np.zeros(z.size, bool), np.full(z.size, np.nan), 32, coarse=4)
    cells = np.concatenate(drain(s, z))
    assert len(cells) == len(set(cells.tolist()))  # each cell once
    done = np.zeros(z.size, bool)
    done[cells] = True
    done = done.reshape(z.shape)
    # the coarse lattice is always computed
    assert done[np.ix_(lattice(n, 4), lattice(n, 4))].all()
    rec = reconstruct(np.where(done, z, np.nan), done, 4)
    assert np.array_equal(rec[done], z[done])  # computed cells are the truth
    assert np.isfinite(rec).all()
    assert done.mean() <= 0.40, done.mean()
    # the picture holds for the figures' default levels, and for --linear and --log alike
    for kind in ({}, {"linear": True}, {"log": True}):
        assert level_mismatch(z, rec, **kind) <= 0.01, kind


def test_adaptive_refines_more_where_the_surface_is_rough():
    z0, z1 = bowl(101), bowl(101, rough=0.2)
    n0 = len(np.concatenate(drain(Adaptive(z0.shape, np.zeros(z0.size, bool), np.full(z0.size, np.nan), 16), z0)))
    n1 = len(np.concatenate(drain(Adaptive(z1.shape, np.zeros(z1.size, bool), np.full(z1.size, np.nan), 16), z1)))
    assert n1 > n0


def test_a_plane_needs_only_the_lattice_and_is_reconstructed_exactly():
    """A plane through zero: only linear levels apply, and there interpolation is exact. (A
    positive plane is refined: the grid is judged against geometric levels too, for plot --log,
    and in log units a plane is curved.)"""
    t = np.linspace(0, 1, 41)
    z = -1.0 + np.add.outer(0.5 * t, 2.0 * t)  # bilinear in (y, x): interpolation is exact
    s = Adaptive(z.shape, np.zeros(z.size, bool), np.full(z.size, np.nan), 8, coarse=8)
    cells = np.concatenate(drain(s, z))
    assert sorted(cells.tolist()) == sorted(s.coarse_cells.tolist())
    positive = z + 2.0  # 1 to 3.5: geometric levels apply too; refined, and the picture still holds
    s = Adaptive(z.shape, np.zeros(z.size, bool), np.full(z.size, np.nan), 8, coarse=8)
    assert len(np.concatenate(drain(s, positive))) > len(s.coarse_cells)
    done = np.zeros(z.size, bool)
    done[cells] = True
    np.testing.assert_allclose(reconstruct(np.where(done.reshape(z.shape), z, np.nan), done.reshape(z.shape), 8),
                               z, rtol=1e-12, atol=1e-12)


def test_the_cells_do_not_depend_on_the_order_results_arrive_in():
    z = bowl(61, rough=0.1)
    sets = []
    for seed, chunk, batch in ((None, 32, 1), (0, 5, 3), (1, 1, 7), (2, 64, 2)):
        rng = None if seed is None else np.random.default_rng(seed)
        s = Adaptive(z.shape, np.zeros(z.size, bool), np.full(z.size, np.nan), chunk)
        sets.append(sorted(np.concatenate(drain(s, z, rng, batch)).tolist()))
    assert all(x == sets[0] for x in sets)


def test_resuming_from_any_point_gives_the_same_cells():
    z = bowl(61, rough=0.1)
    s = Adaptive(z.shape, np.zeros(z.size, bool), np.full(z.size, np.nan), 8)
    order = drain(s, z)
    full = sorted(np.concatenate(order).tolist())
    for k in (1, len(order) // 3, len(order) - 1):
        done = np.zeros(z.size, bool)
        done[np.concatenate(order[:k])] = True
        known = np.where(done, z.reshape(-1), np.nan)
        r = Adaptive(z.shape, done, known, 8)
        rest = np.concatenate(drain(r, z)) if not r.exhausted else np.empty(0, int)
        assert not done[rest].any()  # nothing computed twice
        assert sorted(np.flatnonzero(done).tolist() + rest.tolist()) == full


def test_non_finite_corners_are_refined_to_the_finest_cells():
    z = bowl(41)
    z[20:23, 20:23] = np.inf  # an overflow around one place
    s = Adaptive(z.shape, np.zeros(z.size, bool), np.full(z.size, np.nan), 8)
    done = np.zeros(z.size, bool)
    done[np.concatenate(drain(s, z))] = True
    done = done.reshape(z.shape)
    assert done[19:24, 19:24].all()  # the gap and its border are computed, not interpolated


def test_one_dimensional_grids():
    t = np.linspace(-1, 1, 201)
    z = 0.1 + t ** 2 + 0.05 * np.sin(9 * t)
    s = Adaptive(z.shape, np.zeros(z.size, bool), np.full(z.size, np.nan), 4)
    done = np.zeros(z.size, bool)
    done[np.concatenate(drain(s, z))] = True
    rec = reconstruct(np.where(done, z, np.nan), done, 4)
    assert done.mean() < 0.6 and level_mismatch(z, rec) <= 0.01


def test_box_refinement_covers_the_box():
    b = Box(0, 4, 0, 3)
    kids = b.children()
    assert len(kids) == 4 and {(k.x0, k.x1, k.y0, k.y1) for k in kids} == \
        {(0, 2, 0, 1), (2, 4, 0, 1), (0, 2, 1, 3), (2, 4, 1, 3)}
    assert b.new_points() == [(2, 0), (0, 1), (2, 1), (4, 1), (2, 3)]
    assert Box(0, 1, 0, 5).children()[0].x1 == 1 and len(Box(0, 1, 0, 5).children()) == 2
