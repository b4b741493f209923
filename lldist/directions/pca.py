"""The plane of a training trajectory: its top two principal directions (Li et al. 2018,
section 7), and each checkpoint's coordinates on it. Pure tensor code, no MPI, no HDF5.

    from lldist.directions import pca_directions
    dirs, info, coords = pca_directions(theta, kinds, [theta_1, ..., theta_m])
    # dirs {"x", "y"}: unit vectors; info: explained variance ratios; coords: (m, 2)
"""

from __future__ import annotations

import torch

CENTERS = ("final", "mean")


def pca_directions(theta: dict, kinds: dict, trajectory: list, ignore: str = "biasbn", center: str = "final",
                   select=lambda name: True) -> tuple:
    """The top two principal directions of a training trajectory (Li et al., section 7).

    `trajectory`: the float states theta_1..theta_m of the checkpoints along training; theta is
    the final one. The differences D_i = theta_i - theta over the parameters (BatchNorm
    statistics and, with ignore: biasbn, 1-D parameters excluded, as for random directions)
    are never stacked into a (parameters x m) matrix: their Gram matrix G = D D^T (m x m, float64)
    is built by accumulating entry by entry, and its eigenvectors u_k give the principal
    directions d_k = D^T u_k / |D^T u_k| (unit vectors). Returns (dirs {"x", "y"}, info with the
    explained variance ratios, coords: the trajectory's (m, 2) coordinates c_ik = D_i . d_k).

    `center`: "final" (the default) takes the principal directions of the differences D_i
    themselves, the second moment about theta*: the plane is drawn through theta*, and these
    are the directions that carry the most of the checkpoints' displacement from it. "mean"
    subtracts the mean difference first, as scikit-learn's PCA does and so Li et al.'s code
    (their `setup_PCA_directions` fits sklearn.decomposition.PCA to the D_i): G becomes C G C
    with C = I - 11^T/m, whose eigenvectors u_k (orthogonal to 1) give d_k = D^T u_k all the
    same. The coordinates are the projections of D_i in both cases, as in their code."""
    if center not in CENTERS:
        raise ValueError(f"center {center!r}: allowed {', '.join(CENTERS)}")
    names = [n for n, k in kinds.items()
             if (k in ("weight", "weight_t") or (k == "vector" and ignore != "biasbn")) and select(n)]
    m = len(trajectory)
    if m < 2:
        raise ValueError(f"pca needs at least 2 checkpoints besides the final one, got {m}")
    gram = torch.zeros(m, m, dtype=torch.float64)
    for n in names:
        d = torch.stack([t[n].double().reshape(-1) - theta[n].double().reshape(-1) for t in trajectory])
        gram += d @ d.T
    if center == "mean":
        c = torch.eye(m, dtype=torch.float64) - 1.0 / m
        gram = c @ gram @ c
    evals, evecs = torch.linalg.eigh(gram)  # ascending
    evals, evecs = evals.flip(0), evecs.flip(1)
    total = float(evals.clamp_min(0).sum())
    dirs, coords = {}, torch.zeros(m, 2, dtype=torch.float64)
    for axis, k in (("x", 0), ("y", 1)):
        u = evecs[:, k]
        vec = {n: sum(float(u[i]) * (trajectory[i][n].double() - theta[n].double()) for i in range(m)) for n in names}
        norm = sum(float(v.pow(2).sum()) for v in vec.values()) ** 0.5
        if not norm > 0:
            raise ValueError("the checkpoints do not move: the trajectory has no principal direction")
        dirs[axis] = {n: (vec[n] / norm).to(w.dtype) if n in vec else torch.zeros_like(w) for n, w in theta.items()}
        for i in range(m):  # the projections, directly: (theta_i - theta) . d_k
            coords[i, k] = sum(float(((trajectory[i][n].double() - theta[n].double()) * (vec[n] / norm)).sum())
                               for n in names)
    info = {"explained_variance_ratio": [float(evals[0]) / total, float(evals[1]) / total] if total > 0 else [0.0, 0.0],
            "pca_center": center}
    return dirs, info, coords
