"""What a run reads: the model at θ* (trained first when its checkpoint is missing), the data
splits, the task, and the directions. The surface run, the Hessian at θ* and the API all load
through here.

    source = Source()                               # the job file's model, data and task
    ensure_checkpoint(job)                          # train it when the job says how
    loaded = source.load(job)                       # Loaded(model, theta, kinds, splits, meta)
    dirs = make_dirs(job, loaded, source.make_task(job), source)   # {"x": {...}, "y": {...}, ...}
"""

from __future__ import annotations

import copy
import dataclasses
import glob
import os
import re
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from .config import Job
from .directions import Recipe, make_directions, model_state, pca_directions
from .directions import recipe as recipe_mod
from .errors import UserError
from .evaluation.tasks import Task, task_from_config
from .workloads.data import load_split
from .workloads.models import build_model, load_checkpoint


@dataclass
class Loaded:
    model: torch.nn.Module
    theta: dict
    kinds: dict
    splits: dict  # split name -> TensorSet, DictSet or BatchList (CPU)
    meta: dict  # checkpoint metadata (train/test accuracy at training time)


def load_model_and_data(job: Job) -> Loaded:
    """Everything each rank loads once: evaluation data, model at theta*."""
    if job.model.name.startswith("object:") or job.data.name.startswith("object:"):
        raise UserError(f"{job.source}: object: models and data are given from Python (lldist.landscape)")
    splits = {s: load_split(job.data, s, model_name=job.model.name) for s in job.splits}
    first = next(iter(splits.values()))
    model = build_model(job.model, first.in_shape, first.num_classes)
    meta = load_checkpoint(model, job.model.checkpoint) if job.model.checkpoint else {}
    theta, kinds = model_state(model)
    return Loaded(model, theta, kinds, splits, meta)


@dataclass
class Source:
    """Where a run's model, data and task come from: the job file (the defaults), or objects
    given from Python (lldist.landscape), with the fingerprints that stand for them."""
    loader: Callable[[Job], Loaded] = None  # job -> Loaded; None: load_model_and_data
    task: Optional[Task] = None  # None: the job's eval.loss and eval.metrics
    files: Optional[dict] = None  # extra identity entries (fingerprints of objects)
    target: Optional[dict] = None  # theta' as a state, instead of directions.target's file

    def load(self, job: Job) -> Loaded:
        return (self.loader or load_model_and_data)(job)

    def make_task(self, job: Job) -> Task:
        return self.task or task_from_config(job.eval, job.curvature.operator)


def bn_data(job: Job, loaded: Loaded):
    """eval.bn: recompute: the data BatchNorm statistics are taken on, the train split as the
    job evaluates it (data.subset included); None for the other modes."""
    if job.eval.bn != "recompute":
        return None
    if "train" in loaded.splits:
        return loaded.splits["train"]
    return load_split(job.data, "train", model_name=job.model.name)


def ensure_checkpoint(job: Job, should_stop=lambda: None, log=print) -> None:
    """Train first when the job names a checkpoint that does not exist yet and can train."""
    ck = job.model.checkpoint
    if ck and not os.path.exists(ck):
        if job.train is None:
            raise UserError(f"{job.source}: key 'model.checkpoint': {ck} does not exist")
        from .training import train
        log(f"checkpoint {ck} missing: training it first")
        train(job, log=log, should_stop=should_stop)
    if job.directions.target and not os.path.exists(job.directions.target):
        raise UserError(f"{job.source}: key 'directions.target': {job.directions.target} does not exist")


def ready_at_optimum(job: Job, spread=None, should_stop=lambda: None, log=print) -> bool:
    """Before a computation at θ* that every rank joins (optimum.at_optimum, flatness.measure):
    rank 0 trains a missing checkpoint while the others, quiet (rank 0 says what loading says),
    wait at spread's gate. Returns whether this rank drives (rank 0, or the only process)."""
    driver = spread is None or spread.rank == 0
    if driver:
        ensure_checkpoint(job, should_stop, log)
    else:
        from .workloads import notes
        notes.quiet()
    if spread is not None:
        spread.gate()  # the others load the checkpoint rank 0 may just have trained
    return driver


def checkpoint_state(job: Job, loaded: Loaded, path: str) -> dict:
    """The float state of the job's model with another checkpoint loaded (a target, a
    trajectory's epoch). A model given from Python is copied, not rebuilt."""
    if job.model.name.startswith("object:"):
        other = copy.deepcopy(loaded.model).cpu()
    else:
        first = next(iter(loaded.splits.values()))
        other = build_model(job.model, first.in_shape, first.num_classes)
    load_checkpoint(other, path)
    return model_state(other)[0]


