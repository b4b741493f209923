"""Who computes which cells, and the whole conversation between processes: the only module
that imports mpi4py. It imports nothing else of lldist but `errors`.

    ctx = runner.launch()
    code = runner.run(ctx, room, should_stop)   # collective: every rank calls it

One process (`python -m lldist.surface job.yaml`) or N under a launcher (`mpirun -n 8 ...`,
`srun --mpi=pmix ...`): the same code path, chosen from the launch environment. The caller's
`room` (lldist.runs.surface.SurfaceRun) says *what* to compute; this module says who does it, and how a
run starts, fails and ends. What a room offers (see `Room`): `prepare()` on rank 0, `build()`
on the others, `evaluate(cells)` anywhere, and on rank 0 `schedule`, `take_result`, `tick`,
`start` and `close`.

The message sequence (rank 0 = coordinator, the only writer of the HDF5 file; CTRL and WORK
are tags; every wait below polls with a short sleep, so a waiting rank uses no CPU):

  start-up
    0          payload = room.prepare()           train if needed, open the file, rank 0's evaluator
    0 -> w     CTRL ("payload",)                  or ("abort", code) when prepare failed or a
                                                  signal came: every worker exits with `code`
    all        bcast((k, payload))                collective, entered only once it is ready; k is
                                                  room.group_size (eval.group_size)
    all        k > 1: split into groups           the world's communicator split by rank // k:
                                                  groups of k consecutive ranks; rank 0 leads group 0
    w          device = room.build(payload, g)    each worker: device, model, data; with k > 1
                                                  rank 0 too, and a group's ranks together (their
                                                  process group, a sharded model: collectives)
    group      on CPUs, the group's torch collectives (FSDP2's gathers and reduce-scatters, the
               evaluator's sums) run over a duplicate of its communicator, Group.collective_link:
               Allgather, Alltoall, Bcast and Barrier, every rank of the group in the same order
               (evaluation/collectives.py issues them; on GPUs NCCL carries them instead)
    w -> 0     CTRL ("built", host, device, err)  err: None, or (code, message, traceback)
    0 -> w     CTRL ("go",) | ("abort", code)     abort when any rank failed to build
  chunks (the workers here are the groups' leaders: rank % k == 0; with k = 1, every rank)
    w -> 0     WORK ("ready", n)                  asks for n chunks (workers keep one queued ahead)
    0 -> w     WORK ("chunk", id, cells) | ("stop",)   one answer per chunk asked for; an
                                                  answer may wait (an adaptive schedule's next
                                                  cells depend on results still out); "stop"
                                                  once the schedule will never give more
    leader -> m  GROUP ("cells", id, cells)       before each chunk the leader (rank 0 too, for
                                                  group 0) computes: its members evaluate it with it
    leader -> m  GROUP ("stop",)                  when the leader's work ends
    w -> 0     WORK ("result", ChunkResult)       the one record of a chunk, from here to the
                                                  work log; also asks for one more chunk
    w, m -> 0  WORK ("error", id, traceback)      then waits to be aborted; a member whose leader
                                                  or rank 0 may be stuck in a collective with it
                                                  aborts the job itself after ABORT_WAIT_S
  end
    0          room.close(outcome, cost)          "done" | "stopped" | "failed": the file is closed
    0          MPI_Abort(code) on "stopped"/"failed" (workers may be mid-chunk); on "done" every
               worker has had its ("stop",) and returns 0

A second, shorter conversation: a computation at θ* spread over the ranks (`Spread`; the
Hessian of python -m lldist.hessian and of a study's variants, the sharpness measures, the gate
lldist.connect's ranks wait at while rank 0 trains: lldist/runs/optimum.py). Before the work,
`gate` holds the others while rank 0 trains a missing checkpoint; a failure on any rank ends the
job (MPI_Abort), as in a surface run. The Hessian's products and Lanczos then run in a
torch.distributed world of every rank made with `group` (its CPU collectives over MPI:
evaluation/collectives.py; evaluation/data_rows.py), not in this conversation.

The same object serves the sharpness measures (python -m lldist.sharpness, lldist/runs/sharpness.py),
where every rank runs the same code: restarts, draws and groups are dealt round robin by index,
and after each measure

    w -> 0     SHARE {index: value}               this rank's results
    0 -> w     SHARE {index: value}               every rank's, merged: all ranks hold the same

so every rank reduces the same numbers in index order (and takes the same bisection steps).

Rank 0 evaluates cells too (in runs of up to RANK0_COMPUTES_UP_TO groups; a group is one rank
with k = 1), one pass of cells (eval.cells_per_pass) at a time between polls of its mailbox, so
a worker's request waits at most one pass of rank 0's cells while the worker computes its
queued chunk. Assignment is dynamic: a slow rank simply asks less often. Rank 0 hands each
result to the room, which keeps it and commits results to the file at least once a second, so
its cost per message does not grow with the grid.

Failures, and how every rank ends (the exit status is the run's):

  | where                          | what is reported                         | status        |
  |--------------------------------|------------------------------------------|---------------|
  | rank 0, prepare                | one line (bad input) or the traceback     | 2, or 1       |
  | a worker, build                | the first failing rank's, "N more"        | 2, or 1       |
  | a worker, chunk k              | rank, host, "chunk k (cells a..b)", its   | 1             |
  |                                | traceback                                 |               |
  | rank 0, its own chunk or write | rank 0, the phase, the traceback          | 1             |
  | SIGTERM to rank 0              | "stopped by signal 15", cells saved       | 143           |
  | Ctrl-C (SIGINT)                | "interrupted", cells saved                | 130           |

With several ranks every failure ends every rank (MPI_Abort) within seconds. In a single
process nothing is turned into an exit status here: the exception itself propagates, the
user's own with a note naming the phase and cells (Python 3.11+), after the room has closed the
file. The command line (errors.run_cli) turns it into one line and a status; the notebook API
gets the exception.
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
from typing import Any, NamedTuple, Optional, Protocol

import numpy as np

from ..errors import EXIT_USAGE, Stopped, UserError, one_line

WORK, CTRL, GROUP = 7, 8, 9
ASK = 10  # the gate at θ* (Spread.gate)
SHARE = 12  # the sharpness measures' results (Spread.gather)
# Waits for the others' results at θ* are short: their polls sleep at most 1 ms (at the
# runner's 50 ms a small model's products once took as long on two ranks as on one).
PRODUCT_POLL_MAX_S = 0.001
ABORT_WAIT_S = 10.0  # a failed group member's wait for rank 0's abort before it aborts the job itself
ANY = -1  # Link.probe: a message from any rank
POLL_S = 0.0002  # first sleep between mailbox polls; grows to POLL_MAX_S while nothing comes
POLL_MAX_S = 0.05
ABORT_GRACE_S = 0.5  # see Context.abort
# Rank 0 computes cells too in runs of up to this many ranks (1/16 of the work or more); in
# larger runs it only coordinates: answering hundreds of ranks quickly matters more.
RANK0_COMPUTES_UP_TO = 16
WORKER_NICE = 5  # see _yield_to_the_coordinator
SERVICE_SAMPLES = 100_000  # per-result service times the coordinator keeps for its cost report
_LAUNCH_VARS = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK", "PMI_RANK", "MPI_LOCALNRANKS", "MV2_COMM_WORLD_SIZE")
SIGINT_EXIT = 128 + signal.SIGINT


# ----------------------------------------------------------------------------- records

class ChunkResult(NamedTuple):
    """A finished chunk: made by the rank that computed it, sent as is, handed to the room,
    stored as the chunk's record of the work log. `values`: (len(cells), ...) float64."""
    chunk: int
    cells: np.ndarray
    values: np.ndarray
    rank: int
    host: str
    device: str
    t_start: float
    t_end: float


