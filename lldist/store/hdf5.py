"""The results file: the only module that imports h5py. Layout in docs/FORMAT.md.

    out = Output("out.h5")                  # checked, locked and read once: one run per output
    out.refuse_foreign(config_hash, overwrite)                # before any training
    with out.open(job, hashes, grid, make_dirs, meta, overwrite, quantities) as sf:
        sf.write_chunk(result)              # a finished chunk (transport's ChunkResult record)
        sf.commit_due()                     # between messages: the group commit
        sf.finish()
    out.release()
    with SurfaceReader("out.h5") as sf:                     # plots, metrics, info: never writes
        s = sf.read_all()

The file is the checkpoint of a run: an explicit `done` mask says which cells hold results
(no sentinel values; a NaN loss is a legitimate result), finished chunks are committed in
groups (at least once a second, see COMMIT_S), and re-opening a file made by the same job
resumes it. A file made by another job is
refused. New files (also with --overwrite) are written under a temporary name and renamed
over the old one only when complete, so a run killed or failing while creating one leaves
the old file, or nothing, under the real name. No SWMR: SWMR files cannot be reopened for
writing after a crash.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import socket
import subprocess
import time
from typing import Callable, Optional

import h5py
import numpy as np

from ..config import Job
from ..errors import UserError
from ..grid import Grid

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
             "eval_batch_size": 0, "eval_cells_per_pass": 0, "coordinator_ms_per_message": float("nan"),
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

# Group commit: finished chunks are kept in memory and written (values, then their done marks)
# at most this often, or every COMMIT_CHUNKS chunks, not one by one. A SIGKILL loses at most
# this much finished work (recomputed by the next run); SIGTERM and errors commit first.
COMMIT_S = 1.0
COMMIT_CHUNKS = 256


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
    import torch

    from ..version import __version__
    return {"lldist_version": __version__, "torch_version": torch.__version__, "numpy_version": np.__version__,
            "h5py_version": h5py.__version__, "python_version": platform.python_version()}


def check_writable(path: str) -> None:
    d = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(d, exist_ok=True)
    except OSError as e:
        raise UserError(f"output {path}: cannot create folder {d}: {e.strerror}")
    if not os.access(d, os.W_OK):
        raise UserError(f"output {path}: folder {d} is not writable")
    if os.path.isdir(path):
        raise UserError(f"output {path} is a folder, not a file")


DEFAULT_QUANTITIES = {"loss": "mean cross-entropy loss on the {split} split", "acc": "accuracy on the {split} split"}
UNITS = {"acc": "1", "perplexity": "1"}


def _layout(f: h5py.File, job: Job, hashes: dict, grid: Grid, dirs: dict, meta: dict, quantities: dict) -> None:
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
    dirs = dict(dirs)
    planes, trajectory = dirs.pop("_planes", []), dirs.pop("_trajectory", None)
    fit = dirs.pop("_trajectory_fit", None)
    info = _write_directions(f.create_group("directions"), dirs, job.directions)
    if trajectory is not None:  # pca: the checkpoints' coordinates in the plane of x and y
        t = f.create_dataset("trajectory", data=np.asarray(trajectory, dtype="f8"))
        t.attrs["long_name"] = "coordinates (alpha, beta) of the training checkpoints in the PCA plane"
        t.attrs["checkpoints"] = json.dumps(info.get("checkpoints", []))
        if fit is not None:  # how well the plane holds each checkpoint (loading.trajectory_fit)
            for k, v in fit.items():
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
    if planes:  # plane k's directions, as /directions holds plane 0's
        gp = f.create_group("planes")
        for k, d in enumerate(planes, 1):
            seeded = dataclasses.replace(job.directions, seed=job.directions.seed + k)
            _write_directions(gp.create_group(str(k)), d, seeded)
    # The work log: records[i] (i < nchunks) is chunk i; cell_chunk[cell] is the record of
    # the chunk that computed the cell (-1: not computed). Everything is allocated here, at
    # creation: later writes only overwrite bytes in place and never change the file's
    # structure, so a kill cannot corrupt it.
    _allocate(f, "chunks", (_log_capacity(grid.ncells),), CHUNK_DTYPE, np.zeros((), CHUNK_DTYPE))
    cc = _allocate(f, "cell_chunk", grid.shape, "i4", -1)
    cc.attrs["long_name"] = f"record in /chunks of the chunk that computed the cell (-1: none; {LOG_FULL}: log full)"
    f.create_dataset("nchunks", data=np.int64(0))


def _write_directions(gd, dirs: dict, cfg) -> dict:
    """One plane's directions into group `gd` (/directions, /planes/<k>): tensors per axis, or
    the recipe with its checksums; what made them as attributes. Returns their _info."""
    dirs = dict(dirs)
    info = dirs.pop("_info", {})
    recipe, summary = dirs.pop("_recipe", None), dirs.pop("_summary", None)
    gd.attrs["store"] = "recipe" if recipe is not None else "tensors"
    if recipe is not None:  # directions.store: recipe: every rank regenerates what it needs
        gd.attrs["recipe"] = json.dumps(recipe)
        for axis in summary["checksums"]:
            ga = gd.create_group(axis)
            ga.attrs["norms"] = json.dumps(summary["norms"][axis])
            ga.attrs["checksums"] = json.dumps(summary["checksums"][axis])
            ga.attrs["sums"] = json.dumps(summary["sums"][axis])
    for k, v in info.items():  # what made them: PCA's explained variance, Hessian eigenvalues
        gd.attrs[k] = json.dumps(v) if isinstance(v, (list, dict)) else v
    for axis, direction in dirs.items():
        ga = gd.create_group(axis)
        for name, t in direction.items():
            ga.create_dataset(name, data=t.cpu().numpy())
    from ..directions import cosine, describe
    for k, v in describe(cfg, dirs if recipe is None else {a: None for a in summary["norms"]}).items():
        gd.attrs[k] = v
    if "y" in dirs:
        gd.attrs["cosine_xy"] = cosine(dirs["x"], dirs["y"])
    elif recipe is not None and summary.get("cosine") is not None:
        gd.attrs["cosine_xy"] = summary["cosine"]
    return info


class Lock:
    """One run per output file: an exclusive flock on `<output>.lock`, held by rank 0 from before
    training to the end. A second run on the same output is refused at once; the lock goes
    with the process, so a killed run never leaves a stale one."""

    def __init__(self, path: str):
        import fcntl
        self.path = path + ".lock"
        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as e:
                raise UserError(f"output {path}: cannot create its lock file {self.path} ({e.strerror})")
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                os.close(fd)
                holder = ""
                try:
                    with open(self.path) as f:
                        holder = f.read().strip()
                except OSError:
                    pass
                raise UserError(f"output {path} is being written by another run ({holder or 'running'}); "
                                "wait for it to end, or use --out for another file")
            # the holder before us may have removed the file between our open and our lock:
            # the lock is ours only if the path still names the file we locked
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        self.fd = fd
        # who holds it, for the refusal message; on a full disk the lock holds without it (the
        # flock is the lock, not the text), so a half-done surface still resumes there
        try:
            os.ftruncate(fd, 0)
            os.write(fd, f"pid {os.getpid()} on {socket.gethostname()} since {now_iso()}\n".encode())
        except OSError:
            pass

    def release(self) -> None:
        if self.fd is not None:
            try:
                os.remove(self.path)  # before unlocking: a waiting run re-checks the path
            except OSError:
                pass
            os.close(self.fd)
            self.fd = None


def size(n: float) -> str:
    """Bytes in the unit that fits: 812 kB, 3.4 MB, 21 GB."""
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{int(n)} bytes"


def all_closed() -> bool:
    """No HDF5 file of this process is open (a command may then skip the interpreter's teardown)."""
    return len(h5py.h5f.get_obj_ids(types=h5py.h5f.OBJ_FILE)) == 0


def free_bytes(folder: str) -> int:
    import shutil
    return shutil.disk_usage(folder).free


def estimate_bytes(ncells: int, values_per_cell: int, direction_values: int) -> int:
    """What a new file takes on disk: every dataset is allocated at creation."""
    per_cell = 1 + values_per_cell * 8 + 4 + CHUNK_DTYPE.itemsize / 16  # done, values, cell_chunk, log
    return ncells * per_cell + direction_values * 4 + (1 << 20)


def _read_directions(gd) -> dict:
    """One plane's directions (see SurfaceReader.read_directions)."""
    if gd.attrs.get("store") == "recipe":
        return {"_recipe": json.loads(gd.attrs["recipe"]),
                "_summary": {"norms": {a: json.loads(g.attrs["norms"]) for a, g in gd.items()},
                             "checksums": {a: json.loads(g.attrs["checksums"]) for a, g in gd.items()},
                             "sums": {a: json.loads(g.attrs["sums"]) for a, g in gd.items()}}}
    import torch
    return {axis: {name: torch.from_numpy(ds[()]) for name, ds in g.items()} for axis, g in gd.items()}


class SurfaceReader:
    """A surface file opened read-only; closing it never writes.

        with SurfaceReader("out.h5") as sf:
            s = sf.read_all()     # x, y, done, per-split loss/acc with NaN where not done
    """

    mode = "r"

    def __init__(self, path: str):
        self.path = path
        try:
            self.f = h5py.File(path, self.mode)
        except FileNotFoundError:
            raise UserError(f"{path} does not exist")
        except OSError as e:
            raise UserError(f"{path} cannot be opened as HDF5 (corrupt, locked by a running job, or not "
                            f"an HDF5 file): {str(e).splitlines()[0][:160]}")
        if self.f.attrs.get("format") != FORMAT:
            self.f.close()
            raise UserError(f"{path} is an HDF5 file but not an lldist surface (no format={FORMAT} attribute)")
        missing = [k for k in ("splits", "format_version") if k not in self.f.attrs] + \
            [k for k in ("done", "x", "directions") if k not in self.f]
        try:
            splits = json.loads(self.f.attrs["splits"]) if not missing else []
            missing += [f"{s}/" for s in splits if s not in self.f]
        except (ValueError, TypeError):
            missing.append("splits (not a JSON list)")
        if missing:
            self.f.close()
            raise UserError(f"{path} says it is an lldist surface but lacks {', '.join(missing)}: it was not "
                            "written by lldist, or is damaged")
        self.splits = splits
        self.shape = self.f["done"].shape
        self.planes = len(self.f["plane"]) if "plane" in self.f else 1  # directions.repeats
        self.version = int(self.f.attrs.get("format_version", 0))
        self.quantities = json.loads(self.f.attrs.get("quantities", '["loss", "acc"]'))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self) -> None:
        if self.f.id.valid:
            self.f.close()

    # ------------------------------------------------------------------ reading
    def read_directions(self) -> dict:
        """{"x": {name: tensor}, "y": ..., and "target": theta' on interpolation jobs}; or, for a
        file that keeps them as their recipe, {"_recipe": ..., "_summary": {norms, checksums, sums}}
        (loading.materialize regenerates them)."""
        out = _read_directions(self.f["directions"])
        if "planes" in self.f:  # directions.repeats: planes 1..n-1 under /planes/<k>
            gp = self.f["planes"]
            out["_planes"] = [_read_directions(gp[str(k)]) for k in range(1, len(gp) + 1)]
        return out

    def done(self) -> np.ndarray:
        return self.f["done"][()]

    def array(self, split: str, q: str) -> np.ndarray:
        """One quantity of one split as stored (cells not done hold NaN)."""
        return self.f[split][q][()]

    def checkpoint_meta(self) -> dict:
        return json.loads(self.f.attrs.get("checkpoint_meta", "{}") or "{}")

    def job_yaml(self) -> str:
        return str(self.f.attrs.get("job_yaml", ""))

    def attr(self, name: str, default=None, group: str = "/"):
        """An attribute's value; run-level placeholders (0, NaN, "") read as `default`."""
        v = self.f[group].attrs.get(name, default)
        if isinstance(v, bytes):
            v = v.decode(errors="replace").rstrip()
        if group == "/" and name in RUN_ATTRS and name not in ("runs", "complete") and \
                (v == "" or v == 0 or (isinstance(v, float) and v != v)):
            return default
        return v

    @property
    def adaptive(self) -> Optional[dict]:
        """The job's grid.adaptive settings, or None for a full grid."""
        text = self.f.attrs.get("grid_adaptive", "")
        return json.loads(text) if text else None

    def read_all(self, reconstruct: bool = True) -> dict:
        """Everything a plot or the metrics need: x, y (None on 1D), done, splits, job name,
        and each split's quantities with cells not done as NaN. On an adaptive grid the cells
        not computed are interpolated instead (schedule.reconstruct; `reconstruct=False`
        leaves them NaN), and "interpolated" marks them."""
        f = self.f
        done = f["done"][()]
        out = {"x": f["x"][()], "y": f["y"][()] if "y" in f else None, "done": done,
               "splits": self.splits, "quantities": self.quantities,
               "name": str(f.attrs.get("job_name", "")), "values": {}, "interpolated": None,
               "adaptive": self.adaptive, "planes": self.planes,  # values (planes, ...) when several
               "plane_seeds": json.loads(f["plane"].attrs["seeds"]) if self.planes > 1 else None}
        for split in self.splits:
            for q in self.quantities:
                a = f[split][q][()].astype(float)
                a[~done] = np.nan
                if self.adaptive and reconstruct:
                    from ..schedule import reconstruct as fill
                    a = fill(a, done, int(self.adaptive["coarse"]))
                out["values"][(split, q)] = a
        if self.adaptive and reconstruct:
            out["interpolated"] = ~done & np.isfinite(out["values"][(self.splits[0], self.quantities[0])])
        out["trajectory"] = f["trajectory"][()] if "trajectory" in f else None  # pca: (m, 2)
        out["trajectory_fit"] = self.trajectory_fit()
        out["explained_variance_ratio"] = self.attr("explained_variance_ratio", group="directions")
        samples = self.attr("eval_samples", "{}")
        out["eval_samples"] = json.loads(samples) if isinstance(samples, str) else {}  # {split: examples}
        out["curvature"] = self.curvature()
        out["curvature_by_key"] = self.curvature(operator=None)  # the GGN's and the Fisher's too
        out["sharpness"] = self.sharpness()
        out["points"] = self.points()
        # x runs θ* (α = 0) to θ' (α = 1): an interpolation, or t along a curve (kind curve)
        out["path"] = self.attr("x_kind", "", group="directions") in ("target", "curve")
        out["curve"] = self.attr("curve", None, group="directions")  # bezier | polychain, or None
        cp = self.attr("curve_path", None, group="directions")  # a plane through a curve's control points
        out["curve_path"] = np.asarray(json.loads(cp)) if cp is not None else None  # (101, 2)
        return out

    def curvature(self, operator: Optional[str] = "hessian") -> dict:
        """{split: {...}}: the Hessian at theta* (lldist.hessian), lists decoded, the spectral
        density's nodes and weights as arrays where computed. `operator`: ggn or fisher for
        theirs, None for every one by its key (curvature_key: train, train_ggn, ...)."""
        out = {}
        for key, g in (self.f["curvature"].items() if "curvature" in self.f else ()):
            d = {k: (json.loads(v) if k in ("top_eigenvalues", "blocks", "blocks_spec", "lambda_max_jackknife") else v)
                 for k, v in g.attrs.items()}
            d.update({k: g[k][()] for k in g})
            d.setdefault("operator", "hessian")  # (files before the other operators)
            if operator is None:
                out[key] = d
            elif d["operator"] == operator:
                out[key.split("_")[0]] = d
        return out

    def points(self) -> Optional[dict]:
        """kind plane: {coords (3, 2), labels, done (3,), values {(split, q): (3,)}}, or None."""
        if "points" not in self.f:
            return None
        g = self.f["points"]
        done = g["done"][()]
        values = {}
        for split in self.splits:
            for q in self.quantities:
                v = g[split][q][()].astype(float)
                v[~done] = np.nan
                values[(split, q)] = v
        return {"coords": g["coords"][()], "labels": [x.decode() if isinstance(x, bytes) else str(x)
                                                      for x in g["labels"][()]], "done": done, "values": values}

    def trajectory_fit(self) -> Optional[dict]:
        """pca: how well the plane holds each checkpoint (loading.trajectory_fit), or None."""
        if "trajectory" not in self.f or "captured" not in self.f["trajectory"].attrs:
            return None
        a = self.f["trajectory"].attrs
        out = {k: json.loads(a[k]) for k in ("captured", "loss_checkpoint", "loss_projected")}
        out.update(split=str(a["split"]), threshold=float(a["threshold"]),
                   checkpoints=json.loads(a.get("checkpoints", "[]")))
        return out

    def sharpness(self) -> dict:
        """{split: {...}}: the sharpness measures at theta* (lldist.sharpness), lists decoded."""
        out = {}
        for key, g in (self.f["sharpness"].items() if "sharpness" in self.f else ()):
            out[key] = {k: (json.loads(v) if k.endswith("_restarts") or k == "settings" else v)
                        for k, v in g.attrs.items()}
        return out

    def chunk_log(self) -> tuple:
        """(records, cells): the valid part of the per-chunk work log, and the computed cells
        in the order of their records (chunk by chunk)."""
        n = int(self.f["nchunks"][()])
        rec = self.f["chunks"][:n]
        if "chunk_cells" in self.f:  # format 2
            end = int(rec["offset"][-1] + rec["ncells"][-1]) if n else 0
            return rec, self.f["chunk_cells"][:end]
        owner = self.f["cell_chunk"][()].reshape(-1)
        owner[~self.f["done"][()].reshape(-1)] = -1  # a killed run's record may outlive its marks
        cells = np.flatnonzero((owner >= 0) & (owner < n))
        return rec, cells[np.argsort(owner[cells], kind="stable")]


