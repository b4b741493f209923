"""lldist from Python: any model, any data, any loss, in a notebook or under MPI.

    import lldist
    ls = lldist.landscape(model, data, x=(-1, 1, 51), y=(-1, 1, 51))   # filter-normalized, biasbn ignored
    ls.loss, ls.acc            # (ny, nx) numpy arrays of the first split; ls["test/loss"] etc.
    ls.x, ls.y, ls.done
    fig = ls.plot()            # the contour figure (matplotlib Figure)
    ls2 = lldist.open("out.h5")

`data`: a DataLoader, a Dataset of (x, y) samples, an `(x, y)` pair of tensors, or an iterable
of batches (tuples or dicts of tensors, HuggingFace style). An (x, y) pair or a Dataset is
evaluated in batches of `batch_size`; batches given by a DataLoader or an iterable are kept
as they come. Everything is moved to the device once. The computation is the pipeline's own:
the same evaluator, file, resume and MPI coordinator (`mpirun -n 8 python my_script.py`:
rank 0 returns the landscape, the other ranks None after their share).
"""

from __future__ import annotations

import copy
import dataclasses
import os
import tempfile
from typing import Optional

import numpy as np
import torch
from torch import nn

from .inputs import identity
from .config import LOSSES, DirectionsConfig, EvalConfig, job_from_dict
from .errors import UserError
from .evaluation.tasks import Task, make_task, qualified_name
from .workloads.tensors import BatchList, TensorSet

EVAL_KEYS = {f.name for f in dataclasses.fields(EvalConfig)}
DIRECTION_KEYS = {f.name for f in dataclasses.fields(DirectionsConfig)} - {"target"}


def _axis(value, name) -> list:
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


def _finite(ts) -> None:
    bad = ts.nonfinite()
    if bad:
        raise ValueError(f"data: the inputs hold {bad:,} NaN or infinite values (every cell's loss would be NaN)")


def _api_message(e: Exception) -> str:
    """A refusal worded for the command line, reworded for a Python caller."""
    return (str(e).replace("use --out for a new file or --overwrite to replace it",
                           "pass another out= for a new file, or resume=False to replace it")
            .replace("<landscape()>: ", "").replace("key 'eval.", "argument '")
            .replace("key 'grid.", "argument '").replace("key '", "argument '")
            .replace("directions.target", "target="))


