"""Curves between two minima (Garipov et al. 2018, "Loss surfaces, mode connectivity, and fast
ensembling of DNNs"): a quadratic Bezier curve or a polygonal chain with one bend. No MPI, no
HDF5.

    c = coefficients("bezier", t)               # (c0, c1, c2): θ(t) = c0·a + c1·bend + c2·b
    m = CurveModel(model, a, b, "bezier")       # trains the bend only; t ~ U(0, 1) per forward
    update_bn(model, batches)                   # BatchNorm statistics of the weights now set

The weights at t are c0·a + c1·bend + c2·b, summed in that order: at t = 0 the coefficients
are (1, 0, 0) and at t = 1 (0, 0, 1), so the ends are a and b bit for bit (adding exact zeros).
"""

from __future__ import annotations

import torch
from torch import nn

from ..config import CURVES


def coefficients(kind: str, t: float) -> tuple:
    """(c0, c1, c2) of a, the bend and b at t in [0, 1]."""
    if kind == "bezier":
        return (1 - t) ** 2, 2 * t * (1 - t), t * t
    if kind == "polychain":  # a to the bend on [0, 1/2], the bend to b on [1/2, 1]
        return (1 - 2 * t, 2 * t, 0.0) if t <= 0.5 else (0.0, 2 - 2 * t, 2 * t - 1)
    raise ValueError(f"curve {kind!r}: allowed {', '.join(CURVES)}")


def combine(c: tuple, a: torch.Tensor, bend: torch.Tensor, b: torch.Tensor, out=None) -> torch.Tensor:
    """c0·a + c1·bend + c2·b for c = coefficients(...), summed in that order (exact at t = 0 and
    t = 1), into `out` when given (the evaluator's live weights)."""
    c0, c1, c2 = c
    return torch.mul(a, c0, out=out).add_(bend, alpha=c1).add_(b, alpha=c2)


def point(kind: str, t: float, a: dict, bend: dict, b: dict) -> dict:
    """The weights at t, entry by entry (exact at t = 0 and t = 1)."""
    c = coefficients(kind, t)
    return {n: combine(c, a[n], bend[n], b[n]) for n in a}


def _key(name: str) -> str:
    return name.replace(".", "__")  # ParameterDict keys cannot hold dots


class CurveModel(nn.Module):
    """A module whose only parameters are the bend; each forward in training mode draws t
    uniformly (a seeded generator) and runs `model` at the curve's point. In eval mode it runs at
    `self.t` (0.5 by default). The ends are the float parameters of states `a` and `b`; the
    model's buffers (BatchNorm statistics) are its own: batch statistics in training, to be
    recomputed at each t for evaluation (update_bn), as Garipov et al. do."""

    def __init__(self, model: nn.Module, a: dict, b: dict, kind: str = "bezier", seed: int = 0):
        super().__init__()
        coefficients(kind, 0.0)  # checks the kind
        self.model, self.kind, self.t = model, kind, 0.5
        names = [n for n, p in model.named_parameters()]
        self.names = names
        self._a = {n: a[n].detach().clone() for n in names}
        self._b = {n: b[n].detach().clone() for n in names}
        # the bend starts at the ends' midpoint: the curve starts as the straight line
        self.bend = nn.ParameterDict({_key(n): nn.Parameter((self._a[n] + self._b[n]) / 2) for n in names})
        self.gen = torch.Generator().manual_seed(seed)
        for p in model.parameters():
            p.requires_grad_(False)

    def _apply(self, fn, *args, **kwargs):  # .to(device) moves the ends too (plain dicts, not buffers:
        super()._apply(fn, *args, **kwargs)  # their names hold dots)
        self._a = {n: fn(v) for n, v in self._a.items()}
        self._b = {n: fn(v) for n, v in self._b.items()}
        return self

    def bend_state(self) -> dict:
        return {n: self.bend[_key(n)].detach().clone() for n in self.names}

    def weights(self, t: float) -> dict:
        c0, c1, c2 = coefficients(self.kind, t)
        return {n: self._a[n] * c0 + self.bend[_key(n)] * c1 + self._b[n] * c2 for n in self.names}

    def forward(self, *args, **kwargs):
        t = float(torch.rand((), generator=self.gen)) if self.training else self.t
        buffers = dict(self.model.named_buffers())
        return torch.func.functional_call(self.model, {**self.weights(t), **buffers}, args, kwargs)


def has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


@torch.no_grad()
def update_bn(model: nn.Module, batches, forward=None) -> None:
    """Every BatchNorm layer's running statistics recomputed for the weights the model holds:
    reset, then the cumulative average (momentum None) over `batches` in training mode; the
    model is left in eval mode. `forward(model, batch)` runs a batch (default: model(batch[0]))."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns:
        return
    saved = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
    model.train()
    try:
        for batch in batches:
            (forward or (lambda mod, b: mod(b[0])))(model, batch)
    finally:
        for m, mom in zip(bns, saved):
            m.momentum = mom
        model.eval()
