"""The Hessian at θ* of a job's model: its top eigenvalues, the smallest, Hutchinson's trace
and the spectral density (`python -m lldist.hessian`, and the study at every variant's θ*).

    res = at_optimum(job, top=5, samples=64, batches=4)   # a dict, as stored under /curvature/<split>
"""

from __future__ import annotations

import json
import time

import torch

from .errors import UserError
from .evaluation.curvature import Curvature, Watch, first_batches
from .loading import Source, ready_at_optimum

MAX_TOP = 1000  # eigenpairs by Lanczos: beyond a few hundred, the density is the tool


def store_target(path: str, job, explicit: bool, what: str = "the Hessian"):
    """Where the numbers at theta* (`what`: the Hessian, the sharpness) may be stored: `path`
    when it is an lldist surface of this job's model (same checkpoint content, or the same model
    section when there is none), None when the job's own output does not exist yet. Refuses
    anything else before any work."""
    import os

    from . import identity
    from .config import effective_raw
    from .store import SurfaceReader
    if not os.path.exists(path):
        if explicit:
            raise UserError(f"--out {path} does not exist: {what} is stored into an existing surface of this "
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
        raise UserError(f"{path} is a surface of another model or checkpoint than {job.source}'s; {what} of "
                        "this job is not stored there (give --out a surface of this job)")
    return path


def jackknife_se(leave_one_out: list) -> float:
    """The jackknife's standard error from the n leave-one-out estimates:
    sqrt((n − 1)/n · Σ (θ_(i) − mean)²) (Efron and Stein; Quenouille)."""
    import numpy as np
    v = np.asarray(leave_one_out, dtype=float)
    n = len(v)
    return float(np.sqrt((n - 1) / n * np.sum((v - v.mean()) ** 2))) if n > 1 else float("nan")


def at_optimum(job, top: int = 5, samples: int = 64, batches: int = 4, log=print, split: str = None,
               density_runs: int = 0, density_steps: int = 80, should_stop=lambda: None, spread=None,
               block_top: bool = True, tol: float = 1e-4, smallest: bool = True, jackknife: bool = True) -> dict:
    """Curvature at theta* of a job's model on one split (default its first), of the job's
    curvature.operator (the Hessian by default): the `top` largest eigenvalues, the smallest,
    Hutchinson's trace (± its standard error), lambda_max's standard error over the batches
    (the jackknife: a Lanczos run without each batch; `jackknife=False` skips it), with
    density_runs > 0 the spectral density's quadrature, and with
    curvature.blocks the top eigenvalue (unless not `block_top`: a Lanczos run per block) and
    the trace of each block (from the whole trace's products: Curvature.trace). Runs where the job's data and
    checkpoint are. `should_stop` is asked after every product (and every training batch): a
    signal ends it within one, with errors.Stopped; progress is logged every 10 s.

    `spread` (transport.runner.Products, under MPI): every rank calls this; each computes its
    share of every product's batches; rank 0 drives and returns the dict, the others None."""
    from .evaluation.blocks import blocks as block_names
    from .evaluation.curvature import serve
    from .evaluation.operators import DESCRIPTION
    driver = ready_at_optimum(job, spread, should_stop, log)
    src = Source()
    loaded = src.load(job)
    split = split or next(iter(loaded.splits))
    if split not in loaded.splits:
        raise UserError(f"--split {split}: the job evaluates {', '.join(loaded.splits)}")
    data = loaded.splits[split]
    bs = job.eval.batch_size if job.eval.batch_size != "auto" else 256
    chosen = first_batches(data, bs, batches)
    op = job.curvature.operator
    what = f"{op if op != 'hessian' else 'Hessian'} at theta* of {job.name}"
    watch = Watch(what, should_stop, log) if driver else None
    task = src.make_task(job)
    curv = Curvature(loaded.model, chosen, task, watch=watch, operator=op, spread=spread, key="all")
    parts = {}
    if job.curvature.blocks is not None:
        try:
            named = block_names(loaded.model, job.curvature.blocks, among=curv.names)
        except ValueError as e:
            raise UserError(str(e))
        parts = {b: Curvature(loaded.model, chosen, task, watch=watch, operator=op, names=ps, spread=spread, key=b,
                              guard=curv.guard) for b, ps in named.items()}
    # the jackknife over batches: the operator without batch b, for each b (lambda_max's error bar)
    jack = {f"without batch {b}": Curvature(loaded.model, chosen[:b] + chosen[b + 1:], task, watch=watch, operator=op,
                                            spread=spread, key=f"jack{b}", guard=curv.guard)
            for b in range(len(chosen))} if jackknife and len(chosen) > 1 else {}
    if not driver:
        serve(spread, {"all": curv, **parts, **{c.key: c for c in jack.values()}})
        return None
    try:
        res = _compute(job, curv, parts, watch, top, samples, density_runs, density_steps, log, split, len(chosen),
                       batches, bs, what, DESCRIPTION[op], spread, block_top, tol, smallest)
        if jack:
            watch.stage = f"lambda_max without each of the {len(jack)} batches (the jackknife)"
            t = time.perf_counter()
            each = [float(c.eigs(1, "LA", tol)[0][0]) for c in jack.values()]
            res.update(lambda_max_jackknife=each, lambda_max_se=jackknife_se(each))
            res["hessian_vector_products"] += sum(c.matvecs for c in jack.values())
            res["seconds"] += time.perf_counter() - t
            log(f"lambda_max {res['lambda_max']:.6g} +- {res['lambda_max_se']:.2g} (jackknife over {len(each)} batches: "
                + ", ".join(f"{v:.5g}" for v in each) + ")")
        return res
    finally:
        if spread is not None:
            spread.end()


def _compute(job, curv, parts, watch, top, samples, density_runs, density_steps, log, split, nchosen, batches, bs,
             what, description, spread, block_top, tol, smallest) -> dict:
    if top >= curv.n:
        raise UserError(f"--top {top}: the model has {curv.n:,} parameters, so at most {curv.n - 1:,} eigenvalues "
                        "can be asked of Lanczos (--density gives the whole spectrum's shape)")
    t = time.perf_counter()
    ranks = spread.size if spread is not None else 1
    log(f"{what} on {split}: {curv.n:,} parameters, {nchosen} batches of {bs}"
        + (f", products over {ranks} ranks" if ranks > 1 else ""))
    if curv.guard.note:
        log(curv.guard.note)
    watch.stage = f"top {top} eigenvalues"
    vals, _ = curv.eigs(k=top, which="LA", tol=tol)
    watch.stage = "the smallest eigenvalue"
    lo = curv.smallest(tol, top=float(vals[0])) if smallest else float("nan")
    watch.stage = f"the trace ({samples} samples)"
    named = {b: c.names for b, c in parts.items()}  # the blocks' traces come from the same products
    nan = (float("nan"), float("nan"))
    (tr, err), block_traces = curv.trace(samples, blocks=named) if samples > 0 else (nan, {b: nan for b in named})
    out = {"split": split, "operator": curv.operator, "operator_description": description,
           "batches": nchosen, "batches_requested": batches, "batch_size": bs, "loss": curv.loss(),
           "top_eigenvalues": [float(v) for v in vals], "lambda_max": float(vals[0]), "lambda_min": lo,
           "eig_ratio": abs(lo / float(vals[0])) if vals[0] else float("nan"),
           "trace": tr, "trace_stderr": err, "trace_samples": samples, "ranks": ranks, "lanczos_tol": tol}
    if curv.guard.note:
        out["attention"] = curv.guard.note
    if density_runs > 0:
        watch.stage = f"the density ({density_runs} x {density_steps} Lanczos steps)"
        nodes, weights = curv.density(density_runs, density_steps)
        out.update(density_nodes=nodes, density_weights=weights)
    products = curv.matvecs
    if parts:
        rows = []
        for b, c in parts.items():
            top_b = float("nan")
            if block_top:
                watch.stage = f"block {b} ({c.n:,} parameters)"
                top_b = float(c.eigs(1, "LA", tol)[0][0]) if c.n > 1 else float(c.hvp(torch.ones(c.n, dtype=c.dtype))[0])
            tr_b, err_b = block_traces[b]
            rows.append({"block": b, "parameters": c.n, "lambda_max": top_b, "trace": tr_b, "trace_stderr": err_b})
            products += c.matvecs
        out["blocks"] = rows
        out["blocks_spec"] = json.dumps(job.curvature.blocks)  # (a name or a mapping: decoded by the reader)
        log("per block (top eigenvalue, trace): " + "; ".join(
            f"{r['block']} {r['lambda_max']:.4g}, {r['trace']:.4g}" for r in rows))
    out.update(hessian_vector_products=products, seconds=time.perf_counter() - t, num_parameters=curv.n)
    log(f"{what} on {split} ({nchosen} batches of {bs}, loss {out['loss']:.6g}): "
        f"top eigenvalues {', '.join(f'{v:.6g}' for v in out['top_eigenvalues'])}; lambda_min {lo:.6g}; "
        f"trace {tr:.6g} +- {err:.2g} ({samples} Hutchinson samples)"
        + (f"; spectral density from {density_runs} x {out['density_nodes'].shape[1]} Lanczos steps"
           if density_runs > 0 else "")
        + f"; {products} products in {out['seconds']:.1f} s")
    return out