def landscape(model: nn.Module, data, *, x=(-1.0, 1.0, 51), y=(-1.0, 1.0, 51), split: str = "test",
              loss="cross_entropy", metrics=None, target: Optional[nn.Module] = None, out: Optional[str] = None,
              resume: bool = True, name: str = "landscape", directions: Optional[dict] = None,
              progress_every: float = 10.0, **eval_options):
    """Compute a landscape of `model` around its current weights; see the module docstring.

    Keyword arguments carry what a job file says, with its names: `directions={"seed": 0,
    "norm": "filter", "ignore": "biasbn"}`, and every `eval` key (`batch_size`, `device`,
    `precision`, `channels_last`, `compile`, `bn`, `cells_per_pass`, `chunk_size`, `threads`).
    `target`: a model with the same state keys: the x direction interpolates to its weights.
    `out`: the HDF5 file (default: a new temporary file); an existing file of the same job is
    resumed (`resume=False` replaces it)."""
    from .inputs.loading import Loaded, Source
    from .runs.surface import RunOptions, run_surface
    from .transport import runner
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if target is not None and not isinstance(target, nn.Module):
        raise TypeError(f"target must be a torch.nn.Module, got {type(target).__name__}")
    unknown = set(eval_options) - EVAL_KEYS
    if unknown:
        raise TypeError(f"landscape() got an unexpected keyword argument {sorted(unknown)[0]!r} "
                        f"(eval options: {', '.join(sorted(EVAL_KEYS - {'split'}))})")
    directions = dict(directions or {})
    if set(directions) - DIRECTION_KEYS:
        raise ValueError(f"directions: unknown key {sorted(set(directions) - DIRECTION_KEYS)[0]!r} "
                         f"(known: {', '.join(sorted(DIRECTION_KEYS))})")
    if split not in ("test", "train"):
        raise ValueError(f"split must be 'test' or 'train' (the name the values are stored under), got {split!r}")
    for k, v in directions.items():  # a job file's values: paths, numbers, names (a plane's points are files)
        if not _plain(v):
            raise TypeError(f"directions[{k!r}] must be plain values (numbers, strings, lists of them; a plane's "
                            f"points are checkpoint files), got {type(v).__name__}")
    if target is not None:  # the job's rules see a target (align needs one, repeats refuse it): given from Python
        directions["target"] = "object:target"
    if eval_options.get("bn") == "recompute" and split != "train":
        raise ValueError("bn: 'recompute' takes BatchNorm statistics on the train split: give the training data "
                         "with split='train'")
    task = make_task(loss, metrics)
    if eval_options.get("curvature") and not task.curvature:
        task = Task(loss, metrics, curvature=True) if not isinstance(loss, Task) else task
    grid = {"x": _axis(x, "x")} if y is None else {"x": _axis(x, "x"), "y": _axis(y, "y")}
    ctx = runner.launch()
    if out is None:
        if ctx.mpi:
            raise ValueError("out: under MPI give the file's path (every rank must name the same file)")
        out = os.path.join(tempfile.mkdtemp(prefix="lldist-"), "surface.h5")
    if not isinstance(out, (str, os.PathLike)):
        raise TypeError(f"out must be a path, got {type(out).__name__}")
    out = os.fspath(out)
    bs = eval_options.get("batch_size", 256)
    ts = as_data(data, bs if isinstance(bs, int) and not isinstance(bs, bool) else 256)
    _finite(ts)
    files = {"model_state": identity.tensors(model.state_dict()), "data": identity.tensors(ts),
             "task": identity.task(task)}
    theta_target = None
    if target is not None:
        files["target"] = identity.tensors(target.state_dict())
        theta_target = _state(target)[0]
        theta = _state(model)[0]
        missing = set(theta) - set(theta_target)
        if missing:
            raise ValueError(f"target: its state has no {sorted(missing)[0]!r} (it must be the same architecture)")
        for n, w in theta.items():
            if theta_target[n].shape != w.shape:
                raise ValueError(f"target: {n!r} has shape {tuple(theta_target[n].shape)}, the model's "
                                 f"{tuple(w.shape)} (it must be the same architecture)")
    try:
        job = job_from_dict({
            "name": name, "output": out,
            "model": {"name": f"object:{type(model).__name__}"},
            "data": {"name": f"object:{type(data).__name__}"},
            "directions": directions, "grid": grid,
            # what the file's job text records: the built-in loss's name, or the callables' own
            "eval": {**eval_options, "split": split,
                     "loss": task.loss_name if task.loss_name in LOSSES else f"object:{task.loss_name}",
                     "metrics": {k: f"object:{qualified_name(f)}" for k, f in task.user_metrics.items()} or None},
        }, "<landscape()>")
    except UserError as e:  # the job file's message, for a Python caller: it names the argument
        raise ValueError(_api_message(e)) from None

    def load(job):
        theta, kinds = _state(model)
        # a shard group makes FSDP modules of the model it is given, in place: it gets a copy,
        # and the caller's model stays the caller's (a copy is what a rank holds anyway)
        shard = job.eval.group_size > 1 and job.eval.group_mode == "shard"
        return Loaded(copy.deepcopy(model) if shard else model, theta, kinds, {split: ts}, {})
    source = Source(loader=load, task=task, files=files, target=theta_target)
    # the evaluator moves the model's weights in place: the caller gets theta* back afterwards
    saved = {k: v.detach().clone() for k, v in model.state_dict().items()}
    was_training, device = model.training, next(iter(saved.values())).device if saved else None
    try:
        code = run_surface(ctx, lambda: job, RunOptions(overwrite=not resume, progress_every=progress_every), source)
    except UserError as e:
        raise ValueError(_api_message(e)) from None
    finally:
        if device is not None:
            model.to(device)
        model.load_state_dict(saved)
        model.train(was_training)
    if code:
        raise RuntimeError(f"lldist: the landscape ended with status {code}")
    return open(out) if ctx.rank == 0 else None


def _plain(v) -> bool:
    if isinstance(v, (list, tuple)):
        return all(_plain(x) for x in v)
    if isinstance(v, dict):
        return all(isinstance(k, str) and _plain(x) for k, x in v.items())
    return v is None or isinstance(v, (str, int, float, bool))


def _state(model):
    from .directions.state import model_state
    return model_state(model)


