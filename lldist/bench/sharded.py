"""The Hessian of a sharded model: each rank's memory at group sizes 1, 2 and 4, with the basis in
memory and spilled to disk, on GPT-2 small (124M parameters) at its seeded initialization.

    python -m lldist.bench sharded [--sizes 1 2 4] [--basis-memory 2e9 3e8]

Each setting is a real `mpiexec -n k python -m lldist.hessian` run. Size 1 is the one-process
Hessian (float32, double backward, ARPACK: the whole model on the rank); sizes above 1 are one
shard group of k (float64 rows, differences of the sharded gradient, Lanczos on sharded
vectors: lldist/evaluation/sharded.py). Memory per rank is sampled from /proc while it runs
(groups.py's Memory): the peak resident set, and the peak above the baseline of a process that
only imports what a rank imports. The work is λmax to a tolerance of 1e-1 on two batches of
2 × 48 tokens (one a rank at k = 2): enough Lanczos steps to fill a small basis, few enough
that a float64 GPT-2 on two CPU cores finishes. The bench is about memory; times are for the
record only.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
import time

import numpy as np

from ..errors import positive_int
from .common import find_mpiexec
from .groups import JOBS, Memory, _code, _seeded_gpt2, baseline_mib, model_type

FLAGS = ["--top", "1", "--no-smallest", "--trace-samples", "0", "--no-jackknife", "--batches", "2", "--tol", "1e-1",
         "--set", "eval.batch_size=2"]


def add_arguments(ap) -> None:
    ap.add_argument("--sizes", type=positive_int, nargs="+", default=[1, 2, 4], help="shard group sizes (1: one process)")
    ap.add_argument("--basis-memory", type=float, nargs="+", default=[2e9, 3e8],
                    help="curvature.basis_memory settings of the shard groups (bytes a rank keeps in memory)")


def run(args) -> tuple:
    rows = sharded(args)
    return rows, markdown(rows)


def sharded(args) -> list:
    mpiexec = find_mpiexec()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        job = os.path.join(tmp, "gpt2.yaml")
        with open(job, "w") as f:
            f.write(JOBS["gpt2"])
        _seeded_gpt2(os.path.join(tmp, "gpt2.safetensors"))
        arch = model_type(job, tmp)
        base = baseline_mib(arch)
        print(f"gpt2: baseline {base:.0f} MiB (a process importing {_code(arch)})", flush=True)
        settings = [(k, b) for k in args.sizes for b in (args.basis_memory if k > 1 else [None])]
        for k, budget in settings:
            cmd = [mpiexec, "-n", str(k), sys.executable, "-m", "lldist.hessian", job, *FLAGS]
            if k > 1:
                cmd += ["--set", f"eval.group_size={k}", "--set", "eval.group_mode=shard",
                        "--basis-memory", f"{budget:g}"]
            env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TMPDIR=tmp)
            t0 = time.perf_counter()
            p = subprocess.Popen(cmd, cwd=tmp, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            mem = Memory(p.pid, b"lldist.hessian")
            mem.start()
            stdout, stderr = p.communicate(timeout=7200)
            mem.running = False
            wall = time.perf_counter() - t0
            if p.returncode != 0:  # (a rank killed for memory is a result: the machine's limit)
                peaks = [mem.peak.get(r, float("nan")) for r in range(k)]
                rows.append({"model": "gpt2", "group_size": k, "basis_memory": budget, "failed": p.returncode,
                             "stderr": stderr[-500:], "peak_mib_per_rank": peaks, "baseline_mib": base,
                             "wall_s": wall, "architecture": arch})
                print(f"gpt2 k={k} basis {budget}: failed (exit {p.returncode}; a rank killed for memory exits "
                      f"-9 or 137), peaks so far {[round(x) for x in peaks]} MiB", flush=True)
                continue
            found = re.search(r"top eigenvalues ([-0-9.e+]+)", stdout)
            steps = re.search(r"; (\d+) Lanczos steps", stdout)
            spill = re.search(r"Lanczos basis: (\d+) vectors of ([0-9.e+]+) MB a rank in memory.*?, (\d+) more", stdout)
            products = re.search(r"; (\d+) products in", stdout)
            peaks = [mem.peak.get(r, float("nan")) for r in range(k)]
            row = {"model": "gpt2", "group_size": k, "basis_memory": budget,
                   "route": "one process (float32, double backward, ARPACK)" if k == 1 else
                            "shard group (float64, differences, sharded Lanczos)",
                   "lambda_max": float(found.group(1)) if found else float("nan"),
                   "lanczos_steps": int(steps.group(1)) if steps else None,
                   "in_memory": int(spill.group(1)) if spill else None,
                   "spilled": int(spill.group(3)) if spill else 0,
                   "vector_mb": float(spill.group(2)) if spill else None,
                   "products": int(products.group(1)) if products else None,
                   "peak_mib_per_rank": peaks, "peak_mib_max": float(np.nanmax(peaks)), "baseline_mib": base,
                   "peak_above_baseline_mib": float(np.nanmax(peaks)) - base, "architecture": arch, "wall_s": wall}
            rows.append(row)
            print(f"gpt2 k={k} basis {budget if budget else '-'}: lambda_max {row['lambda_max']:.6g}, "
                  f"peak {row['peak_mib_max']:.0f} MiB a rank ({row['peak_above_baseline_mib']:.0f} above the baseline)"
                  + (f", {row['spilled']} vectors spilled" if row["spilled"] else ""), flush=True)
    return rows


def markdown(rows: list) -> str:
    head = ("".join(f"Baseline: {r['baseline_mib']:.0f} MiB (a process importing {_code(r['architecture'])}).\n"
                    for r in rows[:1]) + "\n"
            "| group size | route | basis_memory | λmax | Lanczos steps (products) | vectors spilled | "
            "peak MiB a rank (max) | above baseline | wall s |\n|---|---|---|---|---|---|---|---|---|\n")

    def budget(r):
        return "-" if r["basis_memory"] is None else f"{r['basis_memory']:g}"
    failed = [r for r in rows if "failed" in r]
    rows = [r for r in rows if "failed" not in r]
    tail = "".join(f"\nk = {r['group_size']}, basis_memory {budget(r)}: failed (exit {r['failed']}), peak per rank "
                   f"{', '.join(f'{x:.0f}' for x in r['peak_mib_per_rank'])} MiB when it ended\n" for r in failed)
    body = "".join(
        f"| {r['group_size']} | {r['route']} | {budget(r)} | {r['lambda_max']:.6g} | "
        f"{r['lanczos_steps'] or '(' + str(r['products']) + ')'} | {r['spilled']} | {r['peak_mib_max']:.0f} | "
        f"{r['peak_above_baseline_mib']:.0f} | {r['wall_s']:.0f} |\n" for r in rows)
    return head + body + tail
