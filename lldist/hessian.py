"""The Hessian at θ*, alone: `python -m lldist.hessian job.yaml [--top 5] [--density]`, or over
ranks: `mpirun -n 4 python -m lldist.hessian job.yaml`.

Loads the job's model and data (training it first if the checkpoint is missing), takes the
first `--batches` batches of one split, and computes (lldist/runs/hessian.py) the largest
eigenvalues, the smallest, Hutchinson's trace, the top eigenvalue's standard error over the
batches (the jackknife) and, with `--density`, the spectral density; with the job's
`curvature.blocks`, the top eigenvalue and trace of each block; of the job's
`curvature.operator` (hessian, ggn or fisher). Every flag is a key of the job's `curvature:`
section, which gives the defaults: the flag wins. Prints the numbers and stores them under
/curvature/<split> (<split>_ggn, <split>_fisher) of the job's output file if it exists. Under
MPI every product's batches are split over the ranks; rank 0 runs Lanczos, prints and stores.
With `eval.group_size: k` and `eval.group_mode: shard` on k ranks the model is sharded over
them and no rank holds it or a whole Lanczos vector (lldist/runs/sharded_hessian.py).
"""

from __future__ import annotations

import argparse
import dataclasses

from .config import CurvatureConfig, curvature_problem, load_job
from .errors import ArgumentParser, UserError, finish, run_cli

D = CurvatureConfig()
# flag -> (help); each is the curvature: key of the same name (dashes for underscores), and
# takes its default from there (argparse's default None: the job's value stands)
FLAGS = {
    "top": (int, f"largest eigenvalues to compute (default {D.top})"),
    "trace_samples": (int, f"Rademacher vectors of Hutchinson's trace estimate (0: no trace; default {D.trace_samples})"),
    "batches": (int, f"batches of eval.batch_size the Hessian is taken on (default {D.batches})"),
    "split": (str, "train or test (default: the job's first split)"),
    "density_runs": (int, f"start vectors of the density (default {D.density_runs})"),
    "density_steps": (int, f"Lanczos steps per start vector (default {D.density_steps})"),
    "tol": (float, f"Lanczos's relative tolerance of the eigenvalues (eigsh's tol, default {D.tol:g}; a large "
                   "model's smallest eigenvalue, beside a bulk near 0, may take hundreds of products at 1e-4: "
                   "1e-2 gives two digits). It is relative to the largest: the GGN's and the Fisher's lambda_min, "
                   "0 in exact arithmetic (both are positive semidefinite), come out within about tol x "
                   "lambda_max of 0"),
    "basis_memory": (float, f"bytes of Lanczos basis a rank keeps in memory (default {D.basis_memory:g}): one "
                            "process cuts eigsh's basis to fit (more restarts); over ranks (each holding a piece of "
                            "every vector) the later vectors go to a file in the temp folder (TMPDIR), the same "
                            "numbers"),
}
SWITCHES = {
    "density": "also the eigenvalue spectral density (stochastic Lanczos quadrature)",
    "smallest": "the smallest eigenvalue too (--no-smallest: not; on a large model with a bulk of tiny negative "
                "eigenvalues and a Lanczos basis cut to fit memory it may not converge)",
    "block_top": "with curvature.blocks, each block's top eigenvalue (a Lanczos run per block; --no-block-top: only "
                 "the blocks' traces, which come from the trace's own products)",
    "jackknife": "lambda_max's standard error over the batches: a Lanczos run without each batch (--no-jackknife: "
                 "not; it costs about one more top-eigenvalue run per batch)",
}


def settings(args, job):
    """The job's curvature: section with the flags given on top; a bad value is refused naming
    the flag (or the key, when the job file gave it)."""
    given = {k: getattr(args, k) for k in (*FLAGS, *SWITCHES) if getattr(args, k) is not None}
    c = dataclasses.replace(job.curvature, **given)
    bad = curvature_problem(c)
    if bad:
        field, why = bad
        if field in given:
            raise UserError(f"--{field.replace('_', '-')} {getattr(c, field)}: {why}")
        raise UserError(f"{job.source}: key 'curvature.{field}' is {getattr(c, field)!r}: {why}")
    return dataclasses.replace(job, curvature=c)


def read(argv):
    """(args, job): the command line read, the job loaded and the flags applied."""
    ap = ArgumentParser(prog="python -m lldist.hessian", doc=__doc__)
    ap.add_argument("job", help="job file (YAML)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a job key, e.g. --set eval.batch_size=128 (repeatable)")
    for name, (kind, text) in FLAGS.items():
        ap.add_argument("--" + name.replace("_", "-"), type=kind, default=None, help=text)
    ap.add_argument("--density", action="store_true", default=None, help=SWITCHES["density"])
    for name in ("smallest", "block_top", "jackknife"):
        ap.add_argument("--" + name.replace("_", "-"), action=argparse.BooleanOptionalAction, default=None,
                        help=SWITCHES[name] + f" (default {getattr(D, name)})")
    ap.add_argument("--out", help="surface file to store the numbers in (default: the job's output, if it exists)")
    args = ap.parse_args(argv)
    return args, settings(args, load_job(args.job, args.set))


def main(argv=None) -> int:
    from .runs.hessian import HESSIAN
    from .runs.optimum import measure_and_store, read_checked
    from .transport import runner
    ctx = runner.launch()
    args, job = read_checked(ctx, lambda: read(argv), HESSIAN)  # once: a refusal is one line, not one per rank
    return measure_and_store(ctx, job, HESSIAN, args.out)


def cli() -> None:
    from .store import all_closed
    finish(run_cli(main), all_closed)


if __name__ == "__main__":
    cli()
