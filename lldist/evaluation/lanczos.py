"""Lanczos on vectors that no rank holds whole: each rank holds its rows of every vector, dot
products are float64 sums per parameter, all-reduced and added in parameter order, so every
rank gets the same numbers, runs the same recurrence and takes the same decisions. No MPI, no
HDF5: the ranks' torch.distributed world is made by the caller.

    class Op(RowLanczos):                          # sets names, shapes, n, device, dtype,
        def _rows(self, name, whole): ...          # basis_bytes; this rank's rows of a whole entry
        def hvp(self, v): ...                      # {name: rows} -> the operator times v, in rows
    top, low, steps, converged = op.extremes(k=3, tol=1e-6)
    (tr, se), blocks = op.trace(64, blocks={...})  # curvature.Curvature's Rademacher vectors
    nodes, weights = op.density(4, 80)             # stochastic Lanczos quadrature

Two operators use it: a shard group's (sharded.py: FSDP2, products by differences of the
sharded gradient) and a data group's (data_rows.py: every rank holds the whole model and
computes exact products over its share of the batches).

**Lanczos.** Full reorthogonalization (twice, classical Gram-Schmidt, its dot products in one
all-reduce) against the basis in rows. The eigenvalues of the tridiagonal T are the Ritz
values; a wanted one has converged when its residual |β_j s_j| is at most tol × the largest
|Ritz value| (ARPACK's test, relative to the spectrum's scale, so that a λmin near 0 converges
too).

**The basis** (`Basis`) keeps its first vectors in memory up to `basis_bytes`
(curvature.basis_memory) and writes the later ones to an unlinked file in the temp folder
(TMPDIR: a node-local disk on a cluster), reading each back when reorthogonalization passes
it: the same arithmetic on the same float64 values, so the same numbers bit for bit, at the
cost of reading the spilled basis twice a step.
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import numpy as np
import torch

from .curvature import mean_and_stderr
from .groups import all_reduce_sum


class Basis:
    """A Lanczos basis on one rank, in order: its rows of each vector (dicts of tensors), the first
    in memory up to `budget` bytes, the rest appended to a temporary file (unlinked at once:
    nothing is left behind, even by a SIGKILL) and read back one vector at a time when iterated."""

    def __init__(self, names: list, like: dict, budget: float):
        self.names = names
        self.shapes = [tuple(like[n].shape) for n in names]
        self.sizes = [like[n].numel() for n in names]
        self.dtype, self.device = like[names[0]].dtype, like[names[0]].device
        self.bytes = max(1, sum(self.sizes)) * torch.empty((), dtype=self.dtype).element_size()
        self.keep = max(1, int(budget // self.bytes))
        self.memory, self.spilled, self.file = [], 0, None

    def append(self, v: dict) -> None:
        if len(self.memory) < self.keep:
            self.memory.append(v)
            return
        import os
        import tempfile
        if self.file is None:
            self.file = tempfile.TemporaryFile(prefix="lldist-lanczos-")
        flat = torch.cat([v[n].reshape(-1) for n in self.names]).cpu().numpy()
        os.pwrite(self.file.fileno(), flat.tobytes(), self.spilled * self.bytes)
        self.spilled += 1

    def __len__(self) -> int:
        return len(self.memory) + self.spilled

    def __iter__(self):
        yield from self.memory
        import os
        for j in range(self.spilled):
            raw = os.pread(self.file.fileno(), self.bytes, j * self.bytes)
            flat = torch.from_numpy(np.frombuffer(raw, dtype=torch.empty((), dtype=self.dtype).numpy().dtype).copy())
            parts = torch.split(flat.to(self.device), self.sizes)
            yield {n: t.view(s) for n, t, s in zip(self.names, parts, self.shapes)}

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None


class RowLanczos:
    """What is computed from an operator's products on vectors in rows (see the module's text).
    A subclass sets `names` (the parameters, in order), `shapes` ({name: the whole entry's
    shape}), `n` (entries in all), `device`, `dtype` (the vectors', float64) and `basis_bytes`,
    and defines `_rows` and `hvp`."""

    spilled = 0  # the most Lanczos vectors a run of this operator wrote to disk
    kept, vector_bytes = 0, 0  # the last run's basis: vectors in memory, bytes of one (this rank's rows)

    # ------------------------------------------------------------------ vectors in rows
    def _all_sum(self, t: torch.Tensor) -> torch.Tensor:
        """t summed over the ranks (the default torch.distributed world's), in place."""
        return all_reduce_sum(t)

    def dot(self, a: dict, b: dict) -> float:
        """aᵀb over every entry: float64 sums per parameter, all-reduced, added in order."""
        sums = torch.stack([(a[n].double() * b[n].double()).sum() for n in self.names])
        return math.fsum(self._all_sum(sums).tolist())

    def dots(self, basis: list, w: dict) -> list:
        """[qᵀw for q in basis], in one all-reduce."""
        if not basis:
            return []
        sums = torch.stack([torch.stack([(q[n] * w[n]).sum() for n in self.names]) for q in basis]).double()
        return [math.fsum(row) for row in self._all_sum(sums).tolist()]

    def normal(self, seed: int) -> dict:
        """Standard normal entries, each parameter drawn whole in turn from one generator and
        this rank's rows kept: the same vector on any group size."""
        g = torch.Generator().manual_seed(seed)
        return {n: self._rows(n, torch.randn(self.shapes[n], generator=g, dtype=torch.float64)) for n in self.names}

    def rademacher(self, g: torch.Generator) -> dict:
        """±1 entries, drawn as curvature.Curvature.trace draws its flat vector over the same
        names (torch's CPU draws are serial, so drawing parameter by parameter continues the
        same stream): the same vectors as one process's trace, this rank's rows of them."""
        return {n: self._rows(n, (torch.randint(0, 2, (math.prod(self.shapes[n]),), generator=g) * 2 - 1)
                              .view(self.shapes[n]).to(torch.float64)) for n in self.names}

    # ------------------------------------------------------------------ what is computed from them
    def lanczos(self, v0: dict, steps: int, done: Callable = lambda alpha, beta, last: False) -> tuple:
        """Up to `steps` Lanczos steps from v0 with full reorthogonalization: (alpha, beta) of
        the tridiagonal T and the last β_j (0: the Krylov space is exhausted, T exact).
        `done(alpha, beta, last)` after each step: stop early (converged)."""
        v = self._scaled(v0, 1 / math.sqrt(self.dot(v0, v0)))
        basis = Basis(self.names, v, self.basis_bytes)
        basis.append(v)
        alpha, beta = [], []
        scale = 0.0
        try:
            for j in range(min(steps, self.n)):
                w = self.hvp(v)
                a = self.dot(w, v)
                alpha.append(a)
                scale = max(scale, abs(a))
                for _ in range(2):  # twice is enough (Kahan; Parlett)
                    c = self.dots(basis, w)
                    for q, cq in zip(basis, c):
                        for n in self.names:
                            w[n].sub_(q[n], alpha=cq)
                b = math.sqrt(self.dot(w, w))
                if b <= 1e-10 * max(scale, 1e-300) or not math.isfinite(b):
                    return alpha, beta, 0.0  # an invariant subspace: T is exact
                if j == min(steps, self.n) - 1 or done(alpha, beta, b):
                    return alpha, beta, b
                beta.append(b)
                v = self._scaled(w, 1 / b)
                basis.append(v)
            return alpha, beta, 0.0
        finally:
            self.spilled = max(self.spilled, basis.spilled)
            self.kept, self.vector_bytes = basis.keep, basis.bytes
            basis.close()

    def _scaled(self, v: dict, c: float) -> dict:
        return {n: t * c for n, t in v.items()}

    def extremes(self, k: int = 1, tol: float = 1e-6, smallest: bool = True, seed: int = 0,
                 steps: int = 300) -> tuple:
        """(top k eigenvalues descending, the smallest or NaN, Lanczos steps, converged): one
        Lanczos run from a seeded normal vector, until the wanted Ritz values converge."""
        from scipy.linalg import eigh_tridiagonal
        k = min(k, self.n)

        def ritz(alpha, beta):
            vals, vecs = eigh_tridiagonal(np.array(alpha), np.array(beta[:len(alpha) - 1]))
            return vals, vecs[-1]

        def done(alpha, beta, last):
            if len(alpha) < k + 1:
                return False
            vals, ends = ritz(alpha, beta)
            wanted = list(range(len(vals) - k, len(vals))) + ([0] if smallest else [])
            return all(abs(last * ends[i]) <= tol * np.abs(vals).max() for i in wanted)
        alpha, beta, last = self.lanczos(self.normal(seed), steps, done)
        vals, _ = ritz(alpha, beta)
        converged = last == 0.0 or done(alpha, beta, last)
        top = [float(x) for x in vals[::-1][:k]]
        return top, float(vals[0]) if smallest else math.nan, len(alpha), converged

    def trace(self, samples: int = 64, seed: int = 0, blocks: Optional[dict] = None) -> tuple:
        """Hutchinson's tr(H) from `samples` Rademacher vectors, the same ones
        curvature.Curvature.trace draws: ((mean, standard error), {block: (mean, standard
        error)} of z_Bᵀ(H z)_B, unbiased for tr(H_BB) at no extra product)."""
        g = torch.Generator().manual_seed(seed)
        blocks = blocks or {}
        est, per = [], {b: [] for b in blocks}
        for _ in range(samples):
            z = self.rademacher(g)
            hz = self.hvp(z)
            sums = self._all_sum(torch.stack([(z[n] * hz[n]).sum() for n in self.names]).double()).tolist()
            by = dict(zip(self.names, sums))
            est.append(math.fsum(sums))
            for b, names in blocks.items():
                per[b].append(math.fsum(by[n] for n in names))
        return mean_and_stderr(est), {b: mean_and_stderr(v) for b, v in per.items()}

    def density(self, runs: int, steps: int) -> tuple:
        """Stochastic Lanczos quadrature (curvature.Curvature.density) on these vectors, each
        run from a seeded normal vector: (nodes, weights), each (runs, steps)."""
        from scipy.linalg import eigh_tridiagonal
        steps = min(steps, self.n)
        nodes, weights = np.zeros((runs, steps)), np.zeros((runs, steps))
        for r in range(runs):
            alpha, beta, _ = self.lanczos(self.normal(1_000 + r), steps)
            vals, vecs = eigh_tridiagonal(np.array(alpha), np.array(beta[:len(alpha) - 1]))
            nodes[r, :len(vals)], weights[r, :len(vals)] = vals, vecs[0] ** 2
        return nodes, weights
