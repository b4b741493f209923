"""directions.kind pca: the plane of a training trajectory, its top two principal directions
(Li et al. 2018, section 7), each checkpoint's coordinates on it, and how well the plane holds
each checkpoint.

    files = trajectory_files(job)                                        # the checkpoints, in order
    dirs, info, coords = pca_directions(theta, kinds, [theta_1, ..., theta_m])
    # dirs {"x", "y"}: unit vectors; info: explained variance ratios; coords: (m, 2)
    d = make(making)                                                     # the job's: Directions
    job = covering(job, loaded)                                          # grid.x/y: auto made numbers
"""

from __future__ import annotations

import copy
import dataclasses
import glob
import os
import re

import torch

from ..errors import UserError
from ..evaluation.tasks import mean_over
from .recipe import Recipe
from .record import Directions
from .state import trainable_names

NORM = "none (unit vectors)"

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


def trajectory_files(job) -> list:
    """The trajectory's checkpoints, in training order, the final one excluded."""
    pattern = job.directions.checkpoints
    if pattern is None:
        if not job.model.checkpoint:
            raise UserError(f"{job.source}: directions.kind: pca needs directions.checkpoints or a model.checkpoint "
                            "whose <stem>_epoch<N>.pt series is the trajectory")
        stem, ext = os.path.splitext(job.model.checkpoint)
        ext = ext or ".pt"  # lldist.train's epoch files keep the checkpoint's format (.pt, .safetensors)
        # lldist.train's epoch series, else a Recorder's step series (inputs/recorder.py)
        pattern = stem + "_epoch*" + ext if len(glob.glob(stem + "_epoch*" + ext)) >= 2 or \
            len(glob.glob(stem + "_step*.pt")) < 2 else stem + "_step*.pt"
    final = os.path.abspath(job.model.checkpoint) if job.model.checkpoint else None

    def order(path):
        nums = re.findall(r"\d+", os.path.basename(path))
        return (int(nums[-1]) if nums else -1, path)
    files = sorted((f for f in glob.glob(pattern) if os.path.abspath(f) != final), key=order)
    if len(files) < 2:
        raise UserError(f"{job.source}: directions.kind: pca found {len(files)} checkpoint(s) matching {pattern}; "
                        "it needs at least 2 besides the final one")
    return files


def inputs(job) -> dict:
    """The trajectory's checkpoints by their content."""
    from ..inputs.identity import file
    return {"trajectory": [file(f) for f in trajectory_files(job)]}


CAPTURED_WELL = 0.5  # a checkpoint whose displacement the plane holds less of is drawn as badly represented


def trajectory_fit(job, loaded, task, states: list, dirs: Directions, coords, log) -> dict:
    """How well the PCA plane holds each checkpoint (loss-landscape #1: "the PCA path does not
    match the contour losses"): the fraction of its displacement θ_i − θ* in the plane,
    (c_i1² + c_i2²)/‖θ_i − θ*‖² over the entries the directions move, and the loss at the
    checkpoint against the loss at its projection θ* + c_i1 d_x + c_i2 d_y (on the job's first
    split; BatchNorm statistics stay θ*'s at the projection, as on the grid)."""
    moving = [n for n in loaded.theta if any(bool(a[n].any()) for a in (dirs.x, dirs.y) if a is not None)]
    split = job.splits[0]
    data = loaded.splits[split]
    bs = job.eval.batch_size if job.eval.batch_size != "auto" else 256
    model = copy.deepcopy(loaded.model)

    def loss_at(state: dict) -> float:
        model.load_state_dict(state, strict=False)
        return mean_over(model, data, task, bs)["loss"]
    captured, at_checkpoint, at_projection = [], [], []
    for st, (c1, c2) in zip(states, coords.tolist()):
        norm2 = sum(float((st[n].double() - loaded.theta[n].double()).pow(2).sum()) for n in moving)
        captured.append((c1 * c1 + c2 * c2) / norm2 if norm2 > 0 else 1.0)
        at_checkpoint.append(loss_at(st))
        proj = {n: (w.double() + c1 * dirs.x[n].double() + (c2 * dirs.y[n].double() if dirs.y is not None else 0))
                .to(w.dtype) for n, w in loaded.theta.items()}
        at_projection.append(loss_at(proj))
    bad = [i + 1 for i, c in enumerate(captured) if c < CAPTURED_WELL]
    log(f"the plane holds {100 * min(captured):.0f}-{100 * max(captured):.0f}% of each checkpoint's displacement"
        + (f"; checkpoints {', '.join(map(str, bad))} under {100 * CAPTURED_WELL:.0f}%: their points on the plane "
           "are projections, not where training went" if bad else ""))
    return {"captured": captured, "loss_checkpoint": at_checkpoint, "loss_projected": at_projection, "split": split,
            "threshold": CAPTURED_WELL}


