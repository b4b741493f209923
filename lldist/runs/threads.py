"""How many CPU threads torch takes on this rank: the job's eval.threads, else OMP_NUM_THREADS,
else this rank's share of its CPUs (transport.runner.cpu_share) less what other processes
already keep busy. Beside six busy processes on 2 cores, 2 threads ran a ResNet-18 surface
2.7-6.8x slower than 1 (two threads of one process wait on each other while a third process
holds the core); `python -m lldist.bench threads` measures the default against fixed choices,
idle and loaded (docs/PERFORMANCE.md).

    n, why = choose(job.eval.threads, cpus)     # why: one phrase for the log
    set_threads(job, cpus) -> n                 # chosen and applied
    n = timed(lambda: ev.evaluate_cells(...), n, cells, log)   # 1 where one thread runs the cells as fast

Idle, more threads are not always faster: a model whose operations are tiny (a digits CNN at
batch 120) ran 79-93 cells/s on one thread and 45-58 on two (`bench threads`, 2026-12-07): the
threads' hand-offs cost more than they share. So an automatic count above one is timed
against one thread on the run's own cells, and the faster kept.
"""

from __future__ import annotations

import os
import time
from typing import Callable, Optional

import torch

SAMPLES, GAP_S = 5, 0.02  # the run queue, read a few times (it changes every few milliseconds)


def busy_elsewhere() -> Optional[float]:
    """The CPUs other processes keep busy now: the median of a few readings of the run queue
    (procs_running in /proc/stat, this process excluded). Not the load average: it trails by a
    minute, so it misses a load that began a second ago and counts this process's own last
    call in a notebook. Idle torch threads sleep (OMP_WAIT_POLICY=PASSIVE: lldist/__init__.py),
    so they are not counted. None where /proc is not there to read."""
    queue = []
    try:
        for i in range(SAMPLES):
            with open("/proc/stat") as f:
                queue.append(next(int(ln.split()[1]) for ln in f if ln.startswith("procs_running")) - 1)
            if i + 1 < SAMPLES:
                time.sleep(GAP_S)
    except (OSError, StopIteration, ValueError, IndexError):
        return None
    return float(max(0, sorted(queue)[SAMPLES // 2]))


def _omp() -> int:
    """OMP_NUM_THREADS as a count, 0 when unset or not a positive number."""
    omp = os.environ.get("OMP_NUM_THREADS", "")
    return int(omp) if omp.isdigit() else 0


def choose(threads: int, cpus: int) -> tuple:
    """(threads, why) for a rank whose share of the CPUs is `cpus`."""
    if threads:
        return threads, "eval.threads"
    if _omp():
        return _omp(), "OMP_NUM_THREADS"
    if not cpus:
        return torch.get_num_threads(), "torch's default"
    busy = busy_elsewhere()
    total = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if busy is None:
        return cpus, f"this rank's share of {total} CPU(s)"
    free = int(total - busy + 0.5)  # (a CPU counts as free when it is at least half idle)
    if free >= cpus:
        return cpus, f"this rank's share of {total} CPU(s)"
    n = max(1, free)
    return n, f"{busy:.0f} of {total} CPU(s) busy with other processes (eval.threads: N sets it)"


EXPENSIVE_S = 2.0  # a cell that takes longer is compute-bound: its threads are kept, not timed
WORTH_TIMING = 50  # cells in the grid: the timing costs about five, so a smaller grid keeps its count untimed
#                    (lldist.curvature's one-cell file would spend five times its work on it)
MARGIN = 0.9  # more threads are kept only when at least 10% faster: one thread wins a tie, as it costs the
#              machine's other work least


def timed(cell: Callable[[], object], n: int, cells: int, log=None) -> int:
    """An automatic count n above 1 against one thread, on the run's own cells (`cell`
    evaluates one: weights set, every batch, the sums): after a warm-up, the faster of two
    cells at each count, kept at least 10% faster for n. A cell over EXPENSIVE_S keeps n
    untimed. A single forward is not enough: on a digits CNN two threads ran one batch as fast
    as one, and whole cells 1.8x slower (the weights' update and the sums between batches are
    many small operations, each waking the second thread). `cells`: the grid's; under
    WORTH_TIMING, n is kept untimed. Returns the count, applied to torch."""
    if n <= 1 or cells < WORTH_TIMING:
        return n
    start = time.perf_counter()
    cell()  # warm-up at n: the first cell pays for allocations
    first = time.perf_counter() - start
    if first > EXPENSIVE_S:
        if log is not None:
            log(f"{n} CPU thread(s): a cell takes {first:.1f} s, long enough to be compute-bound (kept, not timed)")
        return n

    def best(k: int) -> float:
        torch.set_num_threads(k)
        out = float("inf")
        for _ in range(2):
            t = time.perf_counter()
            cell()
            out = min(out, time.perf_counter() - t)
        return out
    many, one = best(n), best(1)
    chosen = n if many < MARGIN * one else 1
    torch.set_num_threads(chosen)
    if log is not None:
        log(f"{chosen} CPU thread(s): a cell took {one * 1e3:.3g} ms on one thread, {many * 1e3:.3g} ms on {n}")
    return chosen


def automatic(job) -> bool:
    """Whether lldist chooses (neither eval.threads nor OMP_NUM_THREADS does)."""
    return not job.eval.threads and not _omp()


def set_threads(job, cpus: int, log=None, fixed: bool = False) -> int:
    """Choose (see `choose`), apply to torch, say why when `log` is given; returns the number.
    `fixed`: `cpus` is the number already chosen (a resume's, rank 0's), taken as it is."""
    n, why = (cpus, "as rank 0 chose") if fixed and automatic(job) else choose(job.eval.threads, cpus)
    torch.set_num_threads(n)
    if log is not None:
        log(f"{n} CPU thread(s): {why}")
    return torch.get_num_threads()
