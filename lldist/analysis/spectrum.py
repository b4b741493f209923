"""The spectral density at θ*, read back: lldist.hessian --density stores stochastic Lanczos
quadrature's nodes and weights (evaluation/curvature.py computes them); here they are smoothed
for the figure and summed up in a line for `lldist.info`. Numpy only.

    grid, density = smoothed_density(nodes, weights)     # (points,), (points,): integrates to 1
    print(density_summary(nodes, weights))               # the bulk, the outliers, the negative mass
"""

from __future__ import annotations

import numpy as np


def smoothed_density(nodes: np.ndarray, weights: np.ndarray, grid: np.ndarray = None, sigma: float = None,
                     points: int = 1000) -> tuple:
    """(grid, density): the quadrature's Dirac masses, averaged over runs, as a sum of Gaussians
    of width sigma (default 1% of the nodes' range), integrating to 1 over the real line."""
    w = weights / weights.shape[0]
    lo, hi = float(nodes[weights > 0].min()), float(nodes[weights > 0].max())
    sigma = sigma or 0.01 * max(hi - lo, 1e-12)
    if grid is None:
        grid = np.linspace(lo - 5 * sigma, hi + 5 * sigma, points)
    d = np.zeros_like(grid, dtype=np.float64)
    for t, m in zip(nodes.ravel(), w.ravel()):
        if m > 0:
            d += m * np.exp(-0.5 * ((grid - t) / sigma) ** 2)
    return grid, d / (sigma * np.sqrt(2 * np.pi))


def density_summary(nodes: np.ndarray, weights: np.ndarray) -> str:
    """One line: the runs and steps, the range, and how the mass splits between the bulk near
    zero (|lambda| within 1% of the largest |lambda|), the outliers above it and the clearly
    negative eigenvalues below it: the shape Ghorbani et al. (2019) describe."""
    w = weights / weights.shape[0]
    lo, hi = float(nodes[weights > 0].min()), float(nodes[weights > 0].max())
    eps = 0.01 * max(abs(lo), abs(hi))
    part = lambda m: 100 * float(w[m].sum())  # noqa: E731
    return (f"{nodes.shape[0]} runs x {nodes.shape[1]} Lanczos steps; eigenvalues in [{lo:.4g}, {hi:.4g}]; "
            f"mass {part(np.abs(nodes) <= eps):.1f}% in the bulk (|lambda| <= {eps:.3g}), {part(nodes > eps):.2f}% "
            f"above it, {part(nodes < -eps):.2f}% below it")
