"""The Hessian at θ* of a model sharded over a rank group: `mpirun -n k python -m lldist.hessian
job.yaml --set eval.group_size=k --set eval.group_mode=shard` (runs/hessian.py sends a shard
group here). No rank holds the model, the Hessian or a whole Lanczos vector.

    res = compute(job, spread)         # every rank of the group; rank 0 returns the dict it stores

The group builds the model on the meta device in float64 and each rank reads its rows of θ*
(inputs/rows.py; built whole and then sharded, with a note, where it cannot be). Products are
central differences of FSDP2's sharded gradient (evaluation/sharded.py says why and how
accurate); Lanczos runs on every rank on its rows of every vector, with all-reduced dot
products, so every rank takes the same steps. It computes what the one-process Hessian
computes (runs/hessian.py): the top eigenvalues, the smallest, Hutchinson's trace with the same
Rademacher vectors, per-block traces and top eigenvalues, λmax's jackknife over the batches,
and the spectral density; of the Hessian, the GGN or the empirical Fisher (curvature.operator).

Over ranks without a shard group (`mpirun -n N python -m lldist.hessian job.yaml`), runs/hessian.py
sends the run to `compute_data`: every rank holds the whole model and takes exact products over
its share of the batches (evaluation/data_rows.py), and the same Lanczos runs on each rank's
piece of every vector, so rank 0 holds no more than the others. Both share `spectrum`.

    res = compute_data(job, spread)    # every rank; rank 0 returns the dict it stores
"""

from __future__ import annotations

import dataclasses
import math
import tempfile
import time
from typing import Callable, Optional

import torch

from ..analysis.uncertainty import jackknife_se
from ..config import Job
from ..errors import UserError
from ..evaluation.blocks import blocks as block_names
from ..evaluation.curvature import Watch, first_batches
from ..evaluation.operators import DESCRIPTION
from ..evaluation.sharded import EPS_SCALE, Sharded
from ..inputs import rows
from ..evaluation.tasks import to_device
from ..inputs.loading import Source

STEP = f"each entry moved by {EPS_SCALE:.3g} x max(1, rms(theta)) on average"
PRODUCT = {"hessian": f"central differences of the FSDP2-sharded gradient in float64, {STEP}",
           "ggn": f"J v by central differences of the logits in float64 ({STEP}), H_out exact, J^T by the "
                  "FSDP2-sharded backward",
           "fisher": f"g_i . v by central differences of each example's loss in float64 ({STEP}), then one "
                     "FSDP2-sharded backward"}


def check(job: Job, ranks: int) -> None:
    """What a shard group's Hessian cannot take, refused in one line before any work."""
    k = job.eval.group_size
    if ranks != k:
        raise UserError(f"{job.source}: key 'eval.group_size' is {k} with group_mode shard, but the run has {ranks} "
                        f"rank(s): the sharded Hessian runs in one group (mpirun -n {k} ...)")


def compute(job: Job, spread=None, log=print, should_stop=lambda: None,
            source: Optional[Source] = None) -> Optional[dict]:
    from ..evaluation.evaluator import device_for_rank
    from .optimum import join_group
    ranks = spread.size if spread is not None else 1
    check(job, ranks)
    s = job.curvature
    driver = spread.rank == 0
    split = s.split or job.splits[0]
    # that split, in float32 as stored (the group's model is float64 whatever eval.precision says)
    job = dataclasses.replace(job, eval=dataclasses.replace(job.eval, split=split, precision="fp32"))
    src = source or Source()
    device = device_for_rank(spread.ctx.local_rank, job.eval.device)
    group = join_group(job, spread, device)
    loaded = rows.for_group(job, src, group, device, log, torch.float64)
    bs = job.eval.batch_size if job.eval.batch_size != "auto" else 256
    chosen = [to_device(b, device) for b in first_batches(loaded.splits[split], bs, s.batches, torch.float64)]
    task = src.make_task(job)
    what = f"{s.operator if s.operator != 'hessian' else 'Hessian'} at theta* of {job.name}"
    watch = Watch(what, should_stop, log) if driver else Watch(what)

    def make(batches, names=None):
        return Sharded(loaded.model, batches, task, group, names=names, watch=watch, operator=s.operator,
                       basis_bytes=s.basis_memory)
    out = spectrum(job, make, chosen, loaded.model, log, watch, bs, split,
                   f"in one shard group of {group.size} (products: {PRODUCT[s.operator]})")
    out.update(ranks=ranks, group_size=group.size, group_mode="shard", product=PRODUCT[s.operator])
    return out if driver else None


