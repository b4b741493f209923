"""Who computes which cells, and the whole conversation between processes: the only module
that imports mpi4py.

    ctx = runner.launch()
    code = runner.run(ctx, prepare, build, should_stop)   # collective: every rank calls it

One process (`python -m lldist.surface job.yaml`) or N under a launcher (`mpirun -n 8 ...`,
`srun --mpi=pmix ...`): the same code path, chosen from the launch environment. The caller
says *what* to compute (`prepare` on rank 0, `build` on the others); this module says who
does it, and how a run starts, fails and ends.

The message sequence (rank 0 = coordinator, the only writer of the HDF5 file; CTRL and WORK
are tags; every wait below polls with a short sleep, so a waiting rank uses no CPU):

  start-up
    0          plan = prepare()                   train if needed, open the file, rank 0's evaluator
    0 -> w     CTRL ("payload",)                  or ("abort", code) when prepare failed or a
                                                  signal came: every worker exits with `code`
    all        bcast(plan.payload)                collective, entered only once it is ready
    w          evaluator = build(payload)         each worker: device, model, data
    w -> 0     CTRL ("built", host, device, err)  err: None, or the error text and its phase
    0 -> w     CTRL ("go",) | ("abort", code)     abort when any rank failed to build
  chunks
    w -> 0     WORK ("ready", n)                  asks for n chunks (workers keep one queued ahead)
    0 -> w     WORK ("chunk", id, cells) | ("stop",)   one answer per chunk asked for; an
                                                  answer may wait (an adaptive schedule's next
                                                  cells depend on results still out); "stop"
                                                  once the schedule will never give more
    w -> 0     WORK ("result", id, values, t0, t1)     also asks for one more chunk
    w -> 0     WORK ("error", id, traceback)      then waits to be aborted
  end
    0          plan.close(outcome)                "done" | "stopped" | "failed": the file is closed
    0          MPI_Abort(code) on "stopped"/"failed" (workers may be mid-chunk); on "done" every
               worker has had its ("stop",) and returns 0

Rank 0 evaluates cells too (in runs of up to RANK0_COMPUTES_UP_TO ranks), one at a time (or
one vmapped group) between polls of its mailbox, so a worker's request waits at most one cell
of rank 0's work, while the worker computes its queued chunk. Assignment is dynamic: a slow
rank simply asks less often. Rank 0 writes each result as it comes (values in place, a few
hyperslabs) and commits the done marks in groups (store.COMMIT_S), so its cost per message
does not grow with the grid.

Every failure names its rank, host and phase ("prepare", "build", "chunk 12 (cells 36..38)",
"write of chunk 12") and ends every rank with a non-zero status: 2 for bad input (one line),
128 + signal for a signal, 1 for anything else (with the failing rank's traceback).
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import time
import traceback
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import numpy as np

from ..errors import EXIT_USAGE, Stopped, UserError, one_line

WORK, CTRL = 7, 8
POLL_S = 0.0002  # first sleep between mailbox polls; grows to POLL_MAX_S while nothing comes
POLL_MAX_S = 0.05
ABORT_GRACE_S = 0.5  # see Context.abort
# Rank 0 computes cells too in runs of up to this many ranks (1/16 of the work or more); in
# larger runs it only coordinates: answering hundreds of ranks quickly matters more.
RANK0_COMPUTES_UP_TO = 16
SERVICE_SAMPLES = 100_000  # per-result service times the coordinator keeps for its cost report
_LAUNCH_VARS = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK", "PMI_RANK", "MPI_LOCALNRANKS", "MV2_COMM_WORLD_SIZE")


def expected_world_size() -> Optional[int]:
    """How many processes the launcher says it started, or None when there is no launcher.

    LLDIST_MPI=1 forces MPI, LLDIST_MPI=0 forbids it."""
    force = os.environ.get("LLDIST_MPI")
    if force == "0":
        return None
    for var in ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "MV2_COMM_WORLD_SIZE"):
        if os.environ.get(var, "").isdigit():
            return int(os.environ[var])
    step = os.environ.get("SLURM_STEP_ID", "")
    if step.isdigit() and int(step) < 4294967290 and os.environ.get("SLURM_STEP_NUM_TASKS", "").isdigit():
        return int(os.environ["SLURM_STEP_NUM_TASKS"])  # srun, with or without a PMI plugin
    if any(v in os.environ for v in _LAUNCH_VARS) or force == "1":
        return 0  # launched, size unknown here
    return None


def _affinity() -> set:
    try:
        return set(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return set(range(os.cpu_count() or 1))


@dataclass
class Context:
    rank: int = 0
    size: int = 1
    local_rank: int = 0
    local_size: int = 1
    host: str = field(default_factory=socket.gethostname)
    comm: object = None  # mpi4py communicator, None for a single process
    cpus: int = 0  # CPU threads this rank may use (see cpu_share); 0: not measured

    @property
    def mpi(self) -> bool:
        return self.comm is not None

    def abort(self, code: int) -> None:
        """End the whole job with `code`: MPI_Abort kills every rank (a plain exit would leave
        the others blocked in a receive); a single process just exits."""
        sys.stdout.flush()
        sys.stderr.flush()
        if self.comm is not None and self.size > 1:
            # MPI_Abort tears the launcher's forwarding pipes down at once: output already
            # flushed but not yet read by the proxy (MPICH's hydra) is lost. A moment to let it
            # through costs nothing on a path that ends the job.
            time.sleep(ABORT_GRACE_S)
            self.comm.Abort(code)
            os._exit(code)
        raise SystemExit(code)


def cpu_share(masks: list, mine: set) -> int:
    """Threads for one rank from the CPU masks of the node's ranks: ranks that share one mask
    (no binding) split it; ranks bound to their own CPUs use theirs. The mask, not
    os.cpu_count(): a taskset or a Slurm cgroup may allow fewer CPUs than the node has."""
    if all(m == masks[0] for m in masks):
        return max(1, len(mine) // len(masks))
    return max(1, len(mine))


def launch() -> Context:
    expected = expected_world_size()
    if expected is None:
        return Context(cpus=cpu_share([_affinity()], _affinity()))
    try:
        from mpi4py import MPI
    except ImportError as e:
        raise UserError(f"started by an MPI launcher but mpi4py cannot be imported ({e}); pip install mpi4py")
    comm = MPI.COMM_WORLD
    if expected and comm.Get_size() != expected:
        # the classic trap: each process comes up as a singleton rank 0 of 1 and would
        # compute the whole grid; stop instead
        raise UserError(f"the launcher started {expected} processes but MPI sees a world of {comm.Get_size()}: "
                        "mpi4py was built against another MPI than the launcher's (use that MPI's mpiexec), "
                        "or srun lacks --mpi=pmix / --mpi=pmi2")
    local = comm.Split_type(MPI.COMM_TYPE_SHARED)
    mine = _affinity()
    masks = [set(m) for m in local.allgather(sorted(mine))]
    ctx = Context(comm.Get_rank(), comm.Get_size(), local.Get_rank(), local.Get_size(), MPI.Get_processor_name(),
                  comm, cpu_share(masks, mine))
    local.Free()
    return ctx


def pick_device(ctx: Context, requested: str) -> str:
    """cuda:<node-local rank mod visible GPUs>, or cpu: one GPU per rank of a node."""
    import torch

    from ..evaluation.evaluator import resolve_device
    if resolve_device(requested) == "cpu":
        return "cpu"
    dev = f"cuda:{ctx.local_rank % torch.cuda.device_count()}"
    torch.cuda.set_device(dev)
    return dev


# ----------------------------------------------------------------------------- records

class RankFailed(RuntimeError):
    """A rank's exception, with its rank, host, phase and traceback in the message."""


