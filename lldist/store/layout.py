"""What a new surface file holds, laid out whole at creation: the format, the provenance, every
dataset allocated and filled in advance, the directions and what made them. docs/FORMAT.md
describes the result; store/writer.py creates the file through here.

    layout(f, job, hashes, grid, dirs, meta, quantities)    # into an open, empty h5py.File

Every later write overwrites bytes in place and never changes the file's structure, so a kill
cannot leave it half-made (see _allocate and RUN_ATTRS).
"""

from __future__ import annotations

import json
import os
import platform
import socket
import subprocess
import sys
import time

import h5py
import numpy as np

from ..cells.grid import Grid
from ..config import Job
from ..directions.record import Directions

FORMAT = "lldist.surface"
FORMAT_VERSION = 5  # 2: directions from their own random stream; /directions/target
#                    3: the work log's cells as /cell_chunk (4 bytes a cell), a bounded /chunks
#                    4: a stream per row of every parameter; directions kept as a recipe
#                    5: every split's loss_se beside its loss (the standard error over examples)
RESUMABLE = (5,)  # older files lack loss_se: their cells cannot be completed with it

# Root attributes that change after creation. They are all made at creation with a fixed type
# and size (fixed-length strings, not variable-length ones that live in HDF5's global heap), and
# later rewritten in place with Attribute.modify: no update ever allocates file space or grows
# an object header, so a kill during one cannot leave the file's structure half-written.
RUN_ATTRS = {"runs": 0, "last_started": "", "last_finished": "", "git_revision": "", "complete": False,
             "eval_batch_size": 0, "eval_cells_per_pass": 0, "eval_threads": 0,
             "coordinator_ms_per_message": float("nan"),
             # rank 0's time per result message (receive, take, answer) of the last run that finished
             "coordinator_ms_median": float("nan"), "coordinator_ms_p99": float("nan"),
             "coordinator_ms_max": float("nan"), "coordinator_results": 0}
TEXT_WIDTH = 64


def _fixed(value):
    if isinstance(value, str):
        return np.bytes_(value.encode()[:TEXT_WIDTH].ljust(TEXT_WIDTH))
    if isinstance(value, (bool, np.bool_)):
        return np.bool_(value)
    if isinstance(value, (int, np.integer)):
        return np.int64(value)
    return np.float64(value)


CHUNK_DTYPE = np.dtype([
    ("run", "i4"), ("ncells", "i4"), ("rank", "i4"),
    ("host", "S64"), ("device", "S32"), ("t_start", "f8"), ("t_end", "f8"),
])
# /cell_chunk of a cell computed after the work log filled up (see _log_capacity)
LOG_FULL = -2

def _log_capacity(ncells: int) -> int:
    """Records the work log can hold. Chunks of one cell each need one record a cell; a run of
    chunks of 16 or more, resumed now and then, needs far fewer. Past this bound the cells are
    still stored and marked done; only their record is missing (cell_chunk = LOG_FULL)."""
    return min(ncells, 4096 + ncells // 16)


def _allocate(f: h5py.File, name: str, shape: tuple, dtype, fill):
    """A dataset whose whole storage is allocated and filled now, inside HDF5 and never as an
    array in this process's memory (a 10001 x 10001 grid would need 800 MB per quantity):
    later writes overwrite bytes in place and never change the file's structure."""
    dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
    dcpl.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)
    dcpl.set_fill_time(h5py.h5d.FILL_TIME_ALLOC)
    dtype = np.dtype(dtype)
    dcpl.set_fill_value(np.array(fill, dtype=dtype))
    return f.create_dataset(name, shape=shape, dtype=dtype, dcpl=dcpl)


