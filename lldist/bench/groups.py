"""Rank groups: cells/s and each rank's memory at group sizes 1, 2 and 4, data and shard, on 4
ranks (a node's worth), for a small model and the GPT-2-scale job.

    python -m lldist.bench groups [--models mlp gpt2] [--sizes 1 2 4] [--ranks 4]
    python -m lldist.bench groups --job jobs/llm_gpt2.yaml --sizes 1 2    # a job of yours, from here

With --job, the job runs from the current directory as you would run it (its relative paths
hold; a model it trains first is trained by the first setting, so train it once before
measuring: rank 0's training peak is not the evaluation's), into a temporary output.

Each setting is a real `mpiexec -n R python -m lldist.surface` run. Cells/s: from the file's
work log (first chunk's start to last chunk's end). Memory, per rank, from /proc while it runs:
the peak resident set (VmHWM), and what it holds once its evaluator is built and the cells run
(VmRSS at the last sample). Both are also given above the baseline: the peak of a process that
only imports what a rank imports (torch, transformers, mpi4py, lldist's surface command), which
no group size changes. The GPT-2 model is read from a seeded safetensors checkpoint written
first, so a shard group builds it on the meta device and each rank reads its own rows
(inputs/rows.py): a sharded rank's parameters, θ* and directions are about 1/k of a whole one's.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np

from ..errors import positive_int
from .common import find_mpiexec, run_time
from .procs import mpi_ranks

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def add_arguments(ap) -> None:
    ap.add_argument("--models", nargs="+", default=["mlp", "gpt2"], choices=["mlp", "gpt2"],
                    help="mlp: a digits MLP; gpt2: jobs/llm_gpt2.yaml's model (124M parameters), at its init")
    ap.add_argument("--sizes", type=positive_int, nargs="+", default=[1, 2, 4], help="group sizes")
    ap.add_argument("--ranks", type=positive_int, default=4, help="ranks of every run (a multiple of each size)")
    ap.add_argument("--job", help="measure this job file instead of --models (run from the current directory)")
    ap.add_argument("--modes", nargs="+", default=["data", "shard"], choices=["data", "shard"],
                    help="group modes above size 1 (a model that only fits sharded: --sizes 4 --modes shard)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="passed to every run's lldist.surface (e.g. eval.precision=bf16)")
    ap.add_argument("--keep", help="copy each setting's output file into this folder (<model>_<size>_<mode>.h5)")


def run(args) -> tuple:
    rows = groups(args)
    return rows, markdown(rows)


JOBS = {
    "mlp": ("name: g_mlp\noutput: g.h5\nmodel: {name: mlp, args: {hidden: [512, 256]}}\n"
            "data: {name: digits}\ngrid: {x: [-1, 1, 24], y: [-1, 1, 4]}\n"
            "eval: {split: test, batch_size: 60, chunk_size: 2, threads: 1}\n"),
    "gpt2": (f"name: g_gpt2\noutput: g.h5\nmodel: {{name: hf:{ROOT}/jobs/models/gpt2_small, checkpoint: gpt2.safetensors}}\n"
             f"data: {{name: hf:csv, root: {ROOT}/jobs/data/pydoc_topics, subset: 16,\n"
             f"       args: {{text: text, label: null, max_length: 48, tokenizer: {ROOT}/jobs/models/tiny_gpt}}}}\n"
             "directions: {seed: 0, store: recipe}\ngrid: {x: [-1, 1, 8]}\n"
             "eval: {split: test, batch_size: 4, loss: lm, chunk_size: 1, threads: 1}\n"),
}


class Memory(threading.Thread):
    """Samples the VmHWM and VmRSS of every rank of a launcher's process tree (MiB)."""

    def __init__(self, root_pid: int, command: bytes = b"lldist.surface"):
        super().__init__(daemon=True)
        self.root, self.peak, self.rss, self.running = root_pid, {}, {}, True
        self.command = command  # what the ranks run (their command line holds it)

    def run(self):
        while self.running:
            for rank, pid in mpi_ranks(self.root, self.command).items():
                try:
                    st = {ln.split(":")[0]: int(ln.split()[1]) for ln in open(f"/proc/{pid}/status")
                          if ln.startswith(("VmHWM", "VmRSS"))}
                except (OSError, ValueError, IndexError):
                    continue
                self.peak[rank] = max(self.peak.get(rank, 0), st.get("VmHWM", 0) / 1024)
                self.rss[rank] = st.get("VmRSS", 0) / 1024
            time.sleep(0.1)


BASELINE = ("import importlib, mpi4py.MPI, torch, lldist.surface, lldist.runs.surface\n"
            "for m in {0!r}: importlib.import_module(m)\n"
            "print(max(int(ln.split()[1]) for ln in open('/proc/self/status') if ln.startswith('VmHWM')) / 1024)")


def model_type(job: str, cwd: str):
    """The transformers architecture of a job's hf: model (its config's model_type), or None."""
    import json

    import yaml
    with open(job) as f:
        name = ((yaml.safe_load(f) or {}).get("model") or {}).get("name", "")
    if not name.startswith("hf:"):
        return None
    try:
        with open(os.path.join(cwd, name.split(":", 1)[1], "config.json")) as f:
            return json.load(f)["model_type"]
    except (OSError, ValueError, KeyError):
        return None


def baseline_mib(architecture=None) -> float:
    """The peak resident set of a process that imports the code a rank imports and nothing
    more: torch, mpi4py, lldist, and for an hf: model transformers with the model's modeling
    module and datasets. No model, no data: what no group size changes."""
    extra = ["transformers", "datasets", f"transformers.models.{architecture}.modeling_{architecture}"] \
        if architecture else []
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    out = subprocess.run([sys.executable, "-c", BASELINE.format(extra)], env=env, capture_output=True,
                         text=True, check=True)
    return float(out.stdout.split()[-1])


