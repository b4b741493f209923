"""The Hessian at θ* of a job's model (or its GGN, its empirical Fisher): the top eigenvalues,
the smallest, Hutchinson's trace, λmax's jackknife error, the spectral density and per-block
spectra, with the job's `curvature:` settings (`python -m lldist.hessian`, whose flags fill them,
and a study's variants: runs/optimum.py runs it on every rank and stores it).

    res = compute(job)                     # a dict, as stored under /curvature/<split>
    HESSIAN                                # the same as a runs.optimum.Measure

One process runs scipy's ARPACK on whole vectors (AtOptimum, below). Under MPI (`spread`:
transport.runner.Spread) every rank holds the model, computes exact products over its share of
the batches and its piece of every Lanczos vector (runs/sharded_hessian.py's compute_data,
evaluation/data_rows.py), so rank 0 holds no more than the others; it returns the result, the
others None. In a shard group the products go through the sharded model (the same file).
"""

from __future__ import annotations

import dataclasses
import json
import time
from typing import Optional

import numpy as np
import torch

from ..analysis.uncertainty import jackknife_se
from ..config import Job
from ..errors import UserError
from ..evaluation.blocks import blocks as block_names
from ..evaluation.curvature import Curvature, Watch, first_batches
from ..evaluation.operators import DESCRIPTION
from ..inputs.loading import Source
from ..store import SurfaceReader, write_curvature
from .optimum import Measure


class AtOptimum:
    """The operators of one computation at θ*: the whole model's on the chosen batches, each
    block's, and the jackknife's (the whole model's without each batch), all sharing one set of
    products' bookkeeping (`watch`). One process: over ranks, runs/sharded_hessian.py."""

    def __init__(self, job: Job, log=print, should_stop=lambda: None, source: Optional[Source] = None):
        self.job, self.settings, self.log = job, job.curvature, log
        s = self.settings
        # the split asked for is loaded whether or not the job's landscape evaluates it (the
        # literature's Hessian is the train loss's); by default the landscape's own first split
        self.split = s.split or job.splits[0]
        if self.split not in job.splits:
            job = dataclasses.replace(job, eval=dataclasses.replace(job.eval, split=self.split))
        source = source or Source()  # (a model and data given from Python: lldist.curvature)
        loaded = source.load(job)
        self.batch_size = job.eval.batch_size if job.eval.batch_size != "auto" else 256
        chosen = first_batches(loaded.splits[self.split], self.batch_size, s.batches)
        op = s.operator
        self.what = f"{op if op != 'hessian' else 'Hessian'} at theta* of {job.name}"
        self.watch = Watch(self.what, should_stop, log)
        task = source.make_task(job)

        def operator(batches, names=None, guard=None):
            return Curvature(loaded.model, batches, task, watch=self.watch, operator=op, names=names, guard=guard,
                             basis_bytes=s.basis_memory)
        self.whole = operator(chosen)
        self.nchosen = len(chosen)
        self.parts = {}
        if s.blocks is not None:
            try:
                named = block_names(loaded.model, s.blocks, among=self.whole.names)
            except ValueError as e:
                raise UserError(str(e))
            self.parts = {b: operator(chosen, ps, self.whole.guard) for b, ps in named.items()}
        # the jackknife over batches: the operator without batch b, for each b (lambda_max's error bar)
        self.jack = [operator(chosen[:b] + chosen[b + 1:], guard=self.whole.guard)
                     for b in range(len(chosen))] if s.jackknife and len(chosen) > 1 else []

    def spectrum(self) -> dict:
        """The whole operator: top eigenvalues, the smallest, the trace (and the blocks' traces
        from the same products), the density; the blocks' rows; the jackknife."""
        s, curv, watch, log = self.settings, self.whole, self.watch, self.log
        if s.top >= curv.n:
            raise UserError(f"--top {s.top}: the model has {curv.n:,} parameters, so at most {curv.n - 1:,} eigenvalues "
                            "can be asked of Lanczos (--density gives the whole spectrum's shape)")
        t = time.perf_counter()
        log(f"{self.what} on {self.split}: {curv.n:,} parameters, {self.nchosen} batches of {self.batch_size}")
        if curv.guard.note:
            log(curv.guard.note)
        watch.stage = f"top {s.top} eigenvalues"
        vals, _ = curv.eigs(k=s.top, which="LA", tol=s.tol)
        watch.stage = "the smallest eigenvalue"
        lo = curv.smallest(s.tol, top=float(vals[0])) if s.smallest else float("nan")
        watch.stage = f"the trace ({s.trace_samples} samples)"
        named = {b: c.names for b, c in self.parts.items()}  # the blocks' traces come from the same products
        nan = (float("nan"), float("nan"))
        (tr, err), block_traces = curv.trace(s.trace_samples, blocks=named) if s.trace_samples > 0 else \
            (nan, {b: nan for b in named})
        out = {"split": self.split, "operator": curv.operator, "operator_description": DESCRIPTION[s.operator],
               "batches": self.nchosen, "batches_requested": s.batches, "batch_size": self.batch_size,
               "loss": curv.loss(), "top_eigenvalues": [float(v) for v in vals], "lambda_max": float(vals[0]),
               "lambda_min": lo, "eig_ratio": abs(lo / float(vals[0])) if vals[0] else float("nan"),
               "trace": tr, "trace_stderr": err, "trace_samples": s.trace_samples, "ranks": 1,
               "lanczos_tol": s.tol}
        if curv.guard.note:
            out["attention"] = curv.guard.note
        runs = s.density_runs if s.density else 0
        if runs > 0:
            watch.stage = f"the density ({runs} x {s.density_steps} Lanczos steps)"
            nodes, weights = curv.density(runs, s.density_steps)
            out.update(density_nodes=nodes, density_weights=weights)
        products = curv.matvecs
        if self.parts:
            out["blocks"] = self.blocks(block_traces)
            out["blocks_spec"] = json.dumps(s.blocks)  # (a name or a mapping: decoded by the reader)
            products += sum(c.matvecs for c in self.parts.values())
        out.update(hessian_vector_products=products, seconds=time.perf_counter() - t, num_parameters=curv.n)
        log(f"{self.what} on {self.split} ({self.nchosen} batches of {self.batch_size}, loss {out['loss']:.6g}): "
            f"top eigenvalues {', '.join(f'{v:.6g}' for v in out['top_eigenvalues'])}"
            + (f"; lambda_min {lo:.6g}" if s.smallest else "")
            + (f"; trace {tr:.6g} +- {err:.2g} ({s.trace_samples} Hutchinson samples)" if s.trace_samples else "")
            + (f"; spectral density from {runs} x {out['density_nodes'].shape[1]} Lanczos steps" if runs > 0 else "")
            + f"; {products} products in {out['seconds']:.1f} s")
        if self.jack:
            self.jackknife(out)
        return out

    def blocks(self, traces: dict) -> list:
        """Per block: its size, top eigenvalue (unless not block_top) and trace (from the whole
        trace's products)."""
        rows = []
        for b, c in self.parts.items():
            top_b = float("nan")
            if self.settings.block_top:
                self.watch.stage = f"block {b} ({c.n:,} parameters)"
                top_b = float(c.eigs(1, "LA", self.settings.tol)[0][0]) if c.n > 1 else \
                    float(c.hvp(torch.ones(c.n, dtype=c.dtype))[0])
            tr_b, err_b = traces[b]
            rows.append({"block": b, "parameters": c.n, "lambda_max": top_b, "trace": tr_b, "trace_stderr": err_b})
        self.log("per block (top eigenvalue, trace): " + "; ".join(
            f"{r['block']} {r['lambda_max']:.4g}, {r['trace']:.4g}" for r in rows))
        return rows

    def jackknife(self, out: dict) -> None:
        """lambda_max without each batch, and its standard error, into `out`."""
        self.watch.stage = f"lambda_max without each of the {len(self.jack)} batches (the jackknife)"
        t = time.perf_counter()
        each = [float(c.eigs(1, "LA", self.settings.tol)[0][0]) for c in self.jack]
        out.update(lambda_max_jackknife=each, lambda_max_se=jackknife_se(each))
        out["hessian_vector_products"] += sum(c.matvecs for c in self.jack)
        out["seconds"] += time.perf_counter() - t
        self.log(f"lambda_max {out['lambda_max']:.6g} +- {out['lambda_max_se']:.2g} (jackknife over {len(each)} "
                 "batches: " + ", ".join(f"{v:.5g}" for v in each) + ")")


