"""The sharpness measures at θ*: `python -m lldist.sharpness job.yaml`, or over ranks:
`mpirun -n 4 python -m lldist.sharpness job.yaml`.

Loads the job's model (training it first if the checkpoint is missing) and the first
`sharpness.examples` examples of `sharpness.split`, and computes (lldist/runs/sharpness.py) the
worst-case adaptive sharpness in the l2 and l-infinity balls, the average case, SAM's
m-sharpness and the PAC-Bayes flatness magnitude, with the settings of the job's `sharpness:`
section (docs/METRICS.md defines them). Prints them and stores them under /sharpness/<split>
of the job's output file if it exists. Under MPI the restarts, draws and groups are dealt over
the ranks; the numbers do not depend on how many.
"""

from __future__ import annotations

from .config import load_job
from .errors import ArgumentParser, finish, run_cli


def read(argv):
    """(args, job): the command line read, the job loaded."""
    ap = ArgumentParser(prog="python -m lldist.sharpness", doc=__doc__)
    ap.add_argument("job", help="job file (YAML)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a job key, e.g. --set sharpness.restarts=8 (repeatable)")
    ap.add_argument("--out", help="surface file to store the numbers in (default: the job's output, if it exists)")
    args = ap.parse_args(argv)
    return args, load_job(args.job, args.set)


def main(argv=None) -> int:
    from .runs.optimum import measure_and_store, read_checked
    from .runs.sharpness import SHARPNESS
    from .transport import runner
    ctx = runner.launch()
    args, job = read_checked(ctx, lambda: read(argv), SHARPNESS)  # once: a refusal is one line, not one per rank
    return measure_and_store(ctx, job, SHARPNESS, args.out)


def cli() -> None:
    from .store import all_closed
    finish(run_cli(main), all_closed)


if __name__ == "__main__":
    cli()
