"""Attention that survives double backward: the curvature's guard against fused kernels. No MPI, no HDF5.

    guard = Guard(model, lambda: model(x[:2]))    # decided once: guard.note is None or what changes
    with guard():                                  # around every product
        ... one Hessian-vector product ...

PyTorch's fused scaled-dot-product attention kernels have no double backward on several
backends (pytorch/pytorch#116350; on this CPU with torch 2.14, the flash kernel raises
"derivative for aten::_scaled_dot_product_flash_attention_for_cpu_backward is not
implemented", and forward mode is missing too). The Hessian, the GGN's forward mode and the
Fisher's all need them. So a model that attends through them computes its curvature on the
math path, the same function written with matmul and softmax, which autograd differentiates
any number of times:

  * a HuggingFace model whose config asks for a fused implementation (sdpa, flash, flex) is
    switched to `attn_implementation="eager"` for the products and switched back after;
  * any other model that calls `F.scaled_dot_product_attention` (seen in one forward pass under
    a torch-function mode) runs the products under `sdpa_kernel(SDPBackend.MATH)`.

The note says which, for the log and the file's /curvature attributes. Eager and fused attention
compute the same function: they differ by float round-off (tested against the exact Hessian).
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

_FUSED_HF = ("sdpa", "flash_attention_2", "flash_attention_3", "flex_attention")


class _SeesAttention(torch.overrides.TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.seen = False

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is F.scaled_dot_product_attention:
            self.seen = True
        return func(*args, **(kwargs or {}))


def _hf_configs(model) -> list:
    """The HuggingFace configs in the model (a PEFT wrapper or a user's module may hold one)."""
    out = []
    for m in model.modules():
        cfg = getattr(m, "config", None)
        if cfg is not None and hasattr(cfg, "_attn_implementation") and all(cfg is not c for c in out):
            out.append(cfg)
    return out


def calls_sdpa(model, forward) -> bool:
    """Whether `forward()` (one pass of `model`) calls F.scaled_dot_product_attention."""
    mode = _SeesAttention()
    with torch.no_grad(), mode:
        forward()
    return mode.seen


class Guard:
    """Decided once per model (one forward pass); entered around every product.

        guard = Guard(model, lambda: model(x[:2]))
        guard.note                  # None, or what is changed and why
        with guard():
            ... one Hessian-vector product ...
    """

    def __init__(self, model, forward):
        self.fused = [c for c in _hf_configs(model) if c._attn_implementation in _FUSED_HF]
        self.math = not self.fused and calls_sdpa(model, forward)
        self.note = None
        if self.fused:
            self.note = (f"attention: eager (the model's {self.fused[0]._attn_implementation} attention has no double "
                         "backward on every backend; curvature products use attn_implementation='eager', the same "
                         "function)")
        elif self.math:
            self.note = ("attention: math (the model calls scaled_dot_product_attention, whose fused kernels have no "
                         "double backward on every backend; curvature products use its math backend)")

    @contextlib.contextmanager
    def __call__(self):
        if self.fused:
            was = [c._attn_implementation for c in self.fused]
            for c in self.fused:
                c._attn_implementation = "eager"
            try:
                yield
            finally:
                for c, w in zip(self.fused, was):
                    c._attn_implementation = w
        elif self.math:
            from torch.nn.attention import SDPBackend, sdpa_kernel
            with sdpa_kernel(SDPBackend.MATH):
                yield
        else:
            yield
