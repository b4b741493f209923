"""Every measure at every checkpoint of a recorded run, into one HDF5 file.

    python -m lldist.series job.yaml                      # the job's series: section names the checkpoints
    mpirun -n 8 python -m lldist.series job.yaml          # units (checkpoint, measure) spread over ranks
    python -m lldist.series job.yaml --set series.checkpoints=runs/mine/model_trajectory.json --out s.h5

Re-running the same command resumes: only the units not marked done are computed. A file of
another series is refused (exit status 2) unless --overwrite. `python -m lldist.plot s.h5`
draws it; docs/SERIES.md says what is measured and how. The run itself is
lldist/runs/series.py's; this module only reads the command line.
"""

from __future__ import annotations

import sys
import types

from .config import load_job
from .errors import ArgumentParser, finish, run_cli
from .runs.series import SeriesOptions, run_series
from .store import all_closed
from .transport import runner


def parse_args(argv):
    ap = ArgumentParser(prog="python -m lldist.series", doc=__doc__)
    ap.add_argument("job", help="job file (YAML)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a job key, e.g. --set series.measures=[curvature] (repeatable)")
    ap.add_argument("--out", help="the series file (default: series.output, else series.h5 beside the job's output)")
    ap.add_argument("--overwrite", action="store_true", help="replace an output file of another series")
    ap.add_argument("--progress-every", type=float, default=SeriesOptions.progress_every, metavar="S",
                    help="seconds between progress lines when not on a terminal (0: no progress lines)")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    ctx = runner.launch()
    should_stop = runner.install_sigterm() if ctx.rank == 0 else (lambda: None)
    return run_series(ctx, lambda: load_job(args.job, args.set),
                      SeriesOptions(out=args.out, overwrite=args.overwrite, progress_every=args.progress_every),
                      should_stop=should_stop)


def cli() -> None:
    finish(run_cli(main), all_closed)


class _Command(types.ModuleType):
    """`lldist.series(...)` is lldist.api.series: this module is the command and, called, the
    function (one name cannot be both a submodule and a function of the package otherwise:
    importing the submodule would bind it over the function)."""

    def __call__(self, *args, **kwargs):
        from .api.series import series
        return series(*args, **kwargs)


sys.modules[__name__].__class__ = _Command


if __name__ == "__main__":
    cli()