def _of(job, loaded) -> tuple:
    """(files, states, dirs, info, coords) of the job's trajectory, computed once per loaded
    model (`covering` needs the coordinates before the file exists, `make` the rest)."""
    from ..inputs.loading import checkpoint_state
    key = (job.directions, job.model.checkpoint)
    cached = getattr(loaded, "_pca", None)
    if cached is not None and cached[0] == key:
        return cached[1]
    files = trajectory_files(job)
    states = [checkpoint_state(job, loaded, f) for f in files]
    try:
        selects = Recipe.of(job.directions, trainable_names(loaded.model)).selects
        dirs, info, coords = pca_directions(loaded.theta, loaded.kinds, states, job.directions.ignore,
                                            job.directions.center, selects)
    except ValueError as e:
        raise UserError(f"{job.source}: directions.kind: pca: {e}")
    loaded._pca = (key, (files, states, dirs, info, coords))
    return loaded._pca[1]


MARGIN = 0.2  # an automatic grid reaches this share of the trajectory's extent beyond it


def covering(job, loaded, log=lambda m: None):
    """The job with each `auto` axis (config.AutoAxis) made the trajectory's extent on it, θ*
    (0) included, widened by MARGIN on both sides; the job as it is without one."""
    from ..config import Axis, AutoAxis
    if not any(isinstance(a, AutoAxis) for a in (job.grid.x, job.grid.y)):
        return job
    coords = _of(job, loaded)[4]
    axes = {}
    for name, k in (("x", 0), ("y", 1)):
        a = getattr(job.grid, name)
        if isinstance(a, AutoAxis):
            lo, hi = min(0.0, float(coords[:, k].min())), max(0.0, float(coords[:, k].max()))
            pad = MARGIN * (hi - lo) or 1.0
            axes[name] = Axis(round(lo - pad, 6), round(hi + pad, 6), a.num)
            log(f"grid.{name}: auto covers the trajectory: [{axes[name].min:g}, {axes[name].max:g}, {a.num}]")
    return dataclasses.replace(job, grid=dataclasses.replace(job.grid, **axes))


def make(m) -> Directions:
    job, loaded = m.job, m.loaded
    files, states, dirs, info, coords = _of(job, loaded)
    m.log(f"pca of {len(files)} checkpoints: explained variance {info['explained_variance_ratio'][0]:.3f}, "
          f"{info['explained_variance_ratio'][1]:.3f}")
    info["checkpoints"] = [os.path.basename(f) for f in files]
    lo, hi = coords.min(0).values.tolist(), coords.max(0).values.tolist()
    m.log(f"trajectory of {len(files)} checkpoints spans alpha [{lo[0]:.3g}, {hi[0]:.3g}], beta [{lo[1]:.3g}, "
          f"{hi[1]:.3g}] (the final checkpoint is at 0, 0): the grid should cover it")
    d = Directions(x=dirs["x"], y=dirs["y"] if job.ndim == 2 else None, attrs=info, trajectory=coords)
    d.trajectory_fit = trajectory_fit(job, loaded, m.task, states, d, coords, m.log)
    return d