class Output:
    """The output file of a run, handled once: the path checked, the lock taken, and what the
    path already holds read once, read-only (a refused run leaves it exactly as it was,
    modification time included).

        out = Output(path)                          # UserError: not writable, a folder, locked
        out.refuse_foreign(config_hash, overwrite)  # before any work (training included)
        sf = out.open(job, hashes, grid, make_dirs, meta, overwrite, quantities)   # the writer
        out.release()                               # when the run ends, however it ends
    """

    def __init__(self, path: str):
        self.path = path
        check_writable(path)
        self.lock = Lock(path)
        try:
            self.existing = self._read_existing()
        except BaseException:
            self.lock.release()
            raise

    def _read_existing(self) -> Optional[dict]:
        """What identifies the surface at the path: None for no file; {"foreign": why} for a
        file that is not an lldist surface."""
        if not os.path.exists(self.path):
            return None
        try:
            with SurfaceReader(self.path) as sf:
                return {"config": sf.attr("job_config_hash", ""), "job": sf.attr("job_hash", ""),
                        "version": sf.version, "source": sf.attr("job_source", "?")}
        except UserError as e:
            return {"foreign": str(e)}

    def refuse_foreign(self, config_hash: str, overwrite: bool) -> None:
        """Refuse an output this job may not write. Anything that is not an lldist surface is
        never touched, --overwrite or not (it may be the job's own checkpoint or job file given
        as --out). Without --overwrite, a surface made by another job configuration, or by an
        older format, is refused too."""
        e = self.existing
        if e is None:
            return
        if "foreign" in e:
            raise UserError(f"{e['foreign']}; refusing to replace a file that is not an lldist surface")
        if overwrite:
            return
        if e["version"] not in RESUMABLE:
            why = ("random directions now come from a stream of their own, so its cells cannot be mixed "
                   "with new ones") if e["version"] < 2 else "its work log has the older layout" \
                if e["version"] < 3 else "its cells lack the loss's standard error, loss_se"
            raise UserError(f"output {self.path} has format version {e['version']}, this lldist writes "
                            f"{FORMAT_VERSION} ({why}); use --out for a new file or --overwrite to replace it")
        if e["config"] and e["config"] != config_hash:
            raise UserError(f"output {self.path} was made by a different job ({e['source']}); use --out for a "
                            "new file or --overwrite to replace it")

    def open(self, job: Job, hashes: dict, grid: Grid, make_dirs: Callable[[], dict], meta: dict,
             overwrite: bool = False, quantities: Optional[dict] = None) -> "SurfaceWriter":
        """Resume the file this job made, or make a new one. A new file (also with --overwrite)
        is written beside the old under a temporary name and renamed over it only once it is
        complete: a run that fails before then leaves the old file as it was."""
        self.refuse_foreign(hashes["config"], overwrite)
        e = self.existing
        if e is not None and not overwrite:
            if e["job"] != hashes["job"]:
                raise UserError(f"output {self.path} was made by a different job ({e['source']}, hash "
                                f"{e['job'][:12]}; this job's is {hashes['job'][:12]}: another checkpoint, target, "
                                "data or loss); use --out for a new file or --overwrite to replace it")
            return SurfaceWriter.begin(self.path)
        return SurfaceWriter.create(self.path, job, hashes, grid, make_dirs(), meta, quantities or DEFAULT_QUANTITIES)

    def release(self) -> None:
        self.lock.release()


