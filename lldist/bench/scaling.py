"""Scaling: the MPI protocol alone, with a synthetic model of fixed cost per cell (it sleeps),
under mpiexec at 1, 2, 4, 8 ranks: speedup, parallel efficiency, coordinator cost.

    python -m lldist.bench scaling [--ranks 1 2 4 8] [--cost 0.05] [--cells 320] [--chunk 2]
"""

from __future__ import annotations

from ..errors import positive_int
from .common import rank_sweep, scaling_markdown


def add_arguments(ap) -> None:
    ap.add_argument("--ranks", type=positive_int, nargs="+", default=[1, 2, 4, 8], help="rank counts to run at")
    ap.add_argument("--cost", type=float, default=0.05, help="seconds per cell")
    ap.add_argument("--cells", type=int, default=320, help="cells of the 1D grid")
    ap.add_argument("--chunk", type=int, default=2, help="cells per chunk")


def run(args) -> tuple:
    rows = scaling(args)
    return rows, scaling_markdown(rows)


def scaling(args) -> list:
    job = {"name": "scaling", "output": "s.h5",
           "model": {"name": "python:lldist.workloads.synthetic:fixed_cost", "args": {"seconds": args.cost}},
           "data": {"name": "digits", "subset": 64},
           "grid": {"x": [-1.0, 1.0, args.cells]},
           "eval": {"batch_size": 64, "chunk_size": args.chunk, "threads": 1}}
    rows = rank_sweep(job, args.ranks)
    for r in rows:
        r.update(cells=args.cells, cost_s=args.cost, chunk=args.chunk, ideal_one_rank_s=args.cells * args.cost)
    return rows
