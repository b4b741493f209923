"""Curves between two minima (Garipov et al. 2018, "Loss surfaces, mode connectivity, and fast
ensembling of DNNs"), composed from lldist's parts: `python -m lldist.connect a.pt b.pt job.yaml`.

    plan = prepare(job, "a.pt", "b.pt", "runs/connect/ab")   # rank 0: trains the bend if needed
    for name, j in plan.jobs.items():                         # curve, line (, line_aligned), plane
        run_surface(ctx, lambda: j, ...)                      # each a surface file, resumable

The bend is trained by the trainer (runs/train.py's fit) on the job's task: evaluation/curves.py's
CurveModel holds a and b fixed and draws t ~ U(0, 1) for every batch, so the expected loss
along the curve is what falls. It starts at the ends' midpoint (the curve starts as the
straight line). The bend is saved as a checkpoint of the job's model (its BatchNorm statistics
the ends' mean; they are recomputed anyway), with its metadata: the curve, the ends' sha256,
the training settings. A rerun with the same ends and settings reuses it; one killed while
training trains again from the start, to the same bend (training is seeded).

Then three 1D/2D jobs, each a surface file written by the same coordinator:
  curve.h5   directions.kind: curve, t from 0 to 1 (connect.points cells)
  line.h5    directions.kind: target, the straight line a -> b, the same t
  plane.h5   directions.kind: plane through [a, b, bend], the curve drawn on it
With connect.align: weights, b is first permuted to match a (directions/align.py), saved as
b_aligned.pt, and the curve, its plane and line_aligned.h5 use it; line.h5 stays the line to b
itself, so the barrier before and after alignment sit side by side.
With BatchNorm in the model and eval.bn: eval, the jobs use eval.bn: recompute: the statistics
of each cell's weights on the train split, as Garipov et al. do (interpolated running
statistics belong to no network).
"""

from __future__ import annotations

import copy
import dataclasses
import os
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from ..inputs import identity
from ..config import Job, TrainConfig, effective_raw, job_from_dict
from ..errors import UserError
from ..evaluation.curves import CurveModel, has_batchnorm
from ..directions.plane import plane_frame
from ..inputs.loading import load_model_and_data

FILES = ("curve", "line", "line_aligned", "plane")  # the surfaces, in the order they run


@dataclass
class Plan:
    """What rank 0 settled before any surface runs: the jobs to run."""
    jobs: dict  # name -> Job, in FILES' order
    notes: list  # lines for the log (what was trained or reused, what was changed and why)


def out_dir(job: Job, a: str, b: str, out: Optional[str]) -> str:
    if out or job.connect.output:
        return out or job.connect.output
    stem = lambda p: os.path.splitext(os.path.basename(os.path.normpath(p)))[0]  # noqa: E731
    return os.path.join("runs", "connect", f"{stem(a)}_{stem(b)}")


def _settings(job: Job) -> TrainConfig:
    return job.connect.train or job.train or TrainConfig()


def _meta(job: Job, a: str, b: str) -> dict:
    """What a bend is the bend of: a stored one with other values is not reused."""
    return {"curve": job.connect.curve, "ends_sha256": [identity.file(a), identity.file(b)],
            "train_config": dataclasses.asdict(_settings(job)), "model": job.model.name, "data": job.data.name}


def _same(stored: dict, wanted: dict) -> bool:
    return all(stored.get(k) == v for k, v in wanted.items())


def _model_at(state: dict, like: torch.nn.Module) -> torch.nn.Module:
    """A copy of `like` holding the float entries of `state`."""
    m = copy.deepcopy(like).cpu()
    with torch.no_grad():
        own = m.state_dict()
        for n, v in state.items():
            own[n].copy_(v)
    return m


def train_bend(job: Job, la, theta_b: dict, meta: dict, path: str, log=print, should_stop=lambda: None) -> dict:
    """Train the bend of a curve from a (`la`, loading.Loaded at a) to the state theta_b and
    save it to `path`, a checkpoint of the job's model with `meta` and the trained curve's
    loss and accuracy at t = 0.5. Returns the checkpoint's metadata."""
    from .train import fit, training_splits
    from ..workloads.models import save_checkpoint
    t = _settings(job)
    cm = CurveModel(copy.deepcopy(la.model), la.theta, theta_b, job.connect.curve, seed=t.seed)
    train_set, test_set = training_splits(job)
    last = fit(cm, job, t, train_set, test_set, log, should_stop, what=f"connect ({job.connect.curve} bend, at t = 0.5)")
    bend = cm.bend_state()
    # the float entries that are not parameters (BatchNorm statistics): the ends' mean
    state = {n: bend[n].cpu() if n in bend else (la.theta[n].double() / 2 + theta_b[n].double() / 2).to(v.dtype)
             for n, v in la.theta.items()}
    meta = {**meta, **{f"mid_{k}": last[k] for k in ("train_loss", "train_acc", "test_loss", "test_acc") if k in last}}
    save_checkpoint(_model_at(state, la.model), path, meta)
    return meta