class SurfaceWriter(SurfaceReader):
    """Rank 0's handle on the file it computes into (the only writer).

        with Output("out.h5").open(job, hashes, grid, make_dirs, meta) as sf:   # or SurfaceWriter.create
            sf.write_chunk(result)   # a ChunkResult: cells, values (n, nsplits, nquantities), who, when
            sf.commit_due()          # now and then: the group commit (see COMMIT_S)
            sf.finish()
    """

    mode = "r+"

    def __init__(self, path: str):
        super().__init__(path)
        self.run = int(self.f.attrs.get("runs", 0))
        self._done = None  # read once, at the first need (see taken)
        self._uncommitted, self._uncommitted_cells = [], 0
        self._last_commit = time.monotonic()

    def taken(self) -> np.ndarray:
        """Which cells hold values: the file's done mask plus the chunks taken and not yet
        committed (1 byte a cell: 1 MB at 1001 x 1001). Read once and kept: rank 0 is the only
        writer, so it is never stale; the schedule reads it ahead of its cursor, and it catches
        a chunk handed out twice."""
        if self._done is None:
            self._done = self.f["done"][()]
            self._nchunks = int(self.f["nchunks"][()])
            # dataset handles looked up once: an h5py lookup by path costs as much as a small write
            self._ds = {n: self.f[n] for n in ("done", "nchunks", "chunks", "cell_chunk")}
            self._ds.update({(sp, q): self.f[sp][q] for sp in self.splits for q in self.quantities})
        return self._done

    def _runs(self, cells: np.ndarray) -> list:
        """(dataset selection, positions in `cells`) for each run of consecutive cells along
        a row: a sweep's chunks are runs of pending cells in row-major order, so a chunk is one
        or two hyperslabs, and a write costs what the chunk holds, not what the grid holds."""
        nx = self.shape[-1]
        row, ix = np.divmod(cells, nx)  # row: over every leading axis (y; the planes' with repeats)
        breaks = np.flatnonzero((np.diff(row) != 0) | (np.diff(ix) != 1)) + 1
        out = []
        for lo, hi in zip(np.r_[0, breaks], np.r_[breaks, len(cells)]):
            cols = slice(int(ix[lo]), int(ix[hi - 1]) + 1)
            lead = tuple(int(i) for i in np.unravel_index(int(row[lo]), self.shape[:-1])) if len(self.shape) > 1 else ()
            out.append((lead + (cols,), slice(int(lo), int(hi))))
        return out

    @classmethod
    def begin(cls, path: str) -> "SurfaceWriter":
        """Open a surface for writing, as a new run of it."""
        sf = cls(path)
        sf.run += 1
        sf.set_attr("runs", sf.run, flush=False)
        sf.set_attr("last_started", now_iso(), flush=False)
        sf.set_attr("git_revision", git_revision())
        return sf

    @classmethod
    def create(cls, path: str, job: Job, hashes: dict, grid: Grid, dirs: dict, meta: dict,
               quantities: dict = None) -> "SurfaceWriter":
        """A new file (replacing what the path held only once it is complete), opened by begin."""
        cls._create(path, job, hashes, grid, dirs, meta, quantities or DEFAULT_QUANTITIES)
        return cls.begin(path)

    @staticmethod
    def _create(path: str, job: Job, hashes: dict, grid: Grid, dirs: dict, meta: dict, quantities: dict) -> None:
        folder = os.path.dirname(os.path.abspath(path))
        need = estimate_bytes(grid.ncells, len(job.splits) * len(quantities),
                              sum(t.numel() for k, d in dirs.items() if not k.startswith("_") for t in d.values()))
        free = free_bytes(folder)
        if need > free:
            raise UserError(f"output {path}: the file needs about {size(need)} and {folder} has {size(free)} free")
        tmp = path + ".creating"
        try:
            with h5py.File(tmp, "w") as f:
                _layout(f, job, hashes, grid, dirs, meta, quantities)
        except (OSError, ValueError) as e:  # a full or read-only disk, a quota
            try:
                os.remove(tmp)
            except OSError:
                pass
            raise UserError(f"output {path}: cannot create the file ({str(e).splitlines()[0][:160]})")
        os.replace(tmp, path)

    # ------------------------------------------------------------------ writing
    def write_chunk(self, r) -> int:
        """Take a finished chunk: `r` is the record the computing rank made (transport's
        ChunkResult: cells, values (len(cells), nsplits, nquantities), rank, host, device,
        t_start, t_end), kept as it is until the commit. Nothing reaches the file before the
        commit (see commit), which is due every COMMIT_S seconds or COMMIT_CHUNKS chunks:
        returns how many cells this call committed."""
        cells = np.asarray(r.cells, dtype=np.int64)
        flat = self.taken().reshape(-1)
        if flat[cells].any():
            raise RuntimeError(f"cells {cells[flat[cells]].tolist()} were already done: a chunk was handed out twice")
        flat[cells] = True
        record = (self.run, len(cells), r.rank, r.host.encode()[:64], r.device.encode()[:32], r.t_start, r.t_end)
        self._uncommitted.append((cells, np.asarray(r.values, dtype=float), record))
        self._uncommitted_cells += len(cells)
        if len(self._uncommitted) >= COMMIT_CHUNKS:
            return self.commit()
        return self.commit_due()

    def points_done(self) -> bool:
        return "points" not in self.f or bool(self.f["points/done"][()].all())

    def write_points(self, values: np.ndarray) -> None:
        """kind plane: the three points' values (3, nsplits, nquantities), then their done marks
        (flushed first, as a commit does: done never reaches the disk before the values)."""
        g = self.f["points"]
        for j, split in enumerate(self.splits):
            for q, name in enumerate(self.quantities):
                g[split][name][:] = values[:, j, q]
        self.f.flush()
        g["done"][:] = True
        self.f.flush()

    def commit_due(self) -> int:
        """Commit if COMMIT_S passed since the last commit; returns the cells committed."""
        if self._uncommitted and time.monotonic() - self._last_commit >= COMMIT_S:
            return self.commit()
        return 0

    def commit(self) -> int:
        """Write every chunk taken since the last commit and make it count: values, records and
        cell owners first, flushed; then the done marks and the record count, flushed again.
        HDF5 may write buffered data to disk in any order: the first flush keeps "done" from
        ever reaching the disk before the values it vouches for. Chunks next to each other (a
        sweep's are) merge into one hyperslab per row, so a commit costs a few writes, and a
        message only the time to take it. Returns the cells committed."""
        self._last_commit = time.monotonic()
        if not self._uncommitted:
            return 0
        log = self._ds["chunks"]
        first = self._nchunks
        nrec = max(0, min(len(self._uncommitted), log.shape[0] - first))  # past the log's capacity: LOG_FULL
        if nrec:
            log[first:first + nrec] = np.array([r for _, _, r in self._uncommitted[:nrec]], dtype=CHUNK_DTYPE)
        owners = np.concatenate([np.full(len(c), first + i if i < nrec else LOG_FULL, dtype=np.int32)
                                 for i, (c, _, _) in enumerate(self._uncommitted)])
        cells = np.concatenate([c for c, _, _ in self._uncommitted])
        values = np.concatenate([v for _, v, _ in self._uncommitted])
        order = np.argsort(cells, kind="stable")  # hyperslabs want increasing indices
        cells, values, owners = cells[order], values[order], owners[order]
        runs = self._runs(cells)
        for j, split in enumerate(self.splits):
            for q, name in enumerate(self.quantities):
                d = self._ds[(split, name)]
                for sel, pos in runs:
                    d[sel] = values[pos, j, q]
        owner = self._ds["cell_chunk"]
        for sel, pos in runs:
            owner[sel] = owners[pos]
        self.f.flush()
        done = self._ds["done"]
        for sel, _ in runs:
            done[sel] = True
        self._nchunks = first + nrec
        self._ds["nchunks"][()] = self._nchunks
        self.f.flush()
        n = self._uncommitted_cells
        self._uncommitted, self._uncommitted_cells = [], 0
        return n

    def close(self) -> None:
        """Commit what was taken (a stop or a failure elsewhere leaves finished chunks valid),
        then close. A failing commit (a full disk) loses only the uncommitted chunks."""
        if self.f.id.valid and self._uncommitted:
            try:
                self.commit()
            except Exception:
                pass
        super().close()

    def set_attr(self, name: str, value, group: str = "/", flush: bool = True) -> None:
        attrs = self.f[group].attrs
        if group == "/" and name in RUN_ATTRS and name in attrs:
            attrs.modify(name, _fixed(value))  # same type and size: rewritten in place
        else:
            attrs[name] = value
        if flush:
            self.f.flush()

    def finish(self, complete: Optional[bool] = None) -> None:
        """The run ended normally: record when, and whether the grid is complete (every cell
        done, or `complete` where the caller knows better: an adaptive grid); close."""
        if self.f.id.valid:
            self.commit()
            self.set_attr("last_finished", now_iso(), flush=False)
            self.set_attr("complete", bool(self.taken().all()) if complete is None else complete, flush=False)
            self.close()


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