@dataclass
class ChunkResult:
    cells: np.ndarray
    values: np.ndarray
    rank: int
    host: str
    device: str
    t_start: float
    t_end: float


@dataclass
class Plan:
    """What rank 0's `prepare` returns: everything the conversation needs from the caller."""
    payload: Any  # broadcast to every worker, which calls build(payload)
    schedule: Any  # take() -> cells or None (none now), exhausted: none ever again (schedule.py)
    evaluate: Callable[[np.ndarray], np.ndarray]  # rank 0's own: cells -> values (n, ...)
    group: int  # cells rank 0 evaluates between polls of its mailbox
    device: str
    write: Callable[[ChunkResult], int]  # one finished chunk, on rank 0 -> cells now saved
    tick: Callable[[], int]  # called between messages -> cells saved since (a due group commit)
    start: Callable[[dict], Any]  # every rank is up: {rank: (host, device)} -> a progress object
    close: Callable[[str, Optional[dict]], None]  # ("done" | "stopped" | "failed", coordinator cost)
    rank0_computes: bool = True  # False: rank 0 only coordinates (ignored for a single process)


@dataclass
class Built:
    """What a worker's `build` returns."""
    evaluate: Callable[[np.ndarray], np.ndarray]
    device: str


def _where(host: str, rank: int) -> str:
    return f"rank {rank} on {host}"