class Room(Protocol):
    """What the runner asks of a computation (lldist.runs.surface.SurfaceRun is the one in use)."""
    schedule: Any  # take() -> cells or None (none now); exhausted: none ever again (lldist.cells.schedule)
    group_size: int  # ranks that evaluate each cell together (rank 0 sets it in prepare)
    cells_per_pass: int  # cells rank 0 evaluates between polls of its mailbox
    device: str
    rank0_computes: bool  # False: rank 0 only coordinates (ignored for a single process)

    def prepare(self) -> Any: ...  # rank 0: the payload every worker's build() gets

    def build(self, payload: Any, group: Optional[Group]) -> str: ...  # ready to evaluate; returns its device

    def evaluate(self, cells: np.ndarray) -> np.ndarray: ...  # cells -> values (n, ...)

    def take_result(self, result: ChunkResult) -> int: ...  # rank 0: keep it -> cells now saved

    def tick(self) -> int: ...  # rank 0, between messages -> cells saved since (a due commit)

    def start(self, hosts: dict) -> Any: ...  # every rank is up: {rank: (host, device)} -> progress

    def close(self, outcome: str, cost: Optional[dict]) -> None: ...  # "done" | "stopped" | "failed"


@dataclass
class Group:
    """k consecutive ranks that evaluate each cell together (eval.group_size; a room builds its
    process group and sharded model from this). Rank 0 leads group 0."""
    index: int  # rank // k
    rank: int  # rank % k: 0 is the leader, the one that talks to rank 0
    size: int
    link: Any  # the group's communicator: ranks 0..size-1 within it

    @property
    def leader(self) -> bool:
        return self.rank == 0

    def bcast(self, obj):
        """The leader's `obj` on every rank of the group (collective)."""
        return self.link.bcast(obj, 0)

    def collective_link(self, device: str) -> Optional["MpiLink"]:
        """Collective: a link of its own for the group's torch collectives on CPUs
        (evaluation/collectives.py runs them over it: MPI's shared memory within a node, not
        gloo's loopback TCP), on a duplicate of the group's communicator; None on GPUs (NCCL)
        or for a link without MPI."""
        if not str(device).startswith("cpu") or not isinstance(self.link, MpiLink):
            return None
        return self.link.dup()

    def tell(self, msg) -> None:
        """From the leader to each member."""
        for m in range(1, self.size):
            self.link.send(msg, m, GROUP)


