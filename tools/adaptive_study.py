"""Adaptive grids against full grids: cells computed, contour-level mismatch, loss error.

    python tools/adaptive_study.py full.h5 [more_full.h5 ...] [--coarse auto --tolerance 0.02]
        replays the adaptive schedule on finished full grids (the schedule decides from the
        values of the cells it asked for, so a replay on a full file is exactly what a run
        would compute) and prints the table.
    python tools/adaptive_study.py --compare full.h5 adaptive.h5 --png out.png
        compares a real adaptive run with its full grid, and draws both.
    python tools/adaptive_study.py --replay-picture full.h5 --png out.png
        draws the replayed schedule on a full grid (bash tools/adaptive_docs.sh runs it all).
    python tools/adaptive_study.py --budget-curve full.h5 [...] --png out.png
        the error (estimated and true) against the cells computed, for every prefix of a budget.

Level mismatch: the fraction of cells whose contour-level index differs between the
reconstructed and the full surface, for the figures' round levels from the full grid's range:
the default choice, linear (plot --linear) and geometric (plot --log), 30 of each, and 12 evenly
spaced linear levels over the full range. The basin: cells whose loss is at most twice the least.
"""

import argparse
import os
import sys

import numpy as np

from lldist.analysis.figures import PlotOptions, _levels
from lldist.bench.adaptive import KINDS as BENCH_KINDS
from lldist.bench.adaptive import compare, read_back, replay
from lldist.cells.interpolation import lattice
from lldist.cells.levels import labelled
from lldist.config import auto_coarse
from lldist.store import SurfaceReader

KINDS = [kind for _, kind in BENCH_KINDS]  # default, 30 linear, 30 geometric, 12 linear over the range


def read(path):
    with SurfaceReader(path) as sf:
        s = sf.read_all()
        name = os.path.splitext(os.path.basename(path))[0]  # the files' jobs may share a name
    return name, s


def picture(full_path: str, adaptive_path: str, png: str, levels: int = 30) -> dict:
    """Full grid | a real adaptive run's reconstruction | cells whose level differs."""
    _, f = read(full_path)
    name, a = read(adaptive_path)
    split = f.splits[0]
    return draw(name, f, a.values[(split, "loss")], a.done, png, levels, a.adaptive["tolerance"])


def replay_picture(full_path: str, png: str, tolerance: float, levels: int = 30, coarse=None) -> dict:
    """The same from a full grid alone: the schedule replayed on it (what a run computes)."""
    name, f = read(full_path)
    full = f.values[(f.splits[0], "loss")]
    done = replay(full, tolerance, levels, coarse)
    return draw(name, f, read_back(full, done, coarse, levels).surface, done, png, levels, tolerance)


