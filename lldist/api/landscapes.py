"""lldist.landscape and lldist.open: a loss landscape of any model, from Python, and the arrays
of any lldist file (the Landscape record).

    ls = lldist.landscape(model, data, x=(-1, 1, 51), y=(-1, 1, 51))   # filter-normalized, biasbn ignored
    ls.loss, ls.acc            # (ny, nx) numpy arrays of the first split; ls["test/loss"] etc.
    ls.x, ls.y, ls.done
    ls.plot()                  # the contour figure (matplotlib Figure)
    ls.metrics()               # the landscape's measures, as python -m lldist.metrics gives them
    ls2 = lldist.open("out.h5")
"""

from __future__ import annotations

import atexit
import copy
import os
import shutil
import tempfile
from typing import Optional

import numpy as np
from torch import nn

from ..config import DirectionsConfig, EvalConfig
from ..errors import UserError
from ..inputs import identity
from .inputs import (axis, check_model, check_split, fingerprints, kept, message, object_job, plain, read_data,
                     sort_options, state, task_of)

DIRECTION_KEYS = {f for f in DirectionsConfig.__dataclass_fields__} - {"target"}


def temporary_file(prefix: str = "lldist-") -> str:
    """A new file's path in a folder removed when Python exits: a landscape asked without out=
    reads its arrays at once, so nothing is lost; pass out= to keep the file."""
    folder = tempfile.mkdtemp(prefix=prefix)
    atexit.register(shutil.rmtree, folder, True)
    return os.path.join(folder, "surface.h5")


def landscape(model: nn.Module, data, *, x=(-1.0, 1.0, 51), y=(-1.0, 1.0, 51), split: str = "test",
              loss="cross_entropy", metrics=None, target: Optional[nn.Module] = None, out: Optional[str] = None,
              resume: bool = True, name: str = "landscape", directions: Optional[dict] = None,
              progress_every: float = 10.0, **eval_options) -> Optional["Landscape"]:
    """The loss landscape of `model` around its current weights θ*: loss (and metrics) at
    θ* + α·d_x + β·d_y on every cell of the grid, as `python -m lldist.surface` computes it.

    model: any torch.nn.Module; its weights, buffers, device and mode are given back unchanged.
    data: a DataLoader, a Dataset of (x, y), an (x, y) pair of tensors, or an iterable of
        batches (tuples or dicts of tensors, HuggingFace style).
    x, y: (min, max, num) of each axis; y=None for a 1D curve.
    split: "test" or "train": the name the values are stored under.
    loss: "cross_entropy", "mse", ... or a callable (outputs, batch) -> per-example losses; metrics: a
        {name: callable} dict of more quantities.
    target: a model of the same architecture: the x direction interpolates to its weights.
    directions: the job file's directions keys ({"seed": 0, "norm": "filter", "ignore": "biasbn"}).
    out: the HDF5 file (default: a temporary one, removed when Python exits); an existing file
        of the same call is resumed, resume=False replaces it.
    **eval_options: every job-file eval key (batch_size, device, precision, threads, bn, ...).

    Returns a Landscape (None on MPI ranks other than 0: under mpirun every rank calls it and
    takes its share of the cells). Bad arguments raise ValueError or TypeError naming them."""
    from ..inputs.loading import Loaded, Source
    from ..runs.surface import RunOptions, run_surface
    from ..transport import runner
    check_model(model)
    if target is not None:
        check_model(target, "target")
    eval_options = sort_options("landscape", eval_options, EvalConfig)[0]
    directions = dict(directions or {})
    if set(directions) - DIRECTION_KEYS:
        raise ValueError(f"directions: unknown key {sorted(set(directions) - DIRECTION_KEYS)[0]!r} "
                         f"(known: {', '.join(sorted(DIRECTION_KEYS))})")
    check_split(split)
    for k, v in directions.items():  # a job file's values: paths, numbers, names (a plane's points are files)
        if not plain(v):
            raise TypeError(f"directions[{k!r}] must be plain values (numbers, strings, lists of them; a plane's "
                            f"points are checkpoint files), got {type(v).__name__}")
    if target is not None:  # the job's rules see a target (align needs one, repeats refuse it): given from Python
        directions["target"] = "object:target"
    if eval_options.get("bn") == "recompute" and split != "train":
        raise ValueError("bn: 'recompute' takes BatchNorm statistics on the train split: give the training data "
                         "with split='train'")
    task = task_of(loss, metrics, bool(eval_options.get("curvature")))
    grid = {"x": axis(x, "x")} if y is None else {"x": axis(x, "x"), "y": axis(y, "y")}
    ctx = runner.launch()
    if out is None:
        if ctx.mpi:
            raise ValueError("out: under MPI give the file's path (every rank must name the same file)")
        out = temporary_file()
    if not isinstance(out, (str, os.PathLike)):
        raise TypeError(f"out must be a path, got {type(out).__name__}")
    out = os.fspath(out)
    ts = read_data(data, eval_options)
    files = fingerprints(model, ts, task)
    theta_target = None
    if target is not None:
        files["target"] = identity.tensors(target.state_dict())
        theta_target = state(target)[0]
        theta = state(model)[0]
        missing = set(theta) - set(theta_target)
        if missing:
            raise ValueError(f"target: its state has no {sorted(missing)[0]!r} (it must be the same architecture)")
        for n, w in theta.items():
            if theta_target[n].shape != w.shape:
                raise ValueError(f"target: {n!r} has shape {tuple(theta_target[n].shape)}, the model's "
                                 f"{tuple(w.shape)} (it must be the same architecture)")
    job = object_job(model, data, task, name=name, out=out, split=split, grid=grid, options=eval_options,
                     directions=directions)

    def load(job):
        theta, kinds = state(model)
        # a shard group makes FSDP modules of the model it is given, in place: it gets a copy,
        # and the caller's model stays the caller's (a copy is what a rank holds anyway)
        shard = job.eval.group_size > 1 and job.eval.group_mode == "shard"
        return Loaded(copy.deepcopy(model) if shard else model, theta, kinds, {split: ts}, {})
    source = Source(loader=load, task=task, files=files, target=theta_target)
    with kept(model):  # the evaluator moves the weights in place: the caller gets θ* back
        try:
            code = run_surface(ctx, lambda: job, RunOptions(overwrite=not resume, progress_every=progress_every),
                               source)
        except UserError as e:
            raise ValueError(message(e)) from None
    if code:
        raise RuntimeError(f"lldist: the landscape ended with status {code}")
    return open(out) if ctx.rank == 0 else None


