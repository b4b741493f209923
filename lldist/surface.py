"""Compute a loss landscape into one HDF5 file.

    python -m lldist.surface jobs/quickstart.yaml                 # one process, CPU or one GPU
    mpirun -n 8 python -m lldist.surface jobs/cifar10_cnn.yaml    # one rank per GPU
    python -m lldist.surface job.yaml --set grid.x=[-1,1,51] --out runs/x.h5 [--overwrite]

Re-running the same command resumes: only cells not marked done are computed. A file made by
a different job is refused (exit status 2) unless --overwrite is given. The run itself is
lldist/runs/surface.py's; this module only reads the command line.
"""

from __future__ import annotations

from .config import load_job
from .errors import ArgumentParser, finish, run_cli
from .runs.surface import RunOptions, run_surface
from .store import all_closed
from .transport import runner


def parse_args(argv):
    ap = ArgumentParser(prog="python -m lldist.surface", doc=__doc__)
    ap.add_argument("job", help="job file (YAML)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a job key, e.g. --set grid.x=[-1,1,11] (repeatable)")
    ap.add_argument("--out", help="output file (overrides the job's 'output')")
    ap.add_argument("--overwrite", action="store_true",
                    help="replace an output file made by another job (the new file replaces it once created)")
    ap.add_argument("--progress-every", type=float, default=RunOptions.progress_every, metavar="S",
                    help="seconds between progress lines when not on a terminal (0: no progress lines)")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    ctx = runner.launch()
    should_stop = runner.install_sigterm() if ctx.rank == 0 else (lambda: None)
    return run_surface(ctx, lambda: load_job(args.job, args.set, args.out),
                       RunOptions(overwrite=args.overwrite, progress_every=args.progress_every), should_stop=should_stop)


def cli() -> None:
    finish(run_cli(main), all_closed)


if __name__ == "__main__":
    cli()