class RankFailed(RuntimeError):
    """A worker's exception, with its rank, host, phase and traceback in the message."""


# ----------------------------------------------------------------------------- the link

class MpiLink:
    """What the runner needs of a communicator, over mpi4py's COMM_WORLD: probe, receive, send,
    broadcast, abort. The tests drive the runner through an in-process fake with these five."""

    def __init__(self, comm):
        from mpi4py import MPI
        self.comm = comm
        self._status = MPI.Status()
        self._any = MPI.ANY_SOURCE
        self._in_place = MPI.IN_PLACE

    def probe(self, source: int, tag: int) -> Optional[int]:
        """The rank a message with `tag` waits from (`source`, or ANY), or None: never blocks."""
        if self.comm.Iprobe(source=self._any if source == ANY else source, tag=tag, status=self._status):
            return self._status.Get_source()
        return None

    def recv(self, source: int, tag: int):
        return self.comm.recv(source=source, tag=tag)

    def send(self, obj, dest: int, tag: int) -> None:
        self.comm.send(obj, dest=dest, tag=tag)

    def bcast(self, obj, root: int = 0):
        return self.comm.bcast(obj, root=root)

    def abort(self, code: int) -> None:
        self.comm.Abort(code)

    # a CPU group's torch collectives (evaluation/collectives.py), as buffers, collective
    def bcast_array(self, arr: np.ndarray, root: int = 0) -> None:
        self.comm.Bcast(arr, root=root)

    @property
    def rank(self) -> int:
        return self.comm.Get_rank()

    @property
    def size(self) -> int:
        return self.comm.Get_size()

    def allgather_array(self, send: Optional[np.ndarray], recv: np.ndarray) -> None:
        """recv = every rank's `send`, in rank order; send None: this rank's part is in recv."""
        self.comm.Allgather(self._in_place if send is None else send, recv)

    def alltoall_array(self, send: np.ndarray, recv: np.ndarray) -> None:
        self.comm.Alltoall(send, recv)

    def barrier(self) -> None:
        self.comm.Barrier()

    def dup(self) -> "MpiLink":
        return MpiLink(self.comm.Dup())

    def split(self, color: int) -> "MpiLink":
        """The communicator of the ranks that give the same `color`, ordered as in this one."""
        return MpiLink(self.comm.Split(color, self.comm.Get_rank()))


# ----------------------------------------------------------------------------- launch

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
    link: Any = None  # MpiLink (or the tests' fake); None for a single process without MPI
    cpus: int = 0  # CPU threads this rank may use (see cpu_share); 0: not measured
    group: Optional[Group] = None  # with eval.group_size > 1, this rank's group (after start-up)

    @property
    def mpi(self) -> bool:
        return self.link is not None

    def abort(self, code: int) -> None:
        """End the whole job with `code` (several ranks): MPI_Abort kills every rank (a plain
        exit would leave the others blocked in a receive)."""
        sys.stdout.flush()
        sys.stderr.flush()
        # MPI_Abort tears the launcher's forwarding pipes down at once: output already
        # flushed but not yet read by the proxy (MPICH's hydra) is lost. A moment to let it
        # through costs nothing on a path that ends the job.
        time.sleep(ABORT_GRACE_S)
        self.link.abort(code)
        os._exit(code)


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
        raise UserError(f"started by an MPI launcher but mpi4py cannot be imported ({e}): pip install "
                        "'lldist[mpich]' (mpi4py with MPICH's wheel: launch with its mpiexec, in the same environment), "
                        "or pip install mpi4py built against your system's MPI")
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
                  MpiLink(comm), cpu_share(masks, mine))
    local.Free()
    return ctx


