"""Figures of surfaces: every figure lldist draws. `python -m lldist.plot`, the study's report
and `lldist.open(path).plot()` all draw with these. The backend is the caller's: a notebook keeps
its own, the commands choose Agg.

    s = read_surface("out.h5")                       # or drawable(SurfaceReader(...).read_all()): a Drawable
    fig = figure(s, "test", "loss", "contour")       # contour | contourf | heat | 3d; a curve on 1D
    plot_2d(s, PlotOptions(dpi=300), outdir, stem)   # every figure of a file, written
    compare(paths, PlotOptions(), outdir)            # several files on one colour scale

2D surfaces: for loss and accuracy of each split, contour lines with labels (`*_contour`),
filled contours (`*_contourf`), a heat map (`*_heat`) and a 3D surface (`*_3d`).
1D surfaces: loss and accuracy against alpha on twin axes (`curve`), train and test together.
Loss (and lambda_max) levels are geometric when they span more than a factor
levels.GEOMETRIC_SPAN (`linear` to refuse). Own figures: `*_curvature` (eval.curvature:
lambda_max, lambda_min, their ratio per cell, loss contours over them), `*_trajectory`
(directions.kind pca: the training path numbered by epoch), `*_density` (lldist.hessian
--density: the eigenvalue spectrum at theta*), `*_blocks` (curvature.blocks: each block's top
eigenvalue and trace at theta*). Cells not yet computed and NaN/inf values are
drawn as gaps.
"""

from __future__ import annotations

import json
import os
import dataclasses
from dataclasses import dataclass
from typing import Optional

import matplotlib
import matplotlib.pyplot as plt
import numpy as np

from ..errors import UserError
from ..cells.levels import geometric_span, labelled, round_levels
from ..store import Surface, SurfaceReader


@dataclass(frozen=True)
class PlotOptions:
    """How figures are drawn: the one declaration of the plot options (the command line's
    flags take their defaults from here)."""
    vmin: Optional[float] = None  # lowest loss shown
    vmax: Optional[float] = None  # highest loss shown (above: gaps)
    levels: int = 30  # contour levels
    log: bool = False  # geometric loss levels, always
    linear: bool = False  # linear loss levels, always
    format: str = "png"  # png | pdf | svg
    dpi: int = 300  # PNG resolution (pdf and svg are vector)


LABELS = {"loss": "loss", "acc": "accuracy", "lambda_max": "λmax (Hessian)", "lambda_min": "λmin (Hessian)",
          "eig_ratio": "|λmin/λmax|", "loss_se": "standard error of the loss"}
GEOMETRIC = ("loss", "lambda_max", "loss_se")  # positive quantities that span decades across a plane
ERRORS = ("loss_se",)  # error bars of another quantity: a heat map in 2D, a band around it in 1D
LEVEL = 0.95  # the confidence of the bands drawn


def read_surface(path: str) -> "Drawable":
    """Arrays of an lldist file, with cells not done as NaN, ready to draw (see drawable)."""
    with SurfaceReader(path) as sf:
        return drawable(sf.read_all())


@dataclass
class Drawable(Surface):
    """A surface as the figures draw it (drawable): the mean over planes in `values`, and the
    label of the x axis."""
    xlabel: str = "alpha (direction x)"
    plane_values: Optional[dict] = None  # directions.repeats: each plane's values, (planes, ...)


def drawable(s: Surface) -> Drawable:
    """The surface as the figures draw it: with directions.repeats the mean over the planes
    (each plane's kept in plane_values); a 2D grid of one row or one column has no area to
    contour, so it becomes the curve along its other axis."""
    d = Drawable(**{f.name: getattr(s, f.name) for f in dataclasses.fields(Surface)})
    d.xlabel = "alpha (direction x)" if not s.curve or s.y is not None else f"t along the {s.curve} curve (0: a, 1: b)"
    if s.planes > 1:  # directions.repeats: every figure draws the mean over the planes,
        # and the planes' own figures (figure_planes) each plane and the spread
        d.plane_values = s.values
        d.values = {k: v.mean(axis=0) for k, v in s.values.items()}  # NaN where a plane is not done
        d.done = s.done.all(axis=0)
    if d.y is not None and 1 in d.done.shape:
        along_x = len(d.x) > 1 or len(d.y) == 1
        d.values = {k: v.reshape(-1) for k, v in d.values.items()}
        d.done = d.done.reshape(-1)
        if not along_x:
            d.x, d.xlabel = d.y, "beta (direction y)"
        d.y = None
    return d


class Levels(np.ndarray):
    """Contour levels (an array, as matplotlib takes them) that know whether they are geometric."""

    def __new__(cls, values, geometric: bool):
        obj = np.asarray(values, dtype=float).view(cls)
        obj.geometric = geometric
        return obj

    def __array_finalize__(self, obj):
        self.geometric = getattr(obj, "geometric", False)


SCALE = {"acc": 100.0}  # shown in percent, in 2D and 1D alike; stored as a fraction


def shown(z: np.ndarray, q: str) -> np.ndarray:
    """A quantity in the units the figures show it in (accuracy in percent)."""
    return z * SCALE.get(q, 1.0)


