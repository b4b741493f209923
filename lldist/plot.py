"""Plot surfaces offline: the only module that imports matplotlib (headless, Agg).

    python -m lldist.plot runs/quickstart/surface.h5 [--out DIR] [--format png|pdf|svg]
                          [--vmin V --vmax V --levels N --log]

2D surfaces: for loss and accuracy of each split, contour lines with labels (`*_contour`),
filled contours (`*_contourf`), a heat map (`*_heat`) and a 3D surface (`*_3d`).
1D surfaces: loss and accuracy against alpha on twin axes (`curve`), train and test together.
Loss levels are geometric when the loss spans more than a factor 50 (`--linear` to refuse).
Cells not yet computed and NaN/inf values are drawn as gaps. Files go next to the input
(`<stem>_<split>_<quantity>_<kind>.<fmt>`) unless --out names a folder.
"""

from __future__ import annotations

import argparse
import os
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from .errors import UserError, run_cli  # noqa: E402

LABELS = {"loss": "loss", "acc": "accuracy"}


def read_surface(path: str) -> dict:
    """Arrays of an lldist file, with cells not done (and non-finite values) as NaN."""
    from .store import SurfaceFile
    sf = SurfaceFile.open(path, "r")
    try:
        f = sf.f
        done = f["done"][()]
        out = {"x": f["x"][()], "y": f["y"][()] if "y" in f else None, "done": done,
               "splits": sf.splits, "name": str(f.attrs.get("job_name", "")), "values": {}}
        for split in sf.splits:
            for q in ("loss", "acc"):
                a = f[split][q][()].astype(float)
                a[~done] = np.nan
                out["values"][(split, q)] = a
        return out
    finally:
        sf.f.close()


def _levels(z: np.ndarray, args, q: str):
    finite = z[np.isfinite(z)]
    if finite.size == 0:
        return None
    lo = args.vmin if args.vmin is not None else finite.min()
    hi = args.vmax if args.vmax is not None else finite.max()
    if q == "acc":
        lo, hi = (finite.min(), finite.max())
    if hi <= lo:
        hi = lo + 1e-12
    if q == "loss" and lo > 0 and (args.log or (not args.linear and hi / lo > 50)):
        # losses around a minimum span decades: geometric levels resolve the basin
        return np.geomspace(lo, hi, args.levels)
    return np.linspace(lo, hi, args.levels)


def _masked(z, lev):
    z = np.ma.masked_invalid(z)
    if lev is not None:  # values beyond vmax/vmin are gaps, not saturated colour
        z = np.ma.masked_where((z < lev[0]) | (z > lev[-1]), z)
    return z


def plot_2d(s: dict, args, outdir: str, stem: str) -> list:
    written = []
    X, Y = np.meshgrid(s["x"], s["y"])  # (ny, nx), the file's own layout
    for (split, q), z in s["values"].items():
        lev = _levels(z, args, q)
        if lev is None:
            continue
        zm = _masked(z, lev)
        title = f"{s['name']}: {split} {LABELS[q]}"
        geometric = q == "loss" and lev[0] > 0 and np.allclose(lev[1] / lev[0], lev[2] / lev[1])
        norm = matplotlib.colors.LogNorm(lev[0], lev[-1]) if geometric else None
        for kind in ("contour", "contourf", "heat", "3d"):
            fig = plt.figure(figsize=(5.5, 4.5))
            if kind == "3d":
                ax = fig.add_subplot(projection="3d")
                zz = np.where(np.isfinite(z), z, np.nan)
                if lev is not None:
                    zz = np.where((zz >= lev[0]) & (zz <= lev[-1]), zz, np.nan)
                ax.plot_surface(X, Y, zz, cmap="viridis", linewidth=0, antialiased=True,
                                vmin=lev[0], vmax=lev[-1])
                ax.set_zlabel(LABELS[q])
            else:
                ax = fig.add_subplot()
                if kind == "contour":
                    cs = ax.contour(X, Y, zm, levels=lev, cmap="viridis", norm=norm)
                    ax.clabel(cs, inline=True, fontsize=7, fmt="%.3g")
                elif kind == "contourf":
                    cs = ax.contourf(X, Y, zm, levels=lev, cmap="viridis", norm=norm)
                    fig.colorbar(cs, ax=ax, label=LABELS[q])
                else:
                    im = ax.imshow(zm, origin="lower", aspect="auto", cmap="viridis", norm=norm,
                                   extent=(s["x"][0], s["x"][-1], s["y"][0], s["y"][-1]),
                                   vmin=None if norm else lev[0], vmax=None if norm else lev[-1])
                    fig.colorbar(im, ax=ax, label=LABELS[q])
                ax.plot([0], [0], "r+", ms=8)  # theta*
            ax.set_xlabel("alpha (direction x)")
            ax.set_ylabel("beta (direction y)")
            ax.set_title(title, fontsize=9)
            path = os.path.join(outdir, f"{stem}_{split}_{q}_{kind}.{args.format}")
            fig.savefig(path, dpi=args.dpi, bbox_inches="tight")
            plt.close(fig)
            written.append(path)
    return written


