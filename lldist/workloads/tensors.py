"""The containers a split lives in on the evaluation device: no loading, no imports of lldist.

    ts = TensorSet(x, y, num_classes=10, scale=1 / 255, mean=CIFAR_MEAN, std=CIFAR_STD)
    for xb, yb in ts.to("cuda").batches(512): ...            # (B, C, H, W) float32, (B,) int64
    DictSet({"input_ids": ids, "attention_mask": mask})      # tokenized text, dict batches
    BatchList([batch, batch, ...])                            # the caller's own batches, as they come

A landscape evaluates the same examples thousands of times, so each split is decoded once into
one of these; `data.py` (images) and `hf.py` (text) fill them.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Iterator, Optional

import torch


@dataclass(frozen=True)
class TensorSet:
    x: torch.Tensor  # (N, C, H, W), uint8 or float32
    y: torch.Tensor  # (N,) int64 class labels, or a regression's real-valued targets
    num_classes: int
    scale: float = 1.0  # x * scale brings raw values to [0, 1]
    mean: Optional[tuple] = None  # per channel, applied after scale
    std: Optional[tuple] = None

    def __len__(self) -> int:
        return self.x.shape[0]

    @property
    def in_shape(self) -> tuple:
        return tuple(self.x.shape[1:])

    def to(self, device) -> "TensorSet":
        return replace(self, x=self.x.to(device), y=self.y.to(device))

    def normalize(self, xb: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
        """(B, C, H, W) raw -> normalized `dtype` on xb's device."""
        if xb.dtype == dtype and self.scale == 1.0 and self.mean is None:
            return xb  # already normalized (a pre-normalized copy): no work, no copy
        xb = xb.to(dtype)
        if self.scale != 1.0:
            xb = xb * self.scale
        if self.mean is not None:
            m = torch.tensor(self.mean, dtype=dtype, device=xb.device).view(1, -1, 1, 1)
            s = torch.tensor(self.std, dtype=dtype, device=xb.device).view(1, -1, 1, 1)
            xb = (xb - m) / s
        return xb

    def batches(self, batch_size: int, dtype=torch.float32) -> Iterator[tuple]:
        for i in range(0, len(self), batch_size):
            yield self.normalize(self.x[i:i + batch_size], dtype), self.y[i:i + batch_size]

    def select(self, idx: torch.Tensor) -> "TensorSet":
        return replace(self, x=self.x[idx], y=self.y[idx])

    def take(self, idx: torch.Tensor) -> tuple:
        """One training batch: (normalized x, y)."""
        return self.normalize(self.x[idx]), self.y[idx]

    def nonfinite(self) -> int:
        """NaN and inf among the inputs (a landscape of them is NaN everywhere)."""
        return _nonfinite([self.x])


@dataclass(frozen=True)
class DictSet:
    """Tokenized text: equal-length tensors by name (input_ids, attention_mask, labels...),
    sliced into HuggingFace-style dict batches on the device."""
    tensors: dict  # name -> (N, ...) tensor
    num_classes: int = 0

    def __len__(self) -> int:
        return next(iter(self.tensors.values())).shape[0]

    @property
    def in_shape(self) -> tuple:
        return tuple(self.tensors["input_ids"].shape[1:])

    def to(self, device) -> "DictSet":
        return replace(self, tensors={k: v.to(device) for k, v in self.tensors.items()})

    def batches(self, batch_size: int, dtype=None) -> Iterator[dict]:
        for i in range(0, len(self), batch_size):
            yield {k: v[i:i + batch_size] for k, v in self.tensors.items()}

    def select(self, idx: torch.Tensor) -> "DictSet":
        return replace(self, tensors={k: v[idx] for k, v in self.tensors.items()})

    def take(self, idx: torch.Tensor) -> dict:
        return {k: v[idx] for k, v in self.tensors.items()}

    def nonfinite(self) -> int:
        return _nonfinite(self.tensors.values())


class BatchList:
    """Batches as the caller made them (tuples or dicts of tensors, HuggingFace style), kept as
    they come: their size is the caller's. `len()` counts examples (the first dimension)."""

    def __init__(self, batches: list):
        self.batches_ = batches

    @staticmethod
    def _tensors(b):
        return list(b.values()) if isinstance(b, dict) else list(b)

    def __len__(self) -> int:
        return sum(self._tensors(b)[0].shape[0] for b in self.batches_)

    @property
    def num_classes(self) -> int:
        """The largest integer target + 1 (0 when the targets are not class labels)."""
        top = -1
        for b in self.batches_:
            t = (b.get("labels", b.get("label")) if isinstance(b, dict) else (b[1] if len(b) > 1 else None))
            if t is not None and not t.is_floating_point() and t.numel():
                top = max(top, int(t.max()))
        return top + 1

    def to(self, device) -> "BatchList":
        def move(b):
            if isinstance(b, dict):
                return {k: v.to(device) for k, v in b.items()}
            return tuple(t.to(device) for t in b)
        return BatchList([move(b) for b in self.batches_])

    def batches(self, batch_size=None, dtype=None) -> Iterator:
        return iter(self.batches_)

    def nonfinite(self) -> int:
        return _nonfinite(t for b in self.batches_ for t in self._tensors(b))


def _nonfinite(tensors) -> int:
    return sum(int((~torch.isfinite(t)).sum()) for t in tensors if t.is_floating_point())