def _levels(z: np.ndarray, args, q: str):
    """Round contour levels over the finite values of z (in the units it is shown in): about
    args.levels of them, geometric for a positive quantity spanning decades (levels.py)."""
    finite = z[np.isfinite(z)]
    if finite.size == 0:
        return None
    lo = args.vmin if args.vmin is not None else finite.min()
    hi = args.vmax if args.vmax is not None else finite.max()
    if q != "loss":  # --vmin/--vmax are loss values
        lo, hi = (finite.min(), finite.max())
    if hi <= lo:
        hi = lo + max(1e-12, 1e-6 * abs(lo))
    geometric = q in GEOMETRIC and lo > 0 and ((args.log and q == "loss") or (not args.linear and geometric_span(lo, hi)))
    return Levels(round_levels(float(lo), float(hi), args.levels, geometric), geometric)


def _geometric(q: str, lev) -> bool:
    return bool(getattr(lev, "geometric", False))


def _number(v: float) -> str:
    """A level or tick as a reader writes it: 0.1, 2.5, 300, 2e+04."""
    if v == 0:
        return "0"
    text = f"{v:g}" if 1e-3 <= abs(v) < 1e5 else f"{v:.0e}"
    return text.replace("-", MINUS)  # one minus sign, matplotlib's own on the ticks beside it


MINUS = "\u2212"
FORMAT = matplotlib.ticker.FuncFormatter(lambda v, _: _number(v))
SMALL = 8  # a grid with fewer points than this along an axis is drawn as cells (a heat map): its contours are boxes


def _ticks(lev) -> dict:
    """Colour-bar ticks at the round levels worth a label, as plain numbers."""
    return dict(ticks=labelled(np.asarray(lev), _geometric("", lev)), format=FORMAT)


def _masked(z, lev):
    z = np.ma.masked_invalid(z)
    if lev is not None:  # values beyond vmax/vmin are gaps, not saturated colour
        z = np.ma.masked_where((z < lev[0]) | (z > lev[-1]), z)
    return z


def _label(q: str) -> str:
    return LABELS.get(q, q)


def figure_2d(s: Drawable, split: str, q: str, kind: str, args) -> "matplotlib.figure.Figure":
    """One 2D figure: kind is contour, contourf, heat or 3d. None when nothing is finite.
    Levels at round values, labels and colour-bar ticks at the majors among them; accuracy in
    percent, filled (its lines alone, at chance level, are noise); theta* marked in every kind."""
    z = shown(s.values[(split, q)], q)
    lev = _levels(z, args, q)
    if lev is None:
        return None
    X, Y = np.meshgrid(s.x, s.y)  # (ny, nx), the file's own layout
    zm = _masked(z, lev)
    geometric = _geometric(q, lev)
    norm = matplotlib.colors.LogNorm(lev[0], lev[-1]) if geometric else None
    cmap = "cividis" if q == "acc" else "viridis"
    label = _label(q) + (" (%)" if q in SCALE else "")
    fig = plt.figure(figsize=(5.5, 4.5))
    centre = (int(np.argmin(np.abs(s.y))), int(np.argmin(np.abs(s.x))))
    if kind == "3d":
        ax = fig.add_subplot(projection="3d")
        # clipped to the levels, not cut: values beyond them lie flat on the range's edge, so
        # the surface has no jagged holes; with a log scale the height is log10 of the loss
        zz = np.where(np.isfinite(z), np.clip(z, lev[0], lev[-1]), np.nan)
        if geometric:
            zz = np.log10(zz)
        surf = ax.plot_surface(X, Y, zz, cmap=cmap, linewidth=0, antialiased=True,
                               vmin=np.nanmin(zz) if np.isfinite(zz).any() else None)
        ax.scatter([s.x[centre[1]]], [s.y[centre[0]]], [zz[centre]], color="r", s=25, depthshade=False,
                   label="θ*")
        cb = fig.colorbar(surf, ax=ax, shrink=0.6, pad=0.2, label=("log10 " if geometric else "") + label)
        cb.formatter = FORMAT
        ax.zaxis.set_major_locator(matplotlib.ticker.MaxNLocator(5))
        ax.zaxis.set_major_formatter(FORMAT)
        ax.set_zlabel(("log10 " if geometric else "") + label, labelpad=10)
        ax.tick_params(axis="z", pad=4)
    else:
        ax = fig.add_subplot()
        major = labelled(np.asarray(lev), geometric)
        if kind in ("contour", "contourf") and min(len(s.x), len(s.y)) < SMALL:
            kind = "heat"  # a few cells: linear interpolation between them would draw boxes, not contours
        if kind == "contour" and q != "acc":
            cs = ax.contour(X, Y, zm, levels=lev, cmap=cmap, norm=norm, linewidths=0.8)
            # labels on the round majors only: near theta* the levels crowd and labels pile up
            ax.clabel(cs, [v for v in cs.levels if np.isclose(major, v, rtol=1e-9).any()], inline=True, fontsize=7,
                      fmt=_number, rightside_up=True)
            fig.colorbar(cs, ax=ax, label=label, **_ticks(lev))
        elif kind in ("contour", "contourf"):
            cs = ax.contourf(X, Y, zm, levels=lev, cmap=cmap, norm=norm)
            fig.colorbar(cs, ax=ax, label=label, **_ticks(lev))
            if kind == "contour":  # accuracy: filled, with dark lines and labels at the round majors
                lines = ax.contour(X, Y, zm, levels=major, colors="k", linewidths=0.6)
                ax.clabel(lines, inline=True, fontsize=7, fmt=_number, rightside_up=True)
        elif kind == "heat":  # each cell a box centred on its coordinates
            im = ax.pcolormesh(s.x, s.y, zm, shading="nearest", cmap=cmap, norm=norm,
                               vmin=None if norm else lev[0], vmax=None if norm else lev[-1])
            fig.colorbar(im, ax=ax, label=label, **_ticks(lev))
        else:
            plt.close(fig)
            raise ValueError(f"kind {kind!r}: allowed contour, contourf, heat, 3d")
        ax.plot([0], [0], "r+", ms=9, mew=1.5, label="θ*")
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(6))  # no colliding tick labels
        ax.yaxis.set_major_locator(matplotlib.ticker.MaxNLocator(6))
    ax.set_xlabel("alpha (direction x)")
    ax.set_ylabel("beta (direction y)")
    t = s.trajectory
    if t is not None and kind in ("contour", "contourf", "heat"):  # pca: the path training took
        ax.plot(t[:, 0], t[:, 1], "-o", color="tab:red", ms=3, lw=1, label="training trajectory")
        ax.plot([t[0, 0]], [t[0, 1]], "s", color="tab:red", ms=5)
    cp = s.curve_path
    if cp is not None and kind in ("contour", "contourf", "heat"):  # the curve whose bend is the third point
        ax.plot(cp[:, 0], cp[:, 1], "-", color="tab:red", lw=1.5, zorder=4, label=f"{s.curve} curve")
        ax.plot([0, 1], [0, 0], "--", color="tab:red", lw=0.8, zorder=4, label="straight line")
    pts = s.points
    if pts is not None and kind in ("contour", "contourf", "heat"):  # kind plane: the three models
        c = pts.coords
        ax.plot(c[:, 0], c[:, 1], "o", color="tab:red", mec="white", ms=7, zorder=5, label="the three models")
        for (px, py), name in zip(c, pts.labels):
            ax.annotate(name, (px, py), textcoords="offset points", xytext=(7, 7), fontsize=7, color="tab:red",
                        bbox={"boxstyle": "round,pad=0.15", "fc": "white", "ec": "none", "alpha": 0.7})
    title = f"{s.name}: {split} {label}"
    if s.interpolated is not None:  # an adaptive grid: say how much is computed
        title += f"\nadaptive: {100 * s.done.mean():.0f}% of cells computed, the rest interpolated"
        if kind in ("contour", "contourf", "heat"):
            iy, ix = np.nonzero(s.done)
            ax.plot(s.x[ix], s.y[iy], ",", color="k", alpha=0.25)  # where the surface was computed
    ax.set_title(title, fontsize=10)
    return fig


