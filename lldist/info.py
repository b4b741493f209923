"""What a surface file holds: job, progress, provenance, and each rank's share of the work.

    python -m lldist.info runs/quickstart/surface.h5

Per rank (from the file's per-chunk work log): host, device, cells, chunks, busy seconds
(sum of its chunks' durations), and its busy fraction of the run's wall time (first chunk
start to last chunk end): a rank well below the others was waiting or slow.
"""

from __future__ import annotations

import json

import sys

import numpy as np

from .errors import ArgumentParser, run_cli


def rank_shares(records: np.ndarray) -> list:
    """One row per (run, rank): cells, chunks, busy seconds, busy fraction of that run's span."""
    rows = []
    for run in np.unique(records["run"]):
        r = records[records["run"] == run]
        span = float(r["t_end"].max() - r["t_start"].min()) or 1e-9
        for rank in np.unique(r["rank"]):
            mine = r[r["rank"] == rank]
            busy = float((mine["t_end"] - mine["t_start"]).sum())
            rows.append({"run": int(run), "rank": int(rank), "host": mine["host"][0].decode(),
                         "device": mine["device"][0].decode(), "cells": int(mine["ncells"].sum()),
                         "chunks": len(mine), "busy_s": busy, "busy_fraction": busy / span})
    return rows


# /directions attributes every kind has (directions/kinds.py's describe), and those drawn or
# tabled elsewhere; the rest are what the kind itself recorded, and are printed as they are
COMMON = ("kind", "x_kind", "y_kind", "norm", "ignore", "seed", "stream", "params", "store", "recipe", "cosine_xy")
SHOWN_ELSEWHERE = ("points", "point_files", "curve", "curve_path", "checkpoints")


def directions_line(attrs: dict) -> str:
    """What made the directions, in one line: the kind and its norm, the models it passes
    through, and whatever else the kind recorded (PCA's explained variance, the Hessian's
    eigenvalues, the source file, the alignment)."""
    words = f"directions: {attrs.get('kind', '?')}"
    if attrs.get("kind") in ("random", "target"):
        words += f", norm {attrs.get('norm')}"
    if "point_files" in attrs:
        words += " through " + ", ".join(json.loads(attrs["point_files"]))
    if "curve" in attrs:  # a curve between a and b, bent at the third point (lldist.connect)
        words += f"; {attrs['curve']} curve (a, b, bend)"
    rest = [f"{k} {v}" for k, v in attrs.items() if k not in COMMON + SHOWN_ELSEWHERE]
    return words + ("; " + ", ".join(rest) if rest else "")


