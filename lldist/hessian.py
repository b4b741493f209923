"""The Hessian at theta*, alone: `python -m lldist.hessian job.yaml [--top 5] [--density]`.

Loads the job's model and data (training it first if the checkpoint is missing), takes the
first `--batches` batches of one split, and computes with `evaluation.curvature` the largest
eigenvalues, the smallest, Hutchinson's trace and, with `--density`, the spectral density;
prints them and stores them under /curvature/<split> of the job's output file if it exists.
"""

from __future__ import annotations

from .evaluation.curvature import Curvature, first_batches


def at_optimum(job, top: int = 5, samples: int = 64, batches: int = 4, log=print, split: str = None,
               density_runs: int = 0, density_steps: int = 80) -> dict:
    """Curvature at theta* of a job's model on one split (default its first): the `top` largest
    eigenvalues, the smallest, Hutchinson's trace and, with density_runs > 0, the spectral
    density's quadrature. Runs where the job's data and checkpoint are."""
    import time

    from .errors import UserError
    from .surface import Source, ensure_checkpoint
    ensure_checkpoint(job)
    src = Source()
    loaded = src.load(job)
    split = split or next(iter(loaded.splits))
    if split not in loaded.splits:
        raise UserError(f"--split {split}: the job evaluates {', '.join(loaded.splits)}")
    data = loaded.splits[split]
    bs = job.eval.batch_size if job.eval.batch_size != "auto" else 256
    chosen = first_batches(data, bs, batches)
    curv = Curvature(loaded.model, chosen, src.make_task(job))
    t = time.perf_counter()
    vals, _ = curv.eigs(k=min(top, curv.n - 1), which="LA")
    lo = float(curv.eigs(1, "SA")[0][0])
    tr, err = curv.trace(samples) if samples > 0 else (float("nan"), float("nan"))
    out = {"split": split, "batches": len(chosen), "batches_requested": batches, "batch_size": bs, "loss": curv.loss(),
           "top_eigenvalues": [float(v) for v in vals], "lambda_max": float(vals[0]), "lambda_min": lo,
           "eig_ratio": abs(lo / float(vals[0])) if vals[0] else float("nan"),
           "trace": tr, "trace_stderr": err, "trace_samples": samples}
    if density_runs > 0:
        nodes, weights = curv.density(density_runs, density_steps)
        out.update(density_nodes=nodes, density_weights=weights)
    out.update(hessian_vector_products=curv.matvecs, seconds=time.perf_counter() - t, num_parameters=curv.n)
    log(f"curvature at theta* on {split} ({len(chosen)} batches of {bs}, loss {out['loss']:.6g}): "
        f"top eigenvalues {', '.join(f'{v:.6g}' for v in out['top_eigenvalues'])}; lambda_min {lo:.6g}; "
        f"trace {tr:.6g} +- {err:.2g} ({samples} Hutchinson samples)"
        + (f"; spectral density from {density_runs} x {nodes.shape[1]} Lanczos steps" if density_runs > 0 else "")
        + f"; {curv.matvecs} Hessian-vector products in {out['seconds']:.1f} s")
    return out


def main(argv=None) -> int:
    import argparse
    import os

    from .config import load_job
    from .errors import UserError
    ap = argparse.ArgumentParser(prog="python -m lldist.hessian",
                                 description="Hessian eigenvalues and trace of a job's model at theta*")
    ap.add_argument("job")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--top", type=int, default=5, help="largest eigenvalues to compute")
    ap.add_argument("--trace-samples", type=int, default=64)
    ap.add_argument("--batches", type=int, default=4, help="batches of eval.batch_size the Hessian is taken on")
    ap.add_argument("--split", help="train or test (default: the job's first split)")
    ap.add_argument("--density", action="store_true",
                    help="also the eigenvalue spectral density (stochastic Lanczos quadrature)")
    ap.add_argument("--density-runs", type=int, default=4, help="start vectors of the density")
    ap.add_argument("--density-steps", type=int, default=80, help="Lanczos steps per start vector")
    ap.add_argument("--out", help="surface file to store the numbers in (default: the job's output, if it exists)")
    args = ap.parse_args(argv)
    job = load_job(args.job, args.set)
    for name in ("top", "batches", "density_runs", "density_steps"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} {getattr(args, name)}: must be at least 1")
    if args.trace_samples < 0:
        raise UserError(f"--trace-samples {args.trace_samples}: must be 0 (no trace) or more")
    res = at_optimum(job, args.top, args.trace_samples, args.batches, log=lambda m: print("lldist: " + m, flush=True),
                     split=args.split,
                     density_runs=args.density_runs if args.density else 0, density_steps=args.density_steps)
    path = args.out or job.output
    if os.path.exists(path):
        from .store import write_curvature
        write_curvature(path, res)
        print(f"lldist: stored in {path} under /curvature/{res['split']}")
    return 0


def cli() -> None:
    import sys

    from .errors import run_cli
    sys.exit(run_cli(main))


if __name__ == "__main__":
    cli()