def plot_2d(s: Drawable, args, outdir: str, stem: str) -> list:
    written = []
    for (split, q) in s.values:
        for kind in ("heat",) if q in ERRORS else ("contour", "contourf", "heat", "3d"):
            fig = figure_2d(s, split, q, kind, args)
            if fig is None:
                break
            path = os.path.join(outdir, f"{stem}_{split}_{q}_{kind}.{args.format}")
            written.append(_save(fig, path, args))
    if s.plane_values is not None:  # directions.repeats: each plane beside the mean, one colour scale
        for (split, q) in s.plane_values:
            fig = figure_planes(s, split, q, args) if q not in ERRORS else None
            if fig is not None:
                written.append(_save(fig, os.path.join(outdir, f"{stem}_{split}_{q}_planes.{args.format}"), args))
    for split in s.splits:
        for what, make in (("curvature", figure_curvature), ("trajectory", figure_trajectory)):
            fig = make(s, split, args)
            if fig is not None:
                written.append(_save(fig, os.path.join(outdir, f"{stem}_{split}_{what}.{args.format}"), args))
    return written


def figure_planes(s: Drawable, split: str, q: str, args):
    """Small multiples: each plane of a directions.repeats file (its seed in the title) and
    their mean, filled contours on one colour scale, theta* marked. None when nothing is finite."""
    planes = [shown(z, q) for z in s.plane_values[(split, q)]]
    mean = shown(s.values[(split, q)], q)
    lev = _levels(np.concatenate([z.ravel() for z in planes]), args, q)
    if lev is None:
        return None
    panels = [(f"plane {k} (seed {seed})", z) for k, (seed, z) in enumerate(zip(s.plane_seeds, planes))]
    panels.append((f"mean of the {len(planes)} planes", mean))
    cols = min(len(panels), 4)
    rows = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 3.3 * rows), sharex=True, sharey=True, squeeze=False,
                             layout="constrained")
    geometric = _geometric(q, lev)
    norm = (matplotlib.colors.LogNorm if geometric else matplotlib.colors.Normalize)(lev[0], lev[-1])
    X, Y = np.meshgrid(s.x, s.y)
    cs = None
    for ax, (title, z) in zip(axes.flat, panels):
        cs = ax.contourf(X, Y, _masked(z, lev), levels=lev, cmap="cividis" if q == "acc" else "viridis", norm=norm)
        ax.plot([0], [0], "r+", ms=8, mew=1.5)
        ax.set_title(title, fontsize=9)
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(5))
        ax.yaxis.set_major_locator(matplotlib.ticker.MaxNLocator(5))
    for k, ax in enumerate(axes.flat[:len(panels)]):
        if k % cols == 0:
            ax.set_ylabel("beta (direction y)")
        if k >= len(panels) - cols:
            ax.set_xlabel("alpha (direction x)")
    for ax in axes.flat[len(panels):]:
        ax.set_visible(False)
    fig.colorbar(cs, ax=axes.ravel().tolist(), label=f"{split} {_label(q)}" + (" (%)" if q in SCALE else ""),
                 **_ticks(lev))
    fig.suptitle(f"{s.name}: {split} {_label(q)}, {len(planes)} independent planes (directions.repeats)",
                 fontsize=10)
    return fig


