"""Benchmarks, measured in one run and printed as ratios: one module per benchmark.

    python -m lldist.bench [throughput options]       # throughput.py: lldist vs the forward ceiling and a naive loop
    python -m lldist.bench scaling [--ranks 1 2 4 8]  # scaling.py: the MPI protocol, fixed-cost cells
    python -m lldist.bench coordinator [--grids 51 501 1001] [--ranks 8 64]   # coordinator.py: rank 0 alone
    python -m lldist.bench curvature [--ranks 1 2]    # curvature.py: a curvature cell vs a loss cell, a map over ranks
    python -m lldist.bench threads [--load 2]         # threads.py: a real run's threads, idle and beside a load
    python -m lldist.bench groups [--sizes 1 2 4]     # groups.py: rank groups' cells/s and memory per rank
    python -m lldist.bench sharded [--sizes 1 2 4]    # sharded.py: a sharded Hessian's memory per rank, basis spilled or not
    python -m lldist.bench adaptive --full F.h5 ...   # adaptive.py: adaptive grids' cells and picture against full grids, wall time
    PYTHONPATH=. python -m lldist.bench gpu [--out DIR] [--budget 400]        # gpu.py: on a CUDA machine

Every mode prints a Markdown table; `--json PATH` and `--markdown PATH` also write the rows
and the table (the gpu mode writes both into --out). `python -m lldist.bench MODE --help`
lists a mode's options.
"""

from __future__ import annotations

import importlib
import json
import sys
import time

from ..errors import ArgumentParser, run_cli

MODES = {"throughput": "lldist vs the pure forward-pass ceiling and a naive per-cell loop (the default)",
         "scaling": "the MPI protocol alone: speedup and efficiency at 1, 2, 4, 8 ranks",
         "coordinator": "rank 0 alone: its cost per message on grids up to 1001x1001 and 64 ranks",
         "curvature": "a curvature cell against a loss cell, and a curvature map over ranks",
         "threads": "a real run with the default threads, one thread, passive waits: idle and beside a load",
         "groups": "rank groups (data, shard) at sizes 1, 2, 4: cells/s and memory per rank, a small model and GPT-2",
         "sharded": "the Hessian of GPT-2 small in shard groups of 1, 2, 4: memory per rank, the basis in memory or on disk",
         "adaptive": "adaptive grids replayed on full grids (cells, band mismatch), and timed against a full run",
         "gpu": "everything the GPU issue measures, with the gpu-marked tests (needs CUDA)"}


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    mode = argv[0] if argv[:1] and argv[0] in MODES else "throughput"
    if argv[:1] == [mode]:
        argv = argv[1:]
    mod = importlib.import_module(f".{mode}", __name__)
    ap = ArgumentParser(
        prog=f"python -m lldist.bench{'' if mode == 'throughput' else ' ' + mode}",
        description=f"{mod.__doc__.splitlines()[0]} Modes: " + "; ".join(f"{k}: {v}" for k, v in MODES.items()),
        epilog="python -m lldist.bench MODE --help: that mode's options")
    mod.add_arguments(ap)
    if mode != "gpu":
        ap.add_argument("--json", help="also write the rows as JSON here")
        ap.add_argument("--markdown", help="also write the table as Markdown here")
    args = ap.parse_args(argv)
    from .common import tune_malloc
    tune_malloc()
    rows, md = mod.run(args)
    if mode == "gpu":
        return 0  # written into --out, printed as it went
    print()
    print(md)
    if args.json:
        import torch
        with open(args.json, "w") as f:
            json.dump({"mode": mode, "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"), "rows": rows},
                      f, indent=1)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(md)
    return 0


def cli() -> None:
    sys.exit(run_cli(main))