# ----------------------------------------------------------------------------- failures

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


def _note(exc: BaseException, ctx: "Context", phase: str) -> None:
    """Name the rank and phase on the user's own exception, which goes on as it is: as a PEP 678
    note (shown under its traceback) and as `lldist_failure`, the line errors.run_cli prints."""
    if isinstance(exc, (UserError, Stopped, KeyboardInterrupt)):
        return
    where = f"{_where(ctx.host, ctx.rank)} failed in {phase}"
    if hasattr(exc, "add_note"):
        exc.add_note(f"lldist: {where}")
    said = getattr(exc, "lldist_failure", None)  # what the work knew (which data met which model) stays
    exc.lldist_failure = f"{where}: {said}" if said else where


def _wait(link, source: int, tag: int, should_stop=lambda: False, longest: float = POLL_MAX_S,
          deadline: Optional[float] = None):
    """(source, message) of the next message from `source` (or ANY), sleeping between polls (at
    most `longest` seconds): a blocking receive spins a core in most MPIs and never returns on a
    signal. Returns (None, None) if should_stop() became true first, or `deadline` seconds passed."""
    nap = min(POLL_S, longest)
    t_end = None if deadline is None else time.monotonic() + deadline
    while True:
        src = link.probe(source, tag)
        if src is not None:
            return src, link.recv(src, tag)
        if should_stop() or (t_end is not None and time.monotonic() > t_end):
            return None, None
        time.sleep(nap)
        nap = min(longest, nap * 1.5)


# ----------------------------------------------------------------------------- the whole run

def run(ctx: Context, room: Room, should_stop=lambda: None) -> int:
    """One distributed computation; returns the exit status (0 when every chunk is done).

    Collective: every rank calls it. `room.prepare()` runs on rank 0 only; `room.build(payload)`
    on every other rank. `should_stop()` returns a signal number once one asked rank 0 to stop.
    In a single process failures raise (see the module docstring); with several ranks they do
    not return: MPI_Abort ends every rank."""
    if ctx.rank != 0:
        return _worker(ctx, room)
    alone = ctx.size == 1
    try:
        payload = room.prepare()
    except BaseException as e:
        if alone:  # no one to abort: the exception is the caller's (see the module docstring)
            _note(e, ctx, "prepare")
            raise
        if isinstance(e, KeyboardInterrupt):
            e = Stopped(signal.SIGINT, "interrupted while preparing; nothing was computed")
        code, message, tb = (e.exit_code, one_line(e), "") if isinstance(e, Stopped) else \
            _failure(0, ctx.host, "prepare", e)
        for w in range(1, ctx.size):
            ctx.link.send(("abort", code), w, CTRL)
        if isinstance(e, Stopped):
            print(f"lldist: {message}", file=sys.stderr, flush=True)
        else:
            _report(one_line(e) if code == EXIT_USAGE else message, tb)
        return code

    hosts = {0: (ctx.host, room.device)}
    if not alone:
        status = _start_workers(ctx, room, payload, hosts, should_stop)
        if status:
            return status
    progress = None
    try:
        progress = room.start(hosts)
        cost = _coordinate(ctx, room, progress, hosts, should_stop)
    except (Stopped, KeyboardInterrupt) as e:
        _close(progress, room, "stopped")
        if alone:
            raise  # Ctrl-C stays a KeyboardInterrupt: a notebook's own, the command line's 130
        if isinstance(e, KeyboardInterrupt):
            e = Stopped(signal.SIGINT, "interrupted: finished cells are saved; run the same command to resume")
        print(f"lldist: {e}", file=sys.stderr, flush=True)
        ctx.abort(e.exit_code)
    except BaseException as e:
        phase = getattr(e, "lldist_phase", "the coordinator")
        if alone:
            _close(progress, room, "failed")
            _note(e, ctx, phase)
            raise
        # the error first: closing the file can take a while, and the error is what matters
        _report(str(e)) if isinstance(e, RankFailed) else _report(*_failure(0, ctx.host, phase, e)[1:])
        _close(progress, room, "failed")
        print("lldist: finished cells are saved; run the same command to resume", file=sys.stderr, flush=True)
        ctx.abort(1)
    _close(progress, room, "done", cost)
    return 0


