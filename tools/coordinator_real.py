"""The coordinator in real runs: `mpiexec -n RANKS python -m lldist.surface
jobs/coordinator_real.yaml` on GRID x GRID cells, rank 0's resident memory sampled every 50 ms
from /proc, and the service times rank 0 stored in the file. Prints one Markdown row per run.

    python tools/coordinator_real.py --ranks 8 --grids 501 1001 --seconds 0 0.002 --dir runs/coord

(docs/PERFORMANCE.md, "The coordinator in real runs"). Linux only (/proc)."""

import argparse
import os
import subprocess
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from lldist.bench.common import find_mpiexec  # noqa: E402
from lldist.bench.procs import mpi_ranks  # noqa: E402


def rss_mib(pid: int) -> float | None:
    try:
        for ln in open(f"/proc/{pid}/status"):
            if ln.startswith("VmRSS"):
                return int(ln.split()[1]) / 1024
    except OSError:
        return None
    return None


def measure(ranks: int, grid: int, seconds: float, out: str) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [find_mpiexec(), "-n", str(ranks), sys.executable, "-m", "lldist.surface",
           os.path.join(ROOT, "jobs", "coordinator_real.yaml"), "--out", out, "--overwrite",
           "--set", f"grid.x=[-1,1,{grid}]", "--set", f"grid.y=[-1,1,{grid}]",
           "--set", f"model.args.seconds={seconds}", "--progress-every", "30"]
    t0 = time.time()
    p = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    log = []
    threading.Thread(target=lambda: log.extend(p.stdout), daemon=True).start()
    pid, samples = None, []
    while p.poll() is None:
        pid = pid or mpi_ranks(p.pid).get(0)
        m = rss_mib(pid) if pid else None
        if m is not None:
            samples.append((time.time() - t0, m))
        time.sleep(0.05)
    time.sleep(0.3)
    if p.returncode:
        sys.exit("".join(log[-20:]) + f"\nthe run failed (exit {p.returncode})")
    from lldist.store import SurfaceReader
    with SurfaceReader(out) as sf:
        stats = {k: sf.attr("coordinator_" + k) for k in
                 ("ms_per_message", "ms_median", "ms_p99", "ms_max", "results")}
    mid = samples[-1][0] / 2 if samples else 0.0  # rank 0's memory in each half of the run
    return {"wall": time.time() - t0, "cells": grid * grid,
            "rss_first_half_max": max((m for t, m in samples if t < mid), default=0),
            "rss_second_half_max": max((m for t, m in samples if t >= mid), default=0), **stats}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ranks", type=int, default=8)
    ap.add_argument("--grids", type=int, nargs="+", default=[501, 1001])
    ap.add_argument("--seconds", type=float, nargs="+", default=[0.0, 0.002],
                    help="the model's cost per cell: 0 is CPU-bound, 0.002 waits 2 ms")
    ap.add_argument("--dir", default="runs/coordinator_real")
    a = ap.parse_args()
    os.makedirs(a.dir, exist_ok=True)
    print("| cells | grid | results | service ms (mean) | (median) | (p99) | (max) | wall s | cells/s "
          "| rank 0 MiB, first half of the run | rank 0 MiB, second half |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for seconds in a.seconds:
        for grid in a.grids:
            r = measure(a.ranks, grid, seconds, os.path.join(a.dir, f"s{seconds:g}_{grid}.h5"))
            kind = "CPU-bound" if seconds == 0 else f"wait {1000 * seconds:g} ms a cell"
            print(f"| {kind} | {grid} x {grid} | {r['results']} | {r['ms_per_message']:.3f} | {r['ms_median']:.3f} | "
                  f"{r['ms_p99']:.3f} | {r['ms_max']:.1f} | {r['wall']:.1f} | {r['cells'] / r['wall']:,.0f} | "
                  f"{r['rss_first_half_max']:.0f} | {r['rss_second_half_max']:.0f} |", flush=True)


if __name__ == "__main__":
    main()
