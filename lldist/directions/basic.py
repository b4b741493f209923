"""Directions in weight space and their normalization (Li et al. 2018, section 4).

    from lldist.directions import model_state, make_directions
    theta, kinds = model_state(model)
    dirs = make_directions(theta, kinds, job.directions, ndim=2)   # {"x": {...}, "y": {...}}

A direction is a dict {state-dict name: tensor shaped like that entry} over the model's
floating-point state: parameters *and* float buffers (BatchNorm running statistics), so
that setting theta + a*dx + b*dy also resets the buffers of every cell, and interpolation
between checkpoints moves the running statistics too. Random directions are zero on buffers.

Kinds of entries: "weight" (parameter with dim > 1: conv and linear weights, normalized per
filter, i.e. per output unit = index along dim 0), "weight_t" (a weight stored (in, out, ...):
transformers' Conv1D in GPT-2, ConvTranspose; its output units run along dim 1, and the filter
follows the module type, not dim 0), "vector" (1-D parameter: biases and
BatchNorm affine parameters; `ignore: biasbn` zeroes them, as in the paper, `ignore: none`
normalizes each as a single filter), "buffer" (always zero in a random direction).

Norms: filter (d_i <- d_i * |theta_i| / |d_i| for each filter i), layer (the same per tensor),
weight (d <- d * theta, elementwise), none (raw Gaussian).
No MPI, no HDF5 here: pure tensor code.
"""

from __future__ import annotations

import json
from typing import Optional

from torch import nn

from ..config import DirectionsConfig
from .recipe import EPS, STREAM_TAG, Recipe, direction, filter_dim, normalize  # noqa: F401 - EPS, filter_dim re-exported

WEIGHTS = ("weight", "weight_t")  # the kinds whose filters are normalized one by one


def _transposed(module: nn.Module) -> bool:
    """Modules that store their weight as (in, out, ...): transformers' Conv1D (GPT-2's c_attn,
    c_proj, c_fc; found by name, so transformers need not be importable) and ConvTranspose."""
    return isinstance(module, nn.modules.conv._ConvTransposeNd) or (
        type(module).__name__ == "Conv1D" and type(module).__module__.startswith("transformers"))


def model_state(model: nn.Module) -> tuple[dict, dict]:
    """(theta, kinds): detached CPU copies of the float state, and each entry's kind."""
    params = {n for n, _ in model.named_parameters()}
    transposed = {f"{m_name}.weight" if m_name else "weight" for m_name, m in model.named_modules() if _transposed(m)}
    theta, kinds, seen = {}, {}, set()
    for name, t in model.state_dict().items():
        if not t.is_floating_point():
            continue  # e.g. BatchNorm's num_batches_tracked
        if t.numel() and t.data_ptr() in seen:
            continue  # a tied weight (a language model's output layer = its embedding): moved once
        seen.add(t.data_ptr())
        theta[name] = t.detach().to("cpu", copy=True)
        if name in params:
            kinds[name] = ("weight_t" if name in transposed else "weight") if t.dim() > 1 else "vector"
        else:
            kinds[name] = "buffer"
    return theta, kinds


def target_direction(theta: dict, theta_target: dict) -> dict:
    """theta' - theta over every float entry (buffers included). Stored for plots and cosines;
    the evaluator interpolates with torch.lerp from theta and theta' themselves, so that
    alpha = 0 is theta and alpha = 1 is theta' exactly (theta + 1*(theta' - theta) is not:
    float32 rounding leaves about 10% of the entries off by up to hundreds of ulp)."""
    return {n: (theta_target[n].to(w.dtype) - w) for n, w in theta.items()}




def make_directions(theta: dict, kinds: dict, cfg: DirectionsConfig, ndim: int,
                    theta_target: Optional[dict] = None, trainable: Optional[set] = None) -> dict:
    """{"x": dir} or {"x": dir, "y": dir}; with a target also {"target": theta'}: x is then
    theta' - theta and y (2D) random. Random directions come from their recipe (recipe.py: one
    stream per row of every parameter, keyed by seed, axis and name): a 1D job and a 2D job
    with one seed share x. With directions.params, only the chosen parameters move (`trainable`:
    the model's parameters that require grad, for trainable_only); a target moves them only."""
    recipe = Recipe.of(cfg, trainable)
    dirs = {}
    if theta_target is not None:
        # every float entry moves to theta' (biases and BatchNorm statistics too), or with
        # directions.params only the chosen parameters: theta' is theta elsewhere, so lerp keeps them
        moving = {n for n in theta if not recipe.subset or (kinds[n] != "buffer" and recipe.selects(n))}
        target = {n: (theta_target[n] if n in moving else theta[n]).to(w.dtype).clone() for n, w in theta.items()}
        dirs["x"] = target_direction(theta, target)
        dirs["target"] = target
    else:
        dirs["x"] = direction(theta, kinds, recipe, "x")
    if ndim == 2:
        dirs["y"] = direction(theta, kinds, recipe, "y")
    return dirs


def describe(cfg: DirectionsConfig, dirs: dict) -> dict:
    """What was done to make the directions, for the file's /directions attributes."""
    kind = "target" if "target" in dirs and cfg.kind != "curve" else cfg.kind
    out = {"kind": kind, "x_kind": kind,
           "y_kind": ("random" if kind == "target" else kind) if "y" in dirs else "",
           "norm": cfg.norm if kind in ("random", "target") else "none (unit vectors)" if kind in ("pca", "hessian")
           else "none (differences of the models)" if kind in ("plane", "curve") else "as in the source file",
           "ignore": cfg.ignore, "seed": cfg.seed,
           "stream": f"per row: torch.Generator seeded with splitmix64(sha256('{STREAM_TAG}:<seed>:<axis>:<name>')[:8], row)",
           "params": json.dumps(cfg.params or {})}
    if kind == "file":
        out["source_file"] = cfg.file
    return out


def cosine(a: dict, b: dict) -> float:
    """Cosine of the angle between two directions, over all their entries, in float64."""
    dot = sum(float((a[n].double() * b[n].double()).sum()) for n in a)
    na = sum(float(a[n].double().pow(2).sum()) for n in a) ** 0.5
    nb = sum(float(b[n].double().pow(2).sum()) for n in b) ** 0.5
    return dot / (na * nb) if na > 0 and nb > 0 else float("nan")