def now_iso() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def git_revision() -> str:
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        out = subprocess.run(["git", "-C", here, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
        if out.returncode == 0:
            dirty = subprocess.run(["git", "-C", here, "status", "--porcelain", "--untracked-files=no"],
                                   capture_output=True, text=True, timeout=5).stdout.strip()
            return out.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return "unknown"


def versions() -> dict:
    """The versions a file records. torch's is the one the writing process runs (it computed the
    cells), read without importing it: the store is read where torch is not (analysis/)."""
    from ..version import __version__
    torch = sys.modules.get("torch")
    return {"lldist_version": __version__, "torch_version": getattr(torch, "__version__", ""),
            "numpy_version": np.__version__, "h5py_version": h5py.__version__,
            "python_version": platform.python_version()}


DEFAULT_QUANTITIES = {"loss": "mean cross-entropy loss on the {split} split", "acc": "accuracy on the {split} split"}
UNITS = {"acc": "1", "perplexity": "1"}


def layout(f: h5py.File, job: Job, hashes: dict, grid: Grid, dirs: Directions, meta: dict, quantities: dict) -> None:
    """Everything a new file holds, allocated and written in full (see write_chunk).
    `quantities`: name -> long name with a {split} field, loss first."""
    a = f.attrs
    a["quantities"] = json.dumps(list(quantities))
    a["format"], a["format_version"] = FORMAT, FORMAT_VERSION
    a["job_name"], a["job_source"], a["job_yaml"] = job.name, job.source, job.text
    a["job_hash"], a["job_config_hash"] = hashes["job"], hashes["config"]
    for k, v in versions().items():
        a[k] = str(v)  # torch's version is a str subclass h5py cannot store
    a["hostname"], a["created"] = socket.gethostname(), now_iso()
    a["ndim"], a["splits"] = grid.ndim, json.dumps(list(job.splits))
    for k, v in RUN_ATTRS.items():
        a[k] = _fixed(v)
    for k, v in meta.items():  # scalars as they are, structures as JSON text
        a[k] = v if isinstance(v, (str, int, float, bool)) else json.dumps(v, default=str)
    x = f.create_dataset("x", data=grid.x)
    x.attrs["long_name"], x.attrs["units"] = "alpha (step along direction x)", "1"
    x.make_scale("x")
    if grid.ndim == 2:
        y = f.create_dataset("y", data=grid.y)
        y.attrs["long_name"], y.attrs["units"] = "beta (step along direction y)", "1"
        y.make_scale("y")
    done = _allocate(f, "done", grid.shape, bool, False)
    done.attrs["long_name"] = "cell has been computed"
    arrays = [done]
    for split in job.splits:
        g = f.create_group(split)
        g.attrs["signal"] = "loss"  # NXdata-style hints for generic HDF5 viewers
        g.attrs["axes"] = np.array(["y", "x"] if grid.ndim == 2 else ["x"], dtype=h5py.string_dtype())
        for name, long_name in quantities.items():
            d = _allocate(g, name, grid.shape, "f8", np.nan)
            d.attrs["long_name"] = long_name.format(split=split)
            if name in UNITS or (name == "loss" and "cross-entropy" in long_name):
                d.attrs["units"] = UNITS.get(name, "nat")
            arrays.append(d)
    if grid.planes > 1:  # directions.repeats: the planes' axis, first
        pl = f.create_dataset("plane", data=np.arange(grid.planes))
        pl.attrs["long_name"] = "plane: directions drawn with directions.seed + plane"
        pl.attrs["seeds"] = json.dumps([job.directions.seed + k for k in range(grid.planes)])
        pl.make_scale("plane")
    for d in arrays:  # (ny, nx): dim 0 is y, dim 1 is x; (planes, ny, nx) with repeats
        d.dims[d.ndim - 1].attach_scale(f["x"])
        d.dims[d.ndim - 1].label = "x"
        if grid.ndim == 2:
            d.dims[d.ndim - 2].attach_scale(f["y"])
            d.dims[d.ndim - 2].label = "y"
        if grid.planes > 1:
            d.dims[0].attach_scale(f["plane"])
            d.dims[0].label = "plane"
    _write_directions(f.create_group("directions"), dirs)
    info = dirs.attrs
    if dirs.trajectory is not None:  # pca: the checkpoints' coordinates in the plane of x and y
        t = f.create_dataset("trajectory", data=np.asarray(dirs.trajectory, dtype="f8"))
        t.attrs["long_name"] = "coordinates (alpha, beta) of the training checkpoints in the PCA plane"
        t.attrs["checkpoints"] = json.dumps(info.get("checkpoints", []))
        if dirs.trajectory_fit is not None:  # how well the plane holds each checkpoint (directions/pca.py)
            for k, v in dirs.trajectory_fit.items():
                t.attrs[k] = json.dumps(v) if isinstance(v, list) else v
    if "points" in info:  # kind plane: the three models themselves, evaluated apart (SurfaceWriter.write_points)
        gp = f.create_group("points")
        gp.attrs["long_name"] = "the three models the plane passes through, evaluated from their own files"
        gp.create_dataset("coords", data=np.asarray(info["points"], dtype="f8")).attrs["long_name"] = \
            "(alpha, beta) of each point"
        gp.create_dataset("labels", data=np.array(info["point_files"], dtype=h5py.string_dtype()))
        _allocate(gp, "done", (3,), bool, False)
        for split in job.splits:
            for name in quantities:
                _allocate(gp, f"{split}/{name}", (3,), "f8", np.nan)
    if dirs.planes:  # plane k's directions, as /directions holds plane 0's
        gp = f.create_group("planes")
        for k, d in enumerate(dirs.planes, 1):
            _write_directions(gp.create_group(str(k)), d)
    # The work log: records[i] (i < nchunks) is chunk i; cell_chunk[cell] is the record of
    # the chunk that computed the cell (-1: not computed). Everything is allocated here, at
    # creation: later writes only overwrite bytes in place and never change the file's
    # structure, so a kill cannot corrupt it.
    _allocate(f, "chunks", (_log_capacity(grid.ncells),), CHUNK_DTYPE, np.zeros((), CHUNK_DTYPE))
    cc = _allocate(f, "cell_chunk", grid.shape, "i4", -1)
    cc.attrs["long_name"] = f"record in /chunks of the chunk that computed the cell (-1: none; {LOG_FULL}: log full)"
    f.create_dataset("nchunks", data=np.int64(0))


def _write_directions(gd, d: Directions) -> None:
    """One plane's directions into group `gd` (/directions, /planes/<k>): tensors per group (x,
    y, target, bend), or the recipe with its checksums; what made them (d.attrs, which the
    kind and directions/kinds.py wrote) as attributes."""
    gd.attrs["store"] = "recipe" if d.recipe is not None else "tensors"
    if d.recipe is not None:  # directions.store: recipe: every rank regenerates what it needs
        gd.attrs["recipe"] = json.dumps(d.recipe)
        for axis in d.summary["checksums"]:
            ga = gd.create_group(axis)
            ga.attrs["norms"] = json.dumps(d.summary["norms"][axis])
            ga.attrs["checksums"] = json.dumps(d.summary["checksums"][axis])
            ga.attrs["sums"] = json.dumps(d.summary["sums"][axis])
    for k, v in d.attrs.items():  # what made them: the kind, the norm, PCA's explained variance, ...
        gd.attrs[k] = json.dumps(v) if isinstance(v, (list, dict)) else v
    for axis, direction in d.tensors().items():
        ga = gd.create_group(axis)
        for name, t in direction.items():
            ga.create_dataset(name, data=t.cpu().numpy())


def estimate_bytes(ncells: int, values_per_cell: int, direction_values: int) -> int:
    """What a new file takes on disk: every dataset is allocated at creation."""
    per_cell = 1 + values_per_cell * 8 + 4 + CHUNK_DTYPE.itemsize / 16  # done, values, cell_chunk, log
    return ncells * per_cell + direction_values * 4 + (1 << 20)
