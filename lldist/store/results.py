"""What is added to a finished surface file: the curvature and the sharpness measures at θ*
(lldist.hessian, lldist.sharpness, a study), the landscape metrics (lldist.metrics). Each is
written into a copy renamed over the original, so a kill or a full disk leaves one whole file.

    key = write_curvature(path, result)     # /curvature/<split>[_ggn|_fisher]
    key = write_sharpness(path, result)     # /sharpness/<split>
    write_metrics(path, split, scalars, convex_map)
"""

from __future__ import annotations

import json
import os
from typing import Callable

import h5py
import numpy as np

from ..errors import UserError

def curvature_key(split: str, operator: str = "hessian") -> str:
    """The group under /curvature: the split for the Hessian (as files before the other
    operators), <split>_<operator> for the GGN and the Fisher."""
    return split if operator == "hessian" else f"{split}_{operator}"


def write_curvature(path: str, result: dict) -> str:
    """/curvature/<split> (curvature_key): the Hessian at theta* (lldist.hessian), or the GGN's,
    the Fisher's: scalars and lists (the per-block rows) as attributes, arrays (the spectral
    density's nodes and weights) as datasets; written like write_metrics (a copy renamed over
    the original). A later computation of the same operator replaces an earlier. Returns the key."""
    split = curvature_key(result["split"], result.get("operator", "hessian"))
    arrays = {k: v for k, v in result.items() if isinstance(v, np.ndarray)}
    scalars = {k: (json.dumps(v) if isinstance(v, (list, dict)) else v) for k, v in result.items()
               if k != "split" and k not in arrays}

    def change(f):
        g = f.require_group("curvature")
        if split in g:
            del g[split]
        g = g.create_group(split)
        g.attrs.update(scalars)
        for k, v in arrays.items():
            g.create_dataset(k, data=v)
    _rewrite(path, change, "the curvature")
    return split


def write_sharpness(path: str, result: dict) -> str:
    """/sharpness/<split>: the sharpness measures at theta* (lldist.sharpness) as attributes,
    lists as JSON; a later computation on the same split replaces an earlier. Returns the key."""
    key = result["split"]
    scalars = {k: (json.dumps(v) if isinstance(v, (list, dict)) else v) for k, v in result.items() if k != "split"}

    def change(f):
        g = f.require_group("sharpness")
        if key in g:
            del g[key]
        g.create_group(key).attrs.update(scalars)
    _rewrite(path, change, "the sharpness")
    return key


def _rewrite(path: str, change: Callable, what: str) -> None:
    """Change a finished file through a copy renamed over it (see write_metrics)."""
    import shutil
    tmp = path + ".metrics"
    try:
        shutil.copyfile(path, tmp)
        with h5py.File(tmp, "r+") as f:
            change(f)
        os.replace(tmp, path)
    except OSError as e:
        try:
            os.remove(tmp)
        except OSError:
            pass
        why = e.strerror or str(e).splitlines()[0][:160]
        raise UserError(f"{path}: cannot store {what} in it ({why}); the file is unchanged")


def write_metrics(path: str, split: str, scalars: dict, convex) -> None:
    """/metrics/<split>: scalar metrics as attributes, the convexity map as a dataset.

    Adding groups changes the file's structure, so the finished surface is copied, the copy
    written and renamed over the original: a kill (or a full disk) at any point leaves one
    whole file."""
    def change(f):
        g = f.require_group("metrics").require_group(split)
        for k, v in scalars.items():
            g.attrs[k] = v
        if "convex" in g:
            del g["convex"]
        if convex is not None:
            d = g.create_dataset("convex", data=convex)
            d.attrs["long_name"] = "central-difference Hessian of the loss is positive definite"
    _rewrite(path, change, "the metrics")
