"""The Hessian at θ* of a job's model: its top eigenvalues, the smallest, Hutchinson's trace
and the spectral density (`python -m lldist.hessian`, and the study at every variant's θ*).

    res = at_optimum(job, top=5, samples=64, batches=4)   # a dict, as stored under /curvature/<split>
"""

from __future__ import annotations

import time

from .errors import UserError
from .evaluation.curvature import Curvature, Watch, first_batches
from .loading import Source, ensure_checkpoint

MAX_TOP = 1000  # eigenpairs by Lanczos: beyond a few hundred, the density is the tool


def store_target(path: str, job, explicit: bool):
    """Where the Hessian's numbers may be stored: `path` when it is an lldist surface of this
    job's model (same checkpoint content, or the same model section when there is none), None
    when the job's own output does not exist yet. Refuses anything else before any work."""
    import os

    from . import identity
    from .config import effective_raw
    from .store import SurfaceReader
    if not os.path.exists(path):
        if explicit:
            raise UserError(f"--out {path} does not exist: the Hessian is stored into an existing surface of this "
                            "job (run python -m lldist.surface first)")
        return None
    with SurfaceReader(path) as sf:  # UserError for anything that is not a surface
        theirs = sf.attr("checkpoint_sha256", "")
        raw = effective_raw(sf.job_yaml(), path)
    ck = job.model.checkpoint
    if ck and os.path.exists(ck):
        same = theirs == identity.file(ck)
    else:
        model = raw.get("model") or {}
        same = not theirs and model.get("name", "cnn") == job.model.name and (model.get("args") or {}) == job.model.args
    if not same:
        raise UserError(f"{path} is a surface of another model or checkpoint than {job.source}'s; the Hessian of "
                        "this job is not stored there (give --out a surface of this job)")
    return path


def at_optimum(job, top: int = 5, samples: int = 64, batches: int = 4, log=print, split: str = None,
               density_runs: int = 0, density_steps: int = 80, should_stop=lambda: None) -> dict:
    """Curvature at theta* of a job's model on one split (default its first): the `top` largest
    eigenvalues, the smallest, Hutchinson's trace and, with density_runs > 0, the spectral
    density's quadrature. Runs where the job's data and checkpoint are. `should_stop` is asked
    after every Hessian-vector product (and every training batch): a signal ends it within one,
    with errors.Stopped; progress is logged every 10 s."""
    ensure_checkpoint(job, should_stop, log)
    src = Source()
    loaded = src.load(job)
    split = split or next(iter(loaded.splits))
    if split not in loaded.splits:
        raise UserError(f"--split {split}: the job evaluates {', '.join(loaded.splits)}")
    data = loaded.splits[split]
    bs = job.eval.batch_size if job.eval.batch_size != "auto" else 256
    chosen = first_batches(data, bs, batches)
    watch = Watch(f"Hessian at theta* of {job.name}", should_stop, log)
    curv = Curvature(loaded.model, chosen, src.make_task(job), watch=watch)
    if top >= curv.n:
        raise UserError(f"--top {top}: the model has {curv.n:,} parameters, so at most {curv.n - 1:,} eigenvalues "
                        "can be asked of Lanczos (--density gives the whole spectrum's shape)")
    t = time.perf_counter()
    log(f"Hessian at theta* of {job.name} on {split}: {curv.n:,} parameters, {len(chosen)} batches of {bs}")
    watch.stage = f"top {top} eigenvalues"
    vals, _ = curv.eigs(k=top, which="LA")
    watch.stage = "the smallest eigenvalue"
    lo = float(curv.eigs(1, "SA")[0][0])
    watch.stage = f"the trace ({samples} samples)"
    tr, err = curv.trace(samples) if samples > 0 else (float("nan"), float("nan"))
    out = {"split": split, "batches": len(chosen), "batches_requested": batches, "batch_size": bs, "loss": curv.loss(),
           "top_eigenvalues": [float(v) for v in vals], "lambda_max": float(vals[0]), "lambda_min": lo,
           "eig_ratio": abs(lo / float(vals[0])) if vals[0] else float("nan"),
           "trace": tr, "trace_stderr": err, "trace_samples": samples}
    if density_runs > 0:
        watch.stage = f"the density ({density_runs} x {density_steps} Lanczos steps)"
        nodes, weights = curv.density(density_runs, density_steps)
        out.update(density_nodes=nodes, density_weights=weights)
    out.update(hessian_vector_products=curv.matvecs, seconds=time.perf_counter() - t, num_parameters=curv.n)
    log(f"curvature at theta* on {split} ({len(chosen)} batches of {bs}, loss {out['loss']:.6g}): "
        f"top eigenvalues {', '.join(f'{v:.6g}' for v in out['top_eigenvalues'])}; lambda_min {lo:.6g}; "
        f"trace {tr:.6g} +- {err:.2g} ({samples} Hutchinson samples)"
        + (f"; spectral density from {density_runs} x {nodes.shape[1]} Lanczos steps" if density_runs > 0 else "")
        + f"; {curv.matvecs} Hessian-vector products in {out['seconds']:.1f} s")
    return out
