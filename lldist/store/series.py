"""The one HDF5 file of a series (python -m lldist.series): every measure at every checkpoint of a
recorded run. Rank 0 is its one writer; the layout is docs/FORMAT.md's "Series files".

    sf = SeriesWriter.open(path, plan, overwrite)   # a new file, or the same plan's to resume
    sf.write(units, values)                         # units: checkpoint * measures + measure
    sf.done()                                       # (checkpoints, measures) bool
    s = read_series(path)                           # Series: steps, thresholds, each measure's columns

A new file is laid out whole under a temporary name and renamed into place. A unit's values are
written before its done mark, and the file flushed after each result (a unit is a checkpoint's
Hessian, or its losses: seconds to hours), so a killed run loses at most the units in flight;
the next run computes them again, to the same numbers.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

import h5py
import numpy as np

from ..errors import UserError
from .layout import _fixed, git_revision, now_iso

FORMAT = "lldist.series"
FORMAT_VERSION = 1
RUN_ATTRS = {"runs": 0, "last_started": "", "last_finished": "", "git_revision": "", "complete": False, "threads": 0}


@dataclass(frozen=True)
class Plan:
    """What a series file holds, fixed when it is made: its identity decides resuming."""
    measures: tuple  # the measures, in column order of the done mask
    columns: dict  # measure -> its column names
    descriptions: dict  # column -> what it is
    checkpoints: tuple  # the files, in training order
    steps: tuple
    lrs: tuple  # each step's learning rate (NaN where the run did not record its optimizer)
    thresholds: tuple  # each step's stability threshold (analysis/stability.py; NaN: unknown)
    threshold_kind: str  # what the thresholds bound: "lambda_max" or "preconditioned lambda_max" ...
    optimizers: tuple  # each step's optimizer record (JSON text; "" where none)
    subset: dict = field(default_factory=dict)  # the Hessian's examples: split, batches, batch size, operator
    job_text: str = ""
    identity: str = ""  # a hash of what makes two runs the same series


@dataclass
class Series:
    """A series file read back: arrays by training order."""
    path: str
    steps: np.ndarray
    lrs: np.ndarray
    thresholds: np.ndarray
    threshold_kind: str
    checkpoints: list
    done: np.ndarray  # (checkpoints, measures) bool
    measures: list
    values: dict  # column name -> (checkpoints,) float64, NaN where not done
    descriptions: dict
    subset: dict
    complete: bool

    def column(self, name: str) -> np.ndarray:
        try:
            return self.values[name]
        except KeyError:
            raise KeyError(f"{name!r}: this series holds {', '.join(self.values)}") from None


def is_series(path: str) -> bool:
    try:
        with h5py.File(path, "r") as f:
            return f.attrs.get("format") == FORMAT
    except OSError:
        return False


def _layout(f: h5py.File, plan: Plan) -> None:
    n, m = len(plan.steps), len(plan.measures)
    f.attrs.update(format=FORMAT, format_version=FORMAT_VERSION, created=now_iso(),
                   identity=plan.identity, job=plan.job_text, measures=json.dumps(list(plan.measures)),
                   columns=json.dumps(plan.columns), descriptions=json.dumps(plan.descriptions),
                   checkpoints=json.dumps(list(plan.checkpoints)), subset=json.dumps(plan.subset),
                   threshold_kind=plan.threshold_kind)
    for name, value in RUN_ATTRS.items():  # rewritten in place by every run: made now, fixed in size
        f.attrs[name] = _fixed(value)
    f.create_dataset("step", data=np.asarray(plan.steps, dtype=np.int64))
    f.create_dataset("lr", data=np.asarray(plan.lrs, dtype=np.float64))
    f.create_dataset("threshold", data=np.asarray(plan.thresholds, dtype=np.float64))
    f.create_dataset("optimizer", data=np.asarray(plan.optimizers, dtype=object), dtype=h5py.string_dtype())
    f.create_dataset("done", shape=(n, m), dtype=bool, fillvalue=False)
    g = f.create_group("values")
    for measure in plan.measures:
        g.create_dataset(measure, shape=(n, len(plan.columns[measure])), dtype=np.float64, fillvalue=np.nan)


class SeriesWriter:
    """Rank 0's handle on the series file (the only writer)."""

    def __init__(self, path: str, plan: Plan):
        self.path, self.plan = path, plan
        self.f = h5py.File(path, "r+")
        self._set(runs=int(self.f.attrs["runs"]) + 1, last_started=now_iso(), git_revision=git_revision())
        self.f.flush()

    def _set(self, **values) -> None:
        """Run attributes rewritten in place (same type and size: the file's structure never
        changes after creation, so a kill mid-write cannot damage it)."""
        for name, value in values.items():
            self.f.attrs.modify(name, _fixed(value))

    @classmethod
    def open(cls, path: str, plan: Plan, overwrite: bool = False) -> "SeriesWriter":
        """The file of this plan: made anew, or an existing one of the same plan to resume. An
        existing file of another plan (or not a series) is refused unless `overwrite`."""
        if os.path.exists(path) and not overwrite:
            try:
                with h5py.File(path, "r") as f:
                    fmt, ident = f.attrs.get("format"), f.attrs.get("identity")
            except OSError as e:
                raise UserError(f"output {path} exists and cannot be read as HDF5 ({str(e).splitlines()[0][:120]}); "
                                "--overwrite replaces it")
            if fmt != FORMAT:
                raise UserError(f"output {path} exists and is not an lldist series; --overwrite replaces it")
            if ident != plan.identity:
                raise UserError(f"output {path} holds another series (other checkpoints, measures or settings); "
                                "--overwrite replaces it, or give another --out")
            return cls(path, plan)
        tmp = path + ".tmp"
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with h5py.File(tmp, "w") as f:
            _layout(f, plan)
        os.replace(tmp, path)
        return cls(path, plan)

    def done(self) -> np.ndarray:
        return self.f["done"][()]

    def threads(self, n: int) -> int:
        """The CPU threads of the file's first run (stored by it: `n`, this run's choice)."""
        if int(self.f.attrs["threads"]) == 0:
            self._set(threads=int(n))
            self.f.flush()
        return int(self.f.attrs["threads"])

    def write(self, units, values) -> int:
        """Each unit's values (its measure's columns first in a row of `values`), then its done
        mark, then a flush. Returns the units written."""
        m = len(self.plan.measures)
        done = self.f["done"]
        for u, row in zip(np.asarray(units).tolist(), np.asarray(values)):
            i, j = divmod(int(u), m)
            measure = self.plan.measures[j]
            self.f["values"][measure][i] = row[:len(self.plan.columns[measure])]
        for u in np.asarray(units).tolist():
            i, j = divmod(int(u), m)
            done[i, j] = True
        self.f.flush()
        return len(units)

    def finish(self, complete: bool) -> None:
        self._set(complete=bool(complete), last_finished=now_iso())
        self.close()

    def close(self) -> None:
        if self.f.id.valid:
            self.f.flush()
            self.f.close()