def trajectory_files(job: Job) -> list:
    """pca: the trajectory's checkpoints, in training order, the final one excluded."""
    pattern = job.directions.checkpoints
    if pattern is None:
        if not job.model.checkpoint:
            raise UserError(f"{job.source}: directions.kind: pca needs directions.checkpoints or a model.checkpoint "
                            "whose <stem>_epoch<N>.pt series is the trajectory")
        stem = os.path.splitext(job.model.checkpoint)[0]
        # lldist.train's epoch series, else a Recorder's step series (lldist/recorder.py)
        pattern = stem + "_epoch*.pt" if len(glob.glob(stem + "_epoch*.pt")) >= 2 or \
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


def make_dirs(job: Job, loaded: Loaded, task: Task, source: Source = Source(), log=lambda m: None,
              trajectory: Optional[list] = None) -> dict:
    """The job's directions: {"x": dir, "y": dir (2D)}, with what the file keeps beside them
    ("target": theta' of an interpolation, "_info": attributes of /directions, "_trajectory": a
    PCA plane's checkpoint coordinates). `trajectory`: pca's checkpoint files, when known.
    With directions.repeats: n, "_planes" holds planes 1..n-1, each made as this job's with
    directions.seed + k would make them (plane 0 is this job's own)."""
    dirs = _make_dirs(job, loaded, task, source, log, trajectory)
    if job.directions.repeats > 1:
        dirs["_planes"] = [_make_dirs(dataclasses.replace(job, directions=dataclasses.replace(
            job.directions, seed=job.directions.seed + k, repeats=1)), loaded, task, source, log, trajectory)
            for k in range(1, job.directions.repeats)]
    return dirs


def _make_dirs(job: Job, loaded: Loaded, task: Task, source: Source, log, trajectory) -> dict:
    kind, ndim = job.directions.kind, job.ndim
    if store_recipe(job, loaded):  # the recipe, its norms and checksums: no direction held whole
        trainable = {n for n, p in loaded.model.named_parameters() if p.requires_grad}
        r = Recipe.of(job.directions, trainable)
        summary = recipe_mod.summarize(loaded.theta, loaded.kinds, r, ("x", "y")[:ndim])
        log(f"directions kept as their recipe ({r.describe()}): {num_parameters(loaded):,} parameters")
        return {"_recipe": recipe_mod.to_dict(r), "_summary": summary}
    if kind in ("random", "target"):
        tgt = source.target if source.target is not None else \
            (checkpoint_state(job, loaded, job.directions.target) if job.directions.target else None)
        info = {}
        if tgt is not None and job.directions.align == "weights":
            tgt, info = aligned_to_theta(loaded, tgt, log)
        trainable = {n for n, p in loaded.model.named_parameters() if p.requires_grad}
        dirs = make_directions(loaded.theta, loaded.kinds, job.directions, ndim, tgt, trainable)
        if info:
            dirs["_info"] = info
        if job.directions.params and not any(t.any() for axis in ("x", "y") if axis in dirs for t in dirs[axis].values()):
            raise UserError(f"{job.source}: key 'directions.params' chooses no parameter the directions can move "
                            f"(the model's: {', '.join(list(loaded.theta)[:6])}, ...)")
        return dirs
    if kind == "file":
        return _file_directions(job, loaded)
    if kind == "plane":
        return _plane_directions(job, loaded, log)
    if kind == "curve":
        return _curve_directions(job, loaded, log)
    if kind == "pca":
        return _pca_directions(job, loaded, log, trajectory or trajectory_files(job), task)
    return _hessian_directions(job, loaded, task, log)


def aligned_to_theta(loaded: Loaded, target: dict, log) -> tuple:
    """theta' with its hidden units permuted to match theta*'s (directions.align: weights;
    directions/align.py), and what the file says of it."""
    from .directions.align import permutation_spec, weight_matching
    try:
        spec = permutation_spec(loaded.model)
    except ValueError as e:
        raise UserError(str(e))
    aligned, perms = weight_matching(spec, loaded.theta, target)
    moved = sum(int((v != torch.arange(len(v))).sum()) for v in perms.values())
    total = sum(len(v) for v in perms.values())
    log(f"target aligned to theta* by weight matching: {moved} of {total} hidden units moved, "
        f"{len(perms)} permutations")
    return aligned, {"align": "weights", "align_units_moved": moved, "align_units": total}


