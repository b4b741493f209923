"""What the face takes from its caller: the data as the pipeline reads it, the arguments checked
under their own names, the job a run of Python objects records, and the caller's model given
back as it came, whatever happens (an error, Ctrl-C).

    ts = as_data(data, batch_size)            # a TensorSet or a BatchList
    job = object_job(model, data, task, out=..., split="test", grid={...}, options={...})
    with kept(model):                         # weights, buffers, device and mode restored after
        ...
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Optional

import numpy as np
import torch
from torch import nn

from ..config import LOSSES, job_from_dict
from ..errors import UserError
from ..evaluation.tasks import Task, make_task, qualified_name
from ..inputs import identity
from ..workloads.tensors import BatchList, TensorSet

SPLITS = ("test", "train")
NAMED = {"split", "loss", "metrics", "operator"}  # sections' fields the calls take as named arguments


def axis(value, name) -> list:
    """(min, max, num) as the job file's [min, max, num]; the argument's own name in errors."""
    if not (isinstance(value, (tuple, list)) and len(value) == 3):
        raise ValueError(f"{name} must be (min, max, num), got {value!r}")
    lo, hi, num = value
    if isinstance(num, bool) or not isinstance(num, (int, np.integer)) or num < 1:
        raise ValueError(f"{name}: num must be a positive integer, got {num!r}")
    return [float(lo), float(hi), int(num)]


def as_data(data, batch_size: int = 256):
    """The caller's data as a TensorSet (an (x, y) pair) or a BatchList (anything else)."""
    if isinstance(data, TensorSet):
        return data
    if isinstance(data, (tuple, list)) and len(data) == 2 and all(isinstance(t, torch.Tensor) for t in data):
        x, y = data
        if len(x) != len(y):
            raise ValueError(f"data: x has {len(x)} samples and y {len(y)}")
        if len(x) == 0:
            raise ValueError("data: x and y hold no examples")
        y = y if y.dtype != torch.int32 else y.long()
        return TensorSet(x if x.dtype == torch.uint8 else x.float(), y,
                         int(y.max()) + 1 if y.dtype == torch.int64 and len(y) else 0)
    if isinstance(data, torch.utils.data.Dataset) and not isinstance(data, torch.utils.data.IterableDataset):
        data = torch.utils.data.DataLoader(data, batch_size=batch_size)
    try:
        batches = list(data)
    except TypeError:
        raise TypeError(f"data must be a DataLoader, a Dataset, an (x, y) pair of tensors or an iterable of "
                        f"batches, got {type(data).__name__}")
    if not batches:
        raise ValueError("data is empty")
    for b in batches:
        if not isinstance(b, (tuple, list, dict)) or not all(isinstance(t, torch.Tensor) for t in
                                                             (b.values() if isinstance(b, dict) else b)):
            raise TypeError(f"data: a batch must be a tuple or a dict of tensors, got {type(b).__name__}")
    out = BatchList([dict(b) if isinstance(b, dict) else tuple(b) for b in batches])
    if any(t.shape[0] == 0 for b in out.batches_ for t in BatchList._tensors(b) if t.dim()):
        raise ValueError("data: a batch holds no examples")
    return out


def read_data(data, options: dict):
    """as_data in the batch size the options give, checked for NaN and infinite inputs."""
    bs = options.get("batch_size", 256)
    ts = as_data(data, bs if isinstance(bs, int) and not isinstance(bs, bool) else 256)
    bad = ts.nonfinite()
    if bad:
        raise ValueError(f"data: the inputs hold {bad:,} NaN or infinite values (every cell's loss would be NaN)")
    return ts


def message(e: Exception) -> str:
    """A refusal worded for the command line, reworded for a Python caller."""
    return (str(e).replace("use --out for a new file or --overwrite to replace it",
                           "pass another out= for a new file, or resume=False to replace it")
            .replace("<landscape()>: ", "").replace("key 'eval.", "argument '")
            .replace("key 'grid.", "argument '").replace("key 'curvature.", "argument '")
            .replace("key 'sharpness.", "argument '").replace("key 'train.", "argument '")
            .replace("key '", "argument '")
            .replace("directions.target", "target="))


def plain(v) -> bool:
    """A job file's kind of value: numbers, strings, lists and mappings of them."""
    if isinstance(v, (list, tuple)):
        return all(plain(x) for x in v)
    if isinstance(v, dict):
        return all(isinstance(k, str) and plain(x) for k, x in v.items())
    return v is None or isinstance(v, (str, int, float, bool))


def state(model):
    from ..directions.state import model_state
    return model_state(model)


def check_model(model, name: str = "model") -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"{name} must be a torch.nn.Module, got {type(model).__name__}")


def check_split(split) -> None:
    if split not in SPLITS:
        raise ValueError(f"split must be 'test' or 'train' (the name the values are stored under), got {split!r}")


def sort_options(call: str, options: dict, *sections) -> list:
    """The keyword arguments split by the dataclass each names a field of (a job file's
    section: EvalConfig, CurvatureConfig, ...), as dicts in the order of `sections`; an argument
    no section has is a TypeError naming it and what there is."""
    fields = [{f.name for f in dataclasses.fields(c)} for c in sections]
    out = [{} for _ in sections]
    for k, v in options.items():
        i = next((i for i, names in enumerate(fields) if k in names), None)
        if i is None:
            known = sorted(set().union(*fields) - NAMED)
            raise TypeError(f"{call}() got an unexpected keyword argument {k!r} (its options: {', '.join(known)})")
        out[i][k] = v
    return out


def task_of(loss, metrics, curvature: bool = False) -> Task:
    task = make_task(loss, metrics)
    if curvature and not task.curvature:
        task = Task(loss, metrics, curvature=True) if not isinstance(loss, Task) else task
    return task


def fingerprints(model: nn.Module, ts, task: Task) -> dict:
    """The identity entries of the objects (inputs.identity): their content stands for them."""
    return {"model_state": identity.tensors(model.state_dict()), "data": identity.tensors(ts),
            "task": identity.task(task)}


def object_job(model: nn.Module, data, task: Task, *, name: str, out: str, split: str, grid: dict,
               options: dict, directions: Optional[dict] = None, sections: Optional[dict] = None):
    """The job a run of Python objects records (model and data by their types, the loss and
    metrics by name), validated as a job file is; a refusal is a ValueError naming the argument."""
    try:
        return job_from_dict({
            "name": name, "output": out,
            "model": {"name": f"object:{type(model).__name__}"},
            "data": {"name": f"object:{type(data).__name__}"},
            "directions": directions or {}, "grid": grid, **(sections or {}),
            # what the file's job text records: the built-in loss's name, or the callables' own
            "eval": {**options, "split": split,
                     "loss": task.loss_name if task.loss_name in LOSSES else f"object:{task.loss_name}",
                     "metrics": {k: f"object:{qualified_name(f)}" for k, f in task.user_metrics.items()} or None},
        }, "<landscape()>")
    except UserError as e:
        raise ValueError(message(e)) from None


@contextlib.contextmanager
def kept(model: nn.Module):
    """The caller's model as it came after the block, also when it raises (Ctrl-C included):
    the evaluator and the measures move its weights in place and may move it to a device. And
    the caller's torch thread count, which a run sets for its own work (eval.threads)."""
    saved = {k: v.detach().clone() for k, v in model.state_dict().items()}
    was_training, device = model.training, next(iter(saved.values())).device if saved else None
    threads = torch.get_num_threads()
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        if device is not None:
            model.to(device)
        model.load_state_dict(saved)
        model.train(was_training)

