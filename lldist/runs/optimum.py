"""A computation at θ* that every rank joins, written once: the Hessian (runs/hessian.py) and the
sharpness measures (runs/sharpness.py), for their commands and a study's variants, and the
guard lldist.connect's ranks share while rank 0 trains.

    code = measure_and_store(ctx, job, HESSIAN, out=None)           # a command: compute, store where it may
    measure_unless_held(job, SHARPNESS, spread_over(ctx), log)       # a study: skip what its file holds
    res = compute(job, HESSIAN)                                      # one process: the result

Under MPI the ranks share the work through transport.runner.Spread (the products' batches,
the sharpness's restarts and draws); rank 0 drives, says and writes. Before the work rank 0
trains a missing checkpoint while the others, quiet, wait at the gate (`ready`). A failure or a
signal on any rank ends every rank (`together`): the others wait on rank 0 and would wait
forever.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Callable, Optional

from ..config import Job, effective_raw
from ..errors import EXIT_USAGE, Quiet, Stopped, UserError
from ..inputs import identity
from ..store import SurfaceReader
from ..transport import runner
from ..transport.runner import SIGINT_EXIT
from .train import ensure_checkpoint


def log(msg: str) -> None:
    print(f"lldist: {msg}", flush=True)


def quiet(msg: str) -> None:
    """What a rank other than 0 says: nothing (rank 0 says it)."""


@dataclass(frozen=True)
class Measure:
    """One computation at θ*: how every rank computes it, and how its file keeps it."""
    what: str  # "the Hessian", "the sharpness": for messages
    group: str  # the file's group it goes under: "curvature" | "sharpness"
    compute: Callable  # (job, spread, log, should_stop, source) -> the result (a dict) on rank 0, None or it elsewhere
    write: Callable  # the store's writer: (path, result) -> its key under `group`
    held: Callable  # (path, job) -> whether the file holds it with the job's settings
    check: Callable = lambda job, ranks: None  # (job, ranks): refuse what it cannot take, before any training


def spread_over(ctx: runner.Context, what: str = "the computation at theta*") -> Optional[runner.Spread]:
    """The ranks' share of a computation at θ* (`what` names it in a failure's report); None in
    a single process."""
    return runner.Spread(ctx, what) if ctx.size > 1 else None


def join_group(job: Job, spread: runner.Spread, device: str):
    """This rank's group of eval.group_size ranks (an evaluation.groups.GroupSpec), its
    torch.distributed world made (collective: every rank calls it)."""
    from ..evaluation.groups import GroupSpec, init_process_group
    group = spread.group(job.eval.group_size)
    spec = GroupSpec(group.rank, group.size, job.eval.group_mode)
    init_process_group(spec, group.bcast, device, group.collective_link(device))
    return spec


def read_checked(ctx: runner.Context, read: Callable, m: Measure):
    """A command's (args, job), read and checked by `m` on rank 0, on every rank (`agree`): a
    refusal is one line."""
    def make():
        args, job = read()
        m.check(job, ctx.size)
        return args, job
    return agree(ctx, make)


def agree(ctx: runner.Context, make: Callable):
    """What rank 0 makes (a command line read, its job loaded and checked), on every rank. A
    refusal is rank 0's to say, once: the others end with its exit status and say nothing (they
    would each print the same line)."""
    if ctx.size == 1:
        return make()
    spread = runner.Spread(ctx, "reading the command line")
    if ctx.rank != 0:
        verdict, value = spread.gate()
        if verdict == "refused":
            raise Quiet(value)
        return value
    try:
        value = make()
    except BaseException as e:  # the others end with the status rank 0 ends with
        code = EXIT_USAGE if isinstance(e, UserError) else e.exit_code if isinstance(e, Stopped) else \
            SIGINT_EXIT if isinstance(e, KeyboardInterrupt) else \
            (e.code if isinstance(e.code, int) else 0) if isinstance(e, SystemExit) else 1  # (--help: 0)
        spread.gate(("refused", code))
        raise
    spread.gate(("made", value))
    return value


@contextlib.contextmanager
def together(spread: Optional[runner.Spread]):
    """Around what every rank does together: a failure or a stop on this rank ends every rank
    (the others wait for this one's next message); in a single process it just propagates."""
    try:
        yield
    except BaseException as e:
        if spread is not None:
            spread.fail(e)
        raise


def ready(job: Job, spread: Optional[runner.Spread], should_stop=lambda: None, say=log) -> bool:
    """Before a computation at θ*: rank 0 trains a missing checkpoint while the others, quiet
    (rank 0 says what loading says), wait at the gate. Returns whether this rank drives (rank 0,
    or the only process)."""
    driver = spread is None or spread.rank == 0
    if driver:
        ensure_checkpoint(job, should_stop, say)
    else:
        from ..workloads import notes
        notes.quiet()
    if spread is not None:
        spread.gate()  # the others load the checkpoint rank 0 may just have trained
    return driver


def store_target(path: str, job: Job, explicit: bool, what: str = "the Hessian") -> Optional[str]:
    """Where the numbers at θ* (`what`) may be stored: `path` when it is an lldist surface of this
    job's model (same checkpoint content, or the same model section when there is none), None
    when the job's own output does not exist yet. Refuses anything else before any work."""
    if not os.path.exists(path):
        if explicit:
            raise UserError(f"--out {path} does not exist: {what} is stored into an existing surface of this "
                            "job (run python -m lldist.surface first)")
        return None
    with SurfaceReader(path) as sf:  # UserError for anything that is not a surface
        theirs = sf.attr("checkpoint_sha256", "")
        raw = effective_raw(sf.job_yaml(), path)
    ck = job.model.checkpoint
    source = identity.theta_source(job)  # (a HuggingFace folder's weights, as the surface's identity takes them)
    if source and os.path.exists(source):
        same = theirs == identity.file(source)
    else:
        model = raw.get("model") or {}
        same = not theirs and model.get("name", "cnn") == job.model.name and (model.get("args") or {}) == job.model.args
    if not same:
        if ck and not os.path.exists(ck):  # (a typo, most likely: this job would train a new model there)
            raise UserError(f"{job.source}: key 'model.checkpoint': {ck} does not exist, so {what} would be of a "
                            f"model trained anew, not of the one {path} is a surface of")
        raise UserError(f"{path} is a surface of another model or checkpoint than {job.source}'s; {what} of "
                        "this job is not stored there (give --out a surface of this job)")
    return path


def compute(job: Job, m: Measure, spread: Optional[runner.Spread] = None, say=log,
            should_stop=lambda: None, source=None) -> Optional[dict]:
    """`m` at the job's θ* with every rank of `spread` (collective), or alone: rank 0 returns the
    result. `source` (inputs.loading.Source): a model and data given from Python."""
    m.check(job, spread.size if spread is not None else 1)
    driver = ready(job, spread, should_stop, say if spread is None or spread.rank == 0 else quiet)
    return m.compute(job, spread, say if driver else quiet, should_stop, source)


def measure_and_store(ctx: runner.Context, job: Job, m: Measure, out: Optional[str] = None) -> int:
    """A command's whole run (python -m lldist.hessian, lldist.sharpness): `m` at θ* with every
    rank, stored in `out` or the job's output when that is a surface of this job (refused before
    any work when it is not; not stored when the job's output does not exist yet). Rank 0 says
    what it found and where it went. Returns the exit status."""
    from .threads import set_threads
    driver = ctx.rank == 0
    should_stop = runner.install_sigterm() if driver else (lambda: None)
    set_threads(job, ctx.cpus)  # eval.threads, as the surface takes it
    spread = spread_over(ctx, m.what)
    with together(spread):
        path = store_target(out or job.output, job, explicit=bool(out), what=m.what) if driver else None
        res = compute(job, m, spread, log, should_stop)
    if not driver:
        return 0
    if path is None:
        log(f"not stored: {job.output} does not exist yet (run python -m lldist.surface, or give --out)")
        return 0
    path = store_target(path, job, explicit=True, what=m.what)  # again: a missing checkpoint was trained meanwhile
    key = m.write(path, res)
    log(f"stored in {path} under /{m.group}/{key}")
    return 0


def measure_unless_held(job: Job, m: Measure, spread: Optional[runner.Spread] = None, say=log,
                        should_stop=lambda: None) -> None:
    """A study's variant: `m` at its θ*, written into its surface file, unless the file holds it
    with the same settings already (a study resumes). Every rank of `spread` calls it (or one
    process alone); rank 0 decides and writes."""
    driver = spread is None or spread.rank == 0
    with together(spread):
        todo = not m.held(job.output, job) if driver else None
        if spread is not None:
            todo = spread.gate(todo)  # every rank: compute it, or not
        if not todo:
            return
        res = compute(job, m, spread, say, should_stop)
        if driver:
            m.write(job.output, res)
