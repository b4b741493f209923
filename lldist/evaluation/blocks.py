"""Blocks of parameters whose curvature is reported one by one (`curvature.blocks`). No MPI, no HDF5.

    blocks(model, "layers")                    # {"conv1": ["conv1.weight", "conv1.bias"], ...}
    blocks(model, "transformer")               # {"h.0.attn": [...], "h.0.mlp": [...], ..., "rest": [...]}
    blocks(model, {"convs": "conv", "head": "^fc"})   # by regular expression over parameter names

The curvature of a block is that of the Hessian's (or GGN's, Fisher's) diagonal sub-block
H_BB: the loss as a function of the block's parameters, the others held at θ* (PyHessian #9,
#10). Its top eigenvalue and trace are computed like the whole operator's, on products with
vectors that are zero outside the block.

  layers       each module that holds parameters itself, in the model's order
  transformer  each attention module (a class named ...Attention, outermost) and each MLP
               (a class named ...MLP, or a BERT layer's Intermediate and Output together);
               everything else (embeddings, norms, heads) in one block "rest"
  mapping      name -> regular expression (re.search on the parameter name); a parameter goes to
               the first block that matches it; parameters no block matches are left out
"""

from __future__ import annotations

import re

from torch import nn

from ..config import BLOCK_KINDS as KINDS  # (declared with the job's keys)


def _layers(model: nn.Module) -> dict:
    out = {}
    for mname, m in model.named_modules():
        own = [f"{mname}.{p}" if mname else p for p, _ in m.named_parameters(recurse=False)]
        if own:
            out[mname or "(root)"] = own
    return out


def _transformer(model: nn.Module) -> dict:
    names = [n for n, _ in model.named_parameters()]
    claimed, out = set(), {}

    def take(block: str, prefix: str):
        ps = [n for n in names if n.startswith(prefix + ".") and n not in claimed]
        if ps:
            out.setdefault(block, []).extend(ps)
            claimed.update(ps)

    for mname, m in model.named_modules():
        cls = type(m).__name__
        if cls.endswith("Attention") and not any(mname.startswith(b + ".") for b in out):
            take(mname, mname)
        elif cls.endswith("MLP") and not any(mname.startswith(b + ".") for b in out):
            take(mname, mname)
        elif cls.endswith("Layer"):  # BERT-style: the MLP is the layer's Intermediate and Output
            kids = dict(m.named_children())
            if "intermediate" in kids and "output" in kids:
                take(f"{mname}.mlp", f"{mname}.intermediate")
                take(f"{mname}.mlp", f"{mname}.output")
    if not out:
        raise ValueError("curvature.blocks: transformer found no attention or MLP modules in the model "
                         "(classes named ...Attention, ...MLP); give layers or a mapping of regular expressions")
    rest = [n for n in names if n not in claimed]
    if rest:
        out["rest"] = rest
    return out


def _mapping(model: nn.Module, spec: dict) -> dict:
    names = [n for n, _ in model.named_parameters()]
    out = {b: [] for b in spec}
    for n in names:
        for b, rx in spec.items():
            if re.search(rx, n):
                out[b].append(n)
                break
    empty = [b for b, ps in out.items() if not ps]
    if empty:
        raise ValueError(f"curvature.blocks.{empty[0]}: {spec[empty[0]]!r} matches no parameter the earlier blocks "
                         f"left (parameters: {', '.join(names[:6])}{', ...' if len(names) > 6 else ''})")
    return out


def blocks(model: nn.Module, spec, among=None) -> dict:
    """{block name: [parameter names]} for a `curvature.blocks` value, each block in the model's
    parameter order. `among`: only these parameters (the curvature's own, e.g. trainable ones)."""
    if isinstance(spec, dict):
        out = _mapping(model, spec)
    elif spec in KINDS:
        out = {"layers": _layers, "transformer": _transformer}[spec](model)
    else:
        raise ValueError(f"curvature.blocks {spec!r}: allowed {', '.join(KINDS)} or a mapping of name -> regular "
                         "expression")
    if among is not None:
        keep = set(among)
        out = {b: [n for n in ps if n in keep] for b, ps in out.items()}
        out = {b: ps for b, ps in out.items() if ps}
    return out
