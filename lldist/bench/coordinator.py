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

Workers import neither torch nor h5py, so 64 ranks fit on a laptop. Each rank runs
`python -m lldist.bench.coordinator N CHUNK RESULTS OUT REPORT` (this module's __main__).
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tempfile

import numpy as np

from ..errors import positive_int


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


def add_arguments(ap) -> None:
    ap.add_argument("--grids", type=int, nargs="+", default=[51, 501, 1001], help="cells per axis of each grid")
    ap.add_argument("--ranks", type=positive_int, nargs="+", default=[8, 64], help="rank counts to run at")
    ap.add_argument("--chunk", type=int, default=32, help="cells per chunk")
    ap.add_argument("--results", type=int, default=3000, help="chunk results per grid")


def run(args) -> tuple:
    rows = coordinator(args)
    return rows, markdown(rows)


def new_file(path: str, n: int, ndim: int = 2):
    """A SurfaceWriter on a new n (x n) grid of a model-free job: the coordinator's file
    without a model (this benchmark, the store's tests)."""
    import torch

    from ..config import job_from_dict
    from ..cells.grid import Grid
    from ..store import SurfaceWriter
    grid = {"x": [-1, 1, n], "y": [-1, 1, n] if ndim == 2 else None}
    job = job_from_dict({"name": f"coordinator_{n}", "output": path, "grid": grid,
                         "model": {"name": "mlp", "checkpoint": None}}, "coordbench")
    from ..directions.record import Directions
    dirs = Directions(x={"w": torch.zeros(4)}, y={"w": torch.zeros(4)})
    return SurfaceWriter.create(path, job, {"job": "bench", "config": "bench"}, Grid(job.grid.x, job.grid.y), dirs, {})


class ZeroCost:
    """The room of this benchmark: the real schedule and writer on rank 0, cells that cost
    nothing on the workers; rank 0 only coordinates."""

    cells_per_pass, device, rank0_computes = 1, "cpu", False

    def __init__(self, ctx, n: int, chunk: int, results: int, out: str, report: str):
        self.ctx, self.n, self.chunk, self.results, self.out, self.report = ctx, n, chunk, results, out, report

    def prepare(self):
        import torch  # noqa: F401 - loaded before the baseline, as in a real run

        from ..cells.schedule import Sweep
        self.before = _rss_mib()
        self.sf = new_file(self.out, self.n)
        self.schedule = Limited(Sweep(self.sf.taken(), self.chunk), self.results)
        self.created = _rss_mib()
        return None

    def build(self, payload, group=None) -> str:
        return "cpu"

    def evaluate(self, cells):
        return np.zeros((len(cells), 1, 2))

    def take_result(self, r) -> int:
        return self.sf.write_chunk(r)

    def tick(self) -> int:
        return self.sf.commit_due()

    def start(self, hosts):
        return _Quiet()

    def close(self, outcome, cost) -> None:
        self.sf.finish()
        s = np.array(cost["service"]) * 1000 if cost and cost["service"] else np.zeros(1)
        with open(self.report, "w") as f:
            json.dump({"grid": self.n, "ranks": self.ctx.size, "chunk": self.chunk, "results": cost["results"],
                       "ms_median": float(np.median(s)), "ms_p99": float(np.percentile(s, 99)),
                       "ms_mean": float(s.mean()), "results_per_s": cost["results"] / cost["wall"],
                       "rss_before_mib": self.before, "rss_created_mib": self.created, "rss_peak_mib": _rss_mib(),
                       "outcome": outcome}, f)


def rank_side(n: int, chunk: int, results: int, out: str, report: str) -> int:
    """Every rank of `mpiexec -n R python -m lldist.bench.coordinator ...` calls this."""
    from ..transport import runner
    ctx = runner.launch()
    return runner.run(ctx, ZeroCost(ctx, n, chunk, results, out, report))


def coordinator(args) -> list:
    from .common import find_mpiexec
    mpiexec = find_mpiexec()
    rows = []
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    if os.getuid() == 0:
        env.update(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    with tempfile.TemporaryDirectory() as tmp:
        for ranks in args.ranks:
            for n in args.grids:
                out, report = os.path.join(tmp, f"c{n}.h5"), os.path.join(tmp, f"c{n}_{ranks}.json")
                cmd = [mpiexec, "-n", str(ranks), sys.executable, "-m", "lldist.bench.coordinator", str(n),
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
