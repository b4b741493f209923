"""Every kind of direction, by its job key `directions.kind`, and what is done the same for all:
making a job's directions (every plane of directions.repeats), describing them for the file,
the identity entries of the files a kind reads, and making tensors of what the file keeps.

    d = make(Making(job, loaded, task, source, log))       # Directions, each plane with its attrs
    d = materialize(sf.read_directions(), job, loaded)      # tensors again (a recipe regenerated)
    d = as_tensors(sf.read_directions())                    # tensors of arrays (no recipe)
    inputs(job)                                             # {"trajectory": [sha256, ...]}: identity's

A kind is one module here (random, target, pca, hessian, file, plane, curve) with
  make(m: Making) -> Directions   its directions (and attrs: what made them, for the file)
  NORM                            describe's "norm": None for the job's directions.norm, else a text
  Y_KIND                          (optional) what y is when not the kind itself (target: random)
  inputs(job) -> dict             (optional) the content of the files it reads, for the job's identity
  points(job, loaded) -> list     (optional) states evaluated apart from the grid (a plane's models)
  covering(job, loaded, log)      (optional) the job with its grid.x/y: auto made numbers (pca)
Adding a kind is its module, a line in KINDS and its keys in config.py.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from ..config import Job
from ..errors import UserError
from . import curve, file, hessian, pca, plane, random, target
from . import recipe as recipes
from .record import Directions
from .state import cosine

KINDS = {"random": random, "target": target, "pca": pca, "hessian": hessian, "file": file, "plane": plane,
         "curve": curve}


@dataclass(frozen=True)
class Making:
    """What a kind makes a job's directions from."""
    job: Job
    loaded: object  # inputs.loading.Loaded: the model at θ*, its float state, the data
    task: object  # evaluation.tasks.Task
    source: object  # inputs.loading.Source: where the model came from (a target given from Python)
    log: Callable = lambda m: None


def kind_of(job: Job, source=None) -> str:
    """The kind that makes the job's directions: `target` for a random plane with a target (the
    job's directions.target, or a target model given from Python)."""
    kind = job.directions.kind
    if kind == "random" and (job.directions.target or getattr(source, "target", None) is not None):
        return "target"
    return kind


def describe(cfg, d: Directions, kind: str) -> dict:
    """What was done to make the directions, for the file's /directions attributes."""
    module = KINDS[kind]
    out = {"kind": kind, "x_kind": kind, "y_kind": getattr(module, "Y_KIND", kind) if "y" in d.axes else "",
           "norm": module.NORM or cfg.norm, "ignore": cfg.ignore, "seed": cfg.seed,
           "stream": f"per row: torch.Generator seeded with splitmix64(sha256('{recipes.STREAM_TAG}:<seed>:<axis>:"
                     "<name>')[:8], row)",
           "params": json.dumps(cfg.params or {})}
    return out


def _one(m: Making) -> Directions:
    """One plane's directions, with their attributes: what the kind says made them, then the
    description and the cosine of x and y."""
    kind = kind_of(m.job, m.source)
    d = KINDS[kind].make(m)
    d.attrs.update(describe(m.job.directions, d, kind))
    if d.y is not None:
        d.attrs["cosine_xy"] = cosine(d.x, d.y)
    elif d.summary is not None and d.summary.get("cosine") is not None:
        d.attrs["cosine_xy"] = d.summary["cosine"]
    return d


def make(m: Making) -> Directions:
    """The job's directions. With directions.repeats: n, `planes` holds planes 1..n-1, each made
    as this job's with directions.seed + k would make them (plane 0 is this job's own)."""
    d = _one(m)
    job = m.job
    if job.directions.repeats > 1:
        d.planes = [_one(dataclasses.replace(m, job=dataclasses.replace(job, directions=dataclasses.replace(
            job.directions, seed=job.directions.seed + k, repeats=1)))) for k in range(1, job.directions.repeats)]
    return d


def kept_as_recipe(job: Job, loaded) -> bool:
    """Whether the job's directions are kept as their recipe: each rank regenerates its own
    rows (random directions, directions.store: recipe, or auto above RECIPE_ABOVE)."""
    return random.kept_as_recipe(job, loaded)


def inputs(job: Job) -> dict:
    """The identity entries of the files the job's kind reads (inputs/identity.py)."""
    hook = getattr(KINDS[kind_of(job)], "inputs", None)
    return hook(job) if hook else {}