RECIPE_ABOVE = 50_000_000  # parameters: above it, directions.store: auto keeps random directions as their recipe


def num_parameters(loaded: Loaded) -> int:
    return sum(t.numel() for t in loaded.theta.values())


def store_recipe(job: Job, loaded: Loaded) -> bool:
    """Whether the job's directions are kept as their recipe (directions.store)."""
    dr = job.directions
    if dr.kind != "random" or dr.target:
        return False
    return dr.store == "recipe" or (dr.store == "auto" and num_parameters(loaded) > RECIPE_ABOVE)


def materialize(stored: dict, job: Job, loaded: Loaded, rows: Optional[dict] = None) -> dict:
    """The directions as tensors, from what the file keeps: the tensors themselves, or the
    recipe, regenerated here (only the rows `rows` of the named entries, for a shard). A whole
    regeneration is checked against the file's checksums."""
    if "_planes" in stored:  # directions.repeats: every plane's, the same way
        out = materialize({k: v for k, v in stored.items() if k != "_planes"}, job, loaded, rows)
        return {**out, "_planes": [materialize(p, job, loaded, rows) for p in stored["_planes"]]}
    if "_recipe" not in stored:
        return stored
    try:
        r = recipe_mod.from_dict(stored["_recipe"])
    except ValueError as e:
        raise UserError(f"{job.output}: {e}")
    axes = tuple(stored["_summary"]["checksums"])
    dirs = {a: recipe_mod.direction(loaded.theta, loaded.kinds, r, a, rows) for a in axes}
    for a in axes:  # whole entries by their sha256; a shard's rows by check_rows, with its group
        for n, t in dirs[a].items():
            if (rows is None or n not in rows) and recipe_mod.checksum(t) != stored["_summary"]["checksums"][a].get(n):
                raise _regenerated_differs(job, a, n)
    return dirs


def _regenerated_differs(job: Job, axis: str, name: str) -> UserError:
    return UserError(f"{job.output}: direction {axis} of {name} regenerated from its recipe differs from the one the "
                     "file was made with (another torch's random numbers?); use --out for a new file")


def check_rows(dirs: dict, stored: dict, job: Job, loaded: Loaded, rows: dict, add_up: Callable) -> None:
    """A sharded group's regenerated rows against the file: each entry's rows' float64 sums,
    added over the group by `add_up` (an all-reduce of a float64 tensor, called by every rank
    of the group with the same entries in the same order), give the sum the file stores."""
    if "_recipe" not in stored or "sums" not in stored["_summary"]:
        return
    for a in sorted(stored["_summary"]["sums"]):
        names = sorted(n for n in rows if n in dirs[a])
        local = torch.tensor([recipe_mod.row_sum(dirs[a][n]) if dirs[a][n].numel() else 0.0 for n in names],
                             dtype=torch.float64)
        total = add_up(local)
        for n, t in zip(names, total.tolist()):
            if not recipe_mod.rows_agree(t, stored["_summary"]["sums"][a][n], stored["_summary"]["norms"][a][n],
                                         loaded.theta[n].numel()):
                raise _regenerated_differs(job, a, n)


def point_states(job: Job, loaded: Loaded) -> list:
    """kind plane or curve: the float states of its three points, exactly as their files hold
    them (the first is theta*, the model's own checkpoint)."""
    return [dict(loaded.theta)] + [checkpoint_state(job, loaded, f) for f in job.directions.points[1:]]


def plane_frame(a: dict, b: dict, c: dict) -> tuple:
    """(u, v, t, |u|², |v|²) of the plane through states a, b, c, in float64: u = b − a,
    v = (c − a) − t·u with t = <c − a, u>/<u, u>, so c = a + t·u + v."""
    u = {n: b[n].double() - a[n].double() for n in a}
    w = {n: c[n].double() - a[n].double() for n in a}
    uu = sum(float((x * x).sum()) for x in u.values())
    if not uu > 0:
        raise ValueError("the first two models are the same weights")
    t = sum(float((w[n] * u[n]).sum()) for n in a) / uu
    v = {n: w[n] - t * u[n] for n in a}
    vv = sum(float((x * x).sum()) for x in v.values())
    if not vv > 1e-12 * uu:
        raise ValueError("the three models lie on one line; they span no plane")
    return u, v, t, uu, vv


