"""Landscape metrics: the literature's words ("wide basin", "more convex", "less chaotic") as
numbers. Pure numpy; definitions in docs/METRICS.md. `python -m lldist.metrics` prints them.

    m, convex = of_file("out.h5", "test")        # every metric of a complete surface, the convexity map
    m = from_file("out.h5", store=True)          # ... and kept in the file under /metrics/<split>
    m, convex = compute(loss, acc, x, y)         # from arrays on a grid (cells/grid.py's axes: (ny, nx))
"""

from __future__ import annotations

from typing import Optional

import numpy as np

from ..errors import UserError

RADII = (0.1, 0.25, 0.5, 1.0)
EPSILONS = (0.1, 0.5, 1.0)
# |lambda_min/lambda_max| below this counts as locally convex: the blue of Li et al.'s maps
CONVEX_RATIO = 0.1


def _centre_index(x: np.ndarray, y: Optional[np.ndarray]):
    ix = int(np.argmin(np.abs(x)))
    return (ix,) if y is None else (int(np.argmin(np.abs(y))), ix)


def _quadratic_curvature(t: np.ndarray, f: np.ndarray, i0: int, half: int = 2) -> float:
    """Second derivative at t[i0] of the least-squares parabola through the 2*half+1 points
    around it (fewer at an edge): exact for a quadratic."""
    lo, hi = max(0, i0 - half), min(len(t), i0 + half + 1)
    tt, ff = t[lo:hi], f[lo:hi]
    ok = np.isfinite(ff)
    if ok.sum() < 3:
        return float("nan")
    a = np.polyfit(tt[ok] - t[i0], ff[ok], 2)[0]
    return float(2 * a)