def resolved(job: Job, loaded, log=lambda m: None) -> Job:
    """The job with an automatic grid (grid.x/y: auto) made numbers by its kind, before its
    identity is taken; the job itself otherwise."""
    hook = getattr(KINDS[kind_of(job)], "covering", None)
    return hook(job, loaded, log) if hook else job


def points(job: Job, loaded) -> Optional[list]:
    """The states the kind evaluates apart from the grid (a plane's three models), or None."""
    hook = getattr(KINDS[kind_of(job)], "points", None)
    return hook(job, loaded) if hook else None


def check_stored(stored: Directions, job: Job, loaded) -> None:
    """What a file keeps must be directions of this model, every plane's: the axes of the grid,
    and for arrays the model's entries with their shapes, for a recipe one this lldist reads. A
    damaged or foreign file is one UserError, before anything is computed or written."""
    for d in [stored] + stored.planes:
        if d.recipe is not None:
            try:
                recipes.from_dict(d.recipe)
            except (ValueError, KeyError, TypeError) as e:
                raise UserError(f"{job.output}: its direction recipe cannot be read ({e}); use --out for a new file")
            held = d.summary
        else:
            held = d.tensors()
        for axis in ("x", "y")[:job.ndim]:
            entries = (held.get("checksums", {}) if d.recipe is not None else held).get(axis)
            if entries is None or set(entries) != set(loaded.theta) or (d.recipe is None and any(
                    tuple(entries[n].shape) != tuple(w.shape) for n, w in loaded.theta.items())):
                raise UserError(f"{job.output}: its directions ({axis}) are not this model's or are damaged (their "
                                "entries or shapes differ from the model's float state); use --out for a new file")


def materialize(stored: Directions, job: Job, loaded, rows: Optional[dict] = None) -> Directions:
    """The directions as tensors, from what the file keeps: its arrays, or the recipe, regenerated
    here (only the rows `rows` of the named entries, for a shard). Checked first (check_stored);
    a whole regeneration against the file's checksums too."""
    check_stored(stored, job, loaded)
    if stored.recipe is None:
        return as_tensors(stored)
    planes = [materialize(p, job, loaded, rows) for p in stored.planes]
    r = recipes.from_dict(stored.recipe)
    checksums = stored.summary["checksums"]
    axes = {a: recipes.direction(loaded.theta, loaded.kinds, r, a, rows, loaded.read) for a in checksums}
    for a in axes:  # whole entries by their sha256; a shard's rows by check_rows, with its group
        for n, t in axes[a].items():
            if (rows is None or n not in rows) and recipes.checksum(t) != checksums[a].get(n):
                raise _regenerated_differs(job, a, n)
    return dataclasses.replace(stored, **axes, planes=planes)


def as_tensors(d: Directions) -> Directions:
    """Directions held as arrays (as the store reads them), every plane's, as tensors sharing
    their memory."""
    return dataclasses.replace(d, **{k: {n: torch.as_tensor(v) for n, v in t.items()} for k, t in d.tensors().items()},
                               planes=[as_tensors(p) for p in d.planes])


def _regenerated_differs(job: Job, axis: str, name: str) -> UserError:
    return UserError(f"{job.output}: direction {axis} of {name} regenerated from its recipe differs from the one the "
                     "file was made with (another torch's random numbers?); use --out for a new file")


def check_rows(d: Directions, stored: Directions, job: Job, loaded, rows: dict, add_up: Callable) -> None:
    """A sharded group's regenerated rows against the file: each entry's rows' float64 sums,
    added over the group by `add_up` (an all-reduce of a float64 tensor, called by every rank
    of the group with the same entries in the same order), give the sum the file stores."""
    for mine, kept in zip(d.planes, stored.planes):  # directions.repeats: every plane's rows
        check_rows(mine, kept, job, loaded, rows, add_up)
    if stored.recipe is None or "sums" not in stored.summary:
        return
    sums, norms = stored.summary["sums"], stored.summary["norms"]
    for a in sorted(sums):
        mine = getattr(d, a)
        names = sorted(n for n in rows if n in mine)
        local = torch.tensor([recipes.row_sum(mine[n]) if mine[n].numel() else 0.0 for n in names],
                             dtype=torch.float64)
        total = add_up(local)
        for n, t in zip(names, total.tolist()):
            if not recipes.rows_agree(t, sums[a][n], norms[a][n], loaded.theta[n].numel()):
                raise _regenerated_differs(job, a, n)