def _close(progress, room: Room, outcome: str, cost: Optional[dict] = None) -> None:
    if progress is not None:
        progress.close()
    room.close(outcome, cost)


def _start_workers(ctx: Context, room: Room, payload, hosts: dict, should_stop) -> int:
    """Payload out, statuses in, go or abort. Returns 0 to go on, else the exit status."""
    link = ctx.link
    for w in range(1, ctx.size):
        link.send(("payload",), w, CTRL)
    k = getattr(room, "group_size", 1)
    link.bcast((k, payload), 0)
    failed = []
    if k > 1:  # rank 0 leads group 0: it builds with its members, as every group does
        _join_group(ctx, k)
        try:
            hosts[0] = (ctx.host, room.build(payload, ctx.group))
        except Exception as e:
            # its members may be stuck in a collective with it and never report: end the job now
            code, message, tb = _failure(0, ctx.host, "build", e)
            _report(message if code != EXIT_USAGE else one_line(e), tb)
            room.close("failed", None)
            ctx.abort(code)
    for _ in range(1, ctx.size):
        src, msg = _wait(link, ANY, CTRL, lambda: should_stop() is not None)
        if msg is None:  # a signal while the workers build
            signum = should_stop()
            for w in range(1, ctx.size):
                link.send(("abort", 128 + signum), w, CTRL)
            room.close("stopped", None)
            print(f"lldist: stopped by signal {signum} while the ranks started; nothing computed",
                  file=sys.stderr, flush=True)
            return 128 + signum
        _, host, device, err = msg
        hosts[src] = (host, device)
        if err is not None:
            failed.append(err)
    if failed:
        code = EXIT_USAGE if all(c == EXIT_USAGE for c, _, _ in failed) else 1
        for w in range(1, ctx.size):
            link.send(("abort", code), w, CTRL)
        room.close("failed", None)
        for _, message, tb in failed[:1]:  # the first is enough; the others are usually the same
            _report(message, tb)
        if len(failed) > 1:
            print(f"lldist: ({len(failed) - 1} more rank(s) failed to start)", file=sys.stderr, flush=True)
        return code
    for w in range(1, ctx.size):
        link.send(("go",), w, CTRL)
    return 0


def _join_group(ctx: Context, k: int) -> None:
    """Split the world into groups of k consecutive ranks (collective: every rank calls it)."""
    ctx.group = _group_of(ctx, k)