def _failure(rank: int, host: str, phase: str, exc: BaseException) -> tuple:
    """(exit code, one-line message, traceback text or '') for an exception in `phase`."""
    if isinstance(exc, UserError):
        return EXIT_USAGE, f"{_where(host, rank)}, {phase}: {one_line(exc)}", ""
    tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    return 1, f"{_where(host, rank)} failed in {phase}: {type(exc).__name__}: {one_line(exc)}", tb


def _report(message: str, tb: str = "") -> None:
    print(f"lldist: error: {message}", file=sys.stderr)
    if tb:
        print(tb.rstrip(), file=sys.stderr)
    sys.stderr.flush()


def _wait(comm, source: int, tag: int, status=None, should_stop: Callable[[], bool] = lambda: False,
          longest: float = POLL_MAX_S):
    """Receive the next message from `source` (or any, with MPI.ANY_SOURCE), sleeping between
    polls (at most `longest` seconds): a blocking receive spins a core in most MPIs and never
    returns on a signal. Returns None if should_stop() became true first."""
    nap = min(POLL_S, longest)
    while not comm.Iprobe(source=source, tag=tag, status=status):
        if should_stop():
            return None
        time.sleep(nap)
        nap = min(longest, nap * 1.5)
    src = status.Get_source() if status is not None else source
    return comm.recv(source=src, tag=tag)


# ----------------------------------------------------------------------------- the whole run

def run(ctx: Context, prepare: Callable[[], Plan], build: Callable[[Any], Built],
        should_stop: Callable[[], Optional[int]] = lambda: None) -> int:
    """One distributed computation; returns the exit status (0 when every chunk is done).

    Collective: every rank calls it. `prepare` runs on rank 0 only; `build(payload)` on every
    other rank. `should_stop()` returns a signal number once one asked rank 0 to stop.
    Failures do not return on a run of several ranks: MPI_Abort ends every rank."""
    if ctx.rank != 0:
        return _worker(ctx, build)
    try:
        plan = prepare()
    except Exception as e:
        code, message, tb = (e.exit_code, one_line(e), "") if isinstance(e, Stopped) else \
            _failure(0, ctx.host, "prepare", e)
        for w in range(1, ctx.size):
            ctx.comm.send(("abort", code), dest=w, tag=CTRL)
        if isinstance(e, (UserError, Stopped)) and not ctx.mpi:
            raise  # the command line prints it as it does any other
        if isinstance(e, Stopped):
            print(f"lldist: {message}", file=sys.stderr, flush=True)
        else:
            _report(message if code != EXIT_USAGE else one_line(e), tb)
        return code

    hosts = {0: (ctx.host, plan.device)}
    if ctx.mpi:
        status = _start_workers(ctx, plan, hosts, should_stop)
        if status:
            return status
    progress = None
    try:
        progress = plan.start(hosts)
        cost = _coordinate(ctx, plan, progress, hosts, should_stop)
    except Stopped as e:
        _close(progress, plan, "stopped")
        print(f"lldist: {e}", file=sys.stderr, flush=True)
        ctx.abort(e.exit_code)
    except BaseException as e:
        # the error first: closing the file can take a while, and the error is what matters
        if isinstance(e, RankFailed):
            _report(str(e))
        else:
            _report(*_failure(0, ctx.host, getattr(e, "lldist_phase", "the coordinator"), e)[1:])
        _close(progress, plan, "failed")
        print("lldist: finished cells are saved; run the same command to resume", file=sys.stderr, flush=True)
        ctx.abort(1)
    _close(progress, plan, "done", cost)
    return 0


def _close(progress, plan: Plan, outcome: str, cost: Optional[dict] = None) -> None:
    if progress is not None:
        progress.close()
    plan.close(outcome, cost)