class Landscape:
    """A surface file's arrays, read once; cells not done are NaN. `ls["test/loss"]`,
    `ls.curvature["train"]["lambda_max"]`, `ls.trajectory`. A file of several planes
    (directions.repeats) gives (planes, ny, nx) arrays: `ls.loss[k]` is plane k, `ls.planes`
    their number, `ls.plane_seeds` their direction seeds.

    On an adaptive grid (grid.adaptive) the cells not computed are interpolated instead:
    `ls.interpolated` marks them (None on a full grid), `ls.fraction_done` is the share computed."""

    def __init__(self, path: str):
        from ..store import SurfaceReader
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
        from ..analysis.uncertainty import binomial_se
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
        from ..analysis.uncertainty import interval, wilson
        split, q = self._split_and(quantity, split)
        if q == "acc" and f"{split}/acc" in self._values and split in self.samples:
            return wilson(self._values[f"{split}/acc"], self.samples[split], level)
        return interval(self[f"{split}/{q}"], self.stderr(q, split), level)

    @property
    def fraction_done(self) -> float:
        return float(self.done.mean())

    def metrics(self, split: Optional[str] = None) -> dict:
        """The landscape's measures, as `python -m lldist.metrics` gives them: the loss and
        accuracy at θ*, the mean rise at radii, the basin's width, the curvature along each axis,
        the convex fraction, a path's barrier, and the Hessian and sharpness measures the file
        holds. {name: number}; the surface must be complete."""
        from ..analysis.metrics import of_file
        if split is not None:
            self._split_and("loss", split)
        try:
            return of_file(self.path, split)[0]
        except UserError as e:
            raise ValueError(str(e)) from None

    def plot(self, quantity: str = "loss", split: Optional[str] = None, kind: str = "contour",
             dpi: Optional[int] = None):
        """The figure `python -m lldist.plot` draws (contour, contourf, heat, 3d; a curve on 1D),
        at `dpi` (default matplotlib's)."""
        from ..analysis import figures
        return figures.for_caller(figures.figure(figures.drawable(self._read), split or self.splits[0], quantity, kind),
                              dpi)

    def __repr__(self) -> str:
        shape = " x ".join(map(str, self.done.shape)) + (" adaptive" if self.adaptive else "")
        return (f"<Landscape {self.name!r} {shape}, {int(self.done.sum())}/{self.done.size} cells done, "
                f"{', '.join(self._values)}: {self.path}>")


def open(path: str):  # noqa: A001 - lldist.open, as the issue names it
    """Any lldist file, complete or not; needs no model and no data: a surface's Landscape, or a
    series' Series (lldist.series: its steps, thresholds and each measure's columns as arrays)."""
    if not os.path.exists(path):
        raise FileNotFoundError(path)
    from ..store.series import is_series, read_series
    if is_series(path):
        return read_series(path)
    return Landscape(path)
