"""A study: several variants of one job (model x batch size, or any keys), trained, surfaced,
measured and compared in one command.

    python -m lldist.study jobs/study_digits.yaml            # everything; resumes what exists
    mpirun -n 8 python -m lldist.study jobs/study_cifar10.yaml
    python -m lldist.study jobs/study_digits.yaml --report-only

The study file (lldist/inputs/study_file.py says what it holds) names the variants; each
lives in `<out>/<label>_<cross values>/` (model.pt, per-epoch checkpoints, surface.h5, plots),
with the Hessian and the sharpness measures at its θ* in its surface file (lldist/runs/study.py).
The report: `<out>/report.html` (self-contained, figures embedded), `<out>/report.md` (the
metrics tables, the verdicts), `<out>/figures/`.
"""

from __future__ import annotations

import os

from .errors import ArgumentParser, UserError, finish, run_cli


def read(argv):
    """(args, study): the command line read, the study file loaded and checked."""
    from .inputs.study_file import load_study
    ap = ArgumentParser(prog="python -m lldist.study", doc=__doc__)
    ap.add_argument("study", help="study file (YAML)")
    ap.add_argument("--only", nargs="+", metavar="VARIANT", help="run only these variants (no report)")
    ap.add_argument("--report-only", action="store_true", help="redraw the report from finished surfaces")
    ap.add_argument("--progress-every", type=float, default=30.0, metavar="S",
                    help="seconds between progress lines when not on a terminal (0: none)")
    args = ap.parse_args(argv)
    study = load_study(args.study)
    unknown = set(args.only or ()) - {v.name for v in study.variants}
    if unknown:
        raise UserError(f"--only: no variant {sorted(unknown)[0]!r} (variants: "
                        f"{', '.join(v.name for v in study.variants)})")
    return args, study


def main(argv=None) -> int:
    import matplotlib
    matplotlib.use("Agg")  # the report's figures are files
    from .runs.optimum import agree
    from .runs.study import StudyOptions, run_study
    from .transport import runner
    ctx = runner.launch()
    args, study = agree(ctx, lambda: read(argv))  # read once: a refusal is one line, not one per rank
    omp = os.environ.get("OMP_NUM_THREADS")
    made_by = f"{'OMP_NUM_THREADS=' + omp + ' ' if omp else ''}python -m lldist.study {args.study}"
    return run_study(ctx, study, StudyOptions(tuple(args.only) if args.only else None, args.report_only,
                                              args.progress_every, made_by))


def cli() -> None:
    from .store import all_closed
    finish(run_cli(main), all_closed)


if __name__ == "__main__":
    cli()
