"""Curvature over a data group: every rank holds the whole model and computes exact products
over its share of the batches, while each Lanczos vector is split over the ranks, so no rank
holds the basis and no rank does more than another. No MPI, no HDF5: the caller makes the
ranks' torch.distributed world (runs/sharded_hessian.py, `compute_data`).

    op = DataRows(model, batches, task, rank, size)   # every rank of the world, together
    hv = op.hvp(v)                                    # {name: this rank's part} -> H v, in parts
    top, low, steps, converged = op.extremes(k=3, tol=1e-6)   # lanczos.RowLanczos

Why: the earlier spread (runs/hessian.py with transport.runner.Spread) ran ARPACK on rank 0,
which held its basis of whole float64 vectors, received every product's float64 partial sums
and sent every vector out, while the others waited. On GPT-2 small over two ranks rank 0 peaked
at about 2.3× a worker's memory, the worker idled half of each product, and the basis had to be
capped at 2 GB, so λmin did not converge.

**Layout.** The parameters' entries, flattened in order and padded to size × L, are cut into
`size` contiguous pieces of L: rank r holds entries [rL, (r+1)L). A vector on a rank is a dict
{name: the part of that parameter's flattened entries inside its piece} (most are empty on a
given rank). With that layout neither collective of a product packs anything:

* all-gather: each rank's piece of v (in the model's dtype, as the product uses it) into the
  whole padded vector on every rank;
* the product over this rank's batches, Curvature.local's exact double backward (or the GGN's
  or Fisher's product), summed in float64 into a padded buffer;
* reduce-scatter, in slices of SCATTER entries of each piece: each rank receives its piece of
  the sum over ranks (evaluation/collectives.py adds the ranks' parts in rank order on CPUs;
  NCCL on GPUs), divided by the total weight.

Rank r runs batches [n r / size, n (r+1) / size). Per rank the product holds
the model, its double-backward graph for one batch, v whole in the model's dtype and the
float64 sum whole (both kept between products), and a slice's collective buffers; the Lanczos
basis takes 8 L bytes a vector.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import torch
from torch import nn

from .curvature import ARPACK_BYTES, Curvature
from .lanczos import RowLanczos
from .tasks import Task

SCATTER = 1 << 23  # entries of each rank's piece a reduce-scatter sums at once (64 MB a rank in float64)


@dataclass
class Tally:
    """Seconds in products, of them on this rank's own share of the batches (the rest: the
    collectives, waiting for the slowest rank), and products: over every operator that adds to
    it (a computation's whole operator, its blocks', its jackknife's)."""
    spent: float = 0.0
    busy: float = 0.0
    products: int = 0


class DataRows(RowLanczos):
    """The operator (Hessian, GGN or Fisher: curvature.Curvature's) of the mean loss over fixed
    batches of a model every rank holds whole, in the parameters `names` (default: all), with
    vectors split over `size` ranks (rank `rank` of the default torch.distributed world; one
    rank needs no world)."""

    def __init__(self, model: nn.Module, batches: list, task: Optional[Task], rank: int, size: int,
                 names: Optional[list] = None, watch: Optional[Callable] = None, operator: str = "hessian",
                 basis_bytes: float = ARPACK_BYTES, guard=None, scratch: Optional[dict] = None,
                 tally: Optional[Tally] = None):
        # the product's two whole-vector buffers, kept from one product to the next (and shared
        # by the operators of one computation, which run one at a time): made anew each time,
        # their pages were faulted in again at every product (on GPT-2 small, more system time
        # than compute)
        self.scratch = scratch if scratch is not None else {}
        self.curv = Curvature(model, batches, task, operator=operator, names=names, guard=guard)
        lo, hi = len(batches) * rank // size, len(batches) * (rank + 1) // size
        self.curv.mine = batches[lo:hi]  # this rank's share of each product
        self.rank, self.size, self.watch = rank, size, watch
        self.operator, self.basis_bytes, self.guard = operator, basis_bytes, self.curv.guard
        self.names, self.n = self.curv.names, self.curv.n
        self.shapes = dict(zip(self.names, self.curv.shapes))
        self.device = self.curv.point[self.names[0]].device
        self.dtype = torch.float64
        self.piece = -(-self.n // size)  # L: entries a rank holds (the last piece padded)
        start = rank * self.piece
        offsets = np.cumsum([0] + self.curv.sizes).tolist()
        # each parameter's entries inside this rank's piece, as a range of its flattened entries
        self.parts = {n: (max(start, a) - a, max(min(start + self.piece, b), max(start, a)) - a)
                      for n, a, b in zip(self.names, offsets[:-1], offsets[1:])}
        self.value, self.weight = self._loss_and_weight(batches, lo, hi)
        self.matvecs = 0
        self.tally = tally if tally is not None else Tally()

    def _loss_and_weight(self, batches: list, lo: int, hi: int) -> tuple:
        """The mean loss and the total weight over every batch: each rank fills its batches'
        slots, the others hold zeros, so the all-reduce is exact and the sums run in batch order,
        as curvature.Curvature.loss's on one rank."""
        slots = torch.zeros(len(batches), 2, dtype=torch.float64)
        with torch.no_grad():
            for i in range(lo, hi):
                s, w = self.curv._sum_and_weight(self.curv.point, batches[i])
                slots[i, 0], slots[i, 1] = float(s), float(w)
        if self.size > 1:
            import torch.distributed as dist
            slots = slots.to(self.device)
            dist.all_reduce(slots)
        v = w = 0.0
        for s, n in slots.tolist():
            v, w = v + s, w + n
        return v / w, w

    def _all_sum(self, t: torch.Tensor) -> torch.Tensor:
        return super()._all_sum(t) if self.size > 1 else t  # (one rank needs no world)

    def loss(self) -> float:
        return self.value

    def _rows(self, n: str, whole: torch.Tensor) -> torch.Tensor:
        a, b = self.parts[n]
        return whole.reshape(-1)[a:b].to(self.device, self.dtype)

    def _gathered(self, v: dict) -> torch.Tensor:
        """v whole, in the model's dtype, on every rank (collective)."""
        mine = torch.zeros(self.piece, dtype=self.curv.dtype, device=self.device)
        mine[:self.entries_held()].copy_(torch.cat([v[n].reshape(-1) for n in self.names]))
        if self.size == 1:
            return mine[:self.n]
        import torch.distributed as dist
        # (all_gather_single and reduce_scatter_single in newer torch, *_tensor in older: the same)
        whole = self._buffer("whole", self.curv.dtype)
        (getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor)(whole, mine)
        return whole[:self.n]

    def _buffer(self, key: str, dtype: torch.dtype) -> torch.Tensor:
        """A scratch vector of size × L entries (its contents are the last product's)."""
        buf = self.scratch.get(key)
        if buf is None or buf.numel() != self.piece * self.size or buf.dtype != dtype or buf.device != self.device:
            buf = self.scratch[key] = torch.zeros(self.piece * self.size, dtype=dtype, device=self.device)
        return buf

    def _scattered(self, total: torch.Tensor) -> torch.Tensor:
        """This rank's piece of the sum over ranks of `total` (collective), in slices of at most
        SCATTER entries of each piece: a whole reduce-scatter would hold another float64 copy of
        the vector while it sums (1 GB for GPT-2 small)."""
        import torch.distributed as dist
        scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
        pieces = total.view(self.size, self.piece)
        mine = torch.empty(self.piece, dtype=torch.float64, device=self.device)
        for a in range(0, self.piece, SCATTER):
            b = min(self.piece, a + SCATTER)
            scatter(mine[a:b], pieces[:, a:b].contiguous())
        return mine

    def hvp(self, v: dict) -> dict:
        """The operator times v (collective), in this rank's parts."""
        t0 = time.perf_counter()
        whole = self._gathered(v)
        # (one rank returns its sum itself: a new one)
        total = self._buffer("total", torch.float64) if self.size > 1 else \
            torch.empty(self.piece, dtype=torch.float64, device=self.device)
        t1 = time.perf_counter()
        self.curv.local(whole, out=total)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.tally.busy += time.perf_counter() - t1
        del whole
        mine = self._scattered(total) if self.size > 1 else total
        del total
        mine /= self.weight
        out, pos = {}, 0
        for n in self.names:
            a, b = self.parts[n]
            out[n] = mine[pos:pos + b - a]
            pos += b - a
        self.tally.spent += time.perf_counter() - t0
        self.tally.products += 1
        self.matvecs += 1
        if self.watch is not None:
            self.watch(self.matvecs)
        return out

    def entries_held(self) -> int:
        """Entries of a vector on this rank: about n / size, never n (for size > 1)."""
        return sum(b - a for a, b in self.parts.values())