def _code(architecture) -> str:
    return (f"torch, transformers, {architecture}'s modeling code, datasets, mpi4py and lldist" if architecture
            else "torch, mpi4py and lldist")


def _seeded_gpt2(path: str) -> None:
    """GPT-2 small at its seeded initialization, as safetensors (read by rows in shard groups)."""
    from ..config import ModelConfig
    from ..workloads.models import build_model, save_checkpoint
    save_checkpoint(build_model(ModelConfig(f"hf:{ROOT}/jobs/models/gpt2_small", seed=0), (), 0), path,
                    {"source": "lldist.bench groups: seed 0"})


def groups(args) -> list:
    mpiexec = find_mpiexec()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        cases = [(os.path.splitext(os.path.basename(args.job))[0], os.path.abspath(args.job), os.getcwd())] \
            if args.job else [(m, os.path.join(tmp, f"{m}.yaml"), tmp) for m in args.models]
        for model, job, cwd in cases:
            if not args.job:
                with open(job, "w") as f:
                    f.write(JOBS[model])
                if model == "gpt2":
                    _seeded_gpt2(os.path.join(tmp, "gpt2.safetensors"))
            arch = model_type(job, cwd)
            base = baseline_mib(arch)
            print(f"{model}: baseline {base:.0f} MiB (a process importing {_code(arch)})", flush=True)
            settings = [(1, "data")] * (1 in args.sizes) + [(k, m) for k in args.sizes if k > 1 for m in args.modes]
            for k, mode in settings:
                if args.ranks % k:
                    continue
                out = os.path.join(tmp, f"{model}_{k}_{mode}.h5")
                env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
                cmd = [mpiexec, "-n", str(args.ranks), sys.executable, "-m", "lldist.surface", job, "--out", out,
                       "--set", f"eval.group_size={k}", "--set", f"eval.group_mode={mode}", "--progress-every", "0"]
                for kv in args.set:
                    cmd += ["--set", kv]
                p = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                mem = Memory(p.pid)
                mem.start()
                stdout, stderr = p.communicate(timeout=3600)
                mem.running = False
                if p.returncode != 0:
                    raise RuntimeError(f"{' '.join(cmd)} failed:\n{stderr[-2000:]}")
                secs, _ = run_time(out)
                from ..store import SurfaceReader
                with SurfaceReader(out) as sf:
                    cells = int(sf.done().sum())
                peaks = [mem.peak.get(r, float("nan")) for r in range(args.ranks)]
                held = [mem.rss.get(r, float("nan")) for r in range(args.ranks)]
                row = {"model": model, "ranks": args.ranks, "group_size": k, "mode": mode if k > 1 else "-",
                       "cells": cells, "seconds": secs, "cells_s": cells / secs,
                       "peak_mib_per_rank": peaks, "held_mib_per_rank": held, "baseline_mib": base,
                       "peak_mib_max": float(np.nanmax(peaks)), "held_mib_max": float(np.nanmax(held)),
                       "peak_above_baseline_mib": float(np.nanmax(peaks)) - base, "architecture": arch,
                       "by_rows": "built on the meta device" in stdout}
                one = row if k == 1 else next((r for r in rows if r["model"] == model and r["group_size"] == 1), None)
                row["peak_above_baseline_vs_1"] = row["peak_above_baseline_mib"] / one["peak_above_baseline_mib"] \
                    if one else float("nan")
                row["cells_s_vs_1"] = row["cells_s"] / one["cells_s"] if one else float("nan")
                row["seconds_per_cell"] = secs / cells * args.ranks / k  # a group's time for one cell
                if args.keep:
                    os.makedirs(args.keep, exist_ok=True)
                    shutil.copy(out, os.path.join(args.keep, os.path.basename(out)))
                rows.append(row)
                print(f"{model:5s} {args.ranks} ranks, groups of {k} ({row['mode']:5s}): {row['cells_s']:7.2f} cells/s, "
                      f"peak {row['peak_mib_max']:6.0f} MiB a rank ({row['peak_above_baseline_mib']:6.0f} above the "
                      f"baseline, {row['peak_above_baseline_vs_1']:.2f}x groups of 1), holding {row['held_mib_max']:6.0f} "
                      f"MiB{', by rows' if row['by_rows'] else ''}", flush=True)
    return rows


def markdown(rows: list) -> str:
    head = ("".join(f"Baseline of {m}: {r['baseline_mib']:.0f} MiB (a process importing {_code(r['architecture'])}).\n"
                    for m, r in {r["model"]: r for r in rows}.items()) + "\n"
            "| model | ranks | group size | mode | built | cells | cells/s | vs groups of 1 | peak MiB a rank (max) | "
            "above baseline | vs groups of 1 | MiB held a rank at the end (max) |\n"
            "|---|---|---|---|---|---|---|---|---|---|---|---|\n")
    return head + "".join(f"| {r['model']} | {r['ranks']} | {r['group_size']} | {r['mode']} | "
                          f"{'by rows' if r['by_rows'] else 'whole'} | {r['cells']} | {r['cells_s']:.2f} | "
                          f"{r['cells_s_vs_1']:.2f}x | {r['peak_mib_max']:.0f} | {r['peak_above_baseline_mib']:.0f} | "
                          f"{r['peak_above_baseline_vs_1']:.2f}x | {r['held_mib_max']:.0f} |\n" for r in rows)