def plot_1d(s: dict, args, outdir: str, stem: str) -> list:
    fig, ax = plt.subplots(figsize=(6, 4))
    ax2 = ax.twinx()
    styles = {"train": "-", "test": "--"}
    for split in s["splits"]:
        loss = np.ma.masked_invalid(s["values"][(split, "loss")])
        acc = np.ma.masked_invalid(s["values"][(split, "acc")])
        ax.plot(s["x"], loss, "b" + styles[split], label=f"{split} loss")
        ax2.plot(s["x"], 100 * acc, "r" + styles[split], label=f"{split} accuracy")
    ax.set_xlabel("alpha")
    ax.set_ylabel("loss", color="b")
    ax2.set_ylabel("accuracy (%)", color="r")
    if args.log:
        ax.set_yscale("log")
    if args.vmin is not None or args.vmax is not None:
        ax.set_ylim(args.vmin, args.vmax)
    lines = ax.get_lines() + ax2.get_lines()
    ax.legend(lines, [ln.get_label() for ln in lines], fontsize=8, loc="upper center")
    ax.set_title(s["name"], fontsize=9)
    path = os.path.join(outdir, f"{stem}_curve.{args.format}")
    fig.savefig(path, dpi=args.dpi, bbox_inches="tight")
    plt.close(fig)
    return [path]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m lldist.plot", description=__doc__.split("\n")[0])
    ap.add_argument("files", nargs="+", help="lldist surface files (.h5)")
    ap.add_argument("--out", help="output folder (default: next to each file)")
    ap.add_argument("--format", default="png", choices=("png", "pdf", "svg"))
    ap.add_argument("--vmin", type=float, help="lowest loss shown")
    ap.add_argument("--vmax", type=float, help="highest loss shown (above: gaps)")
    ap.add_argument("--levels", type=int, default=30, help="number of contour levels")
    ap.add_argument("--log", action="store_true", help="logarithmic loss scale (default when the loss spans "
                    "more than a factor 50)")
    ap.add_argument("--linear", action="store_true", help="linear loss scale, always")
    ap.add_argument("--dpi", type=int, default=120)
    args = ap.parse_args(argv)
    if args.levels < 2:
        raise UserError(f"--levels must be at least 2, got {args.levels}")
    for path in args.files:
        s = read_surface(path)
        outdir = args.out or os.path.dirname(os.path.abspath(path))
        try:
            os.makedirs(outdir, exist_ok=True)
        except OSError as e:
            raise UserError(f"--out {outdir}: {e.strerror}")
        stem = os.path.splitext(os.path.basename(path))[0]
        if not s["done"].any():
            raise UserError(f"{path}: no cell is computed yet")
        written = plot_2d(s, args, outdir, stem) if s["y"] is not None else plot_1d(s, args, outdir, stem)
        print(f"lldist: {path}: wrote {len(written)} figures to {outdir}", flush=True)
    return 0



def cli() -> None:
    sys.exit(run_cli(main))


if __name__ == "__main__":
    sys.exit(run_cli(main))