def compute_data(job: Job, spread, log=print, should_stop=lambda: None,
                 source: Optional[Source] = None) -> Optional[dict]:
    """The Hessian at θ* over a data group of every rank (spread.size > 1, no shard group):
    each rank holds the whole model and takes exact products over its share of the batches,
    and Lanczos runs on every rank over its piece of every vector (evaluation/data_rows.py).
    Rank 0 returns the result, the others None."""
    import torch.distributed as dist

    from ..evaluation.data_rows import DataRows, Tally
    from ..evaluation.evaluator import device_for_rank
    from ..evaluation.groups import GroupSpec, init_process_group
    s = job.curvature
    split = s.split or job.splits[0]
    if split not in job.splits:
        job = dataclasses.replace(job, eval=dataclasses.replace(job.eval, split=split))
    src = source or Source()
    device = device_for_rank(spread.ctx.local_rank, job.eval.device)
    world = spread.group(spread.size)
    init_process_group(GroupSpec(world.rank, world.size, "data"), world.bcast, device,
                       world.collective_link(device))
    try:
        loaded = src.load(job)
        model = loaded.model.to(device)
        bs = job.eval.batch_size if job.eval.batch_size != "auto" else 256
        chosen = [to_device(b, device) for b in first_batches(loaded.splits[split], bs, s.batches)]
        task = src.make_task(job)
        what = f"{s.operator if s.operator != 'hessian' else 'Hessian'} at theta* of {job.name}"
        watch = Watch(what, should_stop, log) if spread.rank == 0 else Watch(what)
        # the whole operator is kept (its guard, its layout); the blocks' and the jackknife's are
        # let go once used (each holds a copy of its parameters), their costs kept in the tally
        whole, scratch, tally = [], {}, Tally()

        def make(batches, names=None):
            op = DataRows(model, batches, task, spread.rank, spread.size, names=names, watch=watch,
                          operator=s.operator, basis_bytes=s.basis_memory, guard=whole[0].guard if whole else None,
                          scratch=scratch, tally=tally)
            if not whole:
                whole.append(op)
            return op
        out = spectrum(job, make, chosen, model, log, watch, bs, split,
                       f"products over {spread.size} ranks, each vector split over them",
                       lambda op: op.guard.note and log(op.guard.note))
        if whole[0].guard.note:
            out["attention"] = whole[0].guard.note
        out.update(ranks=spread.size, group_size=spread.size, group_mode="data",
                   product=f"exact ({DESCRIPTION[s.operator]}), each rank over its share of the batches",
                   vector_entries_per_rank=whole[0].piece, **_ranks_record(tally, log))
        return out if spread.rank == 0 else None
    finally:
        dist.destroy_process_group()


def _ranks_record(tally, log) -> dict:
    """Every rank's peak resident memory (MiB) and the share of its products' time spent on its
    own share of the batches (the rest: collectives and waiting; data_rows.Tally), gathered
    (collective)."""
    import resource

    import torch.distributed as dist
    mine = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            tally.busy / tally.spent if tally.spent else math.nan, tally.spent / max(1, tally.products))
    every = [None] * dist.get_world_size()
    dist.all_gather_object(every, mine)
    peak, share, each = (list(x) for x in zip(*every))
    log("per rank: peak resident " + ", ".join(f"{m:,.0f}" for m in peak) + " MiB; busy "
        + ", ".join(f"{b:.0%}" for b in share) + " of each product (the rest waits on the others); "
        f"{each[0]:.3g} s a product")
    return {"rank_peak_mib": peak, "rank_busy_share": share, "seconds_per_product": each[0]}