class Landscape:
    """A surface file's arrays, read once; cells not done are NaN. `ls["test/loss"]`,
    `ls.curvature["train"]["lambda_max"]`, `ls.trajectory`. A file of several planes
    (directions.repeats) gives (planes, ny, nx) arrays: `ls.loss[k]` is plane k, `ls.planes`
    their number, `ls.plane_seeds` their direction seeds.

    On an adaptive grid (grid.adaptive) the cells not computed are interpolated instead:
    `ls.interpolated` marks them (None on a full grid), `ls.fraction_done` is the share computed."""

    def __init__(self, path: str):
        from .store import SurfaceReader
        with SurfaceReader(path) as sf:
            s = sf.read_all()
        self._read = s  # what plot() draws: the file is read once
        self.path, self.x, self.y, self.done = path, s.x, s.y, s.done
        self.splits, self.name, self.quantities = s.splits, s.name, s.quantities
        self._values = {f"{sp}/{q}": v for (sp, q), v in s.values.items()}  # ls["test/loss"]
        self.interpolated, self.adaptive = s.interpolated, s.adaptive
        # the Hessian at theta* by split (lldist.hessian: lambda_max, trace, density_nodes, ...),
        # and the checkpoints' (m, 2) coordinates on a PCA plane; {} and None when absent
        self.curvature, self.trajectory = s.curvature, s.trajectory
        self.samples = s.eval_samples  # {split: examples evaluated per cell}
        # directions.repeats: the number of planes (the arrays' leading axis when above 1) and
        # each plane's direction seed
        self.planes, self.plane_seeds = s.planes, s.plane_seeds
        self.sharpness = s.sharpness  # {split: the measures at theta*} (lldist.sharpness)

    def __getitem__(self, key: str) -> np.ndarray:
        if key not in self._values:
            raise KeyError(f"{key!r}: this landscape has {', '.join(self._values)}")
        return self._values[key]

    def __getattr__(self, q: str) -> np.ndarray:  # ls.loss, ls.acc, ls.perplexity: the first split's
        quantities = self.__dict__.get("quantities", ())
        if q.startswith("_") or q not in quantities:
            if q.startswith("_") or not quantities:
                raise AttributeError(q)
            why = " (a loss= of your own comes without accuracy: give metrics={'acc': ...})" if q == "acc" else ""
            raise AttributeError(f"this landscape has no {q!r}: its quantities are {', '.join(quantities)}{why}")
        return self._values[f"{self.splits[0]}/{q}"]

    def _split_and(self, quantity: str, split: Optional[str]) -> tuple:
        if "/" in quantity:
            split, quantity = quantity.split("/", 1)
        split = split or self.splits[0]
        if split not in self.splits:
            raise ValueError(f"split {split!r}: this landscape has {', '.join(self.splits)}")
        return split, quantity

    def stderr(self, quantity: str = "loss", split: Optional[str] = None) -> np.ndarray:
        """Each cell's standard error over the split's examples: the loss's as stored (loss_se),
        an accuracy's sqrt(p(1-p)/n). `quantity` may name the split too: "test/loss"."""
        from .analysis.uncertainty import binomial_se
        split, q = self._split_and(quantity, split)
        if q == "loss" and f"{split}/loss_se" in self._values:
            return self._values[f"{split}/loss_se"]
        if q == "acc" and f"{split}/acc" in self._values and split in self.samples:
            return binomial_se(self._values[f"{split}/acc"], self.samples[split])
        raise ValueError(f"quantity {quantity!r}: a standard error is known for the loss (files of format "
                         "version 5 on) and the accuracy")

    def interval(self, quantity: str = "loss", split: Optional[str] = None, level: float = 0.95) -> tuple:
        """(low, high) arrays: the loss's confidence interval (mean ± z·se over examples) or the
        accuracy's Wilson score interval over the split's n examples, at `level`."""
        from .analysis.uncertainty import interval, wilson
        split, q = self._split_and(quantity, split)
        if q == "acc" and f"{split}/acc" in self._values and split in self.samples:
            return wilson(self._values[f"{split}/acc"], self.samples[split], level)
        return interval(self[f"{split}/{q}"], self.stderr(q, split), level)

    @property
    def fraction_done(self) -> float:
        return float(self.done.mean())

    def plot(self, quantity: str = "loss", split: Optional[str] = None, kind: str = "contour"):
        """The figure `python -m lldist.plot` draws (contour, contourf, heat, 3d; a curve on 1D)."""
        from .analysis import figures
        return figures.figure(figures.drawable(self._read), split or self.splits[0], quantity, kind)

    def __repr__(self) -> str:
        shape = " x ".join(map(str, self.done.shape)) + (" adaptive" if self.adaptive else "")
        return (f"<Landscape {self.name!r} {shape}, {int(self.done.sum())}/{self.done.size} cells done, "
                f"{', '.join(self._values)}: {self.path}>")


def open(path: str) -> Landscape:  # noqa: A001 - lldist.open, as the issue names it
    """Any lldist file, complete or not; needs no model and no data."""
    if not os.path.exists(path):
        raise FileNotFoundError(path)
    return Landscape(path)