def convexity_map(z: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """(ny, nx) bool: the central-difference Hessian of z is positive definite (interior
    cells; the border is False). Non-uniform spacing is handled per axis."""
    hx, hy = np.diff(x), np.diff(y)
    out = np.zeros(z.shape, dtype=bool)
    c = z[1:-1, 1:-1]
    # second derivatives on a possibly non-uniform grid
    hxl, hxr = hx[:-1][None, :], hx[1:][None, :]
    hyl, hyr = hy[:-1][:, None], hy[1:][:, None]
    zxx = 2 * (z[1:-1, 2:] * hxl - c * (hxl + hxr) + z[1:-1, :-2] * hxr) / (hxl * hxr * (hxl + hxr))
    zyy = 2 * (z[2:, 1:-1] * hyl - c * (hyl + hyr) + z[:-2, 1:-1] * hyr) / (hyl * hyr * (hyl + hyr))
    zxy = (z[2:, 2:] - z[2:, :-2] - z[:-2, 2:] + z[:-2, :-2]) / ((hxl + hxr) * (hyl + hyr))
    with np.errstate(invalid="ignore"):
        out[1:-1, 1:-1] = (zxx > 0) & (zxx * zyy - zxy ** 2 > 0)
    return out


def local_minima(z: np.ndarray) -> int:
    """Strict local minima: finite cells lower than every finite neighbour (8 in 2D, 2 in 1D),
    the border included (with its fewer neighbours)."""
    zf = np.where(np.isfinite(z), z, np.inf)
    pad = np.pad(zf, 1, constant_values=np.inf)
    is_min = np.isfinite(zf)
    if z.ndim == 1:
        return int((is_min & (zf < pad[:-2]) & (zf < pad[2:])).sum())
    ny, nx = z.shape
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            if dy == 0 and dx == 0:
                continue
            is_min &= zf < pad[1 + dy:1 + dy + ny, 1 + dx:1 + dx + nx]
    return int(is_min.sum())


def mean_abs_second_difference(z: np.ndarray) -> float:
    """Mean |z[i+1] - 2 z[i] + z[i-1]| along each axis, in loss units (grid-step free: compare
    surfaces on the same grid)."""
    parts = [np.abs(np.diff(z, 2, axis=a)) for a in range(z.ndim) if z.shape[a] >= 3]
    vals = np.concatenate([p[np.isfinite(p)].ravel() for p in parts]) if parts else np.array([])
    return float(vals.mean()) if vals.size else float("nan")


def compute(loss: np.ndarray, acc: np.ndarray, x: np.ndarray, y: Optional[np.ndarray] = None) -> tuple:
    """(scalars, maps): scalar metrics as a flat dict, and the convexity map (2D) or None."""
    c = _centre_index(x, y)
    l0 = float(loss[c])
    m = {"centre_loss": l0, "centre_acc": float(acc[c])}
    if y is None:
        r = np.abs(x)
    else:
        X, Y = np.meshgrid(x, y)  # (ny, nx)
        r = np.hypot(X, Y)
    rise = loss - l0
    for rad in RADII:
        inside = (r <= rad + 1e-12) & np.isfinite(rise)
        m[f"mean_rise_r{rad:g}"] = float(rise[inside].mean()) if inside.any() else float("nan")
    for eps in EPSILONS:
        m[f"basin_eps{eps:g}"] = float((np.isfinite(loss) & (loss <= l0 + eps)).mean())
    if y is None:
        m["curvature_x"] = _quadratic_curvature(x, loss, c[0])
        d2 = np.diff(loss, 2)
        m["convex_fraction"] = float((d2 > 0).mean()) if d2.size else float("nan")
        conv = None
    else:
        m["curvature_x"] = _quadratic_curvature(x, loss[c[0], :], c[1])
        m["curvature_y"] = _quadratic_curvature(y, loss[:, c[1]], c[0])
        conv = convexity_map(loss, x, y)
        interior = conv[1:-1, 1:-1]
        m["convex_fraction"] = float(interior.mean()) if interior.size else float("nan")
    m["local_minima"] = local_minima(loss)
    m["roughness"] = mean_abs_second_difference(loss)
    return m, conv


def barrier(alpha: np.ndarray, value: np.ndarray, se: Optional[np.ndarray] = None) -> dict:
    """The barrier of a path from α = 0 to α = 1 (an interpolation between two checkpoints):
    max over the cells with 0 <= α <= 1 of value(α) − ((1 − α) value(0) + α value(1)), where it
    lies, and, given per-cell standard errors, its standard error sqrt(se(α*)² + ((1 − α*)
    se(0))² + (α* se(1))²) (as if the three were independent; they share the examples, so this
    errs large). The end values are read at α = 0 and 1 (interpolated if the grid misses them)."""
    alpha, value = np.asarray(alpha, dtype=float), np.asarray(value, dtype=float)
    inside = (alpha >= -1e-12) & (alpha <= 1 + 1e-12) & np.isfinite(value)
    if inside.sum() < 2:
        return {"height": float("nan"), "alpha": float("nan"), "se": float("nan")}
    finite = np.isfinite(value)  # the ends from every finite cell: the grid may step over 0 or 1
    v0, v1 = (float(np.interp(t, alpha[finite], value[finite])) for t in (0.0, 1.0))
    a, v = alpha[inside], value[inside]
    rise = v - ((1 - a) * v0 + a * v1)
    i = int(np.argmax(rise))
    out = {"height": float(rise[i]), "alpha": float(a[i]), "se": float("nan")}
    if se is not None:
        e_all = np.asarray(se, dtype=float)
        e0, e1 = (float(np.interp(t, alpha[finite], e_all[finite])) for t in (0.0, 1.0))
        e = e_all[inside]
        out["se"] = float(np.sqrt(e[i] ** 2 + ((1 - a[i]) * e0) ** 2 + (a[i] * e1) ** 2))
    return out


def path_metrics(x, loss, acc, loss_se) -> dict:
    """A 1D path file's barriers (Frankle et al. 2020's linear-interpolation barrier, for the
    loss and for the error 1 − accuracy): barrier_loss (± barrier_loss_se), barrier_loss_alpha,
    barrier_error, barrier_error_alpha."""
    m = {}
    b = barrier(x, loss, loss_se)
    m.update(barrier_loss=b["height"], barrier_loss_alpha=b["alpha"])
    if np.isfinite(b["se"]):
        m["barrier_loss_se"] = b["se"]
    if acc is not None and np.isfinite(acc).any():
        e = barrier(x, 1 - np.asarray(acc, dtype=float))
        m.update(barrier_error=e["height"], barrier_error_alpha=e["alpha"])
    return m


def over_planes(computed: list) -> tuple:
    """The metrics of n planes (directions.repeats) as one row: each metric's mean over the
    planes and, as <metric>_planes_se, its standard error over them (the draw-to-draw error bar);
    `planes`: n. The centre's numbers are the same in every plane. The convexity map: the
    first plane's."""
    rows = [m for m, _ in computed]
    out = {"planes": len(rows)}
    for k in rows[0]:
        v = np.array([r[k] for r in rows], dtype=float)
        out[k] = float(v.mean())
        if k not in ("centre_loss", "centre_acc"):
            out[f"{k}_planes_se"] = float(v.std(ddof=1) / np.sqrt(len(v)))
    return out, computed[0][1]


def hessian_metrics(curvature: dict, split: str, ratio: Optional[np.ndarray], x, y) -> dict:
    """The Hessian's numbers: at theta* (lldist.hessian, this split's if measured, else the
    other's, named by `hessian_split`) and, with eval.curvature maps, the ratio at the centre
    and the fraction of cells with |lambda_min/lambda_max| < CONVEX_RATIO."""
    m = {}
    c = curvature.get(split) or next(iter(curvature.values()), None)
    if c is not None:
        m.update(hessian_lambda_max=float(c["lambda_max"]), hessian_lambda_min=float(c["lambda_min"]),
                 hessian_trace=float(c["trace"]), hessian_trace_stderr=float(c["trace_stderr"]),
                 hessian_split=next(k for k, v in curvature.items() if v is c))
        if "lambda_max_se" in c:  # the jackknife over batches (files since lldist.hessian made it)
            m["hessian_lambda_max_se"] = float(c["lambda_max_se"])
    if ratio is not None:
        ok = np.isfinite(ratio)
        m["eig_ratio_centre"] = float(ratio[_centre_index(x, y)])
        m["hessian_convex_fraction"] = float((ratio[ok] < CONVEX_RATIO).mean()) if ok.any() else float("nan")
    return m


SHARPNESS = {"worst_2": "sharp_worst_l2", "worst_inf": "sharp_worst_linf", "average_2": "sharp_average_l2",
             "sam": "sharp_sam", "pac_bayes_flatness": "pac_bayes_flatness", "pac_bayes_sigma": "pac_bayes_sigma"}


def sharpness_metrics(sharpness: dict, split: str) -> dict:
    """The sharpness measures at theta* (lldist.sharpness: this split's if measured, else the
    other's, named by `sharp_split`), with the standard errors the file keeps (_se)."""
    c = sharpness.get(split) or next(iter(sharpness.values()), None)
    if c is None:
        return {}
    m = {"sharp_split": next(k for k, v in sharpness.items() if v is c)}
    for key, name in SHARPNESS.items():
        if key in c:
            m[name] = float(c[key])
            if f"{key}_se" in c:
                m[f"{name}_se"] = float(c[f"{key}_se"])
    return m


def from_file(path: str, split: Optional[str] = None, store: bool = False) -> dict:
    """Metrics of one surface file (its first split unless `split`), plus the checkpoint's
    train/test accuracy and generalization gap recorded at training time. `store=True` also
    writes them into the file (/metrics/<split>)."""
    m, conv = of_file(path, split)
    if store:
        from ..store import write_metrics
        write_metrics(path, m["split"], m, conv)
    return m


def of_file(path: str, split: Optional[str] = None) -> tuple:
    """(metrics, convexity map or None) of a complete surface file, without writing to it."""
    from ..store import SurfaceReader
    with SurfaceReader(path) as sf:
        split = split or sf.splits[0]
        if split not in sf.splits:
            raise UserError(f"{path}: no split {split!r} (has {', '.join(sf.splits)})")
        # an adaptive grid is complete when its schedule is exhausted (the file says so), not
        # when every cell is computed: the rest is interpolated by read_all
        complete = bool(sf.attr("complete")) if sf.adaptive else bool(sf.done().all())
        if not complete:
            raise UserError(f"{path}: the surface is not complete; finish it first (re-run the job)")
        a = sf.read_all()  # complete, so no cell is masked
        meta = sf.checkpoint_meta()
    loss = a.values[(split, "loss")]
    acc = a.values.get((split, "acc"), np.full_like(loss, np.nan))  # a task without accuracy
    if a.planes > 1:  # directions.repeats: each plane's metrics, then their mean ± se
        m, conv = over_planes([compute(loss[k], acc[k], a.x, a.y) for k in range(a.planes)])
    else:
        m, conv = compute(loss, acc, a.x, a.y)
    if (split, "loss_se") in a.values:  # the centre's loss over another sample of the same size
        m["centre_loss_se"] = float(a.values[(split, "loss_se")][(0,) * (loss.ndim - (a.y is not None) - 1)
                                                                    + _centre_index(a.x, a.y)])
    m.update(hessian_metrics(a.curvature, split, a.values.get((split, "eig_ratio")), a.x, a.y))
    m.update(sharpness_metrics(a.sharpness, split))
    if a.y is None and a.is_path:  # an interpolation between two checkpoints: its barrier
        m.update(path_metrics(a.x, loss, a.values.get((split, "acc")), a.values.get((split, "loss_se"))))
    for k in ("train_acc", "test_acc", "gap", "epoch"):
        if k in meta:
            m[f"trained_{k}"] = meta[k]
    m["split"] = split
    return m, conv


# the metrics in three groups, a table each in the study's report (21 columns in one were unreadable)
GROUPS = {
    "at theta*": ["centre_loss", "centre_loss_se", "centre_acc", "trained_train_acc", "trained_test_acc",
                  "trained_gap", "hessian_lambda_max", "hessian_trace", "hessian_lambda_min"],
    "sharpness": ["sharp_worst_l2", "sharp_worst_linf", "sharp_average_l2", "sharp_average_l2_se", "sharp_sam",
                  "sharp_sam_se", "pac_bayes_sigma", "pac_bayes_flatness"],
    "the basin": [f"mean_rise_r{r:g}" for r in RADII] + [f"basin_eps{e:g}" for e in EPSILONS],
    "the path": ["barrier_loss", "barrier_loss_se", "barrier_loss_alpha", "barrier_error", "barrier_error_alpha"],
    "its shape": ["curvature_x", "curvature_y", "convex_fraction", "local_minima", "roughness", "eig_ratio_centre",
                  "hessian_convex_fraction"],
}


def tables(rows: list, names: list) -> dict:
    """{group: Markdown table}, one row per surface, the groups of GROUPS that have values."""
    out = {}
    for group, keys in GROUPS.items():
        t = table(rows, names, keys)
        if t:
            out[group] = t
    return out


def _fmt(v) -> str:
    if isinstance(v, (bool, np.bool_)):
        return str(bool(v))
    if isinstance(v, (int, np.integer)):
        return str(v)
    if isinstance(v, (float, np.floating)):
        return f"{v:.4g}"
    return "" if v is None else str(v)


def _cell(r: dict, k: str) -> str:
    """A metric as printed; over several planes the mean ± its standard error over them."""
    se = r.get(f"{k}_planes_se")
    return _fmt(r.get(k)) + (f" ± {se:.2g}" if se is not None and np.isfinite(se) else "")


def transposed(rows: list, names: list) -> str:
    """The metrics for a terminal: one line per metric, one column per surface, in GROUPS'
    groups; the surfaces named above the columns ([1], [2], ...) when there are several."""
    columns = [f"[{i + 1}]" for i in range(len(rows))] if len(rows) > 1 else ["value"]
    lines = [f"{c} {n}" for c, n in zip(columns, names)] if len(rows) > 1 else [names[0]]
    width = max(len(k) for ks in GROUPS.values() for k in ks)
    for group, keys in GROUPS.items():
        keys = [k for k in keys if any(k in r for r in rows)]
        if not keys:
            continue
        cells = [[_cell(r, k) for r in rows] for k in keys]
        wide = [max(len(columns[j]), *(len(c[j]) for c in cells)) for j in range(len(rows))]
        lines += ["", f"{group + ':':<{width}}  " + "  ".join(f"{c:>{w}}" for c, w in zip(columns, wide))]
        lines += [f"  {k:<{width - 2}}  " + "  ".join(f"{v:>{w}}" for v, w in zip(c, wide)) for k, c in zip(keys, cells)]
    return "\n".join(lines)


def table(rows: list, names: list, keys: list = None) -> str:
    """Markdown table of metrics, one row per surface (every metric, or `keys`); "" if none."""
    keys = keys or [k for ks in GROUPS.values() for k in ks]
    keys = [k for k in keys if any(k in r for r in rows)]
    if not keys:
        return ""
    head = "| surface | " + " | ".join(keys) + " |\n|---|" + "---|" * len(keys) + "\n"

    return head + "".join(f"| {n} | " + " | ".join(_cell(r, k) for k in keys) + " |\n" for n, r in zip(names, rows))

