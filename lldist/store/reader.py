"""A surface file, read: opened read-only (closing it never writes), checked to be an lldist
surface, and read into records.

    with SurfaceReader("out.h5") as sf:       # plots, metrics, info, a resumed run: never writes
        s = sf.read_all()                     # Surface: x, y, done, values {(split, quantity): array}, ...
        d = sf.read_directions()              # Directions, as arrays or a recipe
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass, field
from typing import NamedTuple, Optional

import h5py
import numpy as np

from ..directions.record import Directions
from ..errors import UserError
from .layout import FORMAT, RUN_ATTRS

def _read_directions(gd, path: str) -> Directions:
    """One plane's directions (see SurfaceReader.read_directions); a damaged one is a UserError."""
    try:
        if gd.attrs.get("store") == "recipe":
            return Directions(recipe=json.loads(gd.attrs["recipe"]),
                              summary={k: {a: json.loads(g.attrs[k]) for a, g in gd.items()}
                                       for k in ("norms", "checksums", "sums")})
        # np.asarray: a 0-dimensional entry (a temperature, ReZero's alpha) reads as a 0-d array
        out = Directions(**{axis: {name: np.asarray(ds[()]) for name, ds in g.items()} for axis, g in gd.items()})
    except (KeyError, ValueError, TypeError, AttributeError, OSError) as e:
        raise UserError(f"{path}: its directions ({gd.name}) are damaged: {type(e).__name__}: "
                        f"{str(e).splitlines()[0][:120] if str(e) else ''}")
    for axis, entries in out.tensors().items():
        bad = [n for n, a in entries.items() if not np.issubdtype(a.dtype, np.floating)]
        if bad:  # (an object dataset of an old or foreign writer)
            raise UserError(f"{path}: its direction {axis} of {bad[0]} holds {entries[bad[0]].dtype} values, not floats")
    return out


@dataclass
class Points:
    """A plane's three models, evaluated apart from the grid (directions.kind plane)."""
    coords: np.ndarray  # (3, 2): (alpha, beta) of each
    labels: list  # their file names
    done: np.ndarray  # (3,) bool
    values: dict  # {(split, quantity): (3,)}, NaN where not done


class AdaptiveReading(NamedTuple):
    """An adaptive grid as read: its cells computed, and the estimated error of the rest, in
    contour spacings (cells/interpolation.py), largest and mean over the cells, over its planes."""
    computed: int
    cells: int
    error: float
    mean_error: float

    @classmethod
    def of(cls, read: list, done: np.ndarray) -> "AdaptiveReading":
        """From the Surveys of the deciding quantity's planes and the done mask."""
        return cls(int(done.sum()), int(done.size), max(sv.error for sv in read), max(sv.mean_error for sv in read))


@dataclass
class Surface:
    """A surface file's arrays and what was measured on it, read once (SurfaceReader.read_all).
    Arrays follow cells/grid.py's axes: (ny, nx), (nx,) on 1D, a leading axis of planes with
    directions.repeats."""
    path: str
    name: str  # the job's
    x: np.ndarray
    y: Optional[np.ndarray]  # None on 1D
    done: np.ndarray  # bool: the cells computed
    splits: list
    quantities: list  # loss first: loss, acc, loss_se, ... per split
    values: dict  # {(split, quantity): float64 array}, NaN where not computed (interpolated on adaptive grids)
    interpolated: Optional[np.ndarray] = None  # adaptive grids: the cells filled in by interpolation
    adaptive: Optional[dict] = None  # the job's grid.adaptive settings
    adaptive_reading: Optional["AdaptiveReading"] = None  # adaptive grids: cells computed, estimated error
    planes: int = 1  # directions.repeats
    plane_seeds: Optional[list] = None  # each plane's direction seed
    trajectory: Optional[np.ndarray] = None  # pca: the checkpoints' (m, 2) coordinates
    trajectory_fit: Optional[dict] = None  # pca: how well the plane holds each checkpoint
    explained_variance_ratio: Optional[object] = None  # pca: as the file keeps it (JSON text) or a list
    eval_samples: dict = field(default_factory=dict)  # {split: examples evaluated per cell}
    curvature: dict = field(default_factory=dict)  # {split: the Hessian at θ*} (lldist.hessian)
    curvature_by_key: dict = field(default_factory=dict)  # every operator's, by its key (train, train_ggn, ...)
    sharpness: dict = field(default_factory=dict)  # {split: the measures at θ*} (lldist.sharpness)
    points: Optional[Points] = None  # kind plane: its three models
    is_path: bool = False  # x runs from θ* (0) to θ' (1): an interpolation, or t along a curve
    curve: Optional[str] = None  # bezier | polychain: a curve (its file or the plane drawn through it)
    curve_path: Optional[np.ndarray] = None  # (101, 2): the curve on a plane through its control points


