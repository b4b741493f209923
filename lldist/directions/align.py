"""Permutation alignment before interpolating: weight matching (Ainsworth et al. 2023, Git
Re-Basin). No MPI, no HDF5.

    spec = permutation_spec(model)               # which axis of which entry each hidden unit moves
    aligned, perms = weight_matching(spec, theta_a, theta_b)   # b's units permuted to match a's

A network's hidden units can be reordered without changing its function: permute the rows
(output units) of one layer and the columns of the next, together with the unit's bias and
BatchNorm entries. Weight matching chooses, layer by layer, the permutation of b's units that
maximizes Σ ⟨W_a, P W_b⟩ over every entry the units touch (a linear assignment,
scipy.optimize.linear_sum_assignment), holding the other layers' permutations, and repeats
over the layers in a seeded random order until no permutation changes.

Supported: lldist's `mlp` (a Linear/ReLU chain), `cnn` and `cnn_skip` (conv-BN stacks; a
residual block's output shares its input's permutation, carried through the skip). Others are
refused with one line (their unit structure is not known here).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

SUPPORTED = "lldist's mlp, cnn and cnn_skip models"


def permutation_spec(model: nn.Module) -> dict:
    """{state entry name: (permutation name or None, per axis)} for every floating entry, or a
    ValueError naming the model's type."""
    from ..workloads.models import CNN, MLP, Block
    spec = {}
    if isinstance(model, MLP):
        linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
        prev = None
        for i, (name, m) in enumerate(linears):
            out = f"P{i}" if i < len(linears) - 1 else None  # the last layer's outputs are the classes
            spec[f"{name}.weight"] = (out, prev)
            if m.bias is not None:
                spec[f"{name}.bias"] = (out,)
            prev = out
        return spec
    if isinstance(model, CNN):
        count = [0]

        def fresh():
            count[0] += 1
            return f"P{count[0]}"

        def conv_bn(prefix: str, seq: nn.Sequential, out: str, inp) -> None:
            conv = seq[0]
            spec[f"{prefix}.0.weight"] = (out, inp, None, None)
            if conv.bias is not None:
                spec[f"{prefix}.0.bias"] = (out,)
            if len(seq) > 1:  # BatchNorm: its scale, shift and running statistics follow the unit
                for k in ("weight", "bias", "running_mean", "running_var"):
                    spec[f"{prefix}.1.{k}"] = (out,)
        cur = None
        for i, layer in enumerate(model.features):
            prefix = f"features.{i}"
            if isinstance(layer, nn.Sequential):
                out = fresh()
                conv_bn(prefix, layer, out, cur)
                cur = out
            elif isinstance(layer, Block):
                mid = fresh()
                conv_bn(f"{prefix}.a", layer.a, mid, cur)
                out = cur if layer.skip else fresh()  # y + x: the output's units are the input's
                conv_bn(f"{prefix}.b", layer.b, out, mid)
                cur = out
        spec["head.weight"] = (None, cur)
        spec["head.bias"] = (None,)
        return spec
    raise ValueError(f"align: weight matching supports {SUPPORTED}; this model is a {type(model).__name__}")


def _perm_sizes(spec: dict, theta: dict) -> dict:
    sizes = {}
    for name, axes in spec.items():
        for ax, p in enumerate(axes):
            if p is not None:
                sizes[p] = theta[name].shape[ax]
    return sizes


def permute(spec: dict, theta: dict, perms: dict, skip: str = None) -> dict:
    """theta with every axis a permutation names reordered (index_select by perms[p]); entries
    outside the spec (num_batches_tracked) as they are. `skip`: leave that permutation out."""
    out = {}
    for name, t in theta.items():
        axes = spec.get(name, ())
        for ax, p in enumerate(axes):
            if p is not None and p != skip:
                t = torch.index_select(t, ax, perms[p].to(t.device))
        out[name] = t
    return out


def weight_matching(spec: dict, theta_a: dict, theta_b: dict, max_iter: int = 100, seed: int = 0) -> tuple:
    """(b's state permuted to match a's, {permutation name: LongTensor}). Float64 costs on the
    CPU; the order of the layers in each sweep is seeded, so the result repeats."""
    from scipy.optimize import linear_sum_assignment
    sizes = _perm_sizes(spec, theta_a)
    perms = {p: torch.arange(n) for p, n in sizes.items()}
    a = {k: v.detach().double().cpu() for k, v in theta_a.items() if k in spec}
    b = {k: v.detach().double().cpu() for k, v in theta_b.items() if k in spec}
    rng = np.random.default_rng(seed)
    names = sorted(sizes)
    for _ in range(max_iter):
        changed = False
        for p in rng.permutation(names):
            n = sizes[p]
            cost = torch.zeros(n, n, dtype=torch.float64)
            others = permute(spec, b, perms, skip=p)  # b with every other permutation applied
            for name, axes in spec.items():
                for ax, q in enumerate(axes):
                    if q == p:
                        wa = torch.movedim(a[name], ax, 0).reshape(n, -1)
                        wb = torch.movedim(others[name], ax, 0).reshape(n, -1)
                        cost += wa @ wb.T  # cost[i, j]: a's unit i against b's unit j
            _, col = linear_sum_assignment(cost.numpy(), maximize=True)
            new = torch.as_tensor(col, dtype=torch.long)
            old_score = float(cost[torch.arange(n), perms[p]].sum())
            new_score = float(cost[torch.arange(n), new].sum())
            if new_score > old_score + 1e-12 * max(1.0, abs(old_score)):
                perms[p], changed = new, True
        if not changed:
            break
    aligned = permute(spec, theta_b, perms)
    return {k: v.clone() for k, v in aligned.items()}, perms
