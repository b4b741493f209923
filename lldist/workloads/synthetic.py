"""Synthetic models for the benchmark and the tests: known cost, no arithmetic to speak of.

    model: {name: "python:lldist.workloads.synthetic:fixed_cost", args: {seconds: 0.05}}
"""

from __future__ import annotations

import time

from torch import nn


class FixedCost(nn.Module):
    """A model whose forward sleeps `seconds`: the cost per cell is fixed and uses no CPU, so a
    2-core machine can host 8 ranks and the protocol, not the arithmetic, is measured."""

    def __init__(self, seconds: float = 0.05):
        super().__init__()
        self.fc = nn.Linear(64, 10)
        self.seconds = seconds

    def forward(self, x):  # x (B, 1, 8, 8): the digits images
        time.sleep(self.seconds)
        return self.fc(x.flatten(1))


def fixed_cost(seconds: float = 0.05) -> nn.Module:
    return FixedCost(seconds)


def random_images(split: str = "test", n: int = 64, channels: int = 3, size: int = 32, classes: int = 10,
                  seed: int = 0):
    """Seeded random uint8 images and labels, (n, channels, size, size): a data set for models
    that want RGB images of some size (torchvision's), where nothing may be downloaded.

        data: {name: "python:lldist.workloads.synthetic:random_images", args: {size: 32}}"""
    import torch
    g = torch.Generator().manual_seed(seed + (split == "train"))
    return (torch.randint(0, 256, (n, channels, size, size), generator=g, dtype=torch.uint8),
            torch.randint(0, classes, (n,), generator=g))