def _start_workers(ctx: Context, plan: Plan, hosts: dict, should_stop) -> int:
    """Payload out, statuses in, go or abort. Returns 0 to go on, else the exit status."""
    from mpi4py import MPI
    comm = ctx.comm
    for w in range(1, ctx.size):
        comm.send(("payload",), dest=w, tag=CTRL)
    comm.bcast(plan.payload, root=0)
    status, failed = MPI.Status(), []
    for _ in range(1, ctx.size):
        msg = _wait(comm, MPI.ANY_SOURCE, CTRL, status, lambda: should_stop() is not None)
        if msg is None:  # a signal while the workers build
            signum = should_stop()
            for w in range(1, ctx.size):
                comm.send(("abort", 128 + signum), dest=w, tag=CTRL)
            plan.close("stopped", None)
            print(f"lldist: stopped by signal {signum} while the ranks started; nothing computed",
                  file=sys.stderr, flush=True)
            return 128 + signum
        _, host, device, err = msg
        hosts[status.Get_source()] = (host, device)
        if err is not None:
            failed.append(err)
    if failed:
        code = EXIT_USAGE if all(c == EXIT_USAGE for c, _, _ in failed) else 1
        for w in range(1, ctx.size):
            comm.send(("abort", code), dest=w, tag=CTRL)
        plan.close("failed", None)
        for _, message, tb in failed[:1]:  # the first is enough; the others are usually the same
            _report(message, tb)
        if len(failed) > 1:
            print(f"lldist: ({len(failed) - 1} more rank(s) failed to start)", file=sys.stderr, flush=True)
        return code
    for w in range(1, ctx.size):
        comm.send(("go",), dest=w, tag=CTRL)
    return 0


def _worker(ctx: Context, build: Callable[[Any], Built]) -> int:
    comm = ctx.comm
    msg = _wait(comm, 0, CTRL)
    if msg[0] == "abort":
        return msg[1]
    payload = comm.bcast(None, root=0)
    built, err = None, None
    try:
        built = build(payload)
    except Exception as e:
        err = _failure(ctx.rank, ctx.host, "build", e)
    comm.send(("built", ctx.host, built.device if built else "?", err), dest=0, tag=CTRL)
    msg = _wait(comm, 0, CTRL, longest=0.001)  # "go" follows the last rank's status closely
    if msg[0] == "abort":
        return msg[1]
    _work(ctx, built.evaluate)
    return 0


# ----------------------------------------------------------------------------- chunks

