"""The coordinator alone: rank 0's cost per worker message on large grids and many ranks.

    python -m lldist.bench coordinator [--grids 51 501 1001] [--ranks 8 64] [--chunk 32]
                                       [--results 3000] [--json PATH] [--markdown PATH]

Cells cost nothing (workers answer with zeros at once), so every rank asks as fast as the
coordinator answers: what is measured is rank 0 alone, through the real runner, the real
schedule and the real HDF5 writer (values written in place, work log, group commits).
Per grid and rank count: rank 0's service time per result message (receive, write, answer;
median and 99th percentile), the results it took per second, and its peak memory before and
after the file of that grid exists. Rank 0 only coordinates here, as it does in runs of more
than runner.RANK0_COMPUTES_UP_TO ranks. Each grid is computed for its first `--results`
chunk results (the cost per message is what is measured; a 1001 x 1001 grid is 31,000 of them).

Workers import neither torch nor h5py, so 64 ranks fit on a laptop.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tempfile

import numpy as np


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class Limited:
    """The first `n` chunks of another schedule."""

    def __init__(self, inner, n: int):
        self.inner, self.left = inner, n

    def take(self):
        if self.left <= 0:
            return None
        self.left -= 1
        return self.inner.take()

    def returned(self, cells, values):
        self.inner.returned(cells, values)

    @property
    def exhausted(self) -> bool:
        return self.left <= 0 or self.inner.exhausted


class _Quiet:
    def update(self, n):
        pass

    def close(self):
        pass


def new_file(path: str, n: int, ndim: int = 2):
    """A SurfaceWriter on a new n (x n) grid of a model-free job: the coordinator's file
    without a model (this benchmark, the store's tests)."""
    import torch

    from ..config import job_from_dict
    from ..grid import Grid
    from ..store import SurfaceWriter
    grid = {"x": [-1, 1, n], "y": [-1, 1, n] if ndim == 2 else None}
    job = job_from_dict({"name": f"coordinator_{n}", "output": path, "grid": grid,
                         "model": {"name": "mlp", "checkpoint": None}}, "coordbench")
    dirs = {"x": {"w": torch.zeros(4)}, "y": {"w": torch.zeros(4)}}
    return SurfaceWriter.create_or_resume(path, job, {"job": "bench", "config": "bench"},
                                          Grid(job.grid.x, job.grid.y), lambda: dirs, {}, overwrite=True)


def rank_side(n: int, chunk: int, results: int, out: str, report: str) -> int:
    """Every rank of `mpiexec -n R python -m lldist.transport.coordbench ...` calls this."""
    from . import runner
    ctx = runner.launch()

    def prepare() -> runner.Plan:
        import torch  # noqa: F401 - loaded before the baseline, as in a real run

        from .schedule import Sweep
        before = _rss_mib()
        sf = new_file(out, n)
        sched = Limited(Sweep(sf.taken(), chunk), results)
        created = _rss_mib()

        def write(r):
            return sf.write_chunk(r.cells, r.values, r.rank, r.host, r.device, r.t_start, r.t_end)

        def close(outcome, cost):
            sf.finish()
            s = np.array(cost["service"]) * 1000 if cost and cost["service"] else np.zeros(1)
            with open(report, "w") as f:
                json.dump({"grid": n, "ranks": ctx.size, "chunk": chunk, "results": cost["results"],
                           "ms_median": float(np.median(s)), "ms_p99": float(np.percentile(s, 99)),
                           "ms_mean": float(s.mean()), "results_per_s": cost["results"] / cost["wall"],
                           "rss_before_mib": before, "rss_created_mib": created, "rss_peak_mib": _rss_mib(),
                           "outcome": outcome}, f)

        return runner.Plan(payload=None, schedule=sched, evaluate=None, group=1, device="cpu", write=write,
                           tick=sf.commit_due, start=lambda hosts: _Quiet(), close=close, rank0_computes=False)

    def build(payload) -> runner.Built:
        return runner.Built(lambda cells: np.zeros((len(cells), 1, 2)), "cpu")

    return runner.run(ctx, prepare, build)


def coordinator(args) -> list:
    from ..bench import find_mpiexec
    mpiexec = find_mpiexec()
    rows = []
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    if os.getuid() == 0:
        env.update(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    with tempfile.TemporaryDirectory() as tmp:
        for ranks in args.ranks:
            for n in args.grids:
                out, report = os.path.join(tmp, f"c{n}.h5"), os.path.join(tmp, f"c{n}_{ranks}.json")
                cmd = [mpiexec, "-n", str(ranks), sys.executable, "-m", "lldist.transport.coordbench", str(n),
                       str(args.chunk), str(args.results), out, report]
                p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
                if p.returncode != 0:
                    raise RuntimeError(f"{' '.join(cmd)} failed:\n{p.stderr[-2000:]}")
                with open(report) as f:
                    row = json.load(f)
                os.remove(out)
                rows.append(row)
                print(f"{n:5d}^2 grid, {ranks:3d} ranks: {row['results']} results, service median "
                      f"{row['ms_median']:.3f} ms, p99 {row['ms_p99']:.3f} ms, {row['results_per_s']:.0f} results/s, "
                      f"rank 0 peak {row['rss_peak_mib']:.0f} MiB (before the file {row['rss_before_mib']:.0f})",
                      flush=True)
    return rows


def markdown(rows: list) -> str:
    head = ("| grid | ranks | results | service ms (median) | (mean) | (p99) | results/s | "
            "rank 0 MiB before file | rank 0 peak MiB |\n|---|---|---|---|---|---|---|---|---|\n")
    return head + "".join(
        f"| {r['grid']} x {r['grid']} | {r['ranks']} | {r['results']} | {r['ms_median']:.3f} | {r['ms_mean']:.3f} | "
        f"{r['ms_p99']:.3f} | {r['results_per_s']:.0f} | {r['rss_before_mib']:.0f} | {r['rss_peak_mib']:.0f} |\n"
        for r in rows)


if __name__ == "__main__":
    n, chunk, results, out, report = sys.argv[1:6]
    sys.exit(rank_side(int(n), int(chunk), int(results), out, report))
