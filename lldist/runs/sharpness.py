"""The sharpness measures at θ* of a job's model: `python -m lldist.sharpness job.yaml`, and
a study's variants with `sharpness: true` (runs/optimum.py runs it on every rank and stores it).

    res = compute(job)          # a dict, as stored under /sharpness/<split> (store.write_sharpness)
    SHARPNESS                   # the same as a runs.optimum.Measure

Worst-case adaptive sharpness in the ℓ2 and ℓ∞ balls, the average case, SAM's m-sharpness
and the PAC-Bayes flatness magnitude (evaluation/sharpness.py defines them; the job's
`sharpness:` section sets them), on the first `sharpness.examples` examples of one split.
Under MPI (`spread`, transport.runner.Spread) restarts, draws and groups are dealt round
robin by index; every rank gets every result (`spread.gather`) and reduces them in index order,
so the numbers are the same on any number of ranks.

With `eval.group_size: k` they are dealt over groups of k ranks instead, each group computing
its share together (evaluation/sharpness.py): in `shard` mode through FSDP2, its model built on
the meta device with each rank reading only its rows (inputs/rows.py) where the job's model
can be, so that no rank holds the whole model; in `data` mode each member whole.
"""

from __future__ import annotations

import dataclasses
import math
import time

from ..errors import UserError
from ..evaluation.sharpness import Sharpness, bisect_sigma, mean_and_se, rows
from ..evaluation.tasks import batch_size
from ..inputs.loading import Source
from ..store import SurfaceReader, write_sharpness
from .optimum import Measure, join_group

NORMS = {"2": 2, "inf": math.inf}  # the worst case's balls, by the name its results carry


def _examples(data, bs: int, n: int, dtype) -> list:
    """The split's first n examples (fewer if it has fewer) in batches of bs."""
    out, have = [], 0
    for b in data.batches(bs, dtype):
        take = min(batch_size(b), n - have)
        out.append(b if take == batch_size(b) else rows(b, 0, take))
        have += take
        if have >= n:
            break
    return out


def check(job, ranks: int = 1) -> None:
    """SAM's groups are taken within batches: sharpness.m at most eval.batch_size; groups of
    eval.group_size ranks need a multiple of it."""
    bs = job.eval.batch_size if job.eval.batch_size != "auto" else 256
    if job.sharpness.m > bs:
        raise UserError(f"{job.source}: key 'sharpness.m' is {job.sharpness.m}, more than eval.batch_size ({bs}): "
                        "SAM's groups are taken within batches")
    k = job.eval.group_size
    if k > 1 and (ranks % k or ranks < k):
        raise UserError(f"{job.source}: key 'eval.group_size' is {k}, but the run has {ranks} rank(s): "
                        f"launch a multiple of {k} (mpirun -n {k * max(1, ranks // k)} ...)")