def _save(fig, path: str, args, close: bool = True) -> str:
    """Write a figure; a folder that is read-only or full is one line, not a traceback."""
    try:
        fig.savefig(path, dpi=args.dpi, bbox_inches="tight")
    except OSError as e:
        plt.close(fig)
        raise UserError(f"cannot write {path}: {e.strerror or e}")
    if close:
        plt.close(fig)
    return path


def _loss_contours(ax, s: Drawable, split: str, args, colors="w") -> None:
    """Thin loss contours over another quantity's map: where the basin is."""
    z = s.values.get((split, "loss"))
    lev = _levels(z, args, "loss") if z is not None else None
    if lev is not None:
        X, Y = np.meshgrid(s.x, s.y)
        ax.contour(X, Y, _masked(z, lev), levels=labelled(np.asarray(lev), _geometric("loss", lev)), colors=colors,
                   linewidths=0.5, alpha=0.8)


def curvature_panels(fig, axes, maps: list, args, colorbars: bool = True):
    """Draw per-cell curvature maps. `maps` is [(s, split, q)] one per axis: lambda_max on log
    levels when it spans decades, lambda_min on a diverging scale centred at 0 (negative:
    directions of descent), |lambda_min/lambda_max| from 0 (convex) up; loss contours over them."""
    images = []
    for ax, (s, split, q, lev) in zip(axes, maps):
        z = s.values[(split, q)]
        X, Y = np.meshgrid(s.x, s.y)
        if q == "lambda_min":
            # white at 0, blue below, red above, symmetric-log: lambda_min spans decades too
            lim = max(abs(lev[0]), abs(lev[-1]), 1e-12)
            norm = matplotlib.colors.SymLogNorm(1e-2 * lim, vmin=-lim, vmax=lim)
            im = ax.pcolormesh(X, Y, np.ma.masked_invalid(z), cmap="RdBu_r", norm=norm, shading="nearest")
        else:
            norm = matplotlib.colors.LogNorm(lev[0], lev[-1]) if _geometric(q, lev) else \
                matplotlib.colors.Normalize(lev[0], lev[-1])
            im = ax.pcolormesh(X, Y, np.ma.masked_invalid(z), cmap="magma" if q == "eig_ratio" else "viridis",
                               norm=norm, shading="nearest")
        _loss_contours(ax, s, split, args)
        ax.plot([0], [0], "c+", ms=8)
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(5))
        ax.yaxis.set_major_locator(matplotlib.ticker.MaxNLocator(5))
        if colorbars:  # unlabelled: the panel's title names the quantity
            _colorbar(fig, im, ax=ax)
        images.append(im)
    return images


def _colorbar(fig, im, **kw):
    """A colour bar with plain-number ticks; on a symmetric-log scale only 0 and the powers of
    ten clear of the linear band around it (else "-10", "0" and "10" print on top of each other)."""
    cb = fig.colorbar(im, format=FORMAT, **kw)
    norm = im.norm
    if isinstance(norm, (matplotlib.colors.LogNorm, matplotlib.colors.Normalize)) and \
            not isinstance(norm, matplotlib.colors.SymLogNorm) and norm.vmax > norm.vmin:
        log = isinstance(norm, matplotlib.colors.LogNorm)
        # a horizontal bar under one panel has room for about five numbers side by side
        most = 8 if cb.orientation == "vertical" else 5
        cb.set_ticks(labelled(round_levels(norm.vmin, norm.vmax, 30, log), log, most=most))
        cb.ax.set_ylim(norm.vmin, norm.vmax) if cb.orientation == "vertical" else cb.ax.set_xlim(norm.vmin, norm.vmax)
    if isinstance(norm, matplotlib.colors.SymLogNorm):
        lim, band = norm.vmax, norm.linthresh
        powers = [10.0 ** k for k in range(int(np.floor(np.log10(2 * band))), int(np.ceil(np.log10(lim))) + 1)
                  if 2 * band <= 10.0 ** k <= lim]
        cb.set_ticks(sorted([-p for p in powers] + [0.0] + powers))
    return cb


def figure_curvature(s: Drawable, split: str, args):
    """The reference code's convexity map and its parts: lambda_max, lambda_min and their
    ratio per cell (eval.curvature), side by side, with the loss contours. None without them."""
    qs = [q for q in ("lambda_max", "lambda_min", "eig_ratio") if (split, q) in s.values]
    levs = [_levels(s.values[(split, q)], args, q) for q in qs]
    if not qs or any(lev is None for lev in levs):
        return None
    fig, axes = plt.subplots(1, len(qs), figsize=(4.6 * len(qs), 3.9), squeeze=False, layout="constrained")
    curvature_panels(fig, axes[0], [(s, split, q, lev) for q, lev in zip(qs, levs)], args)
    for ax, q in zip(axes[0], qs):
        ax.set_title(_label(q), fontsize=9)
        ax.set_xlabel("alpha (direction x)")
    axes[0][0].set_ylabel("beta (direction y)")
    fig.suptitle(f"{s.name}: {split} Hessian per cell (white: loss contours)", fontsize=10)
    return fig


