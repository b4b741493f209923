"""The stability thresholds of an optimizer's step: the largest curvature along which its
linearized iteration does not diverge (the edge of stability). No torch: the formulas work on
numbers and on numpy arrays alike.

    opt = Optimizer.of(record)          # a Recorder's record of an optimizer's hyperparameters
    threshold(opt)                      # 2/η (gradient descent), (2 + 2β)/η (heavy ball), ...
    p = preconditioner(v, opt, t)       # Adam: P_t, whose λmax(P⁻¹H) is compared to threshold(opt)

The formulas, each the bound of the linear recurrence of the update on a quadratic ½ a x² with
a the curvature (for Adam: an eigenvalue of P⁻¹H, the preconditioner held fixed):

  gradient descent          x ← x − η a x                       stable iff a < 2/η
  heavy ball (PyTorch SGD,  b ← β b + (1 − d) a x, x ← x − η b   stable iff a < (2 + 2β) / (η (1 − d))
    momentum β, dampening d)
  Nesterov (PyTorch SGD,    b ← β b + a x, x ← x − η (a x + β b)  stable iff a < (2 + 2β) / (η (1 + 2β))
    nesterov=True)
  Adam, AdamW               m ← β₁ m + (1 − β₁) g, x ← x − η P⁻¹ m   stable iff λ(P⁻¹H) < (2 + 2β₁) / (η (1 − β₁))
                            with P = (1 − β₁ᵗ) (√(v / (1 − β₂ᵗ)) + ε): 38/η at β₁ = 0.9

Sources: Cohen, Kaur, Li, Kolter, Talwalkar, "Gradient descent on neural networks typically
occurs at the edge of stability" (ICLR 2021; 2/η, and for momentum Appendix: (2 + 2β)/η and
(2 + 2β)/((1 + 2β)η)); Cohen, Ghorbani, Krishnan, Agarwal, Medapati, Badura, Suo, Cardoze,
Nado, Dahl, Gilmer, "Adaptive gradient methods at the edge of stability" (2022; the
preconditioned sharpness λ₁(P_t⁻¹H_t) against 38/η, P_t as above). AdamW's decoupled weight
decay adds η λ_wd to the diagonal of the iteration and is ignored here, as in the paper.
tests/test_stability.py checks each bound by running the recurrence just below and just above it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

KINDS = ("sgd", "adam")  # sgd: gradient descent, heavy ball, Nesterov; adam: Adam and AdamW


@dataclass(frozen=True)
class Optimizer:
    """An optimizer's hyperparameters at one step (its first parameter group's)."""
    kind: str  # sgd | adam
    lr: float
    momentum: float = 0.0  # sgd
    dampening: float = 0.0  # sgd
    nesterov: bool = False  # sgd
    beta1: float = 0.9  # adam
    beta2: float = 0.999  # adam
    eps: float = 1e-8  # adam

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"kind {self.kind!r}: allowed {', '.join(KINDS)}")
        if not self.lr > 0:
            raise ValueError(f"lr must be positive, got {self.lr!r}")

    @classmethod
    def of(cls, record: dict) -> "Optimizer":
        """From a Recorder's record of an optimizer ({"class": "SGD", "lr": ..., ...})."""
        name = str(record.get("class", "")).lower()
        kind = "adam" if name.startswith("adam") else "sgd" if name == "sgd" else name
        betas = record.get("betas") or (0.9, 0.999)
        return cls(kind=kind, lr=float(record["lr"]), momentum=float(record.get("momentum") or 0.0),
                   dampening=float(record.get("dampening") or 0.0), nesterov=bool(record.get("nesterov", False)),
                   beta1=float(betas[0]), beta2=float(betas[1]), eps=float(record.get("eps") or 1e-8))


def threshold(opt: Optimizer) -> float:
    """The curvature at which the step's linear iteration loses stability (see the module's
    table): compare λmax (gradient descent, momentum) or λmax(P⁻¹H) (Adam) with it."""
    if opt.kind == "adam":
        return (2 + 2 * opt.beta1) / (opt.lr * (1 - opt.beta1))
    b = opt.momentum
    if opt.nesterov:
        return (2 + 2 * b) / (opt.lr * (1 + 2 * b))
    return (2 + 2 * b) / (opt.lr * (1 - opt.dampening)) if b else 2 / opt.lr


def preconditioner(v, opt: Optimizer, step: int):
    """Adam's P_t (elementwise, the same shape as v, its second-moment estimate after `step`
    updates): (1 − β₁ᵗ) (√(v / (1 − β₂ᵗ)) + ε)."""
    if opt.kind != "adam":
        raise ValueError(f"a preconditioner is Adam's; this optimizer is {opt.kind}")
    if step < 1:
        raise ValueError(f"step must be at least 1 (Adam's bias corrections divide by 1 - beta**step), got {step}")
    return (1 - opt.beta1 ** step) * ((v / (1 - opt.beta2 ** step)) ** 0.5 + opt.eps)


def ratio(sharpness: float, opt: Optional[Optimizer]) -> float:
    """sharpness / threshold: 1 at the edge of stability (NaN without an optimizer's record)."""
    return sharpness / threshold(opt) if opt is not None else math.nan