def compute(job, spread=None, log=print, should_stop=lambda: None, source=None) -> dict:
    """Every sharpness measure at θ* of the job's model, whose checkpoint must exist (runs.optimum's
    `ready` trains a missing one). Every rank calls it (with `spread`); each returns the same dict,
    rank 0 says it. `source`: where the model and data come from (the job's files by default)."""
    import torch

    from ..evaluation.evaluator import device_for_rank
    cfg = job.sharpness
    bs = job.eval.batch_size if job.eval.batch_size != "auto" else 256
    # that split, in float32 (the measures have no precision of their own)
    job = dataclasses.replace(job, eval=dataclasses.replace(job.eval, split=cfg.split, precision="fp32"))
    src = source or Source()
    device = device_for_rank(spread.ctx.local_rank if spread is not None else 0, job.eval.device)
    k = job.eval.group_size
    rank, size = (spread.rank, spread.size) if spread is not None else (0, 1)
    check(job, size)
    group = join_group(job, spread, device) if k > 1 else None
    loaded = _load(job, src, group, device, log)
    batches = [({k: v.to(device) for k, v in b.items()} if isinstance(b, dict) else tuple(t.to(device) for t in b))
               for b in _examples(loaded.splits[cfg.split], bs, cfg.examples, torch.float32)]
    n = sum(batch_size(b) for b in batches)
    gather = spread.gather if spread is not None else (lambda d: d)
    # the workers: groups of k ranks (each rank its own group when k = 1); a group's leader
    # hands in its results (every member computes them: the members' passes are collective)
    workers, me, leader = size // k, rank // k, rank % k == 0

    def spread_over(count: int, one) -> list:
        """one(k) for k = 0..count-1, dealt round robin over the groups; every result, in index order."""
        mine = {j: one(j) for j in range(me, count, workers)}
        got = gather(mine if leader else {})
        return [got[j] for j in range(count)]

    t = time.perf_counter()
    s = Sharpness(loaded.model, batches, src.make_task(job), should_stop=should_stop, log=log, group=group)
    nparams = s.count
    log(f"sharpness at theta* of {job.name} on {cfg.split}: {nparams:,} parameters, {n} examples in batches of {bs}"
        + (f", over {size} ranks" if size > 1 else "")
        + (f" in {workers} {job.eval.group_mode} group(s) of {k}" if k > 1 else ""))
    out = {"split": cfg.split, "examples": n, "batch_size": bs, "loss": s.base, "ranks": size,
           "group_size": k, "group_mode": job.eval.group_mode if k > 1 else "",
           "num_parameters": nparams, "settings": json_settings(cfg)}
    for name, p in NORMS.items():
        rho = cfg.rho_2 if p == 2 else cfg.rho_inf
        s.stage = f"worst case, l{name} ball ({cfg.restarts} restarts of {cfg.steps} steps)"
        found = spread_over(cfg.restarts, lambda k: s.worst(rho, p, cfg.steps, k, cfg.seed))
        out[f"worst_{name}"] = max(found)
        out[f"worst_{name}_restarts"] = found  # the spread says how far the ascent is from converged
        log(f"worst-case adaptive sharpness, l{name} ball rho {rho:g}: {max(found):.6g} "
            f"(restarts {', '.join(f'{v:.4g}' for v in found)})")
    s.stage = f"average case ({cfg.draws} draws)"
    avg, avg_se = mean_and_se(spread_over(cfg.draws, lambda k: s.average(cfg.rho_2, k, cfg.seed)))
    out.update(average_2=avg, average_2_se=avg_se)
    log(f"average-case adaptive sharpness, l2 sphere rho {cfg.rho_2:g}: {avg:.6g} +- {avg_se:.2g} ({cfg.draws} draws)")
    groups = len(s.groups(cfg.m))
    s.stage = f"SAM's m-sharpness ({groups} groups)"
    if groups:
        sam, sam_se = mean_and_se(spread_over(groups, lambda k: s.sam(k, cfg.m, cfg.rho_sam, cfg.sam_steps)))
    else:
        sam = sam_se = math.nan
    # groups are whole m examples within a batch: each batch's last (batch size mod m) are left out
    left_out = n - groups * cfg.m
    out.update(sam=sam, sam_se=sam_se, sam_groups=groups, sam_examples_left_out=left_out)
    log(f"SAM's m-sharpness, m {cfg.m}, rho {cfg.rho_sam:g}: {sam:.6g} +- {sam_se:.2g} ({groups} groups"
        + (f"; {left_out} of the {n} examples left out: groups of {cfg.m} are taken within batches of {bs}"
           if left_out else "") + ")")
    s.stage = "PAC-Bayes flatness (bisection on sigma)"
    pac = bisect_sigma(lambda sigma: mean_and_se(spread_over(cfg.draws, lambda k: s.pac_rise(sigma, k, cfg.seed))),
                       cfg.pac_threshold, cfg.pac_tol)
    out.update(pac_bayes_sigma=pac["sigma"], pac_bayes_flatness=1 / pac["sigma"] ** 2 if pac["sigma"] else math.nan,
               pac_bayes_rise=pac["rise"], pac_bayes_rise_se=pac["rise_se"], pac_bayes_sigma_above=pac["sigma_above"],
               pac_bayes_bracketed=pac["bracketed"], pac_bayes_evaluations=pac["evaluations"])
    log(f"PAC-Bayes flatness: sigma' {pac['sigma']:.4g} (expected loss rise {pac['rise']:.4g} +- {pac['rise_se']:.2g} "
        f"<= {cfg.pac_threshold:g}), 1/sigma'^2 {out['pac_bayes_flatness']:.4g}")
    out.update(forward_passes=s.passes, seconds=time.perf_counter() - t)  # (this rank's passes)
    return out


def _load(job, src: Source, group, device: str, log):
    """The loaded job with its model on the device: in a shard group, sharded over it
    (inputs/rows.for_group: read by rows where it can be)."""
    if group is not None and group.mode == "shard":
        from ..inputs import rows
        return rows.for_group(job, src, group, device, log)
    loaded = src.load(job)
    loaded.model = loaded.model.to(device)
    return loaded


def json_settings(cfg) -> str:
    import json
    return json.dumps(dataclasses.asdict(cfg), sort_keys=True)


def held(path: str, job) -> bool:
    """Whether the surface holds the measures with these settings (a study resumes)."""
    import json
    with SurfaceReader(path) as sf:
        old = sf.sharpness().get(job.sharpness.split, {})
    return old.get("settings") == json.loads(json_settings(job.sharpness))


SHARPNESS = Measure("the sharpness", "sharpness", compute, write_sharpness, held, check)