DAMAGE = (KeyError, ValueError, TypeError, AttributeError, IndexError, OSError, RuntimeError)


def _checked(read):
    """A read of the file whose structure is not what lldist wrote (bytes flipped, a group where
    a dataset belongs, an attribute that is not JSON) is one UserError naming the file, not a
    traceback from deep inside h5py or json."""
    @functools.wraps(read)
    def wrapped(self, *args, **kwargs):
        try:
            return read(self, *args, **kwargs)
        except UserError:
            raise
        except DAMAGE as e:
            why = str(e).splitlines()[0][:160] if str(e) else ""
            raise UserError(f"{self.path} is damaged ({read.__name__}: {type(e).__name__}{': ' + why if why else ''}); "
                            "it cannot be read as an lldist surface") from None
    return wrapped


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
        try:
            self._structure()
        except BaseException:
            self.f.close()
            raise

    @_checked
    def _structure(self) -> None:
        """The grid's shape, the planes, the quantities: the arrays' axes must be the grid's
        (x, y, and the planes' with directions.repeats), every quantity of every split there."""
        f = self.f
        self.shape = f["done"].shape
        self.planes = len(f["plane"]) if "plane" in f else 1  # directions.repeats
        self.version = int(f.attrs.get("format_version", 0))
        self.quantities = json.loads(f.attrs.get("quantities", '["loss", "acc"]'))
        axes = ((self.planes,) if self.planes > 1 else ()) + ((len(f["y"]),) if "y" in f else ()) + (len(f["x"]),)
        if self.shape != axes:
            raise ValueError(f"its done mask is {self.shape}, its axes {axes}")
        for split in self.splits:
            for q in self.quantities:
                if f[split][q].shape != axes:
                    raise ValueError(f"{split}/{q} is {f[split][q].shape}, its axes {axes}")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self) -> None:
        if self.f.id.valid:
            self.f.close()

    # ------------------------------------------------------------------ reading
    @_checked
    def read_directions(self) -> Directions:
        """The directions, numpy arrays by group (x, y, and target, bend where a plane holds
        them), or, for a file that keeps them as their recipe, the recipe and its summary (norms,
        checksums, sums); directions.kinds.materialize makes tensors of either."""
        out = _read_directions(self.f["directions"], self.path)
        if "planes" in self.f:  # directions.repeats: planes 1..n-1 under /planes/<k>
            gp = self.f["planes"]
            if set(gp) != {str(k) for k in range(1, len(gp) + 1)}:
                raise UserError(f"{self.path}: its planes' directions are damaged (groups {', '.join(sorted(gp))})")
            out.planes = [_read_directions(gp[str(k)], self.path) for k in range(1, len(gp) + 1)]
        return out

    @_checked
    def done(self) -> np.ndarray:
        return self.f["done"][()]

    @_checked
    def array(self, split: str, q: str) -> np.ndarray:
        """One quantity of one split as stored (cells not done hold NaN)."""
        return self.f[split][q][()]

    @_checked
    def checkpoint_meta(self) -> dict:
        return json.loads(self.f.attrs.get("checkpoint_meta", "{}") or "{}")

    @_checked
    def job_yaml(self) -> str:
        return str(self.f.attrs.get("job_yaml", ""))

    @_checked
    def attr(self, name: str, default=None, group: str = "/"):
        """An attribute's value; run-level placeholders (0, NaN, "") read as `default`."""
        v = self.f[group].attrs.get(name, default)
        if isinstance(v, bytes):
            v = v.decode(errors="replace").rstrip()
        if group == "/" and name in RUN_ATTRS and name not in ("runs", "complete") and \
                (v == "" or v == 0 or (isinstance(v, float) and v != v)):
            return default
        return v

    @_checked
    def attrs(self, group: str = "/") -> dict:
        """Every attribute of a group, text decoded."""
        return {k: (v.decode(errors="replace").rstrip() if isinstance(v, bytes) else v)
                for k, v in self.f[group].attrs.items()}

    @property
    @_checked
    def adaptive(self) -> Optional[dict]:
        """The job's grid.adaptive settings, or None for a full grid."""
        text = self.f.attrs.get("grid_adaptive", "")
        return json.loads(text) if text else None

    def _surveys(self, a: np.ndarray, done: np.ndarray) -> list:
        """Each plane's Survey of quantity array `a` (NaN where not done) on this adaptive grid."""
        from ..cells.schedule import surveys
        ad = self.adaptive
        return surveys(a, done, int(ad["coarse"]), int(ad.get("levels", 30)), self.planes)

    @_checked
    def adaptive_reading(self) -> Optional["AdaptiveReading"]:
        """An adaptive grid's cells computed and estimated interpolation error, from the quantity
        that decided (the first split's loss); None for a full grid."""
        if not self.adaptive:
            return None
        done = self.f["done"][()]
        first = (self.splits[0], self.quantities[0])
        return AdaptiveReading.of(self._surveys(self._values(self.f, done, [first])[first], done), done)

    @_checked
    def read_all(self, reconstruct: bool = True) -> "Surface":
        """Everything a plot or the metrics need, as a Surface: each split's quantities with
        cells not done as NaN. On an adaptive grid the cells not computed are interpolated
        instead (cells/schedule.py's reconstruct; `reconstruct=False` leaves them NaN), and
        `interpolated` marks them."""
        f = self.f
        done = f["done"][()]
        values = self._values(f, done)
        interpolated = reading = None
        if self.adaptive and reconstruct:
            from ..cells.schedule import joined
            first = (self.splits[0], self.quantities[0])
            read = {k: self._surveys(a, done) for k, a in values.items()}
            values = {k: joined(sv) for k, sv in read.items()}
            interpolated = ~done & np.isfinite(values[first])
            reading = AdaptiveReading.of(read[first], done)
        samples = self.attr("eval_samples", "{}")
        cp = self.attr("curve_path", None, group="directions")  # a plane through a curve's control points
        return Surface(
            path=self.path, name=str(f.attrs.get("job_name", "")), x=f["x"][()], y=f["y"][()] if "y" in f else None,
            done=done, splits=self.splits, quantities=self.quantities, values=values, interpolated=interpolated,
            adaptive=self.adaptive, adaptive_reading=reading, planes=self.planes,
            plane_seeds=json.loads(f["plane"].attrs["seeds"]) if self.planes > 1 else None,
            trajectory=f["trajectory"][()] if "trajectory" in f else None, trajectory_fit=self.trajectory_fit(),
            explained_variance_ratio=self.attr("explained_variance_ratio", group="directions"),
            eval_samples=json.loads(samples) if isinstance(samples, str) else {},
            curvature=self.curvature(), curvature_by_key=self.curvature(operator=None), sharpness=self.sharpness(),
            points=self.points(),
            # x runs θ* (α = 0) to θ' (α = 1): an interpolation, or t along a curve (kind curve)
            is_path=self.attr("x_kind", "", group="directions") in ("target", "curve"),
            curve=self.attr("curve", None, group="directions"),
            curve_path=np.asarray(json.loads(cp)) if cp is not None else None)

    @_checked
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

    @_checked
    def points(self) -> Optional["Points"]:
        """kind plane: the three models, evaluated from their own files; None for other kinds."""
        if "points" not in self.f:
            return None
        g = self.f["points"]
        done = g["done"][()]
        return Points(g["coords"][()], [x.decode() if isinstance(x, bytes) else str(x) for x in g["labels"][()]],
                      done, self._values(g, done))

    def _values(self, g, done: np.ndarray, keys: Optional[list] = None) -> dict:
        """{(split, quantity): float64 array} under group g (the grid's, the points'), NaN where
        not done; every split's every quantity, or those in `keys`."""
        values = {}
        for split, q in keys or [(split, q) for split in self.splits for q in self.quantities]:
            a = g[split][q][()].astype(float)
            a[~done] = np.nan
            values[(split, q)] = a
        return values

    @_checked
    def trajectory_fit(self) -> Optional[dict]:
        """pca: how well the plane holds each checkpoint (directions/pca.py), or None."""
        if "trajectory" not in self.f or "captured" not in self.f["trajectory"].attrs:
            return None
        a = self.f["trajectory"].attrs
        out = {k: json.loads(a[k]) for k in ("captured", "loss_checkpoint", "loss_projected")}
        out.update(split=str(a["split"]), threshold=float(a["threshold"]),
                   checkpoints=json.loads(a.get("checkpoints", "[]")))
        return out

    @_checked
    def sharpness(self) -> dict:
        """{split: {...}}: the sharpness measures at theta* (lldist.sharpness), lists decoded."""
        out = {}
        for key, g in (self.f["sharpness"].items() if "sharpness" in self.f else ()):
            out[key] = {k: (json.loads(v) if k.endswith("_restarts") or k == "settings" else v)
                        for k, v in g.attrs.items()}
        return out

    @_checked
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
