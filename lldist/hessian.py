"""The Hessian at theta*, alone: `python -m lldist.hessian job.yaml [--top 5] [--density]`,
or over ranks: `mpirun -n 4 python -m lldist.hessian job.yaml`.

Loads the job's model and data (training it first if the checkpoint is missing), takes the
first `--batches` batches of one split, and computes (lldist/optimum.py) the largest
eigenvalues, the smallest, Hutchinson's trace, the top eigenvalue's standard error over the
batches (the jackknife) and, with `--density`, the spectral density; with
the job's `curvature.blocks`, the top eigenvalue and trace of each block; of the job's
`curvature.operator` (hessian, ggn or fisher). Prints them and stores them under
/curvature/<split> (<split>_ggn, <split>_fisher) of the job's output file if it exists.
Under MPI every product's batches are split over the ranks (transport.runner.Products);
rank 0 runs Lanczos, prints and stores.
"""

from __future__ import annotations

import argparse

from .optimum import MAX_TOP, at_optimum, store_target


def main(argv=None) -> int:

    from .config import load_job
    from .errors import ArgumentParser, UserError
    ap = ArgumentParser(prog="python -m lldist.hessian", doc=__doc__)
    ap.add_argument("job", help="job file (YAML)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a job key, e.g. --set eval.batch_size=128 (repeatable)")
    ap.add_argument("--top", type=int, default=5, help="largest eigenvalues to compute")
    ap.add_argument("--trace-samples", type=int, default=64,
                    help="Rademacher vectors of Hutchinson's trace estimate (0: no trace)")
    ap.add_argument("--batches", type=int, default=4, help="batches of eval.batch_size the Hessian is taken on")
    ap.add_argument("--split", help="train or test (default: the job's first split)")
    ap.add_argument("--density", action="store_true",
                    help="also the eigenvalue spectral density (stochastic Lanczos quadrature)")
    ap.add_argument("--density-runs", type=int, default=4, help="start vectors of the density")
    ap.add_argument("--density-steps", type=int, default=80, help="Lanczos steps per start vector")
    ap.add_argument("--tol", type=float, default=1e-4,
                    help="Lanczos's relative tolerance of the eigenvalues (eigsh's tol; a large model's smallest "
                         "eigenvalue, beside a bulk near 0, may take hundreds of products at 1e-4: 1e-2 gives two digits)")
    ap.add_argument("--smallest", action=argparse.BooleanOptionalAction, default=True,
                    help="the smallest eigenvalue too (--no-smallest: not; on a large model with a bulk of tiny "
                         "negative eigenvalues and a Lanczos basis cut to fit memory it may not converge)")
    ap.add_argument("--block-top", action=argparse.BooleanOptionalAction, default=True,
                    help="with curvature.blocks, each block's top eigenvalue (a Lanczos run per block; "
                         "--no-block-top: only the blocks' traces, which come from the trace's own products)")
    ap.add_argument("--jackknife", action=argparse.BooleanOptionalAction, default=True,
                    help="lambda_max's standard error over the batches: a Lanczos run without each batch "
                         "(--no-jackknife: not; it costs about one more top-eigenvalue run per batch)")
    ap.add_argument("--out", help="surface file to store the numbers in (default: the job's output, if it exists)")
    args = ap.parse_args(argv)
    job = load_job(args.job, args.set)
    for name in ("top", "batches", "density_runs", "density_steps"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} {getattr(args, name)}: must be at least 1")
    if not 0 < args.tol < 1:
        raise UserError(f"--tol {args.tol}: must be between 0 and 1 (a relative tolerance)")
    if args.trace_samples < 0:
        raise UserError(f"--trace-samples {args.trace_samples}: must be 0 (no trace) or more")
    if args.top > MAX_TOP:
        raise UserError(f"--top {args.top}: at most {MAX_TOP} eigenvalues by Lanczos; --density gives the shape of the "
                        "whole spectrum")
    from .transport import runner
    ctx = runner.launch()
    spread = runner.Products(ctx) if ctx.size > 1 else None
    driver = ctx.rank == 0
    try:
        # refused now, not after the work
        path = store_target(args.out or job.output, job, explicit=bool(args.out)) if driver else None
        res = at_optimum(job, args.top, args.trace_samples, args.batches,
                         log=(lambda m: print("lldist: " + m, flush=True)) if driver else (lambda m: None),
                         should_stop=runner.install_sigterm() if driver else (lambda: None), split=args.split,
                         density_runs=args.density_runs if args.density else 0, density_steps=args.density_steps,
                         spread=spread, block_top=args.block_top, tol=args.tol, smallest=args.smallest,
                         jackknife=args.jackknife)
    except BaseException as e:
        if spread is not None:
            spread.fail(e)  # rank 0 and the others wait on each other: end every rank
        raise
    if not driver:
        return 0
    if path is None:
        print(f"lldist: not stored: {job.output} does not exist yet (run python -m lldist.surface, or give --out)")
        return 0
    path = store_target(path, job, explicit=True)  # again: a missing checkpoint was trained meanwhile
    from .store import write_curvature
    key = write_curvature(path, res)
    print(f"lldist: stored in {path} under /curvature/{key}")
    return 0


def cli() -> None:
    from .errors import finish, run_cli
    from .store import all_closed
    finish(run_cli(main), all_closed)


if __name__ == "__main__":
    cli()
