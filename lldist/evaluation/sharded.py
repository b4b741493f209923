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

**Lanczos** (lanczos.py's RowLanczos): every vector is a dict of the rank's rows of every
parameter, in the parameters' own FSDP2 sharding.

**Memory.** A rank holds its rows of: θ, the model's parameters (and their float64 gradient),
the two points θ ± εv, their two gradients, v and w, and the basis (in memory up to
`basis_bytes`, the rest on disk: lanczos.Basis). A rank's bytes are then about (8 + min(steps,
basis vectors that fit)) × 8 × (parameters / k), plus one gathered FSDP unit and the
activations of a batch.
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import numpy as np
import torch
from torch import nn

from .curvature import ARPACK_BYTES
from .groups import GroupSpec, group_pass, held_rows, local, sum_gradients, write_point
from .lanczos import RowLanczos
from .operators import OPERATORS
from .tasks import Task, logits_of, model_inputs

EPS_SCALE = float(np.finfo(np.float64).eps) ** 0.5  # a central difference's step, relative (see above)


class Sharded(RowLanczos):
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
