"""Who computes which cells: the only module that imports mpi4py.

One process (`python -m lldist.surface job.yaml`) or N under a launcher (`mpirun -n 8 ...`,
`srun --mpi=pmix ...`): the same code path, chosen from the launch environment.

Protocol (rank 0 = coordinator, the only writer of the HDF5 file):
  worker -> 0   ("ready", n)                      asks for n chunks (workers keep one queued ahead)
  0 -> worker   ("chunk", id, cells) | ("stop",)  one answer per chunk asked for
  worker -> 0   ("result", id, values, t0, t1)    also asks for one more chunk
  worker -> 0   ("error", id, traceback)          then waits to be aborted
Rank 0 evaluates cells too, one at a time (or one vmapped group) between polls of its mailbox,
so a worker's request waits at most one cell of rank 0's work, while the worker computes its
queued chunk.
Assignment is dynamic: a slow rank simply asks less often.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import time
import traceback
from collections import deque
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np

from .errors import UserError

TAG = 7
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


@dataclass
class Context:
    rank: int = 0
    size: int = 1
    local_rank: int = 0
    local_size: int = 1
    host: str = socket.gethostname()
    comm: object = None  # mpi4py communicator, None for a single process

    @property
    def mpi(self) -> bool:
        return self.comm is not None

    def abort(self, code: int) -> None:
        """End the whole job with `code`: MPI_Abort kills every rank (a plain exit would leave
        the others blocked in a receive); a single process just exits."""
        sys.stdout.flush()
        sys.stderr.flush()
        if self.comm is not None and self.size > 1:
            self.comm.Abort(code)
            os._exit(code)
        raise SystemExit(code)


def launch() -> Context:
    expected = expected_world_size()
    if expected is None:
        return Context()
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
    ctx = Context(comm.Get_rank(), comm.Get_size(), local.Get_rank(), local.Get_size(), MPI.Get_processor_name(), comm)
    local.Free()
    return ctx


def pick_device(ctx: Context, requested: str) -> str:
    """cuda:<node-local rank mod visible GPUs>, or cpu."""
    import torch
    if requested == "cpu" or (requested == "auto" and not torch.cuda.is_available()):
        return "cpu"
    if not torch.cuda.is_available():
        raise UserError("eval.device is cuda, but torch sees no CUDA device")
    dev = f"cuda:{ctx.local_rank % torch.cuda.device_count()}"
    torch.cuda.set_device(dev)
    return dev


# ----------------------------------------------------------------------------- coordinator

class Stop(Exception):
    """SIGTERM arrived: stop handing out work."""


class RankFailed(RuntimeError):
    """A worker's exception, with its rank, host, chunk and remote traceback in the message."""


@dataclass
class ChunkResult:
    cells: np.ndarray
    values: np.ndarray
    rank: int
    host: str
    device: str
    t_start: float
    t_end: float


