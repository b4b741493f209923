"""Threads on a shared machine: a real surface run (python -m lldist.surface, one process) with
lldist's default threads (runs/threads.py: its share of the CPUs, fewer when other processes
keep them busy), with fixed counts, and with OpenMP's wait policies, on an idle machine and
beside K processes spinning.

    python -m lldist.bench threads [--load 2] [--cells 15] [--rounds 2] [--settings default "1 thread" ...]

OpenMP threads that spin-wait are fast alone and slow when other processes want the cores: a
spinning thread holds a core its sibling, or a neighbour, needs. What lldist should default
to is decided here, from cells/s of the same job in each setting (each from the file's own
work log: first chunk start to last chunk end), the settings run in alternation.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile

import numpy as np

from ..errors import positive_int
from .common import Busy, run_time

SETTINGS = {  # name -> environment changes
    "default": {},
    "1 thread": {"OMP_NUM_THREADS": "1"},
    "all CPUs": {"OMP_NUM_THREADS": str(len(os.sched_getaffinity(0)))},  # (lldist's default before it followed the load)
    "passive wait": {"OMP_WAIT_POLICY": "PASSIVE"},
    "active wait": {"OMP_WAIT_POLICY": "ACTIVE"},
    "spin 10k": {"GOMP_SPINCOUNT": "10000"},
    "spin 100k": {"GOMP_SPINCOUNT": "100000"},
}


def add_arguments(ap) -> None:
    ap.add_argument("--load", type=int, default=len(os.sched_getaffinity(0)), metavar="K",
                    help="spinning processes in the loaded half (default: one per core)")
    ap.add_argument("--cells", type=positive_int, default=15, help="cells per axis of the job's grid")
    ap.add_argument("--rounds", type=positive_int, default=2, help="alternated rounds of every setting")
    ap.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS), help="which to run")


def run(args) -> tuple:
    rows = threads(args)
    return rows, markdown(rows)


def job_text(n: int) -> str:
    return (f"name: threads\noutput: t.h5\nmodel: {{name: cnn, args: {{width: 16, stages: 3}}}}\n"
            f"data: {{name: digits}}\ngrid: {{x: [-1, 1, {n}], y: [-1, 1, {n}]}}\n"
            "eval: {split: test, batch_size: 120, chunk_size: 8}\n")


def threads(args) -> list:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        job = os.path.join(tmp, "job.yaml")
        with open(job, "w") as f:
            f.write(job_text(args.cells))
        for load in (0, args.load):
            rates = {k: [] for k in args.settings}
            with Busy(load):
                for _ in range(args.rounds):
                    for name in args.settings:
                        extra = SETTINGS[name]
                        out = os.path.join(tmp, "t.h5")
                        env = {k: v for k, v in os.environ.items()
                               if k not in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
                        env.update(extra)
                        subprocess.run([sys.executable, "-m", "lldist.surface", job, "--out", out, "--overwrite",
                                        "--progress-every", "0"], cwd=tmp, env=env, check=True, capture_output=True)
                        secs, _ = run_time(out)
                        rates[name].append(args.cells ** 2 / secs)
            for name, r in rates.items():
                row = {"load": load, "setting": name, "cells_s": float(np.median(r)), "rounds": r}
                rows.append(row)
                print(f"load {load}: {name:13s} {row['cells_s']:7.2f} cells/s  (rounds: "
                      f"{', '.join(f'{x:.2f}' for x in r)})", flush=True)
    return rows


def markdown(rows: list) -> str:
    head = "| load (spinning processes) | setting | cells/s (median) | rounds |\n|---|---|---|---|\n"
    out = head + "".join(f"| {r['load']} | {r['setting']} | {r['cells_s']:.2f} | "
                         f"{', '.join(f'{x:.2f}' for x in r['rounds'])} |\n" for r in rows)
    return out + "\n" + verdict(rows)


FIXED = ("1 thread", "all CPUs")  # the choices a user could fix instead of the default


def verdict(rows: list) -> str:
    """Per load: how much slower the default is than the best fixed thread count (the bar:
    at most 1.3x)."""
    lines = []
    for load in sorted({r["load"] for r in rows}):
        at = {r["setting"]: r["cells_s"] for r in rows if r["load"] == load}
        fixed = {k: v for k, v in at.items() if k in FIXED}
        if "default" in at and fixed:
            best = max(fixed, key=fixed.get)
            lines.append(f"* load {load}: the default is {fixed[best] / at['default']:.2f}x slower than the best fixed "
                         f"choice ({best}, {fixed[best]:.2f} cells/s against {at['default']:.2f})")
    return "\n".join(lines) + ("\n" if lines else "")