def prepare(job: Job, a: str, b: str, out: str, overwrite: bool = False, log=print,
            should_stop: Callable = lambda: None) -> Plan:
    """Rank 0's part before the surfaces: b aligned (connect.align), the bend trained or reused,
    and the jobs of the files."""
    from ..directions.target import aligned_to_theta
    from ..inputs.loading import checkpoint_state
    from ..workloads.models import load_checkpoint, save_checkpoint
    for p in (a, b):
        if not os.path.exists(p):
            raise UserError(f"checkpoint {p} does not exist")
    if os.path.exists(out) and not os.path.isdir(out):
        raise UserError(f"--out {out} is a file, not a folder (the bend and the surfaces go into it)")
    # every surface job checked before any training (with placeholder points: the bend is not
    # made yet), so what it refuses is refused now, not after the bend has trained
    surface_jobs(job, a, b, b, a, out, False, 0.5)
    ja = dataclasses.replace(job, model=dataclasses.replace(job.model, checkpoint=a))
    la = load_model_and_data(ja)  # the model at a, once
    theta_b = checkpoint_state(ja, la, b)
    if all(torch.equal(w, theta_b[n]) for n, w in la.theta.items()):
        raise UserError(f"connect: {a} and {b} hold the same weights: there is nothing between them to connect")
    os.makedirs(out, exist_ok=True)
    notes = []
    b_end = b
    if job.connect.align:
        # matched again on every run (seeded, so the same permutation): a b_aligned.pt left by
        # another b is never taken for this one's; an equal one is left as it is, so its sha256,
        # which the bend and the files' identities hold, stays
        b_end = os.path.join(out, "b_aligned.pt")
        state, info = aligned_to_theta(la, theta_b, log)
        if overwrite or not os.path.exists(b_end) or \
                not all(torch.equal(v, state[n]) for n, v in checkpoint_state(ja, la, b_end).items()):
            # the ends by their paths from the output folder: the folder can move with them
            save_checkpoint(_model_at(state, la.model), b_end,
                            {**info, "aligned_to": os.path.relpath(a, out), "source": os.path.relpath(b, out)})
        theta_b = checkpoint_state(ja, la, b_end)
        notes.append(f"b aligned to a by weight matching: {b_end}")
    bend = os.path.join(out, "bend.pt")
    wanted = {**_meta(job, a, b_end), "ends": [os.path.relpath(a, out), os.path.relpath(b_end, out)]}
    if os.path.exists(bend) and not overwrite:
        stored = load_checkpoint(copy.deepcopy(la.model), bend)
        if not _same(stored, {k: v for k, v in wanted.items() if k != "ends"}):
            raise UserError(f"{bend} is the bend of other ends or settings; use --out for a new folder or "
                            "--overwrite to train it again")
        notes.append(f"bend {bend} reused (same ends and settings)")
    else:
        train_bend(job, la, theta_b, wanted, bend, log, should_stop)
        notes.append(f"bend trained: {bend}")
    try:
        tc = plane_frame(la.theta, theta_b, checkpoint_state(ja, la, bend))[2]
    except ValueError as e:
        raise UserError(f"connect: the plane of {a}, {b_end} and the bend: {e} (the bend {bend} is kept: a rerun "
                        "with the same ends and settings reuses it, --overwrite trains it again)")
    with_bn = has_batchnorm(la.model)
    return Plan(surface_jobs(job, a, b, b_end, bend, out, with_bn, tc, notes), notes)


def surface_jobs(job: Job, a: str, b: str, b_end: str, bend: str, out: str, with_bn: bool, tc: float,
                 notes: Optional[list] = None) -> dict:
    """The connect run's surface jobs, each a validated job made from the user's own (its model,
    data and eval keys) with the directions, grid and output of that file. `tc`: the bend's x in
    the plane (directions/plane.py's plane_frame), which the plane's grid covers."""
    raw = effective_raw(job.text, job.source) if job.text else {}
    for k in ("train", "directions", "grid", "output"):
        raw.pop(k, None)
    raw.setdefault("model", {})["checkpoint"] = a
    ev = raw.setdefault("eval", {})
    if with_bn and job.eval.bn == "eval":
        ev["bn"] = "recompute"
        if job.eval.batch_size == "auto":
            ev["batch_size"] = 256  # recomputed statistics depend on the batch size: a fixed one
        if notes is not None:
            notes.append("BatchNorm: statistics recomputed at every cell on the train split (eval.bn: recompute)")
    if ev.get("bn") == "recompute":
        ev["cells_per_pass"] = 1  # one cell at a time
    c = job.connect
    pts = [a, b_end, bend]
    t_axis = [0.0, 1.0, c.points]
    specs = {"curve": ({"kind": "curve", "points": pts, "curve": c.curve}, {"x": t_axis}),
             "line": ({"kind": "target", "target": b}, {"x": t_axis})}
    if b_end != b:
        specs["line_aligned"] = ({"kind": "target", "target": b_end}, {"x": t_axis})
    m = c.margin
    specs["plane"] = ({"kind": "plane", "points": pts, "curve": c.curve},
                      {"x": [min(0.0, tc) - m, max(1.0, tc) + m, c.plane], "y": [-m, 1.0 + m, c.plane]})
    jobs = {}
    for name in FILES:
        if name in specs:
            d, g = specs[name]
            r = {**copy.deepcopy(raw), "directions": d, "grid": g, "output": os.path.join(out, f"{name}.h5")}
            jobs[name] = job_from_dict(r, f"{job.source} (connect: {name})")
    return jobs


def summary(paths: dict) -> list:
    """Lines comparing the barriers of the files (lldist.analysis.metrics.path_metrics), each stored in
    its file's /metrics."""
    from ..analysis.metrics import from_file
    lines = []
    for name in ("line", "line_aligned", "curve"):
        if name not in paths:
            continue
        m = from_file(paths[name], store=True)
        se = f" ± {m['barrier_loss_se']:.3g}" if "barrier_loss_se" in m else ""
        err = f", error {m['barrier_error']:.4f} at t = {m['barrier_error_alpha']:.3g}" if "barrier_error" in m else ""
        lines.append(f"{name:>12}: barrier ({m['split']}) loss {m['barrier_loss']:.4f}{se} at t = "
                     f"{m['barrier_loss_alpha']:.3g}{err}")
    return lines