def figure_trajectory(s: Drawable, split: str, args):
    """directions.kind pca: the loss on the plane of the trajectory's top two principal
    directions, the checkpoints' path on it numbered by epoch or step, the variance each axis explains."""
    t = s.trajectory
    z = s.values.get((split, "loss"))
    if t is None or z is None:
        return None
    lev = _levels(z, args, "loss")
    if lev is None:
        return None
    fig, ax = plt.subplots(figsize=(5.8, 4.6))
    X, Y = np.meshgrid(s.x, s.y)
    norm = matplotlib.colors.LogNorm(lev[0], lev[-1]) if _geometric("loss", lev) else None
    cs = ax.contour(X, Y, _masked(z, lev), levels=lev, cmap="viridis", norm=norm, linewidths=0.8)
    major = labelled(np.asarray(lev), _geometric("loss", lev), most=6)
    ax.clabel(cs, [v for v in cs.levels if np.isclose(major, v, rtol=1e-9).any()], inline=True, fontsize=6, fmt=_number,
              rightside_up=True)
    ax.plot(t[:, 0], t[:, 1], "-o", color="tab:red", ms=3.5, lw=1.2, label="training trajectory")
    fit = s.trajectory_fit
    labels, unit = checkpoint_numbers((fit or {}).get("checkpoints") or [], len(t))
    step = max(1, len(t) // 8)  # at most about eight numbers on the path
    for i in list(range(0, len(t), step)) + ([len(t) - 1] if (len(t) - 1) % step else []):
        ax.annotate(labels[i], t[i], textcoords="offset points", xytext=(4, 4), fontsize=7, color="tab:red")
    if fit is not None:  # checkpoints the plane holds under half of: their dot is a projection only
        well = fit.get("threshold", 0.5)
        bad = np.asarray(fit["captured"]) < well
        if bad.any():
            ax.plot(t[bad, 0], t[bad, 1], "o", mfc="white", mec="tab:red", ms=6, mew=1.2,
                    label=f"under {100 * well:.0f}% of its displacement in the plane")
    ax.plot([0], [0], "k*", ms=9, label="θ* (final weights)")
    ev = s.explained_variance_ratio
    ev = json.loads(ev) if isinstance(ev, str) else ev
    names = [f"{n} ({100 * float(v):.1f}% of the variance)" for n, v in zip(("PC1", "PC2"), ev)] if ev is not None \
        else ["PC1", "PC2"]
    ax.set_xlabel(names[0])
    ax.set_ylabel(names[1])
    ax.set_aspect("equal", adjustable="datalim")
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2, frameon=False)
    ax.set_title(f"{s.name}: {split} loss and the training trajectory (numbers: {unit})", fontsize=9)
    return fig


def checkpoint_numbers(names: list, m: int) -> tuple:
    """(a label per checkpoint, what the labels count): the epoch or step each file's name says
    (lldist.train's <stem>_epoch<N>.pt, a Recorder's <stem>_step<N>.pt), else their order."""
    import re
    for unit in ("epoch", "step"):
        found = [re.search(rf"_{unit}(\d+)\.pt$", str(n)) for n in names]
        if len(found) == m and m and all(found):
            return [f.group(1) for f in found], f"{unit}s"
    return [str(i + 1) for i in range(m)], "checkpoints in training order"


def figure_density(c: dict, name: str, split: str):
    """The Hessian's eigenvalue density at theta* (stochastic Lanczos quadrature), log scale,
    with the top eigenvalues marked. None without a density."""
    if "density_nodes" not in c:
        return None
    from .spectrum import smoothed_density
    grid, d = smoothed_density(c["density_nodes"], c["density_weights"])
    fig, ax = plt.subplots(figsize=(5.8, 3.6))
    ax.semilogy(grid, np.maximum(d, 1e-12), lw=1.2)
    for i, v in enumerate(c.get("top_eigenvalues", [])):
        ax.axvline(v, color="tab:red", lw=0.6, ls=":", label="top eigenvalues (eigsh)" if i == 0 else None)
    ax.set_ylim(max(1e-8, d.max() * 1e-8), d.max() * 3)
    op = OPERATOR_LABEL.get(c.get("operator", "hessian"), "Hessian")
    ax.set_xlabel(f"{op} eigenvalue")
    ax.set_ylabel("density")
    ax.legend(fontsize=7)
    runs, steps = c["density_nodes"].shape
    ax.set_title(f"{name}: {split} {op} spectrum at θ* ({runs} runs x {steps} Lanczos steps, "
                 f"{c.get('batches')} batches)", fontsize=9)
    return fig


OPERATOR_LABEL = {"hessian": "Hessian", "ggn": "Gauss-Newton", "fisher": "empirical Fisher"}


def figure_eigenvalues(c: dict, name: str, split: str):
    """The top eigenvalues at theta* by rank (and the smallest, where computed), on a log
    scale when all are positive: the figure of a curvature without a density or blocks."""
    top = np.asarray(c.get("top_eigenvalues", []), dtype=float)
    if not len(top):
        return None
    op = OPERATOR_LABEL.get(c.get("operator", "hessian"), "Hessian")
    fig, ax = plt.subplots(figsize=(4.8, 3.2))
    k = np.arange(1, len(top) + 1)
    ax.plot(k, top, "o-", lw=1, ms=4, label="largest (Lanczos)")
    se = c.get("lambda_max_se")
    if se is not None and np.isfinite(se):
        ax.errorbar([1], [top[0]], yerr=[se], color="tab:blue", capsize=3, lw=0.8)
    lo = c.get("lambda_min")
    if lo is not None and np.isfinite(lo):
        ax.axhline(lo, color="tab:red", lw=0.8, ls="--", label=f"smallest {_number(lo)}")
    if (top > 0).all() and (lo is None or not np.isfinite(lo) or lo > 0):
        ax.set_yscale("log")
    ax.set_xticks(k)
    ax.set_xlabel("rank")
    ax.set_ylabel(f"{op} eigenvalue")
    ax.legend(fontsize=7)
    ax.set_title(f"{name}: {split} {op} at θ* ({c.get('batches')} batches)", fontsize=9)
    fig.tight_layout()
    return fig