def read_series(path: str) -> Series:
    if not os.path.exists(path):
        raise UserError(f"{path} does not exist")
    try:
        f = h5py.File(path, "r")
    except OSError as e:
        raise UserError(f"{path} cannot be opened as HDF5: {str(e).splitlines()[0][:160]}")
    with f:
        if f.attrs.get("format") != FORMAT:
            raise UserError(f"{path} is not an lldist series (no format={FORMAT} attribute)")
        try:
            measures = json.loads(f.attrs["measures"])
            columns = json.loads(f.attrs["columns"])
            done = f["done"][()]
            values = {}
            for j, m in enumerate(measures):
                block = f["values"][m][()]
                for k, name in enumerate(columns[m]):
                    values[name] = np.where(done[:, j], block[:, k], np.nan)
            return Series(path, f["step"][()], f["lr"][()], f["threshold"][()], str(f.attrs["threshold_kind"]),
                          json.loads(f.attrs["checkpoints"]), done, measures, values,
                          json.loads(f.attrs["descriptions"]), json.loads(f.attrs["subset"]),
                          bool(f.attrs["complete"]))
        except (KeyError, ValueError, TypeError) as e:
            raise UserError(f"{path} says it is an lldist series but is damaged or incomplete ({type(e).__name__}: {e})")