def main(argv=None) -> int:
    from .config import effective_raw
    from .store import SurfaceReader
    ap = ArgumentParser(prog="python -m lldist.info", doc=__doc__)
    ap.add_argument("file", help="an lldist surface file (.h5), complete or not")
    args = ap.parse_args(argv)
    with SurfaceReader(args.file) as sf:
        done = sf.done()
        print(f"{args.file}: job {sf.attr('job_name')} ({sf.attr('job_source')}), hash {sf.attr('job_hash')[:12]}")
        planes = f" ({sf.planes} planes: directions.repeats)" if sf.planes > 1 else ""
        print(f"  grid {' x '.join(map(str, done.shape))}{planes}, splits {', '.join(sf.splits)}: "
              f"{int(done.sum())}/{done.size} cells done, {sf.attr('runs')} run(s), "
              f"complete={bool(sf.attr('complete')) if sf.adaptive else bool(done.all())}")
        if sf.adaptive:
            a = sf.adaptive
            r = sf.adaptive_reading()
            budget = f", budget {a['budget']} cells a plane" if a.get("budget") else ""
            print(f"  adaptive grid (lattice every {a['coarse']}th cell, tolerance {a['tolerance']:g} of "
                  f"{a['levels']} contour levels' spacing{budget}): {int(done.sum())} cells computed "
                  f"({100 * done.mean():.1f}%), the rest interpolated when read; estimated error {r.error:.3g} "
                  f"of a spacing at most, {r.mean_error:.2g} on average")
        print(f"  lldist {sf.attr('lldist_version')}, torch {sf.attr('torch_version')}, git {sf.attr('git_revision')}, "
              f"created {sf.attr('created')}, last finished {sf.attr('last_finished', '-')}")
        ev = (effective_raw(sf.job_yaml(), args.file) or {}).get("eval") or {}
        group = f", groups of {ev['group_size']} ranks ({ev.get('group_mode', 'data')})" \
            if (ev.get("group_size") or 1) > 1 else ""
        threads = f", {sf.attr('eval_threads')} CPU thread(s)" if sf.attr("eval_threads") else ""
        print(f"  batch {sf.attr('eval_batch_size')}, cells per pass {sf.attr('eval_cells_per_pass')}{group}{threads}, "
              f"cosine(x, y) {sf.attr('cosine_xy', group='directions')}")
        mean = sf.attr("coordinator_ms_per_message")
        if mean is not None:
            parts = [f"{k} {sf.attr('coordinator_ms_' + k):.3f}" for k in ("median", "p99", "max")
                     if sf.attr("coordinator_ms_" + k) is not None]
            print(f"  coordinator (last finished run): {mean:.3f} ms a worker message on average"
                  + (f"; per result message {', '.join(parts)} ms ({sf.attr('coordinator_results')} results)"
                     if parts else ""))
        for key, a in sf.curvature(operator=None).items():
            op = "" if a["operator"] == "hessian" else f"{a['operator']}, "
            print(f"  curvature at theta* ({op}{key.split('_')[0]}, {a['batches']} batches of {a['batch_size']}"
                  + (f", {a['ranks']} ranks" if a.get("ranks", 1) > 1 else "") + "): lambda_max "
                  f"{a['lambda_max']:.6g}, lambda_min {a['lambda_min']:.6g}, trace {a['trace']:.6g} +- "
                  f"{a['trace_stderr']:.2g}, top {', '.join(f'{v:.4g}' for v in a['top_eigenvalues'])}")
            if "attention" in a:
                print(f"    {a['attention']}")
            if "density_nodes" in a:
                from .analysis.spectrum import density_summary
                print("    spectral density: " + density_summary(a["density_nodes"], a["density_weights"]))
            if a.get("blocks"):
                print(f"    {'block':<32} {'parameters':>10} {'lambda_max':>11} {'trace':>11} {'+-':>8}")
                for r in a["blocks"]:
                    print(f"    {r['block'][:32]:<32} {r['parameters']:>10,} {r['lambda_max']:>11.4g} {r['trace']:>11.4g} "
                          f"{r['trace_stderr']:>8.2g}")
        for split, m in sf.sharpness().items():
            print(f"  sharpness at theta* ({split}, {m['examples']} examples"
                  + (f", {m['ranks']} ranks" if m.get("ranks", 1) > 1 else "") + "): worst-case adaptive l2 "
                  f"{m['worst_2']:.4g}, linf {m['worst_inf']:.4g}; average l2 {m['average_2']:.4g} +- "
                  f"{m['average_2_se']:.2g}; SAM {m['sam']:.4g} +- {m['sam_se']:.2g}; PAC-Bayes 1/sigma^2 "
                  f"{m['pac_bayes_flatness']:.4g}")
        print("  " + directions_line(sf.attrs("directions")))
        pts = sf.points()
        if pts is not None:  # a plane's three models, evaluated from their own files
            for (px, py), name, k in zip(pts.coords, pts.labels, range(3)):
                vals = ", ".join(f"{sp} {q} {v[k]:.4g}" for (sp, q), v in pts.values.items() if q in ("loss", "acc"))
                print(f"    {name:<28} at ({px:.4g}, {py:.4g}): {vals}")
        fit = sf.trajectory_fit()
        if fit is not None:  # how well the PCA plane holds each checkpoint
            print(f"  trajectory on the plane ({fit['split']} loss; * under {100 * fit['threshold']:.0f}% of the "
                  "displacement in the plane: its point is a projection)")
            print(f"    {'#':>3} {'checkpoint':<28} {'in plane':>8} {'loss there':>11} {'loss projected':>14}")
            names = fit["checkpoints"] or [""] * len(fit["captured"])
            for i, (n, c, a, b) in enumerate(zip(names, fit["captured"], fit["loss_checkpoint"], fit["loss_projected"])):
                flag = "*" if c < fit["threshold"] else " "
                print(f"    {i + 1:>3} {n[:28]:<28} {100 * c:>7.1f}%{flag} {a:>11.4g} {b:>14.4g}")
        records, _ = sf.chunk_log()
        if len(records):
            print(f"  {'run':>3} {'rank':>4} {'host':<16} {'device':<8} {'cells':>6} {'chunks':>6} {'busy s':>8} {'busy':>6}")
            for r in rank_shares(records):
                print(f"  {r['run']:>3} {r['rank']:>4} {r['host']:<16} {r['device']:<8} {r['cells']:>6} "
                      f"{r['chunks']:>6} {r['busy_s']:>8.2f} {100 * r['busy_fraction']:>5.0f}%")
    return 0


def cli() -> None:
    sys.exit(run_cli(main))


if __name__ == "__main__":
    sys.exit(run_cli(main))