def _group_of(ctx: Context, k: int) -> Group:
    """This rank's group of k consecutive ranks, its communicator split off (collective)."""
    return Group(ctx.rank // k, ctx.rank % k, k, ctx.link.split(ctx.rank // k))


def _worker(ctx: Context, room: Room) -> int:
    link = ctx.link
    _, msg = _wait(link, 0, CTRL)
    if msg[0] == "abort":
        return msg[1]
    k, payload = link.bcast(None, 0)
    if k > 1:
        _join_group(ctx, k)
    device, err = None, None
    try:
        device = room.build(payload, ctx.group)
    except Exception as e:
        err = _failure(ctx.rank, ctx.host, "build", e)
    link.send(("built", ctx.host, device or "?", err), 0, CTRL)
    # "go" follows the last rank's status closely; a rank that failed waits for rank 0's word,
    # but not forever: rank 0 may be stuck in its own group's set-up with this rank
    _, msg = _wait(link, 0, CTRL, longest=0.001, deadline=None if err is None else ABORT_WAIT_S)
    if msg is None:
        _report(err[1], err[2])
        ctx.abort(err[0])
    if msg[0] == "abort":
        return msg[1]
    _yield_to_the_coordinator()
    if ctx.group is not None and not ctx.group.leader:
        _follow(ctx, room)
    else:
        _work(ctx, room)
    return 0


def _yield_to_the_coordinator() -> None:
    """Workers run at a slightly lower priority than rank 0: where ranks share cores (8 ranks on
    2 here) the coordinator's short answers then come first; a real run's p99 service time fell
    from 0.65 to 0.17 ms (docs/PERFORMANCE.md). Ranks with cores of their own see no change."""
    try:
        os.nice(WORKER_NICE)
    except OSError:  # not allowed here: no matter
        pass


# ----------------------------------------------------------------------------- chunks

class _Coordinator:
    """Rank 0's side of the chunks: hand the schedule's chunks to the workers and to rank 0
    itself, pass each finished chunk to the room. State in attributes; one method a message."""

    def __init__(self, ctx: Context, room: Room, progress, hosts: dict):
        self.ctx, self.room, self.progress, self.hosts = ctx, room, progress, hosts
        self.sched = room.schedule
        self.handed = {}  # chunk id -> (rank, cells)
        k = ctx.group.size if ctx.group is not None else 1
        self.groups = max(1, ctx.size // k)
        # the ranks that talk to rank 0: every other rank, or with groups their leaders
        self.owed = {w: 0 for w in range(k, ctx.size, k)}  # answers each worker waits for
        self.waiting = {}  # the workers with answers owed, in the order they asked (a dict as an ordered set)
        self.asked = set()  # workers whose first request came: each must hear "stop" before the end
        self.next_id = 0
        self.local = None  # rank 0's own chunk: [id, cells, position, values, t_start]
        self.cost = {"messages": 0, "seconds": 0.0, "results": 0, "service": []}

    def take(self):
        cells = self.sched.take()
        if cells is None:
            return None, None
        self.next_id += 1
        return self.next_id - 1, cells

    def owe(self, dest: int, n: int) -> None:
        self.owed[dest] += n
        self.waiting[dest] = None

    def answer(self) -> None:
        """Every answer owed that can be given now: a chunk, or "stop" once none will come.
        Only the workers that wait are visited: a message's cost must not grow with the ranks."""
        link = self.ctx.link
        for dest in list(self.waiting):
            while self.owed[dest]:
                cid, cells = self.take()
                if cells is not None:
                    self.handed[cid] = (dest, cells)
                    link.send(("chunk", cid, cells), dest, WORK)
                elif self.sched.exhausted:
                    link.send(("stop",), dest, WORK)
                else:
                    return  # the schedule waits for results still out
                self.owed[dest] -= 1
            del self.waiting[dest]

    def saved(self, n: int) -> None:
        if n:
            self.progress.update(n)

    def keep(self, result: ChunkResult) -> None:
        try:
            self.saved(self.room.take_result(result))
        except BaseException as e:
            e.lldist_phase = f"the write of chunk {result.chunk}"
            raise

    def handle(self, src: int, msg) -> None:
        kind = msg[0]
        if kind == "ready":
            self.owe(src, msg[1])
            self.asked.add(src)
        elif kind == "result":
            result = msg[1]
            self.handed.pop(result.chunk)
            self.keep(result)
            self.owe(src, 1)
        elif kind == "error":
            _, cid, text = msg
            cells = self.handed.get(cid, (None, None))[1]
            phase = f"chunk {cid} (cells {cells[0]}..{cells[-1]})" if cells is not None else "a chunk"
            last = text.strip().splitlines()[-1] if text.strip() else "?"
            raise RankFailed(f"{_where(self.hosts.get(src, ('?',))[0], src)} failed in {phase}: {last}\n"
                             f"--- traceback of rank {src} ---\n{text.rstrip()}")

    def mailbox(self) -> bool:
        """Handle every message waiting; True when there was one."""
        link, got = self.ctx.link, False
        while link is not None:
            src = link.probe(ANY, WORK)
            if src is None:
                break
            t = time.perf_counter()
            msg = link.recv(src, WORK)
            self.handle(src, msg)
            self.answer()
            dt = time.perf_counter() - t
            self.cost["messages"] += 1
            self.cost["seconds"] += dt
            if msg[0] == "result":
                self.cost["results"] += 1
                if len(self.cost["service"]) < SERVICE_SAMPLES:  # bounded: a 10001^2 grid has millions
                    self.cost["service"].append(dt)
            got = True
        return got

    def compute_own(self) -> bool:
        """One pass of rank 0's own cells; True when it computed."""
        alone = self.ctx.link is None or self.ctx.size == 1
        computes = alone or (self.room.rank0_computes and self.groups <= RANK0_COMPUTES_UP_TO)
        if self.local is None and computes:
            cid, cells = self.take()
            if cells is not None:
                self.local = [cid, cells, 0, None, time.time()]
                if self.ctx.group is not None:
                    self.ctx.group.tell(("cells", cid, cells))  # group 0 evaluates it with rank 0
                if not alone:
                    self.answer()  # an adaptive schedule may have more now
        if self.local is None:
            return False
        cid, cells, pos, values, t0 = self.local
        per_pass = self.room.cells_per_pass
        try:
            part = self.room.evaluate(cells[pos:pos + per_pass])
        except BaseException as e:
            e.lldist_phase = f"chunk {cid} (cells {cells[0]}..{cells[-1]})"
            raise
        if values is None:
            values = self.local[3] = np.zeros((len(cells),) + part.shape[1:])
        values[pos:pos + len(part)] = part
        self.local[2] = min(len(cells), pos + per_pass)
        if self.local[2] == len(cells):
            self.keep(ChunkResult(cid, cells, values, 0, self.ctx.host, self.room.device, t0, time.time()))
            self.local = None
            if self.ctx.size > 1:
                self.answer()
        return True

    @property
    def finished(self) -> bool:
        return self.sched.exhausted and not self.handed and not self.waiting and len(self.asked) == len(self.owed)


def _coordinate(ctx: Context, room: Room, progress, hosts: dict, should_stop) -> dict:
    """The chunk phase on rank 0. Raises RankFailed with a worker's traceback, Stopped on a
    signal. Returns the coordinator's own cost: {"messages": n, "seconds": time receiving,
    keeping, answering, "results": result messages, "service": seconds of each (the first
    SERVICE_SAMPLES), "wall": seconds in all}."""
    co = _Coordinator(ctx, room, progress, hosts)
    t_begin = time.perf_counter()
    nap = POLL_S
    while True:
        signum = should_stop()
        if signum is not None:
            raise Stopped(signum, f"stopped by signal {signum}: finished cells are saved; "
                                  "run the same command to resume")
        got = co.mailbox()
        co.saved(room.tick())
        if co.compute_own():
            continue
        if ctx.size > 1 and co.sched.exhausted and co.waiting:
            co.answer()  # the last result may have ended the schedule: stop whoever waits
        if co.finished:
            co.cost["wall"] = time.perf_counter() - t_begin
            if ctx.group is not None:
                ctx.group.tell(("stop",))  # group 0's members
            return co.cost
        if got:
            nap = POLL_S
            continue
        # nothing to compute here: wait for a worker, polling so that SIGTERM is noticed
        # (a blocking Probe would not return on a signal) without spinning a core
        time.sleep(nap)
        nap = min(0.001, nap * 1.5)


def _work(ctx: Context, room: Room, prefetch: int = 2) -> None:
    """Ask for chunks, evaluate them, send results, until told to stop. An exception is sent
    to the coordinator with its traceback; then this rank waits to be aborted."""
    link = ctx.link
    # SIGTERM keeps its default here: a worker dies at once (its unfinished chunk is simply
    # computed again by the next run); only rank 0, which owns the file, closes it first.
    link.send(("ready", prefetch), 0, WORK)
    expect, queue, cid = prefetch, deque(), None
    try:
        while True:
            # take every answer already here; wait only when there is nothing to do
            while expect > 0 and (not queue or link.probe(0, WORK) is not None):
                _, msg = _wait(link, 0, WORK, longest=0.001)  # a chunk's latency: keep it short
                expect -= 1
                if msg[0] == "chunk":
                    queue.append((msg[1], msg[2]))
            if not queue:
                if ctx.group is not None:
                    ctx.group.tell(("stop",))
                return
            cid, cells = queue.popleft()
            if ctx.group is not None:
                ctx.group.tell(("cells", cid, cells))  # the members evaluate it with this rank
            t0 = time.time()
            values = room.evaluate(cells)
            link.send(("result", ChunkResult(cid, cells, values, ctx.rank, ctx.host, room.device, t0, time.time())),
                      0, WORK)
            expect += 1
    except KeyboardInterrupt:
        # Ctrl-C reaches every rank: rank 0 saves what is finished and ends the job
        _wait_for_abort(link)
    except Exception:
        link.send(("error", cid, traceback.format_exc()), 0, WORK)
        _wait_for_abort(link)


def _follow(ctx: Context, room: Room) -> None:
    """A group member: evaluate every chunk its leader announces, with it (the cells' collectives
    are inside room.evaluate), until the leader says stop. Its values are the leader's too: only
    the leader sends them. A failure goes to rank 0 at once; the member then waits for the abort,
    and aborts the job itself after ABORT_WAIT_S (its leader, or rank 0 when it leads this group,
    may be stuck in a collective with it)."""
    g, cid = ctx.group, None
    try:
        while True:
            _, msg = _wait(g.link, 0, GROUP, longest=0.001)
            if msg[0] == "stop":
                return
            _, cid, cells = msg
            room.evaluate(cells)
    except KeyboardInterrupt:
        _wait_for_abort(ctx.link)
    except Exception:
        text = traceback.format_exc()
        if g.index != 0:  # rank 0 is free to report it and close the file first
            ctx.link.send(("error", cid, text), 0, WORK)
            _wait(ctx.link, 0, CTRL, longest=0.2, deadline=ABORT_WAIT_S)
        # rank 0 leads this group and waits in a collective with this rank (or did not answer):
        # the report is this rank's, and the abort too; the file keeps what was committed
        last = text.strip().splitlines()[-1]
        _report(f"{_where(ctx.host, ctx.rank)} failed in chunk {cid} (a member of group {g.index}): {last}", text)
        ctx.abort(1)


# ----------------------------------------------------------------------------- a computation at θ*

class Spread:
    """A computation at θ* spread over the ranks (the second conversation, at the top): a gate,
    results gathered, the world of every rank for torch's collectives. With one process it is
    never made.

        spread = Spread(ctx)
        lo, hi = spread.share(len(batches))        # this rank's batches
        world = spread.group(spread.size)          # every rank, for a torch.distributed world
    """

    def __init__(self, ctx: Context, what: str = "the computation at theta*"):
        self.ctx, self.rank, self.size = ctx, ctx.rank, ctx.size
        self.what = what  # what a failure report names: "the Hessian", "the sharpness", "connect"

    def share(self, n: int) -> tuple:
        return n * self.rank // self.size, n * (self.rank + 1) // self.size

    def group(self, k: int) -> Group:
        """Collective: this rank's Group of k consecutive ranks (eval.group_size), whose leader
        broadcasts the address of the group's own torch.distributed world."""
        return _group_of(self.ctx, k)

    def gate(self, value=None):
        """Collective: the others wait (polling, no core spun) until rank 0 comes here, e.g. after
        it trained the checkpoint they are about to load; every rank returns rank 0's `value`."""
        if self.rank == 0:
            for w in range(1, self.size):
                self.ctx.link.send(("go", value), w, ASK)
            return value
        return _wait(self.ctx.link, 0, ASK, longest=0.2)[1][1]

    def fail(self, exc: BaseException) -> None:
        """Rank 0 failed or was stopped while the others serve it: report it and end every rank
        (they wait for its next ASK). Returns only with one process: the caller raises."""
        if self.size <= 1:
            return
        if isinstance(exc, Stopped):
            code = exc.exit_code
            print(f"lldist: {one_line(exc)}", file=sys.stderr)
        elif isinstance(exc, KeyboardInterrupt):
            code = SIGINT_EXIT
            print("lldist: interrupted", file=sys.stderr)
        else:
            code, message, tb = _failure(self.rank, self.ctx.host, self.what, exc)
            _report(message, tb)
        self.ctx.abort(code)

    def gather(self, mine: dict) -> dict:
        """Collective: every rank's {index: value} merged, returned on every rank."""
        link = self.ctx.link
        if self.rank == 0:
            merged = dict(mine)
            for w in range(1, self.size):
                merged.update(_wait(link, w, SHARE, longest=PRODUCT_POLL_MAX_S)[1])
            for w in range(1, self.size):
                link.send(merged, w, SHARE)
            return merged
        link.send(mine, 0, SHARE)
        return _wait(link, 0, SHARE, longest=PRODUCT_POLL_MAX_S)[1]

def _wait_for_abort(link) -> None:
    """A failed worker waits for rank 0's MPI_Abort; it never returns on its own, but a second
    Ctrl-C ends it quietly."""
    while True:
        try:
            _wait(link, 0, CTRL, longest=1.0)
        except KeyboardInterrupt:
            os._exit(SIGINT_EXIT)


def install_sigterm():
    """SIGTERM (Slurm time limit, preemption) is remembered; returns `should_stop`, which
    gives the signal's number once it came. The coordinator then stops handing out work,
    closes the file (every finished chunk is already flushed) and exits 128 + 15."""
    flag = {}

    def handler(signum, frame):
        flag["stop"] = signum
    signal.signal(signal.SIGTERM, handler)
    return lambda: flag.get("stop")
