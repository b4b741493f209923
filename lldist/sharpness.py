"""The sharpness measures at theta*: `python -m lldist.sharpness job.yaml`, or over ranks:
`mpirun -n 4 python -m lldist.sharpness job.yaml`.

Loads the job's model (training it first if the checkpoint is missing) and the first
`sharpness.examples` examples of `sharpness.split`, and computes (lldist/flatness.py) the
worst-case adaptive sharpness in the l2 and l-infinity balls, the average case, SAM's
m-sharpness and the PAC-Bayes flatness magnitude, with the settings of the job's `sharpness:`
section (docs/METRICS.md defines them). Prints them and stores them under /sharpness/<split>
of the job's output file if it exists. Under MPI the restarts, draws and groups are dealt over
the ranks; the numbers do not depend on how many.
"""

from __future__ import annotations


def main(argv=None) -> int:
    from .config import load_job
    from .errors import ArgumentParser
    from .flatness import measure
    from .optimum import store_target
    ap = ArgumentParser(prog="python -m lldist.sharpness", doc=__doc__)
    ap.add_argument("job", help="job file (YAML)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a job key, e.g. --set sharpness.restarts=8 (repeatable)")
    ap.add_argument("--out", help="surface file to store the numbers in (default: the job's output, if it exists)")
    args = ap.parse_args(argv)
    job = load_job(args.job, args.set)
    from .transport import runner
    ctx = runner.launch()
    spread = runner.Products(ctx) if ctx.size > 1 else None
    driver = ctx.rank == 0
    what = "the sharpness"
    try:
        path = store_target(args.out or job.output, job, explicit=bool(args.out), what=what) if driver else None
        res = measure(job, log=(lambda m: print("lldist: " + m, flush=True)) if driver else (lambda m: None),
                      should_stop=runner.install_sigterm() if driver else (lambda: None), spread=spread)
    except BaseException as e:
        if spread is not None:
            spread.fail(e)  # the ranks wait on each other: end every rank
        raise
    if not driver:
        return 0
    if path is None:
        print(f"lldist: not stored: {job.output} does not exist yet (run python -m lldist.surface, or give --out)")
        return 0
    path = store_target(path, job, explicit=True, what=what)  # again: a missing checkpoint was trained meanwhile
    from .store import write_sharpness
    key = write_sharpness(path, res)
    print(f"lldist: stored in {path} under /sharpness/{key}")
    return 0


def cli() -> None:
    from .errors import finish, run_cli
    from .store import all_closed
    finish(run_cli(main), all_closed)


if __name__ == "__main__":
    cli()
