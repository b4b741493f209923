"""Curvature of a model sharded over a rank group (FSDP2), whose Hessian no rank holds, and
whose vectors no rank holds whole. No MPI, no HDF5: runs/sharded_hessian.py builds the group.

    op = Sharded(model, batches, task, group)      # model: FSDP2-sharded, its rows float64
    hv = op.hvp(v)                                 # {name: this rank's rows} -> the same: H v
    Sharded(..., operator="ggn")                   # G v, or "fisher": F v (operators.py's)
    top, low, steps = op.extremes(k=3, tol=1e-6)   # Lanczos on sharded vectors
    (tr, se), blocks = op.trace(64, blocks={...})  # Hutchinson's, curvature.Curvature's vectors

**Products.** Double backward does not pass through FSDP2 (the graph's leaves are the gathered
parameters, and the reduce-scatter detaches the sharded gradients), but first-order backward
does. So H v is a central difference of the sharded gradient,

    H v ≈ (g(θ + εv) − g(θ − εv)) / 2ε,

with every rank's rows, the forward and the gradient in float64 (the group's model is built
in float64 from the checkpoint's float32 values: runs/sharded_hessian.py). The step moves each
entry by EPS_SCALE · max(1, rms(θ)) on average (ε = that · √n / ‖v‖), EPS_SCALE the square
root of float64's machine epsilon (1.5e-8), not the cube root that balances a smooth
function's truncation and rounding errors: a ReLU network's gradient jumps where a unit's
input changes sign, and a step of 6e-6 crossed such kinks on the digits MLP (errors of 40 in
entries of 0.2); at 1.5e-8 the truncation error is ε² ∇³L, about 1e-16, and the rounding
error (machine epsilon · |g| / ε) about 1e-8 relative. Measured against exact Hessians
(tests/test_sharded_hessian.py): products within 2e-9 relative of double backward's, and the
eigenvalues, traces, block spectra and jackknife within 1e-7 of the exact matrix's. A
gradient costs one forward and one backward, so a product costs two of each (Pearlmutter's
exact product, which FSDP2 cannot run, costs about the same).

The GGN and the empirical Fisher need no second derivative of the network: G v = Jᵀ H_out (J v)
and F v = Σ_i w_i (g_i · v) g_i / Σ w_i (operators.py). Only the forward-mode part (J v, or
c_i = g_i · v, the change of each example's own mean loss) is a central difference, of two
forwards with the same step; H_out (J v) is double backward through the loss alone (plain
tensors), and Jᵀ(...) or Σ_i w_i c_i g_i is one ordinary backward through the sharded model at
θ with that cotangent, FSDP2's reduce-scatter summing it. A product costs three forwards and
one backward. Measured against the exact matrices (Jacobians in numpy): within 1e-9 relative.

**Lanczos.** Every vector is a dict of the rank's rows of every parameter (the parameters'
own FSDP2 sharding). Dot products are float64 sums per parameter, all-reduced, and added in
parameter order: every rank gets the same numbers, so every rank runs the same recurrence and
takes the same decisions. Full reorthogonalization (twice, classical Gram-Schmidt, its dot
products in one all-reduce) against the sharded basis. The eigenvalues of the tridiagonal T
are the Ritz values; a wanted one has converged when its residual |β_j s_j| is at most tol ×
the largest |Ritz value| (ARPACK's test, relative to the spectrum's scale, so that a λmin near
0 converges too).

**Memory.** A rank holds its rows of: θ, the model's parameters (and their float64 gradient),
the two points θ ± εv, their two gradients, v and w, and the basis. The basis (`Basis`) keeps
its first vectors in memory up to `basis_bytes` (curvature.basis_memory) and writes the later
ones to an unlinked file in the temp folder (TMPDIR: a node-local disk on a cluster), reading
each back when reorthogonalization passes it: the same arithmetic on the same float64 values,
so the same numbers bit for bit, at the cost of reading the spilled basis twice a step. A
rank's bytes are then about (8 + min(steps, basis vectors that fit)) × 8 × (parameters / k),
plus one gathered FSDP unit and the activations of a batch.
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import numpy as np
import torch
from torch import nn

from .curvature import ARPACK_BYTES, mean_and_stderr
from .groups import GroupSpec, all_reduce_sum, group_pass, held_rows, local, sum_gradients, write_point
from .operators import OPERATORS
from .tasks import Task, logits_of, model_inputs

EPS_SCALE = float(np.finfo(np.float64).eps) ** 0.5  # a central difference's step, relative (see above)


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


class Sharded:
    """The Hessian of the mean loss over fixed batches of a model sharded over `group`, at the
    weights it holds, in the parameters `names` (default: every floating-point one; a block's
    for a per-block spectrum, the others held)."""

    def __init__(self, model: nn.Module, batches: list, task: Optional[Task], group: GroupSpec,
                 names: Optional[list] = None, watch: Optional[Callable] = None, operator: str = "hessian",
                 basis_bytes: float = ARPACK_BYTES):
        if operator not in OPERATORS:
            raise ValueError(f"operator {operator!r}: allowed {', '.join(OPERATORS)}")
        self.model, self.batches, self.task, self.group = model.eval(), batches, task or Task(), group
        self.operator, self.basis_bytes = operator, basis_bytes
        self.spilled = 0  # the most Lanczos vectors a run of this operator wrote to disk
        self.watch = watch
        sum_gradients(model)
        params = {n: p for n, p in model.named_parameters() if p.is_floating_point()}
        self.names = list(names) if names is not None else list(params)
        self.shapes = {n: tuple(params[n].shape) for n in self.names}  # (a DTensor's: the whole parameter's)
        self.n = int(sum(params[n].numel() for n in self.names))
        self.rows = {}  # name -> this rank's rows of it (None: a 0-dim parameter, whole)
        for n in self.names:
            p = params[n]
            if hasattr(p, "to_local"):
                self.rows[n] = held_rows(n, local(p), p.shape[0], group) if p.dim() else None
        # FSDP2 sets itself up at the first forward, re-making the sharded parameters' storage:
        # a point written before it would be lost, so the loss at θ comes first
        self.value = self._loss()
        self.theta = {n: local(params[n]).detach().clone() for n in self.names}
        self.held = {n: local(p).detach().clone() for n, p in params.items() if n not in self.theta}
        self.dtype = next(iter(self.theta.values())).dtype
        self.device = next(iter(self.theta.values())).device
        rms = math.sqrt(self.dot(self.theta, self.theta) / max(self.n, 1))
        self.step = EPS_SCALE * max(1.0, rms) * math.sqrt(self.n)  # ε‖v‖: see the module's text
        self.matvecs = 0

    # ------------------------------------------------------------------ sharded vectors
    def dot(self, a: dict, b: dict) -> float:
        """aᵀb over every entry: float64 sums per parameter, all-reduced, added in order."""
        sums = torch.stack([(a[n].double() * b[n].double()).sum() for n in self.names])
        return math.fsum(all_reduce_sum(sums).tolist())

    def dots(self, basis: list, w: dict) -> list:
        """[qᵀw for q in basis], in one all-reduce."""
        if not basis:
            return []
        sums = torch.stack([torch.stack([(q[n] * w[n]).sum() for n in self.names]) for q in basis]).double()
        return [math.fsum(row) for row in all_reduce_sum(sums).tolist()]

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

    def _rows(self, n: str, whole: torch.Tensor) -> torch.Tensor:
        rows = self.rows.get(n)
        return (whole[rows] if rows is not None else whole).to(self.device, self.dtype)

    # ------------------------------------------------------------------ products
    def _gradient(self, point: dict) -> dict:
        write_point(self.model, self.names, point)
        return group_pass(self.model, self.names, self.batches, self.task, self.group, grad=True)[1]

    def loss(self) -> float:
        """The mean loss at θ (one rank's bit for bit: group_pass)."""
        return self.value

    def _loss(self) -> float:
        with torch.no_grad():
            return group_pass(self.model, self.names, self.batches, self.task, self.group, grad=False)[0]

    def hvp(self, v: dict) -> dict:
        """The operator times v (collective; H v, G v or F v as `operator` says), in this
        rank's rows."""
        norm = math.sqrt(self.dot(v, v))
        if norm == 0:
            return {n: torch.zeros_like(t) for n, t in v.items()}
        eps = self.step / norm
        plus = {n: self.theta[n] + eps * v[n] for n in self.names}
        minus = {n: self.theta[n] - eps * v[n] for n in self.names}
        if self.operator == "hessian":
            hi, lo = self._gradient(plus), self._gradient(minus)
            out = {n: (hi[n] - lo[n]) / (2 * eps) for n in self.names}
            write_point(self.model, self.names, self.theta)
        else:
            out = self._outer(plus, minus, eps)
        self.matvecs += 1
        if self.watch is not None:
            self.watch(self.matvecs)
        return out

    def _outer(self, plus: dict, minus: dict, eps: float) -> dict:
        """G v or F v: per batch, the forward's change along v by a central difference of two
        forwards (J v of the logits, or of each example's own mean loss: c_i = g_i · v), then
        one ordinary backward through the sharded model at θ with the cotangent H_out (J v),
        or w_i c_i (operators.py: the same operators, there with forward mode)."""
        model, task = self.model, self.task

        def forward(b):
            args, kwargs = model_inputs(b)
            return logits_of(model(*args, **kwargs))

        def differenced(b, f):
            with torch.no_grad():
                write_point(model, self.names, plus)
                hi = f(forward(b), b)
                write_point(model, self.names, minus)
                lo = f(forward(b), b)
            write_point(model, self.names, self.theta)
            return (hi - lo) / (2 * eps)

        def ggn(b):
            jv = differenced(b, lambda out, b: out)
            out = forward(b)
            o = out.detach().requires_grad_(True)
            s, n = task.loss_terms(o, b)
            (go,) = torch.autograd.grad(s, o, create_graph=True)
            (hjv,) = torch.autograd.grad((go * jv.to(go.dtype)).sum(), o)  # H_out (J v)
            return s.detach(), n, (out * hjv.to(out.dtype)).sum()

        def fisher(b):
            def means(out, b):
                vals, wts = task.loss_examples(out, b)
                return vals / wts
            c = differenced(b, means)  # c_i = g_i · v
            vals, wts = task.loss_examples(forward(b), b)
            w = wts.detach()
            return vals.detach().sum(), w.sum(), ((vals / wts) * (w * c)).sum()

        grads = group_pass(model, self.names, self.batches, task, self.group, grad=True,
                           terms=ggn if self.operator == "ggn" else fisher)[1]
        return grads

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
            sums = all_reduce_sum(torch.stack([(z[n] * hz[n]).sum() for n in self.names]).double()).tolist()
            by = dict(zip(self.names, sums))
            est.append(math.fsum(sums))
            for b, names in blocks.items():
                per[b].append(math.fsum(by[n] for n in names))
        return mean_and_stderr(est), {b: mean_and_stderr(v) for b, v in per.items()}