def budget_curve(paths: list, png: str, tolerance: float, levels: int = 30, points: int = 24) -> list:
    """The error of the picture against the cells computed, for a run with a budget killed after
    each prefix: estimated error (what lldist.info reports) and true error (the full grid as
    truth), one curve a model. Returns the rows."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(1, 2, figsize=(11, 4), constrained_layout=True)
    rows = []
    for path in paths:
        name, f = read(path)
        full = f.values[(f.splits[0], "loss")]
        order = []
        replay(full, 0.0, levels, budget=full.size, order=order)  # tolerance 0: the budget's whole order
        c = auto_coarse(max(full.shape))
        n0 = len(lattice(full.shape[0], c)) * len(lattice(full.shape[1], c))  # the lattice: the first prefix
        ks = np.unique(np.geomspace(n0, len(order), points).astype(int))
        est, mis, mean = [], [], []
        for k in ks:
            done = np.zeros(full.size, bool)
            done[order[:k]] = True
            sv = read_back(full, done.reshape(full.shape), None, levels)
            est.append(sv.error)
            mean.append(sv.mean_error)
            mis.append(max(compare(full, sv.surface, levels, **kind)["mismatch"] for kind in KINDS))
            rows.append((name, int(k), k / full.size, sv.error, sv.mean_error, mis[-1]))
        ax[0].loglog(ks / full.size, est, "-", label=f"{name}: largest, estimated")
        ax[0].loglog(ks / full.size, mean, "--", label=f"{name}: mean, estimated")
        ax[1].semilogx(ks / full.size, 100 * np.array(mis), "-o", ms=3, label=name)
    ax[0].set_xlabel("share of cells computed")
    ax[0].set_ylabel("interpolation error, contour spacings")
    ax[0].legend(fontsize=8)
    ax[1].axhline(0.5, color="0.5", lw=0.8, ls=":")
    ax[1].set_xlabel("share of cells computed")
    ax[1].set_ylabel("cells in another band, %\n(worst of 4 level sets, full grid as truth)")
    ax[1].legend(fontsize=8)
    fig.suptitle(f"a budget's every prefix: {levels} levels, cells in the order a run computes them", fontsize=11)
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return rows


def draw(name: str, f: dict, rec: np.ndarray, done: np.ndarray, png: str, levels: int, tolerance: float) -> dict:
    """Full grid | adaptive reconstruction (computed cells dotted) | cells whose level differs."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    full = f.values[(f.splits[0], "loss")]
    lev = _levels(full, PlotOptions(levels=levels), "loss")
    norm = matplotlib.colors.LogNorm(lev[0], lev[-1]) if lev.geometric else None
    c = compare(full, rec, levels)
    fig, ax = plt.subplots(1, 3, figsize=(13, 4.2), constrained_layout=True)
    X, Y = np.meshgrid(f.x, f.y)
    for k, (z, title) in enumerate(((full, f"full grid: {full.size} cells"),
                                    (rec, f"adaptive: {int(done.sum())} cells ({done.mean():.0%}) computed"))):
        cs = ax[k].contourf(X, Y, z, levels=lev, cmap="viridis", norm=norm)
        ax[k].contour(X, Y, z, levels=lev, colors="k", linewidths=0.3)
        ax[k].set_title(title, fontsize=10)
    iy, ix = np.nonzero(done)
    ax[1].plot(f.x[ix], f.y[iy], ".", ms=0.6, color="w", alpha=0.6)
    mism = np.digitize(full, lev) != np.digitize(rec, lev)
    ax[2].imshow(np.where(mism, 1.0, np.nan), origin="lower", cmap="Reds", vmin=0, vmax=1,
                 extent=(f.x[0], f.x[-1], f.y[0], f.y[-1]), aspect="auto")
    ax[2].contour(X, Y, full, levels=lev, colors="0.7", linewidths=0.3)
    ax[2].set_title(f"level differs: {c['mismatch']:.2%} of cells", fontsize=10)
    fig.colorbar(cs, ax=ax[:2], shrink=0.85, ticks=labelled(np.asarray(lev), lev.geometric), format="%g",
                 location="left", pad=0.08).set_label("loss")
    for x in ax:
        x.set_xlabel("alpha")
    ax[0].set_ylabel("beta")
    fig.suptitle(f"{name} {' x '.join(map(str, full.shape))}: {levels} levels, tolerance {tolerance:g}", fontsize=11)
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return c


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("files", nargs="*")
    ap.add_argument("--coarse", type=int, default=None, help="the lattice's stride (default: auto)")
    ap.add_argument("--tolerance", type=float, default=0.02)
    ap.add_argument("--levels", type=int, default=30)
    ap.add_argument("--compare", nargs=2, metavar=("FULL", "ADAPTIVE"))
    ap.add_argument("--png")
    ap.add_argument("--replay-picture", metavar="FULL", help="draw the replayed schedule on a full grid into --png")
    ap.add_argument("--budget-curve", action="store_true", help="the error against cells computed, into --png")
    a = ap.parse_args(argv)
    if a.replay_picture:
        c = replay_picture(a.replay_picture, a.png or "adaptive.png", a.tolerance, a.levels, a.coarse)
        print(f"level mismatch {c['mismatch']:.2%}, max loss error {c['max_err']:.3g} ({c['max_rel_err']:.1%})")
        return 0
    if a.compare:
        c = picture(a.compare[0], a.compare[1], a.png or "adaptive.png", a.levels)
        print(f"level mismatch {c['mismatch']:.2%}, max loss error {c['max_err']:.3g} ({c['max_rel_err']:.1%})")
        return 0
    if a.budget_curve:
        print("| model | cells | share | estimated error, largest | mean | worst mismatch |")
        print("|---|---|---|---|---|---|")
        for r in budget_curve(a.files, a.png or "budget.png", a.tolerance, a.levels):
            print(f"| {r[0]} | {r[1]} | {r[2]:.1%} | {r[3]:.3g} | {r[4]:.2g} | {r[5]:.2%} |")
        return 0
    print("| model | grid | loss span | cells computed | mismatch, default levels | 30 linear | 30 geometric | "
          "12 linear, full range | estimated error (largest, mean) | max loss error (rel.) | in the basin (rel.) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for path in a.files:
        name, s = read(path)
        full = s.values[(s.splits[0], "loss")]
        done = replay(full, a.tolerance, a.levels, a.coarse)
        sv = read_back(full, done, a.coarse, a.levels)
        c = [compare(full, sv.surface, a.levels, **kind) for kind in KINDS]
        span = np.nanmax(full) / np.nanmin(full)
        print(f"| {name} | {' x '.join(map(str, full.shape))} | x{span:,.0f} | {done.mean():.1%} | "
              f"{c[0]['mismatch']:.2%} | {c[1]['mismatch']:.2%} | {c[2]['mismatch']:.2%} | {c[3]['mismatch']:.2%} | "
              f"{sv.error:.3f}, {sv.mean_error:.4f} | {c[0]['max_err']:.3g} ({c[0]['max_rel_err']:.1%}) | "
              f"{c[0]['basin_err']:.2g} ({c[0]['basin_rel_err']:.2%}) |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