def coordinate(ctx: Context, chunks: list, evaluate_cells: Callable, group: int, out_shape: tuple,
               write: Callable[[ChunkResult], None], progress, device: str, hosts: dict,
               compute_on_rank0: bool = True,
               should_stop: Callable[[], bool] = lambda: False) -> None:
    """Hand `chunks` (arrays of flat cell indices) to the workers and to rank 0 itself; call
    `write` once per finished chunk. Raises RuntimeError with a worker's traceback on failure,
    Stop when should_stop() became true (SIGTERM). Returns the coordinator's own cost:
    {"messages": n, "seconds": time spent receiving, writing and answering worker messages}."""
    queue = deque(enumerate(chunks))
    handed = {}  # chunk id -> (rank, cells)
    finished = set()  # workers told to stop and holding nothing
    local = None  # [id, cells, position, values, t_start]
    comm = ctx.comm
    status = None
    if comm is not None:
        from mpi4py import MPI
        status = MPI.Status()

    def answer(dest):
        if queue:
            cid, cells = queue.popleft()
            handed[cid] = (dest, cells)
            comm.send(("chunk", cid, cells), dest=dest, tag=TAG)
        else:
            comm.send(("stop",), dest=dest, tag=TAG)
            if not any(r == dest for r, _ in handed.values()):
                finished.add(dest)

    def handle(src, msg):
        kind = msg[0]
        if kind == "ready":
            for _ in range(msg[1]):
                answer(src)
        elif kind == "result":
            _, cid, values, t0, t1 = msg
            rank, cells = handed.pop(cid)
            write(ChunkResult(cells, values, rank, hosts[rank][0], hosts[rank][1], t0, t1))
            progress.update(len(cells))
            answer(src)
        elif kind == "error":
            _, cid, text = msg
            where = f"chunk {cid} (cells {handed[cid][1][0]}..{handed[cid][1][-1]})" if cid in handed else "setup"
            last = text.strip().splitlines()[-1] if text.strip() else "?"
            raise RankFailed(f"rank {src} on {hosts.get(src, ('?',))[0]} failed in {where}: {last}\n"
                               f"--- traceback of rank {src} ---\n{text}")

    nworkers = ctx.size - 1
    cost = {"messages": 0, "seconds": 0.0}
    while True:
        if should_stop():
            raise Stop()
        while comm is not None and comm.Iprobe(source=MPI.ANY_SOURCE, tag=TAG, status=status):
            t = time.perf_counter()
            src = status.Get_source()
            handle(src, comm.recv(source=src, tag=TAG))
            cost["messages"] += 1
            cost["seconds"] += time.perf_counter() - t
        if local is None and queue and (compute_on_rank0 or nworkers == 0):
            cid, cells = queue.popleft()
            local = [cid, cells, 0, np.zeros((len(cells),) + out_shape), time.time()]
        if local is not None:
            cid, cells, pos, values, t0 = local
            # a few cells at a time (one vmapped group), then back to the mailbox
            values[pos:pos + group] = evaluate_cells(cells[pos:pos + group])
            local[2] = min(len(cells), pos + group)
            if local[2] == len(cells):
                write(ChunkResult(cells, values, 0, ctx.host, device, t0, time.time()))
                progress.update(len(cells))
                local = None
            continue
        if not queue and not handed and len(finished) == nworkers:
            return cost
        # nothing to compute here: wait for a worker, polling so that SIGTERM is noticed
        # (a blocking Probe would not return on a signal) without spinning a core
        time.sleep(0.0005)


# ----------------------------------------------------------------------------- worker

def work(ctx: Context, evaluate_cells: Callable, prefetch: int = 2) -> None:
    """Ask for chunks, evaluate them, send results, until told to stop. An exception is sent
    to the coordinator with its traceback; then this rank waits to be aborted."""
    comm = ctx.comm
    # SIGTERM keeps its default here: a worker dies at once (its unfinished chunk is simply
    # computed again by the next run); only rank 0, which owns the file, closes it first.
    comm.send(("ready", prefetch), dest=0, tag=TAG)
    expect, queue, cid = prefetch, deque(), None
    try:
        while True:
            # take every answer already here; block only when there is nothing to do
            while expect > 0 and (not queue or comm.Iprobe(source=0, tag=TAG)):
                msg = comm.recv(source=0, tag=TAG)
                expect -= 1
                if msg[0] == "chunk":
                    queue.append((msg[1], msg[2]))
            if not queue:
                return
            cid, cells = queue.popleft()
            t0 = time.time()
            values = evaluate_cells(cells)
            comm.send(("result", cid, values, t0, time.time()), dest=0, tag=TAG)
            expect += 1
    except Exception:
        comm.send(("error", cid, traceback.format_exc()), dest=0, tag=TAG)
        while True:  # the coordinator aborts the whole job
            time.sleep(1)


def install_sigterm(flag: dict) -> None:
    """SIGTERM (Slurm time limit, preemption) sets a flag; the coordinator stops handing out
    work, closes the file (every finished chunk is already flushed) and exits."""
    def handler(signum, frame):
        flag["stop"] = signum
    signal.signal(signal.SIGTERM, handler)