def _plane_directions(job: Job, loaded: Loaded, log) -> dict:
    """The plane through three models (Garipov et al. 2018): origin a = theta*, x = b − a,
    y = (c − a) − t·x with t = <c − a, x>/<x, x> (float64, over every float entry: parameters
    and BatchNorm statistics, as an interpolation moves them), so a sits at (0, 0), b at
    (1, 0) and c at (t, 1). The file records the three points' coordinates and names; the run
    evaluates the points themselves from their files (run.py), bit for bit those models."""
    a, b, c = point_states(job, loaded)
    try:
        u, v, t, uu, vv = plane_frame(a, b, c)
    except ValueError as e:
        raise UserError(f"{job.source}: directions.points: {e}")
    names = [os.path.basename(os.path.normpath(f)) for f in job.directions.points]
    log(f"plane through {', '.join(names)}: |b - a| {uu ** 0.5:.4g}, c at ({t:.4g}, 1), |y| {vv ** 0.5:.4g}")
    dirs = {"x": {n: x.to(a[n].dtype) for n, x in u.items()}, "y": {n: x.to(a[n].dtype) for n, x in v.items()}}
    dirs["_info"] = {"points": [[0.0, 0.0], [1.0, 0.0], [t, 1.0]], "point_files": names,
                     "plane_x_norm": uu ** 0.5, "plane_y_norm": vv ** 0.5}
    if job.directions.curve:  # c is the bend of a curve from a to b: the plane holds it whole
        from .evaluation.curves import coefficients
        # θ(t) = c0·a + c1·c + c2·b, and the plane is affine: its coordinates are c1·(t_c, 1) + c2·(1, 0)
        path = [(c1 * t + c2, c1) for c0, c1, c2 in (coefficients(job.directions.curve, s / 100) for s in range(101))]
        dirs["_info"].update(curve=job.directions.curve, curve_path=[list(p) for p in path])
    return dirs


def _curve_directions(job: Job, loaded: Loaded, log) -> dict:
    """A curve between two minima (python -m lldist.connect): θ(t) = c0(t)·a + c1(t)·bend +
    c2(t)·b over every float entry (evaluation/curves.py), t the grid's x; exact at t = 0 and 1.
    The file keeps b as /directions/target, the bend as /directions/bend and, for the record and
    as the moving-entry mask, x = b − a (the straight line's direction)."""
    a, b, bend = point_states(job, loaded)
    kind = job.directions.curve or "bezier"
    names = [os.path.basename(os.path.normpath(f)) for f in job.directions.points]
    log(f"{kind} curve from {names[0]} to {names[1]}, bend {names[2]}")
    return {"x": {n: b[n] - a[n] for n in a}, "target": {n: b[n].clone() for n in a},
            "bend": {n: bend[n].clone() for n in a},
            "_info": {"curve": kind, "point_files": names}}


def _file_directions(job: Job, loaded: Loaded) -> dict:
    from .store import SurfaceReader
    with SurfaceReader(job.directions.file) as sf:
        theirs = sf.read_directions()
    if "_recipe" in theirs:
        raise UserError(f"{job.source}: directions.file {job.directions.file} keeps its directions as a recipe over "
                        "its own checkpoint's norms; another model cannot take them (make it with directions.store: "
                        "tensors)")
    for axis in ("x", "y")[:job.ndim]:
        if axis not in theirs:
            raise UserError(f"{job.source}: directions.file {job.directions.file} has no {axis} direction")
        if set(theirs[axis]) != set(loaded.theta) or any(theirs[axis][n].shape != w.shape for n, w in loaded.theta.items()):
            raise UserError(f"{job.source}: directions.file {job.directions.file} was made for another model "
                            "(its directions' entries or shapes differ from this model's state)")
    return {axis: {n: theirs[axis][n].to(w.dtype) for n, w in loaded.theta.items()} for axis in ("x", "y")[:job.ndim]}


CAPTURED_WELL = 0.5  # a checkpoint whose displacement the plane holds less of is drawn as badly represented


def _mean_loss(model, state: dict, data, task: Task, batch_size: int) -> float:
    """The task's mean loss over a split with `state` loaded (float64 sums of the batch sums)."""
    model.load_state_dict(state, strict=False)
    model.eval()
    total = None
    with torch.no_grad():
        for b in data.batches(batch_size):
            t = task.sums(task.forward(model, b), b).double()
            total = t if total is None else total + t
    return float(total[0] / total[1])