def figure_blocks(c: dict, name: str, split: str):
    """Per-block curvature at θ* (curvature.blocks): the top eigenvalue and the trace of each
    block's sub-matrix, as horizontal bars on log scales (blocks differ by orders of magnitude),
    the trace with its Hutchinson standard error. None without blocks."""
    rows = c.get("blocks")
    if not rows:
        return None
    op = OPERATOR_LABEL.get(c.get("operator", "hessian"), "Hessian")
    labels = [r["block"] for r in rows]
    y = np.arange(len(rows))[::-1]
    panels = [("lambda_max", "top eigenvalue"), ("trace", "trace")]
    if not any(np.isfinite(r["lambda_max"]) for r in rows):  # lldist.hessian --no-block-top: traces only
        panels = panels[1:]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.0 * len(panels), 1.2 + 0.28 * len(rows)), sharey=True,
                             squeeze=False)
    axes = axes[0]
    for ax, (key, title) in zip(axes, panels):
        vals = np.array([r[key] for r in rows], dtype=float)
        err = np.array([r.get("trace_stderr", 0.0) for r in rows], dtype=float) if key == "trace" else None
        pos = np.isfinite(vals) & (vals > 0)
        ax.barh(y[pos], vals[pos], xerr=None if err is None else err[pos], color="tab:blue", alpha=0.8,
                error_kw={"lw": 0.8, "capsize": 2})
        if (~pos).any():  # a negative, zero or missing value has no bar on a log scale: say it
            for yi, v in zip(y[~pos], vals[~pos]):
                ax.text(0.02, yi, f"{v:.3g}", transform=ax.get_yaxis_transform(), va="center", fontsize=7)
        if pos.any():  # bars from a decade below the smallest: their lengths compare on the log scale
            ax.set_xscale("log")
            hi = float((vals[pos] + (err[pos] if err is not None else 0)).max())
            ax.set_xlim(float(vals[pos].min()) / 10, hi * 1.5)
            ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())  # decades only: readable
        ax.set_title(title, fontsize=9)
        ax.tick_params(labelsize=7)
    axes[0].set_yticks(y)
    axes[0].set_yticklabels(labels)
    fig.suptitle(f"{name}: {split} {op} per block at θ* ({c.get('batches')} batches)", fontsize=9)
    fig.tight_layout()
    return fig


def for_caller(fig, dpi: Optional[int]):
    """A figure for the caller: at `dpi`, and, in a notebook (the inline backend), closed, so
    that the cell shows it once, as the value it returns, not a second time as an open figure."""
    if fig is None:
        return None
    if dpi is not None:
        if isinstance(dpi, bool) or not isinstance(dpi, (int, float)) or dpi <= 0:
            raise ValueError(f"dpi must be a positive number, got {dpi!r}")
        fig.set_dpi(dpi)
    if "inline" in matplotlib.get_backend():
        plt.close(fig)
    return fig


def figure(s: Drawable, split: str, q: str = "loss", kind: str = "contour", **kw):
    """A figure of one quantity of a surface read by read_surface (lldist.Landscape.plot):
    a 2D kind, or the 1D curve of all quantities."""
    args = PlotOptions(**kw)
    if (split, q) not in s.values:
        raise ValueError(f"no {split}/{q} in this surface (has {', '.join('/'.join(k) for k in s.values)})")
    if s.y is None:
        return figure_1d(s, args)
    return figure_2d(s, split, q, kind, args)


def paths_figure(t: np.ndarray, losses: dict, ylabel: str):
    """Losses along paths between two models (a curve and the straight line), t from 0 to 1."""
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for name, z in losses.items():
        ax.plot(t, np.ma.masked_invalid(z), "-o", ms=3, label=name)
    ax.set_xlabel("t (0: a, 1: b)")
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=8)
    ax.set_title(f"{ylabel} along the paths between two minima", fontsize=10)
    fig.tight_layout()
    return fig


