"""Adaptive grids against full grids: cells computed, contour-level mismatch, loss error.

    python tools/adaptive_study.py full.h5 [more_full.h5 ...] [--coarse 4 --tolerance 0.05]
        replays the adaptive schedule on finished full grids (the schedule decides from the
        values of the cells it asked for, so a replay on a full file is exactly what a run
        would compute) and prints the table.
    python tools/adaptive_study.py --compare full.h5 adaptive.h5 --png out.png
        compares a real adaptive run with its full grid, and draws both.
    python tools/adaptive_study.py --replay-picture full.h5 --png out.png
        draws the replayed schedule on a full grid (bash tools/adaptive_docs.sh runs it all).

Level mismatch: the fraction of cells whose contour-level index differs between the
reconstructed and the full surface, for the figures' round levels from the full grid's range:
the default choice, linear (plot --linear) and geometric (plot --log).
"""

import argparse
import os
import sys

import numpy as np

from lldist.analysis.figures import PlotOptions, _levels
from lldist.cells.levels import labelled
from lldist.cells.schedule import Adaptive, reconstruct
from lldist.store import SurfaceReader


def replay(loss: np.ndarray, coarse: int, tolerance: float, levels: int = 30, chunk: int = 32) -> np.ndarray:
    """The done mask an adaptive run computes on this surface."""
    shape = loss.shape
    flat = loss.reshape(-1)
    s = Adaptive(shape, np.zeros(flat.size, bool), np.full(flat.size, np.nan), chunk, coarse, tolerance, levels)
    done = np.zeros(flat.size, bool)
    while not s.exhausted:
        cells = s.take()
        if cells is None:
            raise RuntimeError("the schedule waits with nothing out")
        done[cells] = True
        s.returned(cells, flat[cells])
    return done.reshape(shape)


def compare(full: np.ndarray, approx: np.ndarray, levels: int = 30, **kind) -> dict:
    lev = _levels(full, PlotOptions(levels=levels, **kind), "loss")
    ok = np.isfinite(full)
    a, b = np.digitize(full[ok], lev), np.digitize(np.nan_to_num(approx[ok], nan=np.inf), lev)
    err = np.abs(approx[ok] - full[ok])
    return {"mismatch": float(np.mean(a != b)), "max_err": float(np.nanmax(err)),
            "max_rel_err": float(np.nanmax(err / np.abs(full[ok])))}


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


def replay_picture(full_path: str, png: str, coarse: int, tolerance: float, levels: int = 30) -> dict:
    """The same from a full grid alone: the schedule replayed on it (what a run computes)."""
    name, f = read(full_path)
    full = f.values[(f.splits[0], "loss")]
    done = replay(full, coarse, tolerance, levels)
    return draw(name, f, reconstruct(np.where(done, full, np.nan), done, coarse), done, png, levels, tolerance)


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
    ap.add_argument("--coarse", type=int, default=4)
    ap.add_argument("--tolerance", type=float, default=0.05)
    ap.add_argument("--levels", type=int, default=30)
    ap.add_argument("--compare", nargs=2, metavar=("FULL", "ADAPTIVE"))
    ap.add_argument("--png")
    ap.add_argument("--replay-picture", metavar="FULL", help="draw the replayed schedule on a full grid into --png")
    a = ap.parse_args(argv)
    if a.replay_picture:
        c = replay_picture(a.replay_picture, a.png or "adaptive.png", a.coarse, a.tolerance, a.levels)
        print(f"level mismatch {c['mismatch']:.2%}, max loss error {c['max_err']:.3g} ({c['max_rel_err']:.1%})")
        return 0
    if a.compare:
        c = picture(a.compare[0], a.compare[1], a.png or "adaptive.png", a.levels)
        print(f"level mismatch {c['mismatch']:.2%}, max loss error {c['max_err']:.3g} ({c['max_rel_err']:.1%})")
        return 0
    print("| model | grid | loss span | cells computed | mismatch, default levels | linear | geometric | "
          "max loss error (rel.) |")
    print("|---|---|---|---|---|---|---|---|")
    for path in a.files:
        name, s = read(path)
        full = s.values[(s.splits[0], "loss")]
        done = replay(full, a.coarse, a.tolerance, a.levels)
        rec = reconstruct(np.where(done, full, np.nan), done, a.coarse)
        c = [compare(full, rec, a.levels, **kind) for kind in ({}, {"linear": True}, {"log": True})]
        span = np.nanmax(full) / np.nanmin(full)
        print(f"| {name} | {' x '.join(map(str, full.shape))} | x{span:,.0f} | {done.mean():.1%} | "
              f"{c[0]['mismatch']:.2%} | {c[1]['mismatch']:.2%} | {c[2]['mismatch']:.2%} | "
              f"{c[0]['max_err']:.3g} ({c[0]['max_rel_err']:.1%}) |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