def spectrum(job: Job, make: Callable, chosen: list, model, log, watch, bs: int, split: str, how: str,
             made: Callable = lambda op: None) -> dict:
    """What a Hessian at θ* computes (runs/hessian.py's AtOptimum.spectrum) with an operator on
    vectors in rows (evaluation/lanczos.py): `make(batches, names=None)` makes it, on the chosen
    batches or a jackknife's, in every parameter or a block's; `made(op)` is called on the whole
    operator once it is made (a data group says how its attention runs). On every rank,
    collectively."""
    s = job.curvature
    what = watch.what
    op = make(chosen)
    made(op)
    if s.top >= op.n:
        raise UserError(f"--top {s.top}: the model has {op.n:,} parameters, so at most {op.n - 1:,} eigenvalues "
                        "can be asked of Lanczos")
    t = time.perf_counter()
    log(f"{what} on {split}: {op.n:,} parameters, {len(chosen)} batches of {bs}, {how}")
    watch.stage = f"top {s.top} eigenvalues" + (" and the smallest" if s.smallest else "")
    top, lo, steps, converged = op.extremes(s.top, s.tol, s.smallest)
    if op.spilled:
        log(f"Lanczos basis: {op.kept} vectors of {op.vector_bytes / 1e6:.3g} MB a rank in memory "
            f"(curvature.basis_memory {s.basis_memory:g}), {op.spilled} more in a file in {tempfile.gettempdir()}")
    if not converged:
        log(f"note: Lanczos stopped at {steps} steps before the eigenvalues met tol {s.tol:g}")
    named = {}
    if s.blocks is not None:
        try:
            named = block_names(model, s.blocks, among=op.names)
        except ValueError as e:
            raise UserError(str(e))
    watch.stage = f"the trace ({s.trace_samples} samples)"
    nan = (math.nan, math.nan)
    (tr, err), block_traces = op.trace(s.trace_samples, blocks=named) if s.trace_samples > 0 else \
        (nan, {b: nan for b in named})
    out = {"split": split, "operator": s.operator, "operator_description": DESCRIPTION[s.operator],
           "batches": len(chosen), "batches_requested": s.batches, "batch_size": bs, "loss": op.loss(),
           "top_eigenvalues": top, "lambda_max": top[0], "lambda_min": lo,
           "eig_ratio": abs(lo / top[0]) if top[0] else math.nan, "trace": tr, "trace_stderr": err,
           "trace_samples": s.trace_samples, "lanczos_tol": s.tol, "lanczos_steps": steps, "lanczos_converged": converged}
    extra = 0  # the products of the blocks' and the jackknife's own runs
    if s.density:
        watch.stage = f"the density ({s.density_runs} x {s.density_steps} Lanczos steps)"
        out["density_nodes"], out["density_weights"] = op.density(s.density_runs, s.density_steps)
    if named:
        table = []
        for b, names in named.items():
            part = make(chosen, names)
            watch.stage = f"block {b} ({part.n:,} parameters)"
            top_b = part.extremes(1, s.tol, smallest=False)[0][0] if s.block_top and part.n > 1 else math.nan
            extra += part.matvecs
            table.append({"block": b, "parameters": part.n, "lambda_max": top_b, "trace": block_traces[b][0],
                          "trace_stderr": block_traces[b][1]})
        out["blocks"] = table
        import json
        out["blocks_spec"] = json.dumps(s.blocks)
        log("per block (top eigenvalue, trace): " + "; ".join(
            f"{r['block']} {r['lambda_max']:.4g}, {r['trace']:.4g}" for r in table))
    out["num_parameters"] = op.n
    log(f"{what} on {split} ({len(chosen)} batches of {bs}, loss {out['loss']:.6g}): top eigenvalues "
        f"{', '.join(f'{v:.6g}' for v in top)}" + (f"; lambda_min {lo:.6g}" if s.smallest else "")
        + (f"; trace {tr:.6g} +- {err:.2g} ({s.trace_samples} Hutchinson samples)" if s.trace_samples else "")
        + f"; {steps} Lanczos steps")
    if s.jackknife and len(chosen) > 1:
        watch.stage = f"lambda_max without each of the {len(chosen)} batches (the jackknife)"
        each = []
        for b in range(len(chosen)):
            part = make(chosen[:b] + chosen[b + 1:])
            each.append(part.extremes(1, s.tol, smallest=False)[0][0])
            extra += part.matvecs
        out.update(lambda_max_jackknife=each, lambda_max_se=jackknife_se(each))
        log(f"lambda_max {top[0]:.6g} +- {out['lambda_max_se']:.2g} (jackknife over {len(each)} batches)")
    out.update(hessian_vector_products=op.matvecs + extra, seconds=time.perf_counter() - t)
    return out