def job_labels(paths: list) -> list:
    """A short title per file from what differs between their jobs, e.g. "cnn_skip, batch 64"."""
    from ..config import dotted, effective_raw
    flat = []
    for p in paths:
        with SurfaceReader(p) as sf:
            try:
                raw = effective_raw(sf.job_yaml(), p)  # the file's text and its --set overrides
            except (UserError, ValueError):  # an unreadable job text only costs the panel its title
                raw = {}
        flat.append(dotted(raw))
    ignore = {"name", "output", "model.checkpoint", "directions.target"}
    keys = sorted({k for f in flat for k in f} - ignore)
    differ = [k for k in keys if len({repr(f.get(k)) for f in flat}) > 1]
    if "model.name" in differ:  # the model's arguments follow the model: its name says enough
        differ = [k for k in differ if not k.startswith("model.args.")]
    first = ["model.name", "train.batch_size", "train.lr", "train.optimizer", "data.name"]
    # what makes the model first (name, training, data), then the rest (grid, evaluation)
    differ.sort(key=lambda k: (first.index(k) if k in first else len(first),
                               not k.startswith(("model.", "train.", "data.")), k))
    pretty = {"model.name": "{}", "train.batch_size": "batch {}", "train.lr": "lr {}", "train.optimizer": "{}",
              "data.name": "{}", "model.args.batchnorm": "batchnorm {}"}
    if "directions.kind" in differ:  # paths between minima (lldist.connect): the path says it all
        def what(f):
            kind = f.get("directions.kind") or "random"
            return {"target": "straight line", "curve": f"{f.get('directions.curve') or 'bezier'} curve",
                    "pca": "PCA plane", "hessian": "Hessian eigenvectors"}.get(kind, kind)
        def aligned(f):  # b's end is lldist.connect's permuted copy of b (connect.align)
            end = f.get("directions.target") or (f.get("directions.points") or [None, ""])[1]
            return " (aligned)" if os.path.basename(str(end)) == "b_aligned.pt" else ""
        return [what(f) + aligned(f) for f in flat]
    labels = []
    for f, p in zip(flat, paths):
        parts = [pretty.get(k, k.split(".")[-1] + " {}").format(f.get(k)) for k in differ[:4]]
        labels.append(", ".join(parts) if parts else os.path.basename(os.path.dirname(os.path.abspath(p))) or p)
    return labels


def compare(paths: list, args, outdir: str) -> list:
    """Side by side with ONE colour scale, the same levels and the same axes (2D), or overlaid
    curves (1D). Returns [(path, figure)] before closing, for tests to inspect."""
    surfaces = [read_surface(p) for p in paths]
    labels = job_labels(paths)
    dims = {s.y is None for s in surfaces}
    if len(dims) > 1:
        raise UserError("--compare needs surfaces of one kind: all 1D or all 2D")
    splits = [sp for sp in surfaces[0].splits if all(sp in s.splits for s in surfaces)]
    if not splits:
        raise UserError("--compare: the files share no split (train/test)")
    written = []
    for split in splits:
        for q in [q for q in surfaces[0].quantities if q not in ERRORS and all(q in t.quantities for t in surfaces)]:
            zs = [shown(s.values[(split, q)], q) for s in surfaces]
            lev = _levels(np.concatenate([z.ravel() for z in zs]), args, q)
            if lev is None:
                continue
            name = os.path.join(outdir, f"compare_{split}_{q}.{args.format}")
            if surfaces[0].y is None:
                fig, ax = plt.subplots(figsize=(6.5, 4.2))
                for s, z, lab in zip(surfaces, zs, labels):
                    ax.plot(s.x, np.ma.masked_invalid(z), label=lab, marker="o" if len(s.x) == 1 else None)
                ax.set_xlabel("t (0: a, 1: b)" if all(s.is_path for s in surfaces) else surfaces[0].xlabel)
                ax.set_ylabel(f"{split} {_label(q)}" + (" (%)" if q in SCALE else ""))
                ax.axvline(0, color="0.5", lw=0.8, ls=":", label="θ*")
                if _geometric(q, lev):
                    ax.set_yscale("log")
                ax.legend(fontsize=8)
                ax.set_title(f"{split} {_label(q)} of {len(surfaces)} surfaces", fontsize=10)
            else:
                n = len(surfaces)
                cols = min(n, 3)
                rows = (n + cols - 1) // cols
                fig, axes = plt.subplots(rows, cols, figsize=(4.4 * cols, 4.0 * rows), sharex=True, sharey=True,
                                         squeeze=False)
                geometric = _geometric(q, lev)
                norm = (matplotlib.colors.LogNorm if geometric else matplotlib.colors.Normalize)(lev[0], lev[-1])
                major = labelled(np.asarray(lev), geometric)
                cs = None
                for k, (ax, s, z, lab) in enumerate(zip(axes.flat, surfaces, zs, labels)):
                    X, Y = np.meshgrid(s.x, s.y)
                    cs = ax.contourf(X, Y, _masked(z, lev), levels=lev, cmap="cividis" if q == "acc" else "viridis",
                                     norm=norm)
                    ax.contour(X, Y, _masked(z, lev), levels=major, colors="k", linewidths=0.4)
                    ax.plot([0], [0], "r+", ms=8, mew=1.5)
                    ax.set_title(lab, fontsize=10)
                    if k % cols == 0:
                        ax.set_ylabel("beta (direction y)")
                    if k >= n - cols:
                        ax.set_xlabel("alpha (direction x)")
                    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(5))
                    ax.yaxis.set_major_locator(matplotlib.ticker.MaxNLocator(5))
                for ax in axes.flat[n:]:
                    ax.set_visible(False)
                fig.colorbar(cs, ax=axes.ravel().tolist(), label=f"{split} {_label(q)}" + (" (%)" if q in SCALE else ""),
                             **_ticks(lev))
                fig.suptitle(f"{split} {_label(q)}: {n} surfaces on one colour scale, the same levels and axes",
                             fontsize=10)
            written.append((_save(fig, name, args, close=False), fig))
        if surfaces[0].y is not None:
            fig = compare_curvature(surfaces, labels, split, args)
            if fig is not None:
                name = os.path.join(outdir, f"compare_{split}_curvature.{args.format}")
                written.append((_save(fig, name, args, close=False), fig))
    return written


