"""Connect two minima by a low-loss curve (Garipov et al. 2018), and compare it with the line.

    python -m lldist.connect a.pt b.pt job.yaml                 # the job names the model and data
    mpirun -n 4 python -m lldist.connect a.pt b.pt job.yaml --set connect.curve=polychain
    python -m lldist.connect a.pt b.pt job.yaml --out runs/ab --set connect.align=weights

Trains the bend of a quadratic Bezier curve (or a polygonal chain with one bend) from a to b
with the job's trainer and task (the `connect:` section: curve, train, points, plane, margin,
align, output), then computes, each as a surface file in the output folder (default
runs/connect/<a>_<b>): curve.h5 (loss and accuracy along the curve, t from 0 to 1), line.h5
(the straight line), line_aligned.h5 (with connect.align), plane.h5 (the plane through a, b
and the bend, with the curve drawn). Prints each path's barrier (lldist.metrics). Re-running
the same command resumes: the bend is reused, only cells not done are computed. What is done
and why: lldist/runs/connect.py.
"""

from __future__ import annotations


def read(argv):
    """(args, job, out): the command line read, the job made from it (the model at θ* is a), the
    output folder."""
    from .config import job_from_dict, load_job
    from .errors import ArgumentParser
    from .runs.connect import out_dir
    from .runs.surface import RunOptions
    ap = ArgumentParser(prog="python -m lldist.connect", doc=__doc__)
    ap.add_argument("a", help="the first minimum (a checkpoint)")
    ap.add_argument("b", help="the second minimum (a checkpoint of the same model)")
    ap.add_argument("job", nargs="?", help="job file (YAML) naming the model, data and evaluation")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a job key, e.g. --set connect.train.epochs=40 (repeatable)")
    ap.add_argument("--out", help="output folder (overrides connect.output)")
    ap.add_argument("--overwrite", action="store_true", help="train the bend again and replace the files")
    ap.add_argument("--progress-every", type=float, default=RunOptions.progress_every, metavar="S",
                    help="seconds between progress lines when not on a terminal (0: none)")
    args = ap.parse_args(argv)
    sets = [f"model.checkpoint={args.a}"] + args.set  # the model at theta* is a (what the job trains is not used)
    if args.job:
        job = load_job(args.job, sets)
    else:
        from .config import apply_override
        raw = {}
        for item in sets:
            apply_override(raw, item, "<command line>")
        job = job_from_dict(raw, "<command line>")
    return args, job, out_dir(job, args.a, args.b, args.out)


def main(argv=None) -> int:
    from .runs.connect import prepare, summary
    from .runs.optimum import agree
    from .runs.surface import RunOptions, log, run_surface
    from .transport import runner
    ctx = runner.launch()
    args, job, out = agree(ctx, lambda: read(argv))  # read once: a refusal is one line, not one per rank
    should_stop = runner.install_sigterm() if ctx.rank == 0 else (lambda: None)
    # rank 0 aligns b and trains the bend while the others wait; every rank then runs the same jobs
    plan = agree(ctx, lambda: prepare(job, args.a, args.b, out, args.overwrite, log, should_stop))
    if ctx.rank == 0:
        for line in plan.notes:
            log(line)
    for name, j in plan.jobs.items():
        if ctx.rank == 0:
            log(f"connect: {name} -> {j.output}")
        code = run_surface(ctx, lambda j=j: j, RunOptions(overwrite=args.overwrite, progress_every=args.progress_every),
                           should_stop=should_stop)
        if code:
            return code
    if ctx.rank == 0:
        for line in summary({n: j.output for n, j in plan.jobs.items()}):
            log(line)
        log(f"plot: python -m lldist.plot {plan.jobs['curve'].output} (and line.h5, plane.h5)")
    return 0


def cli() -> None:
    from .errors import finish, run_cli
    from .store import all_closed
    finish(run_cli(main), all_closed)


if __name__ == "__main__":
    cli()
