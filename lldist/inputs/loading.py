"""What a run reads: the model at θ*, the data splits and the task, from the job file or given
from Python; other checkpoints of the same model. The surface run, the computations at θ* and
the API all load through here (runs/train.py trains a checkpoint that is missing first).

    source = Source()                               # the job file's model, data and task
    loaded = source.load(job)                       # Loaded(model, theta, kinds, splits, meta)
    task = source.make_task(job)
    state = checkpoint_state(job, loaded, "b.pt")   # another checkpoint's float state
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from ..config import Job
from ..directions.state import model_state
from ..errors import UserError
from ..evaluation.tasks import Task, task_from_config
from ..workloads.data import load_split
from ..workloads.models import build_model, load_checkpoint


@dataclass
class Loaded:
    model: torch.nn.Module
    theta: dict
    kinds: dict
    splits: dict  # split name -> TensorSet, DictSet or BatchList (CPU)
    meta: dict  # checkpoint metadata (train/test accuracy at training time)
    rows: Optional[object] = None  # inputs.rows.Rows when theta's parameters are shapes (meta
    #                                tensors): a model loaded by rows; their values are read through it

    def read(self, name: str, rows: Optional[slice] = None) -> torch.Tensor:
        """θ*'s entry `name`, or its rows `rows` of dim 0, whether held or read by rows."""
        w = self.theta[name]
        if w.is_meta:
            return self.rows.read(name, rows)
        return w if rows is None or not w.dim() else w[rows]


def load_splits(job: Job) -> dict:
    """The job's evaluation splits, by name (CPU)."""
    return {s: load_split(job.data, s, model_name=job.model.name) for s in job.splits}


def load_model_and_data(job: Job) -> Loaded:
    """Everything each rank loads once: evaluation data, model at theta*."""
    if job.model.name.startswith("object:") or job.data.name.startswith("object:"):
        raise UserError(f"{job.source}: object: models and data are given from Python (lldist.landscape)")
    splits = load_splits(job)
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


def point_states(job: Job, loaded: Loaded) -> list:
    """kind plane or curve: the float states of its three points, exactly as their files hold
    them (the first is theta*, the model's own checkpoint)."""
    return [dict(loaded.theta)] + [checkpoint_state(job, loaded, f) for f in job.directions.points[1:]]
