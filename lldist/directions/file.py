"""directions.kind file: the directions of another lldist file (a landscape of one model along
another's directions), read through the store.

    d = make(making)        # Directions(x, y) as the other file keeps them, in this model's dtypes
"""

from __future__ import annotations

import hashlib
import json

import torch

from ..errors import UserError
from .record import Directions

NORM = "as in the source file"


def digest(path: str) -> str:
    """sha256 of a surface file's directions (their names and bytes): a file that gains cells
    keeps its digest, one made with other directions does not."""
    from ..store import SurfaceReader
    with SurfaceReader(path) as sf:
        d = sf.read_directions()
    if d.recipe is not None:  # the recipe and its checksums stand for the tensors
        return hashlib.sha256(json.dumps({"_recipe": d.recipe, "_summary": d.summary}, sort_keys=True)
                              .encode()).hexdigest()
    h = hashlib.sha256()
    for axis, entries in sorted(d.tensors().items()):
        for name in sorted(entries):
            h.update(f"{axis}/{name}".encode())
            h.update(entries[name].tobytes())
    return h.hexdigest()


def inputs(job) -> dict:
    return {"directions_file": digest(job.directions.file)}


def make(m) -> Directions:
    from ..store import SurfaceReader
    job, loaded, path = m.job, m.loaded, m.job.directions.file
    with SurfaceReader(path) as sf:
        theirs = sf.read_directions()
    if theirs.recipe is not None:
        raise UserError(f"{job.source}: directions.file {path} keeps its directions as a recipe over "
                        "its own checkpoint's norms; another model cannot take them (make it with directions.store: "
                        "tensors)")
    axes = {}
    for axis in ("x", "y")[:job.ndim]:
        got = getattr(theirs, axis)
        if got is None:
            raise UserError(f"{job.source}: directions.file {path} has no {axis} direction")
        if set(got) != set(loaded.theta) or any(got[n].shape != tuple(w.shape) for n, w in loaded.theta.items()):
            raise UserError(f"{job.source}: directions.file {path} was made for another model "
                            "(its directions' entries or shapes differ from this model's state)")
        axes[axis] = {n: torch.from_numpy(got[n]).to(w.dtype) for n, w in loaded.theta.items()}
    return Directions(**axes, attrs={"source_file": path})
