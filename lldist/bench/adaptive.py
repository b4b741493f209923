"""Adaptive grids: the cells they compute and the picture they give against full grids, and their
wall time against a full run.

    python -m lldist.bench adaptive --full runs/adaptive/*_101.h5 runs/adaptive/*_201.h5
    python -m lldist.bench adaptive --timing runs/adaptive/cnn_bn.pt [--ranks 4] [--n 101]

--full: finished full grids (bash tools/adaptive_docs.sh makes nine). On each, the schedule is
replayed with the job defaults (grid.adaptive: {}): it decides from the values of the cells it
asks for, so a replay on a full grid computes exactly what a run would, with the same values
(tests/test_adaptive.py checks it). Its reading is compared with the full grid: the share of
cells whose contour band differs at the figures' default levels, at 30 round linear and 30
round geometric levels, and at 12 evenly spaced linear levels over the full range; the largest
loss error, and in the basin (cells whose loss is at most twice the least).

--timing: a quickstart CNN checkpoint at n x n, computed in full and adaptive on --ranks ranks
(real mpiexec runs of lldist.surface). Cells/s from each file's work log; the adaptive run's
cells/s below the full run's is the share of the workers' time lost to waiting for decisions
(the tiers' ends) and to deciding.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile

import numpy as np

from ..errors import positive_int
from .common import find_mpiexec, run_time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
KINDS = (("default", {}), ("30 linear", {"linear": True}), ("30 geometric", {"log": True}), ("12 linear", {"even": 12}))


def add_arguments(ap) -> None:
    ap.add_argument("--full", nargs="*", default=[], help="finished full-grid files to replay the schedule on")
    ap.add_argument("--timing", metavar="CHECKPOINT", help="a quickstart CNN checkpoint (tools/adaptive_docs.sh "
                    "trains runs/adaptive/cnn_bn.pt) to time a full and an adaptive run of")
    ap.add_argument("--ranks", type=positive_int, default=4)
    ap.add_argument("--n", type=positive_int, default=101, help="the timing grid's points an axis")
    ap.add_argument("--tolerance", type=float, default=None, help="grid.adaptive.tolerance (default: the job default)")


def replay(loss: np.ndarray, tolerance: float, levels: int = 30, coarse=None, budget=None, chunk: int = 32,
           order: list = None) -> np.ndarray:
    """The done mask an adaptive run computes on this surface (`order`: a list the cells are
    appended to in the order they are handed out)."""
    from ..config import auto_coarse
    from ..cells.schedule import Adaptive
    flat = loss.reshape(-1)
    s = Adaptive(loss.shape, 1, np.zeros(flat.size, bool), np.full(flat.size, np.nan), chunk,
                 coarse or auto_coarse(max(loss.shape)), tolerance, levels, budget)
    done = np.zeros(flat.size, bool)
    while not s.exhausted:
        cells = s.take()
        if cells is None:
            raise RuntimeError("the schedule waits with nothing out")
        done[cells] = True
        if order is not None:
            order.extend(cells.tolist())
        s.returned(cells, flat[cells])
    return done.reshape(loss.shape)


def read_back(full: np.ndarray, done: np.ndarray, coarse=None, levels: int = 30):
    """The Survey of the cells `done`: what lldist.plot draws and lldist.info reports."""
    from ..config import auto_coarse
    from ..cells.schedule import surveys
    return surveys(np.where(done, full, np.nan), done, coarse or auto_coarse(max(full.shape)), levels)[0]


def compare(full: np.ndarray, approx: np.ndarray, levels: int = 30, **kind) -> dict:
    """Cells in another band than the full grid's, at the figures' round levels (`kind`: linear
    or log), or at `even` linear levels over the full range; the largest loss errors."""
    from ..analysis.figures import PlotOptions, _levels
    ok = np.isfinite(full)
    if kind.get("even"):
        lev = np.linspace(np.nanmin(full), np.nanmax(full), kind["even"])
    else:
        lev = _levels(full, PlotOptions(levels=levels, **kind), "loss")
    a, b = np.digitize(full[ok], lev), np.digitize(np.nan_to_num(approx[ok], nan=np.inf), lev)
    err = np.abs(approx[ok] - full[ok])
    basin = full[ok] <= 2 * np.nanmin(full)
    return {"mismatch": float(np.mean(a != b)), "max_err": float(np.nanmax(err)),
            "max_rel_err": float(np.nanmax(err / np.abs(full[ok]))), "basin_err": float(np.nanmax(err[basin])),
            "basin_rel_err": float(np.nanmax(err[basin] / np.abs(full[ok][basin])))}


def table_row(path: str, tolerance: float) -> dict:
    from ..store import SurfaceReader
    with SurfaceReader(path) as sf:
        s = sf.read_all()
    full = s.values[(s.splits[0], "loss")]
    done = replay(full, tolerance)
    sv = read_back(full, done)
    c = {name: compare(full, sv.surface, **kind) for name, kind in KINDS}
    return {"model": os.path.splitext(os.path.basename(path))[0], "grid": " x ".join(map(str, full.shape)),
            "span": float(np.nanmax(full) / np.nanmin(full)), "share": float(done.mean()),
            "mismatch": {k: v["mismatch"] for k, v in c.items()}, "estimated": [sv.error, sv.mean_error],
            "max_err": c["default"]["max_err"], "max_rel_err": c["default"]["max_rel_err"],
            "basin_err": c["default"]["basin_err"], "basin_rel_err": c["default"]["basin_rel_err"]}


def timing(args, tolerance) -> list:
    from ..store import SurfaceReader
    mpi = find_mpiexec()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for label, extra in (("full", []), ("adaptive", ["--set", "grid.adaptive={}" if tolerance is None
                                                          else f"grid.adaptive={{tolerance: {tolerance}}}"])):
            out = os.path.join(tmp, f"{label}.h5")
            cmd = [mpi, "-n", str(args.ranks), sys.executable, "-m", "lldist.surface",
                   os.path.join(ROOT, "jobs", "quickstart.yaml"), "--set", f"model.checkpoint={os.path.abspath(args.timing)}",
                   "--set", f"grid.x=[-1,1,{args.n}]", "--set", f"grid.y=[-1,1,{args.n}]", "--out", out, *extra]
            print(f"bench adaptive: {label} {args.n} x {args.n} on {args.ranks} ranks", file=sys.stderr, flush=True)
            subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, cwd=tmp,
                           env={**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")})
            seconds, _ = run_time(out)
            with SurfaceReader(out) as sf:
                cells = int(sf.done().sum())
            rows.append({"run": label, "cells": cells, "seconds": seconds, "cells_per_s": cells / seconds})
    rows[1]["vs_full"] = rows[1]["cells_per_s"] / rows[0]["cells_per_s"]
    rows[1]["wall_vs_full"] = rows[1]["seconds"] / rows[0]["seconds"]
    return rows


def run(args) -> tuple:
    from ..config import AdaptiveConfig
    tol = AdaptiveConfig().tolerance if args.tolerance is None else args.tolerance
    rows = [table_row(p, tol) for p in args.full]
    times = timing(args, args.tolerance) if args.timing else []
    return {"replays": rows, "timing": times}, markdown(rows, times)


def markdown(rows: list, times: list) -> str:
    out = []
    if rows:
        out += ["| model | grid | loss span | cells computed | band mismatch: default levels | 30 linear | "
                "30 geometric | 12 linear, full range | estimated error, largest / mean (spacings) | "
                "max loss error (rel.) | in the basin (rel.) |", "|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in rows:
            m = r["mismatch"]
            out.append(f"| {r['model']} | {r['grid']} | x{r['span']:,.0f} | {r['share']:.1%} | {m['default']:.2%} | "
                       f"{m['30 linear']:.2%} | {m['30 geometric']:.2%} | {m['12 linear']:.2%} | "
                       f"{r['estimated'][0]:.3f} / {r['estimated'][1]:.4f} | {r['max_err']:.3g} "
                       f"({r['max_rel_err']:.2%}) | {r['basin_err']:.2g} ({r['basin_rel_err']:.2%}) |")
    if times:
        out += ["", "| run | cells | seconds | cells/s | vs the full run |", "|---|---|---|---|---|"]
        for t in times:
            vs = (f"{t['vs_full']:.2f}x the cells/s ({1 - t['vs_full']:.0%} lost to waiting), "
                  f"{t['wall_vs_full']:.2f}x the wall time") if "vs_full" in t else "-"
            out.append(f"| {t['run']} | {t['cells']} | {t['seconds']:.1f} | {t['cells_per_s']:.1f} | {vs} |")
    return "\n".join(out)