def trajectory_fit(job: Job, loaded: Loaded, task: Task, states: list, dirs: dict, coords, log) -> dict:
    """How well the PCA plane holds each checkpoint (loss-landscape #1: "the PCA path does not
    match the contour losses"): the fraction of its displacement θ_i − θ* in the plane,
    (c_i1² + c_i2²)/‖θ_i − θ*‖² over the entries the directions move, and the loss at the
    checkpoint against the loss at its projection θ* + c_i1 d_x + c_i2 d_y (on the job's first
    split; BatchNorm statistics stay θ*'s at the projection, as on the grid)."""
    moving = [n for n in loaded.theta if any(bool(dirs[a][n].any()) for a in ("x", "y") if a in dirs)]
    split = job.splits[0]
    data = loaded.splits[split]
    bs = job.eval.batch_size if job.eval.batch_size != "auto" else 256
    model = copy.deepcopy(loaded.model)
    captured, at_checkpoint, at_projection = [], [], []
    for st, (c1, c2) in zip(states, coords.tolist()):
        norm2 = sum(float((st[n].double() - loaded.theta[n].double()).pow(2).sum()) for n in moving)
        captured.append((c1 * c1 + c2 * c2) / norm2 if norm2 > 0 else 1.0)
        at_checkpoint.append(_mean_loss(model, st, data, task, bs))
        proj = {n: (w.double() + c1 * dirs["x"][n].double() + (c2 * dirs["y"][n].double() if "y" in dirs else 0))
                .to(w.dtype) for n, w in loaded.theta.items()}
        at_projection.append(_mean_loss(model, proj, data, task, bs))
    bad = [i + 1 for i, c in enumerate(captured) if c < CAPTURED_WELL]
    log(f"the plane holds {100 * min(captured):.0f}-{100 * max(captured):.0f}% of each checkpoint's displacement"
        + (f"; checkpoints {', '.join(map(str, bad))} under {100 * CAPTURED_WELL:.0f}%: their points on the plane "
           "are projections, not where training went" if bad else ""))
    return {"captured": captured, "loss_checkpoint": at_checkpoint, "loss_projected": at_projection, "split": split,
            "threshold": CAPTURED_WELL}


def _pca_directions(job: Job, loaded: Loaded, log, files: list, task: Task = None) -> dict:
    states = [checkpoint_state(job, loaded, f) for f in files]
    try:
        trainable = {n for n, p in loaded.model.named_parameters() if p.requires_grad}
        recipe = Recipe.of(job.directions, trainable)
        dirs, info, coords = pca_directions(loaded.theta, loaded.kinds, states, job.directions.ignore,
                                            job.directions.center, recipe.selects)
    except ValueError as e:
        raise UserError(f"{job.source}: directions.kind: pca: {e}")
    log(f"pca of {len(files)} checkpoints: explained variance {info['explained_variance_ratio'][0]:.3f}, "
        f"{info['explained_variance_ratio'][1]:.3f}")
    info["checkpoints"] = [os.path.basename(f) for f in files]
    lo, hi = coords.min(0).values.tolist(), coords.max(0).values.tolist()
    log(f"trajectory of {len(files)} checkpoints spans alpha [{lo[0]:.3g}, {hi[0]:.3g}], beta [{lo[1]:.3g}, "
        f"{hi[1]:.3g}] (the final checkpoint is at 0, 0): the grid should cover it")
    dirs = {a: dirs[a] for a in ("x", "y")[:job.ndim]}
    dirs["_info"], dirs["_trajectory"] = info, coords
    if task is not None:  # a file of directions only (identity checks) does without
        dirs["_trajectory_fit"] = trajectory_fit(job, loaded, task, states, dirs, coords, log)
    return dirs


def _hessian_directions(job: Job, loaded: Loaded, task: Task, log) -> dict:
    """The top eigenvectors of the Hessian at theta*."""
    from .evaluation.curvature import Curvature, first_batches
    first = next(iter(loaded.splits.values()))
    batches = first_batches(first, job.eval.batch_size, job.directions.batches)
    curv = Curvature(loaded.model, batches, task)
    vals, vecs = curv.eigs(k=job.ndim, which="LA")
    log(f"hessian directions: top eigenvalues {', '.join(f'{v:.5g}' for v in vals)} "
        f"({curv.matvecs} Hessian-vector products on {len(batches)} batches)")
    dirs = {axis: curv.as_state(vecs[:, i], loaded.theta) for i, axis in enumerate(("x", "y")[:job.ndim])}
    dirs["_info"] = {"hessian_eigenvalues": [float(v) for v in vals], "hessian_batches": len(batches),
                     "hessian_batch_size": job.eval.batch_size}
    return dirs