def _coordinate(ctx: Context, plan: Plan, progress, hosts: dict, should_stop) -> dict:
    """Hand the schedule's chunks to the workers and to rank 0 itself; write each finished
    chunk. Raises RankFailed with a worker's traceback, Stopped on a signal. Returns the
    coordinator's own cost: {"messages": n, "seconds": time receiving, writing, answering,
    "results": result messages, "service": seconds of each (the first SERVICE_SAMPLES),
    "wall": seconds in all}."""
    sched = plan.schedule
    handed = {}  # chunk id -> (rank, cells)
    owed = {w: 0 for w in range(1, ctx.size)}  # answers each worker waits for
    waiting = {}  # the workers with answers owed, in the order they asked (a dict as an ordered set)
    asked = set()  # workers whose first request came: each must hear "stop" before the end
    next_id = [0]
    local = None  # [id, cells, position, values, t_start]
    comm = ctx.comm
    status = None
    if comm is not None:
        from mpi4py import MPI
        status = MPI.Status()

    def take():
        cells = sched.take()
        if cells is None:
            return None, None
        next_id[0] += 1
        return next_id[0] - 1, cells

    def owe(dest, n):
        owed[dest] += n
        waiting[dest] = None

    def answer():
        """Every answer owed that can be given now: a chunk, or "stop" once none will come.
        Only the workers that wait are visited: a message's cost must not grow with the ranks."""
        for dest in list(waiting):
            while owed[dest]:
                cid, cells = take()
                if cells is not None:
                    handed[cid] = (dest, cells)
                    comm.send(("chunk", cid, cells), dest=dest, tag=WORK)
                elif sched.exhausted:
                    comm.send(("stop",), dest=dest, tag=WORK)
                else:
                    return  # the schedule waits for results still out
                owed[dest] -= 1
            del waiting[dest]

    def saved(n):
        if n:
            progress.update(n)

    def write(cid, result):
        try:
            saved(plan.write(result))
        except BaseException as e:
            e.lldist_phase = f"write of chunk {cid}"
            raise

    def handle(src, msg):
        kind = msg[0]
        if kind == "ready":
            owe(src, msg[1])
            asked.add(src)
        elif kind == "result":
            _, cid, values, t0, t1 = msg
            rank, cells = handed.pop(cid)
            write(cid, ChunkResult(cells, values, rank, hosts[rank][0], hosts[rank][1], t0, t1))
            owe(src, 1)
        elif kind == "error":
            _, cid, text = msg
            phase = f"chunk {cid} (cells {handed[cid][1][0]}..{handed[cid][1][-1]})" if cid in handed else "a chunk"
            last = text.strip().splitlines()[-1] if text.strip() else "?"
            raise RankFailed(f"{_where(hosts.get(src, ('?',))[0], src)} failed in {phase}: {last}\n"
                             f"--- traceback of rank {src} ---\n{text.rstrip()}")

    cost = {"messages": 0, "seconds": 0.0, "results": 0, "service": []}
    t_begin = time.perf_counter()
    nap = POLL_S
    while True:
        signum = should_stop()
        if signum is not None:
            raise Stopped(signum, f"stopped by signal {signum}: finished cells are saved; "
                                  "run the same command to resume")
        got = False
        while comm is not None and comm.Iprobe(source=MPI.ANY_SOURCE, tag=WORK, status=status):
            t = time.perf_counter()
            src = status.Get_source()
            msg = comm.recv(source=src, tag=WORK)
            handle(src, msg)
            answer()
            dt = time.perf_counter() - t
            cost["messages"] += 1
            cost["seconds"] += dt
            if msg[0] == "result":
                cost["results"] += 1
                if len(cost["service"]) < SERVICE_SAMPLES:  # bounded: a 10001^2 grid has millions
                    cost["service"].append(dt)
            nap, got = POLL_S, True
        saved(plan.tick())
        if local is None and (plan.rank0_computes or comm is None):
            cid, cells = take()
            if cells is not None:
                local = [cid, cells, 0, None, time.time()]
                if comm is not None:
                    answer()  # an adaptive schedule may have more now
        if local is not None:
            cid, cells, pos, values, t0 = local
            # a few cells at a time (one vmapped group), then back to the mailbox
            try:
                part = plan.evaluate(cells[pos:pos + plan.group])
            except BaseException as e:
                e.lldist_phase = f"chunk {cid} (cells {cells[0]}..{cells[-1]})"
                raise
            if values is None:
                values = local[3] = np.zeros((len(cells),) + part.shape[1:])
            values[pos:pos + len(part)] = part
            local[2] = min(len(cells), pos + plan.group)
            if local[2] == len(cells):
                write(cid, ChunkResult(cells, values, 0, ctx.host, plan.device, t0, time.time()))
                local = None
                if comm is not None:
                    answer()
            continue
        if comm is not None and sched.exhausted and waiting:
            answer()  # the last result may have ended the schedule: stop whoever waits
        if sched.exhausted and not handed and not waiting and len(asked) == len(owed):
            cost["wall"] = time.perf_counter() - t_begin
            return cost
        if got:
            continue
        # nothing to compute here: wait for a worker, polling so that SIGTERM is noticed
        # (a blocking Probe would not return on a signal) without spinning a core
        time.sleep(nap)
        nap = min(0.001, nap * 1.5)


def _work(ctx: Context, evaluate: Callable, prefetch: int = 2) -> None:
    """Ask for chunks, evaluate them, send results, until told to stop. An exception is sent
    to the coordinator with its traceback; then this rank waits to be aborted."""
    comm = ctx.comm
    # SIGTERM keeps its default here: a worker dies at once (its unfinished chunk is simply
    # computed again by the next run); only rank 0, which owns the file, closes it first.
    comm.send(("ready", prefetch), dest=0, tag=WORK)
    expect, queue, cid = prefetch, deque(), None
    try:
        while True:
            # take every answer already here; wait only when there is nothing to do
            while expect > 0 and (not queue or comm.Iprobe(source=0, tag=WORK)):
                msg = _wait(comm, 0, WORK, longest=0.001)  # a chunk's latency: keep it short
                expect -= 1
                if msg[0] == "chunk":
                    queue.append((msg[1], msg[2]))
            if not queue:
                return
            cid, cells = queue.popleft()
            t0 = time.time()
            values = evaluate(cells)
            comm.send(("result", cid, values, t0, time.time()), dest=0, tag=WORK)
            expect += 1
    except Exception:
        comm.send(("error", cid, traceback.format_exc()), dest=0, tag=WORK)
        while True:  # the coordinator aborts the whole job
            time.sleep(1)


def install_sigterm() -> Callable[[], Optional[int]]:
    """SIGTERM (Slurm time limit, preemption) is remembered; returns `should_stop`, which
    gives the signal's number once it came. The coordinator then stops handing out work,
    closes the file (every finished chunk is already flushed) and exits 128 + 15."""
    flag = {}

    def handler(signum, frame):
        flag["stop"] = signum
    signal.signal(signal.SIGTERM, handler)
    return lambda: flag.get("stop")
