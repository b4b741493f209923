"""The curvature operators of a loss, as products with a vector on one batch. No MPI, no HDF5.

    s_v, w = product("ggn", f, params, v, task, batch)   # ([tensor like each parameter], weight)

`f(params) -> outputs` is the model as a function of the parameters being differentiated
(the others held); `v` one tensor per parameter. Each returns the product of the batch's
*summed* loss (Task.loss_terms: the sum of the per-example losses and the sum of their
weights), so that summing over batches and dividing by the summed weight gives the operator of
the mean loss, the evaluation's own definition (curvature.py does the sum and the division):

  hessian  H v = d/dθ (∇L · v): double backward through the model (Pearlmutter's trick).
           Indefinite; exact.
  ggn      the generalized Gauss-Newton matrix G = Jᵀ H_out J (J: the outputs' Jacobian
           in θ, H_out: the loss's Hessian in the outputs): J v by forward mode, H_out (J v) by
           double backward through the loss alone, Jᵀ(...) by one backward. Positive
           semidefinite for a loss convex in the outputs (cross-entropy, squared error); no
           second derivative of the network, so no double backward through attention.
  fisher   the empirical Fisher F = Σ_i w_i g_i g_iᵀ / Σ_i w_i, g_i the gradient of example
           i's own mean loss (its summed loss over its weight: a sequence's loss per token),
           w_i its weight (1 per example; a sequence's tokens under loss: lm). Built from
           per-example gradients without holding them: c = J_ℓ v (one forward-mode pass gives
           every g_i · v), then Σ_i w_i c_i g_i (one backward with those as the cotangent).

Forward mode (torch.func.jvp) and a backward cost about what the Hessian's double backward
costs; the three are measured against a gradient in docs/CURVATURE.md.
"""

from __future__ import annotations

import warnings

import torch

from ..config import OPERATORS_CURVATURE as OPERATORS  # (declared with the job's keys)
DESCRIPTION = {
    "hessian": "Hessian of the loss",
    "ggn": "generalized Gauss-Newton matrix (J^T H_out J) of the loss",
    "fisher": "empirical Fisher matrix (mean of per-example gradient outer products) of the loss",
}


def _hessian(f, params: dict, v: dict, task, batch) -> tuple:
    names = list(params)
    s, w = task.loss_terms(f(params), batch)
    g = torch.autograd.grad(s, [params[n] for n in names], create_graph=True)
    gv = sum((gi * v[n]).sum() for gi, n in zip(g, names))
    hv = torch.autograd.grad(gv, [params[n] for n in names], allow_unused=True)
    return [h if h is not None else torch.zeros_like(params[n]) for h, n in zip(hv, names)], w


def _jvp(f, p: dict, v: dict):
    """torch.func.jvp, without the FutureWarning torch's own forward-mode set-up gives on first
    use (it builds its decompositions with the deprecated torch.jit.script: nothing of ours)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch.jit.script.*deprecated", category=FutureWarning)
        return torch.func.jvp(f, (p,), (v,))


def _detached(params: dict) -> dict:
    return {n: p.detach() for n, p in params.items()}


def _ggn(f, params: dict, v: dict, task, batch) -> tuple:
    p = _detached(params)
    _, jv = _jvp(f, p, v)  # J v: the outputs' change along v
    out, vjp = torch.func.vjp(f, p)
    o = out.detach().requires_grad_(True)
    s, w = task.loss_terms(o, batch)
    go = torch.autograd.grad(s, o, create_graph=True)[0]
    (hjv,) = torch.autograd.grad((go * jv.to(go.dtype)).sum(), o)  # H_out (J v)
    (gv,) = vjp(hjv.to(out.dtype))  # Jᵀ H_out J v
    return [gv[n] for n in p], w.detach()


def _fisher(f, params: dict, v: dict, task, batch) -> tuple:
    p = _detached(params)
    holder = {}

    def mean_losses(q):  # (B,): each example's own mean loss
        vals, wts = task.loss_examples(f(q), batch)
        holder["w"] = wts.detach()
        return vals / wts

    _, c = _jvp(mean_losses, p, v)  # c_i = g_i · v
    _, vjp = torch.func.vjp(mean_losses, p)
    w = holder["w"]
    (fv,) = vjp((w * c).to(c.dtype))  # Σ_i w_i (g_i · v) g_i
    return [fv[n] for n in p], w.sum()


PRODUCTS = {"hessian": _hessian, "ggn": _ggn, "fisher": _fisher}


def product(operator: str, f, params: dict, v: dict, task, batch) -> tuple:
    """(the batch's summed-loss operator times v, one tensor per parameter; the batch's weight)."""
    try:
        fn = PRODUCTS[operator]
    except KeyError:
        raise ValueError(f"operator {operator!r}: allowed {', '.join(OPERATORS)}") from None
    return fn(f, params, v, task, batch)
