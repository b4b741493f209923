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
