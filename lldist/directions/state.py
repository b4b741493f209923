"""The float state directions live in, and what is measured on it. Pure tensor code.

    theta, kinds = model_state(model)         # detached CPU copies of the float state; each entry's kind
    cosine(d1, d2)                            # the angle between two directions, float64

A direction is a dict {state-dict name: tensor shaped like that entry} over the model's
floating-point state: parameters *and* float buffers (BatchNorm running statistics), so that
setting theta + a*dx + b*dy also resets the buffers of every cell, and interpolation between
checkpoints moves the running statistics too. Random directions are zero on buffers.

Kinds of entries: "weight" (parameter with dim > 1: conv and linear weights, normalized per
filter, i.e. per output unit = index along dim 0), "weight_t" (a weight stored (in, out, ...):
transformers' Conv1D in GPT-2, ConvTranspose; its output units run along dim 1, and the filter
follows the module type, not dim 0), "vector" (1-D parameter: biases and BatchNorm affine
parameters; `ignore: biasbn` zeroes them, as in the paper, `ignore: none` normalizes each as a
single filter), "buffer" (always zero in a random direction).
"""

from __future__ import annotations

from torch import nn


def _transposed(module: nn.Module) -> bool:
    """Modules that store their weight as (in, out, ...): transformers' Conv1D (GPT-2's c_attn,
    c_proj, c_fc; found by name, so transformers need not be importable) and ConvTranspose."""
    return isinstance(module, nn.modules.conv._ConvTransposeNd) or (
        type(module).__name__ == "Conv1D" and type(module).__module__.startswith("transformers"))


def model_state(model: nn.Module) -> tuple[dict, dict]:
    """(theta, kinds): detached CPU copies of the float state, and each entry's kind (a meta
    tensor stays one: its shape and dtype)."""
    params = {n for n, _ in model.named_parameters()}
    transposed = {f"{m_name}.weight" if m_name else "weight" for m_name, m in model.named_modules() if _transposed(m)}
    theta, kinds, seen = {}, {}, set()
    for name, t in model.state_dict(keep_vars=True).items():
        if not t.is_floating_point():
            continue  # e.g. BatchNorm's num_batches_tracked
        key = id(t) if t.is_meta else t.data_ptr()  # (meta tensors have no data to point at)
        if t.numel() and key in seen:
            continue  # a tied weight (a language model's output layer = its embedding): moved once
        seen.add(key)
        # a parameter on the meta device (a model loaded by rows: inputs/rows.py) is its shape
        theta[name] = t.detach() if t.is_meta else t.detach().to("cpu", copy=True)
        if name in params:
            kinds[name] = ("weight_t" if name in transposed else "weight") if t.dim() > 1 else "vector"
        else:
            kinds[name] = "buffer"
    return theta, kinds


def trainable_names(model: nn.Module) -> set:
    """The names of the model's parameters that require grad (directions.params.trainable_only)."""
    return {n for n, p in model.named_parameters() if p.requires_grad}


def cosine(a: dict, b: dict) -> float:
    """Cosine of the angle between two directions, over all their entries, in float64."""
    dot = sum(float((a[n].double() * b[n].double()).sum()) for n in a)
    na = sum(float(a[n].double().pow(2).sum()) for n in a) ** 0.5
    nb = sum(float(b[n].double().pow(2).sum()) for n in b) ** 0.5
    return dot / (na * nb) if na > 0 and nb > 0 else float("nan")
