"""How sure a landscape's numbers are: intervals from the per-cell standard errors a file
stores. Plain numpy and the standard library; no torch, no MPI, no HDF5.

    lo, hi = interval(loss, loss_se, level=0.95)       # the mean loss ± z·se (normal)
    lo, hi = wilson(acc, n, level=0.95)                # Wilson's score interval for an accuracy
    se = jackknife_se([lam_without_batch_1, ...])      # the jackknife's standard error

The loss's standard error is over the split's examples (evaluation/tasks.py: loss_se): it says
how far the cell's loss could move on another sample of the same size from the same
distribution, not how far another direction draw would move it (directions.repeats does).
"""

from __future__ import annotations

from statistics import NormalDist

import numpy as np


def z_value(level: float) -> float:
    """The two-sided normal quantile of a confidence level (1.96 for 0.95)."""
    if not 0 < level < 1:
        raise ValueError(f"level must lie strictly between 0 and 1, got {level!r}")
    return NormalDist().inv_cdf(0.5 + level / 2)


def interval(mean, se, level: float = 0.95) -> tuple:
    """(low, high): mean ± z·se, elementwise; NaN where either is NaN."""
    mean, se = np.asarray(mean, dtype=float), np.asarray(se, dtype=float)
    z = z_value(level)
    return mean - z * se, mean + z * se


def wilson(p, n, level: float = 0.95) -> tuple:
    """(low, high): Wilson's score interval for a proportion p of n independent trials,
    elementwise. Unlike p ± z·sqrt(p(1−p)/n) it stays within [0, 1] and is not empty at p = 0
    or 1 (a cell where every example is right still has an interval)."""
    p, n = np.asarray(p, dtype=float), np.asarray(n, dtype=float)
    if np.any(n <= 0):
        raise ValueError("n must be positive")
    z = z_value(level)
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * np.sqrt(np.clip(p * (1 - p), 0, None) / n + z * z / (4 * n * n)) / denom
    # the interval always holds p: at p = 0 or 1 its end is p itself, not 1e-17 beside it
    return np.clip(np.fmin(centre - half, p), 0, 1), np.clip(np.fmax(centre + half, p), 0, 1)


def binomial_se(p, n):
    """sqrt(p(1−p)/n): the standard error of a proportion."""
    p = np.asarray(p, dtype=float)
    return np.sqrt(np.clip(p * (1 - p), 0, None) / np.asarray(n, dtype=float))


def jackknife_se(leave_one_out: list) -> float:
    """The jackknife's standard error from the n leave-one-out estimates:
    sqrt((n − 1)/n · Σ (θ_(i) − mean)²) (Efron and Stein; Quenouille)."""
    v = np.asarray(leave_one_out, dtype=float)
    n = len(v)
    return float(np.sqrt((n - 1) / n * np.sum((v - v.mean()) ** 2))) if n > 1 else float("nan")