def compare_curvature(surfaces: list, labels: list, split: str, args):
    """The curvature maps of several surfaces: a row per surface, a column per quantity
    (lambda_max, lambda_min, |lambda_min/lambda_max|), each column on ONE colour scale."""
    qs = [q for q in ("lambda_max", "lambda_min", "eig_ratio") if all((split, q) in t.values for t in surfaces)]
    if not qs:
        return None
    levs = [_levels(np.concatenate([t.values[(split, q)].ravel() for t in surfaces]), args, q) for q in qs]
    if any(lev is None for lev in levs):
        return None
    n = len(surfaces)
    fig, axes = plt.subplots(n, len(qs), figsize=(4.0 * len(qs), 3.3 * n + 0.9), squeeze=False,
                             sharex=True, sharey=True, layout="constrained")
    for row, (t, lab) in enumerate(zip(surfaces, labels)):
        ims = curvature_panels(fig, axes[row], [(t, split, q, lev) for q, lev in zip(qs, levs)], args,
                               colorbars=False)
        axes[row][0].set_ylabel(f"{lab}\nbeta", fontsize=8)
    for col, (q, im) in enumerate(zip(qs, ims)):
        axes[0][col].set_title(_label(q), fontsize=9)
        axes[-1][col].set_xlabel("alpha")
        _colorbar(fig, im, ax=axes[:, col].tolist(), orientation="horizontal", shrink=0.9)
    fig.suptitle(f"{split}: Hessian per cell, one colour scale per column (white: loss contours)", fontsize=10)
    return fig


def figure_1d(s: Drawable, args):
    """Loss on the left axis, the second quantity (accuracy in %, or e.g. a custom metric) on
    the right; train solid, test dashed. Shaded: the 95% intervals over examples, the loss's
    from its stored standard error, the accuracy's Wilson interval."""
    from .uncertainty import interval, wilson
    fig, ax = plt.subplots(figsize=(6, 4))
    others = [q for q in s.quantities if q != "loss" and q not in ERRORS]
    right = "acc" if "acc" in others else (others[0] if others else None)
    ax2 = ax.twinx() if right else None
    styles = {"train": "-", "test": "--"}
    for split in s.splits:
        marker = "o" if len(s.x) == 1 else ""  # a single cell is a point, not a line
        loss = np.ma.masked_invalid(s.values[(split, "loss")])
        ax.plot(s.x, loss, "b" + marker + styles[split], label=f"{split} loss" + (
            f" (mean of {s.planes} planes)" if s.plane_values is not None else ""))
        if s.plane_values is not None:  # directions.repeats: each plane thin, the planes' range shaded
            each = s.plane_values[(split, "loss")]
            for z in each:
                ax.plot(s.x, np.ma.masked_invalid(z), color="b", lw=0.5, alpha=0.5, ls=styles[split])
            ax.fill_between(s.x, each.min(axis=0), each.max(axis=0), color="b", alpha=0.12, lw=0)
        elif (split, "loss_se") in s.values:
            lo, hi = interval(s.values[(split, "loss")], s.values[(split, "loss_se")], LEVEL)
            ax.fill_between(s.x, lo, hi, color="b", alpha=0.15, lw=0)
        if right:
            v = np.ma.masked_invalid(s.values[(split, right)])
            ax2.plot(s.x, 100 * v if right == "acc" else v, "r" + marker + styles[split],
                     label=f"{split} {_label(right)}")
            n = s.eval_samples.get(split)
            if right == "acc" and n and s.plane_values is None:
                lo, hi = wilson(s.values[(split, "acc")], n, LEVEL)
                ax2.fill_between(s.x, 100 * lo, 100 * hi, color="r", alpha=0.12, lw=0)
    ax.axvline(0, color="0.5", lw=0.8, ls=":", label="θ*")
    ax.set_xlabel(s.xlabel)
    ax.set_ylabel("loss", color="b")
    if right:
        ax2.set_ylabel("accuracy (%)" if right == "acc" else _label(right), color="r")
    if args.log:
        ax.set_yscale("log")
    if args.vmin is not None or args.vmax is not None:
        ax.set_ylim(args.vmin, args.vmax)
    lines = ax.get_lines() + (ax2.get_lines() if right else [])
    # the legend below the axes: inside, it sat on the curves; above, on the title
    ax.legend(lines, [ln.get_label() for ln in lines], fontsize=8, loc="upper center",
              bbox_to_anchor=(0.5, -0.14), ncol=min(3, len(lines)), frameon=False)
    ax.set_title(s.name + (f" ({s.planes} planes: thin lines, their range shaded)" if s.plane_values is not None else
                              f" (bands: {100 * LEVEL:.0f}% intervals over examples)"
                              if any(q in ERRORS for q in s.quantities) else ""), fontsize=10)
    return fig


def plot_1d(s: Drawable, args, outdir: str, stem: str) -> list:
    fig = figure_1d(s, args)
    path = os.path.join(outdir, f"{stem}_curve.{args.format}")
    return [_save(fig, path, args)]


def write_all(s: Drawable, args: PlotOptions, outdir: str, stem: str) -> list:
    """Every figure of one surface (2D or 1D), and the spectral density where stored: paths."""
    written = plot_2d(s, args, outdir, stem) if s.y is not None else plot_1d(s, args, outdir, stem)
    for key, c in s.curvature_by_key.items():
        for what, make in (("density", figure_density), ("blocks", figure_blocks)):
            fig = make(c, s.name, key.split("_")[0])
            if fig is not None:
                written.append(_save(fig, os.path.join(outdir, f"{stem}_{key}_{what}.{args.format}"), args))
    return written
