"""Plot surfaces offline.

    python -m lldist.plot runs/quickstart/surface.h5 [--out DIR] [--format png|pdf|svg]
                          [--vmin V --vmax V --levels N --log | --linear] [--vtk] [--html]
    python -m lldist.plot a.h5 b.h5 ... --compare [--out DIR]

Every figure of each file (lldist/analysis/figures.py says which), written next to the input
(`<stem>_<split>_<quantity>_<kind>.<fmt>`) unless --out names a folder. `--compare`: the
surfaces side by side on one colour scale, with the same contour levels and axes (2D), or
overlaid (1D), and the curvature maps in a grid; panel titles say what differs between the
jobs. `--vtk` also writes `<stem>.vts` for ParaView, `--html` an interactive 3D surface per
quantity (lldist[html]). A series file (python -m lldist.series) gets λmax against step with the
stability threshold and the loss below, and each other measure against step with its errors.
"""

from __future__ import annotations

import dataclasses
import os
import sys

import numpy as np

from .errors import ArgumentParser, UserError, run_cli


def check_args(args) -> None:
    if args.levels < 3:
        raise UserError(f"--levels must be at least 3, got {args.levels}")
    for name in ("vmin", "vmax"):
        v = getattr(args, name)
        if v is not None and not np.isfinite(v):
            raise UserError(f"--{name} must be a finite number, got {v}")
    if args.vmin is not None and args.vmax is not None and not args.vmin < args.vmax:
        raise UserError(f"--vmin ({args.vmin}) must be below --vmax ({args.vmax})")
    if not 1 <= args.dpi <= 2400:
        raise UserError(f"--dpi must be between 1 and 2400, got {args.dpi}")


def folder(path: str) -> str:
    """The folder figures go to, made if needed; a file in the way is one line."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise UserError(f"--out {path} is a file, not a folder")
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise UserError(f"--out {path}: cannot make the folder ({e.strerror})")
    return path


def options(args):
    from .analysis.figures import PlotOptions
    return PlotOptions(**{f.name: getattr(args, f.name) for f in dataclasses.fields(PlotOptions)})


def main(argv=None) -> int:
    import matplotlib
    matplotlib.use("Agg")  # files only: the command line never needs a window
    from .analysis import figures
    d = figures.PlotOptions()
    ap = ArgumentParser(prog="python -m lldist.plot", doc=__doc__)
    ap.add_argument("files", nargs="+", help="lldist surface or series files (.h5)")
    ap.add_argument("--out", help="output folder (default: next to each file)")
    ap.add_argument("--format", default=d.format, choices=("png", "pdf", "svg"), help="figure file format")
    ap.add_argument("--vmin", type=float, default=d.vmin, help="lowest loss shown")
    ap.add_argument("--vmax", type=float, default=d.vmax, help="highest loss shown (above: gaps)")
    ap.add_argument("--levels", type=int, default=d.levels, help="number of contour levels")
    ap.add_argument("--log", action="store_true", default=d.log,
                    help="logarithmic loss scale (the default when the loss spans more than a factor 50)")
    ap.add_argument("--linear", action="store_true", default=d.linear, help="linear loss scale, always")
    ap.add_argument("--dpi", type=int, default=d.dpi, help="PNG resolution (pdf and svg are vector)")
    ap.add_argument("--vtk", action="store_true", help="also write <file>.vts for ParaView (z: the loss)")
    ap.add_argument("--html", action="store_true",
                    help="also write an interactive 3D surface per split and quantity as HTML (lldist[html])")
    ap.add_argument("--compare", action="store_true",
                    help="one figure per quantity: the files side by side on one colour scale (1D: overlaid)")
    args = ap.parse_args(argv)
    check_args(args)
    opts = options(args)
    if args.compare:
        outdir = folder(args.out or os.path.dirname(os.path.abspath(args.files[0])))
        figs = figures.compare(args.files, opts, outdir)
        for _, fig in figs:
            figures.plt.close(fig)
        print(f"lldist: wrote {len(figs)} comparison figures to {outdir}", flush=True)
        return 0
    from .store.series import is_series
    for path in args.files:
        if is_series(path):  # python -m lldist.series's file: its measures against step
            from .analysis import series_figures
            from .store.series import read_series
            ser = read_series(path)
            if not ser.done.any():
                raise UserError(f"{path}: no unit of the series is computed yet")
            outdir = folder(args.out or os.path.dirname(os.path.abspath(path)))
            written = series_figures.write_all(ser, outdir, os.path.splitext(os.path.basename(path))[0],
                                               args.format, args.dpi)
            print(f"lldist: {path}: wrote {len(written)} figures to {outdir}", flush=True)
            continue
        s = figures.read_surface(path)
        outdir = folder(args.out or os.path.dirname(os.path.abspath(path)))
        stem = os.path.splitext(os.path.basename(path))[0]
        computed = s.plane_values is not None or s.done.any()  # (with repeats: the mean's cells need every plane)
        if not computed or (s.plane_values is not None and
                            not any(np.isfinite(v).any() for v in s.plane_values.values())):
            raise UserError(f"{path}: no cell is computed yet")
        ad = s.adaptive
        if ad:
            r = s.adaptive_reading
            print(f"lldist: {path}: adaptive grid, {r.computed} of {r.cells} cells computed; estimated "
                  f"interpolation error {r.error:.3g} of the spacing of {ad.get('levels')} levels at most, "
                  f"{r.mean_error:.2g} on average", flush=True)
        if ad and (opts.levels > ad.get("levels") or opts.vmin is not None or opts.vmax is not None):
            print(f"lldist: warning: {path} is an adaptive grid read to a fraction of the spacing of "
                  f"{ad.get('levels')} contour levels over its range (linear or geometric); drawn with denser "
                  "levels, more cells may fall in the wrong band", file=sys.stderr, flush=True)
        written = figures.write_all(s, opts, outdir, stem)
        print(f"lldist: {path}: wrote {len(written)} figures to {outdir}", flush=True)
        from .analysis import export
        if args.vtk:
            out = export.write_vts(s, os.path.join(outdir, stem + ".vts"), log=opts.log)
            print(f"lldist: {path}: wrote {out} (ParaView)", flush=True)
        if args.html:
            for (split, q) in s.values:
                export.write_html(s, os.path.join(outdir, f"{stem}_{split}_{q}.html"), split, q,
                                  log=opts.log and q == "loss")
            print(f"lldist: {path}: wrote {len(s.values)} interactive HTML surfaces to {outdir}", flush=True)
    return 0


def cli() -> None:
    sys.exit(run_cli(main))


if __name__ == "__main__":
    cli()
