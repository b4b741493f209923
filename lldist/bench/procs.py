"""The processes of a launched run, read from /proc (Linux): the benchmarks sample each rank's
memory, the tests kill one rank. A rank is known by the rank its launcher put in its
environment (PMI_RANK: MPICH's hydra; OMPI_COMM_WORLD_RANK: Open MPI), not by MPI itself.
"""

from __future__ import annotations

import os

RANK_VARS = (b"PMI_RANK=", b"OMPI_COMM_WORLD_RANK=")


def process_tree(root: int) -> list:
    """`root` and all its descendants, parents before children (MPICH's hydra puts each rank in
    a session of its own, so a process group does not hold a whole run)."""
    children = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            children.setdefault(ppid, []).append(int(d))
    out, todo = [], [root]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def mpi_ranks(root: int, command: bytes = b"lldist.surface") -> dict:
    """{MPI rank: pid} of the processes below a launcher `root` that run `command` (the first
    of each rank in tree order: the rank, not a helper process it started)."""
    out = {}
    for pid in process_tree(root):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if command not in f.read():
                    continue
            with open(f"/proc/{pid}/environ", "rb") as f:
                env = f.read().split(b"\0")
        except OSError:
            continue
        rank = next((int(e.split(b"=", 1)[1]) for e in env if e.startswith(RANK_VARS)), None)
        if rank is not None:
            out.setdefault(rank, pid)
    return out