def compute(job: Job, spread=None, log=print, should_stop=lambda: None, source: Optional[Source] = None) -> Optional[dict]:
    """Curvature at θ* of the job's model with its `curvature:` settings (see the module
    docstring); runs where the job's data and checkpoint are, which must exist (runs.optimum's
    `ready` trains a missing one). `should_stop` is asked after every product: a signal ends it
    within one, with errors.Stopped; progress is logged every 10 s. `source`: where the model and
    data come from (the job's files by default). In a shard group (eval.group_mode: shard) the
    products go through the sharded model instead: runs/sharded_hessian.py."""
    if job.eval.group_size > 1 and job.eval.group_mode == "shard":
        from .sharded_hessian import compute as sharded
        return sharded(job, spread, log, should_stop, source)
    if spread is not None and spread.size > 1:
        from .sharded_hessian import compute_data
        return compute_data(job, spread, log, should_stop, source)
    return AtOptimum(job, log=log, should_stop=should_stop, source=source).spectrum()


def held(path: str, job: Job) -> bool:
    """Whether the surface holds the curvature these settings ask for (a study resumes): the same
    batches and trace samples, at least as many eigenvalues, the same blocks, and the smallest
    eigenvalue, the density and the jackknife where they are asked for."""
    s = job.curvature
    with SurfaceReader(path) as sf:
        old = sf.curvature(operator=s.operator).get(s.split, {})
    # a small split may hold fewer batches than asked: compare what was asked
    return old.get("batches_requested") == s.batches and old.get("trace_samples") == s.trace_samples and \
        len(old.get("top_eigenvalues", [])) >= s.top and old.get("blocks_spec", None) == s.blocks and \
        (not s.smallest or np.isfinite(old.get("lambda_min", np.nan))) and \
        (not s.density or "density_nodes" in old) and (not s.jackknife or "lambda_max_se" in old or old["batches"] < 2)


def check(job: Job, ranks: int) -> None:
    """A shard group's Hessian refuses what it cannot take (runs/sharded_hessian.py)."""
    if job.eval.group_size > 1 and job.eval.group_mode == "shard":
        from .sharded_hessian import check as sharded
        sharded(job, ranks)


HESSIAN = Measure("the Hessian", "curvature", compute, write_curvature, held, check)
