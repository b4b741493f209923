"""A rank group's torch.distributed collectives over the runner's MPI link, for CPU tensors:
the backend a CPU group's process group uses instead of gloo. No MPI here: the link
(transport/runner.py's MpiLink on a duplicate of the group's communicator: runner.Group.
collective_link) moves numpy buffers; this module turns torch's collectives into its calls.

    name = register(link)                      # evaluation/groups.init_process_group does this

Why: gloo moves every byte through TCP on the loopback, about 0.3 GB/s on the 2-core VM of
docs/GROUPS.md, so a shard group of two spent as long gathering GPT-2's rows as computing its
forward. MPI moves them through shared memory within a node, and over the interconnect across
nodes: an all-gather of 62M floats a rank between two ranks took 0.055 s with mpich against
gloo's 0.75 s (the same VM, 2026-12-07). On GPUs the group keeps NCCL.

What is offered is what lldist's groups use: FSDP2's all-gather (in place) and reduce-scatter,
all-reduce, broadcast and barrier. Every call completes before it returns (a done Work): FSDP2
on CPU has no stream to overlap with. Sums are made here, in rank order, from every rank's
contribution (an all-gather, or an all-to-all for the reduce-scatter): the same bits on every
rank and at every run, whatever MPI's own reduction order would be. The link's communicator is
a duplicate of the group's, so none of these messages can meet the runner's own.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist
from torch._C._distributed_c10d import _create_work_from_future
from torch.futures import Future

NAME = "lldist_mpi"
CHUNK = 1 << 24  # elements summed at a time: an all-reduce holds k chunks, not k tensors

_staged: list = []  # the link of the group being made: torch's backend maker takes no argument of ours


def register(link) -> str:
    """Stage `link` (the group's ranks, with rank, size, allgather_array, alltoall_array,
    bcast_array and barrier) for the next process group made with the returned backend name;
    the backend is registered once a process."""
    if NAME.upper() not in dist.Backend._plugins:
        dist.Backend.register_backend(NAME, _create, devices=["cpu"])
    _staged[:] = [link]
    return NAME


def _create(store, rank: int, size: int, timeout) -> "LinkProcessGroup":
    if not _staged:
        raise RuntimeError(f"the {NAME} backend makes a group's process group only from a staged "
                           "link (evaluation.collectives.register)")
    link = _staged.pop()
    if (link.rank, link.size) != (rank, size):
        raise RuntimeError(f"{NAME}: torch.distributed asks for rank {rank} of {size}, the "
                           f"link is rank {link.rank} of {link.size}")
    return LinkProcessGroup(link)


def _done(result=None):
    f = Future()
    f.set_result(result)
    return _create_work_from_future(f)


def _buffer(t: torch.Tensor) -> np.ndarray:
    """A contiguous CPU tensor's memory as numpy (half types as bytes: MPI only moves them)."""
    if t.device.type != "cpu" or not t.is_contiguous():
        raise RuntimeError(f"{NAME} moves contiguous CPU tensors only (got {t.device}, "
                           f"contiguous={t.is_contiguous()})")
    t = t.detach().reshape(-1)
    if t.dtype in (torch.bfloat16, torch.float16):
        t = t.view(torch.int16)
    elif t.dtype == torch.bool:
        t = t.view(torch.uint8)
    return t.numpy()


def _check_sum(opts) -> None:
    op = getattr(opts, "reduceOp", None)
    if op is not None and op != dist.ReduceOp.SUM:
        raise RuntimeError(f"{NAME} sums only (lldist sets FSDP2 to plain sums); asked for {op}")


class LinkProcessGroup(dist.ProcessGroup):
    def __init__(self, link):
        super().__init__(link.rank, link.size)
        self.link, self._name = link, ""

    def size(self) -> int:
        return self.link.size

    def getBackendName(self) -> str:
        return NAME

    # torch names the group after making it; DeviceMesh reads the name back from Python
    def _set_group_name(self, name: str) -> None:
        self._name = name
        super()._set_group_name(name)

    @property
    def group_name(self) -> str:
        return self._name

    # ------------------------------------------------------------------ moving bytes
    def _gather(self, out: torch.Tensor, inp: torch.Tensor) -> None:
        """out = the ranks' `inp`, concatenated in rank order. FSDP2 gathers in place (its
        input is this rank's slice of the output), which MPI calls IN_PLACE."""
        mine = out.data_ptr() + self.link.rank * inp.numel() * inp.element_size()
        if inp.data_ptr() == mine and inp.is_contiguous():
            self.link.allgather_array(None, _buffer(out))
        else:
            self.link.allgather_array(_buffer(inp.contiguous()), _buffer(out))

    def all_gather_single(self, output_tensor, input_tensor, opts=None):
        if output_tensor.is_contiguous():
            self._gather(output_tensor, input_tensor)
        else:
            flat = output_tensor.contiguous()
            self._gather(flat, input_tensor)
            output_tensor.copy_(flat)
        return _done(output_tensor)

    _allgather_base = all_gather_single

    def _stacked(self, t: torch.Tensor) -> torch.Tensor:
        """The ranks' `t`, stacked along a new first axis in rank order."""
        out = torch.empty((self.size(),) + tuple(t.shape), dtype=t.dtype)
        self._gather(out, t.contiguous())
        return out

    def allgather(self, output_tensors, input_tensors, opts=None):
        for outs, inp in zip(output_tensors, input_tensors):
            for o, b in zip(outs, self._stacked(inp)):
                o.copy_(b)
        return _done(output_tensors)

    def broadcast(self, tensors, opts=None):
        root = getattr(opts, "rootRank", 0)
        for t in tensors:
            flat = t if t.is_contiguous() else t.contiguous()
            self.link.bcast_array(_buffer(flat), root)
            if flat is not t:
                t.copy_(flat)
        return _done(tensors)

    def barrier(self, opts=None):
        self.link.barrier()
        return _done()

    # ------------------------------------------------------------------ sums, in rank order
    def _summed(self, t: torch.Tensor) -> torch.Tensor:
        flat = t.contiguous().reshape(-1)
        out = torch.empty_like(flat)
        for s in range(0, flat.numel(), CHUNK):
            out[s:s + CHUNK] = _in_order(self._stacked(flat[s:s + CHUNK]))
        return out.view(t.shape)

    def allreduce(self, tensors, opts=None):
        _check_sum(opts)
        for t in tensors:
            t.copy_(self._summed(t))
        return _done(tensors)

    def allreduce_coalesced(self, tensors, opts=None):
        return self.allreduce(tensors, opts)

    def reduce_scatter_single(self, output_tensor, input_tensor, opts=None):
        """output = the sum over ranks of their input's piece for this rank (rank order)."""
        _check_sum(opts)
        k = self.size()
        pieces = input_tensor.contiguous().reshape(k, -1)
        received = torch.empty_like(pieces)
        self.link.alltoall_array(_buffer(pieces), _buffer(received))
        output_tensor.reshape(-1).copy_(_in_order(received))
        return _done(output_tensor)

    _reduce_scatter_base = reduce_scatter_single

    def reduce_scatter(self, output_tensors, input_tensors, opts=None):
        for out, pieces in zip(output_tensors, input_tensors):
            self.reduce_scatter_single(out, torch.stack([p.reshape(-1) for p in pieces]), opts)
        return _done(output_tensors)


def _in_order(parts: torch.Tensor) -> torch.Tensor:
    """parts[0] + parts[1] + ... left to right (a fixed order, so every rank gets the same bits)."""
    acc = parts[0].clone()
    for p in parts[1:]:
        acc += p
    return acc
