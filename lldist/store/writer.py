"""The one writer of a surface file: rank 0's handle on the file it computes into. A new file is
laid out whole (store/layout.py) under a temporary name and renamed into place; finished chunks
are committed in groups, values before their done marks.

    sf = SurfaceWriter.create(path, job, hashes, grid, dirs, meta, quantities)   # or begin(path): resume
    sf.write_chunk(result)     # a transport.runner.ChunkResult
    sf.commit_due()            # between messages: the group commit
    sf.finish()
"""

from __future__ import annotations

import os
import time
from typing import Optional

import h5py
import numpy as np

from ..cells.grid import Grid
from ..config import Job
from ..directions.record import Directions
from ..errors import UserError
from .layout import (
    CHUNK_DTYPE,
    DEFAULT_QUANTITIES,
    LOG_FULL,
    RUN_ATTRS,
    _fixed,
    estimate_bytes,
    git_revision,
    layout,
    now_iso,
)
from .reader import SurfaceReader

# Group commit: finished chunks are kept in memory and written (values, then their done marks)
# at most this often, or every COMMIT_CHUNKS chunks, not one by one. A SIGKILL loses at most
# this much finished work (recomputed by the next run); SIGTERM and errors commit first.
COMMIT_S = 1.0
COMMIT_CHUNKS = 256


def size(n: float) -> str:
    """Bytes in the unit that fits: 812 kB, 3.4 MB, 21 GB."""
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{int(n)} bytes"


def free_bytes(folder: str) -> int:
    import shutil
    return shutil.disk_usage(folder).free


def check_room(path: str, ncells: int, values_per_cell: int, direction_values: int) -> None:
    """Refuse a new file its folder has no room for (every dataset is allocated at creation):
    before the file is made, and before its directions are (the run asks with their count)."""
    folder = os.path.dirname(os.path.abspath(path))
    need = estimate_bytes(ncells, values_per_cell, direction_values)
    free = free_bytes(folder)
    if need > free:
        raise UserError(f"output {path}: the file needs about {size(need)} and {folder} has {size(free)} free")


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
    def create(cls, path: str, job: Job, hashes: dict, grid: Grid, dirs: Directions, meta: dict,
               quantities: dict = None) -> "SurfaceWriter":
        """A new file (replacing what the path held only once it is complete), opened by begin."""
        cls._create(path, job, hashes, grid, dirs, meta, quantities or DEFAULT_QUANTITIES)
        return cls.begin(path)

    @staticmethod
    def _create(path: str, job: Job, hashes: dict, grid: Grid, dirs: Directions, meta: dict, quantities: dict) -> None:
        check_room(path, grid.ncells, len(job.splits) * len(quantities),
                   sum(t.numel() for p in [dirs] + dirs.planes for d in p.tensors().values() for t in d.values()))
        tmp = path + ".creating"
        try:
            with h5py.File(tmp, "w") as f:
                layout(f, job, hashes, grid, dirs, meta, quantities)
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
