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

import hashlib
from typing import Optional

import torch
from torch import nn

from ..config import DirectionsConfig

EPS = 1e-10  # guards zero-norm directions; a zero filter of theta gives a zero direction


WEIGHTS = ("weight", "weight_t")  # the kinds whose filters are normalized one by one


def filter_dim(kind: str) -> int:
    """The dimension a weight's filters (output units) run along."""
    return 1 if kind == "weight_t" else 0


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


def _normalize(d: torch.Tensor, w: torch.Tensor, norm: str, dim: int = 0) -> torch.Tensor:
    """d rescaled to w's norms; with `filter`, each filter along `dim` to the same filter's."""
    if norm == "none":
        return d
    if norm == "weight":
        return d * w
    if norm == "layer":
        return d * (w.norm() / (d.norm() + EPS))
    if norm == "filter":
        if d.dim() <= 1:  # a 1-D vector is one filter
            return d * (w.norm() / (d.norm() + EPS))
        dn = d.transpose(0, dim).flatten(1).norm(dim=1)  # (filters,)
        wn = w.transpose(0, dim).flatten(1).norm(dim=1)
        shape = [1] * d.dim()
        shape[dim] = -1
        return d * (wn / (dn + EPS)).view(shape)
    raise ValueError(f"unknown normalization {norm!r}")  # config validation makes this unreachable


def random_direction(theta: dict, kinds: dict, norm: str, ignore: str, gen: torch.Generator) -> dict:
    """One Gaussian direction, normalized. Draws from `gen` in the state dict's order, on the
    CPU in float32, so the same seed gives the same direction on every machine."""
    out = {}
    for name, w in theta.items():
        d = torch.randn(w.shape, generator=gen, dtype=torch.float32)
        kind = kinds[name]
        if kind == "buffer" or (kind == "vector" and ignore == "biasbn"):
            d.zero_()
        else:
            d = _normalize(d, w.float(), norm, filter_dim(kind))
        out[name] = d.to(w.dtype)
    return out


def target_direction(theta: dict, theta_target: dict) -> dict:
    """theta' - theta over every float entry (buffers included). Stored for plots and cosines;
    the evaluator interpolates with torch.lerp from theta and theta' themselves, so that
    alpha = 0 is theta and alpha = 1 is theta' exactly (theta + 1*(theta' - theta) is not:
    float32 rounding leaves about 10% of the entries off by up to hundreds of ulp)."""
    return {n: (theta_target[n].to(w.dtype) - w) for n, w in theta.items()}


STREAM_TAG = "lldist.directions"


def stream_seed(seed: int) -> int:
    """The seed of the directions' own random stream. Models are initialised with
    torch.manual_seed(model.seed); drawing directions from a generator seeded with the same
    small integer would repeat the draws that initialised the weights (cosine with the initial
    weights about -0.35 instead of ~0.01), so the directions' seed is hashed with a tag first."""
    digest = hashlib.sha256(f"{STREAM_TAG}:{int(seed)}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def make_directions(theta: dict, kinds: dict, cfg: DirectionsConfig, ndim: int,
                    theta_target: Optional[dict] = None) -> dict:
    """{"x": dir} or {"x": dir, "y": dir}; with a target also {"target": theta'}: x is then
    theta' - theta and y (2D) random.

    The generator draws x first, then y: a 1D job and a 2D job with the same seed share x."""
    gen = torch.Generator().manual_seed(stream_seed(cfg.seed))
    dirs = {}
    if theta_target is not None:
        dirs["x"] = target_direction(theta, theta_target)
        dirs["target"] = {n: theta_target[n].to(w.dtype).clone() for n, w in theta.items()}
    else:
        dirs["x"] = random_direction(theta, kinds, cfg.norm, cfg.ignore, gen)
    if ndim == 2:
        dirs["y"] = random_direction(theta, kinds, cfg.norm, cfg.ignore, gen)
    return dirs


def describe(cfg: DirectionsConfig, dirs: dict) -> dict:
    """What was done to make the directions, for the file's /directions attributes."""
    kind = "target" if "target" in dirs else cfg.kind
    out = {"kind": kind, "x_kind": kind,
           "y_kind": ("random" if kind == "target" else kind) if "y" in dirs else "",
           "norm": cfg.norm if kind in ("random", "target") else "none (unit vectors)" if kind in ("pca", "hessian")
           else "as in the source file",
           "ignore": cfg.ignore, "seed": cfg.seed,
           "stream": f"torch.Generator seeded with sha256('{STREAM_TAG}:<seed>')[:8]"}
    if kind == "file":
        out["source_file"] = cfg.file
    return out


def cosine(a: dict, b: dict) -> float:
    """Cosine of the angle between two directions, over all their entries, in float64."""
    dot = sum(float((a[n].double() * b[n].double()).sum()) for n in a)
    na = sum(float(a[n].double().pow(2).sum()) for n in a) ** 0.5
    nb = sum(float(b[n].double().pow(2).sum()) for n in b) ** 0.5
    return dot / (na * nb) if na > 0 and nb > 0 else float("nan")
