"""One surface run: the room the runner (transport/runner.py) talks to. It composes what the
other parts do: the output file (store), the job's identity (identity), what it reads
(loading), which cells next (schedule), and the evaluator (evaluation).

    code = run_surface(ctx, lambda: job, RunOptions(overwrite=False), Source(), should_stop)
    # which is: runner.run(ctx, SurfaceRun(ctx, get_job, options, source, should_stop), should_stop)

What the runner calls, in its order (the message sequence is in runner.py):
  rank 0     prepare()       lock and check the output, train if needed, create or resume the
                             file, build rank 0's evaluator and the schedule -> the payload
  workers    build(payload)  their own evaluator, with rank 0's batch size and cells per pass
  all        evaluate(cells) values (n, nsplits, nquantities) for flat cell indices
  rank 0     start(hosts)    every rank is up: the log lines and the progress display
  rank 0     take_result(r)  a finished chunk (runner.ChunkResult) to the file and the schedule
  rank 0     tick()          between messages: the group commit when due
  rank 0     close(outcome)  "done" | "stopped" | "failed": commit, close, release the lock
"""

from __future__ import annotations

import ctypes
import dataclasses
import gc
import os
import sys
import time
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import torch

from ..inputs import identity
from ..config import Job
from ..errors import UserError
from ..evaluation.evaluator import Evaluator, device_for_rank
from ..evaluation.groups import GroupSpec, all_reduce_sum, init_process_group, shard_rows
from ..evaluation.tasks import Task
from ..cells.grid import Grid, auto_chunk_size
from ..directions import kinds
from ..directions.record import Directions
from ..inputs import rows
from ..inputs.loading import Loaded, Source, bn_data
from ..cells.schedule import Adaptive, Sweep
from ..store import Output
from ..store.writer import check_room, size
from ..transport import runner
from ..transport.progress import Progress
from .threads import automatic, set_threads, timed
from .train import ensure_checkpoint
from ..workloads import notes


def log(msg: str) -> None:
    print(f"lldist: {msg}", flush=True)


@dataclass(frozen=True)
class RunOptions:
    overwrite: bool = False  # replace an output made by another job (once the new file exists)
    progress_every: float = 10.0  # seconds between progress lines when not on a terminal; 0: none


@dataclass
class Payload:
    """What rank 0 sends every worker: the job, the stored directions, and the numbers rank 0
    fixed for every rank (the last float bits of a loss depend on them)."""
    job: Job
    dirs: Directions  # as the file keeps them: arrays, or a recipe each rank regenerates
    batch_size: int
    cells_per_pass: int
    threads: int = 0  # the CPU threads chosen for this file when the job leaves them automatic (0: each rank's own)
    by_rows: bool = False  # a shard group builds its model on the meta device and reads its rows (inputs/rows.py)


def available_memory() -> int:
    """Bytes of memory available now (0 where the system does not say)."""
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 0


def _return_freed_memory() -> None:
    """Hand the heap's freed pages back to the OS. Building the evaluator frees what it no longer
    needs (a sharded rank: the whole model and theta*), but glibc keeps freed heap memory for
    reuse, so a rank's resident size stayed at its build peak (GPT-2, groups of two: 2.8 GB
    held, 2.0 GB after this)."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to ask
        pass


M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter
LARGE_BLOCK = 1 << 20


def _return_memory_at_once() -> None:
    """Blocks of 1 MiB and more straight from mmap, handed back to the OS when freed. glibc
    otherwise raises its mmap threshold as large blocks come and go (up to 32 MiB) and keeps
    what they free in its heap, so a rank's resident set carried the garbage of its last
    forward and build (GPT-2 in a shard group of two: 300 MB, a fifth of its peak; each
    cell's temporaries are then mapped afresh, which bench groups measures)."""
    try:
        ctypes.CDLL("libc.so.6").mallopt(M_MMAP_THRESHOLD, LARGE_BLOCK)
    except (OSError, AttributeError):  # not glibc: its own policy
        pass


def _quiet(msg: str) -> None:
    pass


def make_evaluator(job: Job, loaded: Loaded, dirs: Directions, device: str, batch_size, cells_per_pass,
                   task: Task, group: Optional[GroupSpec] = None, curvature_model=None) -> Evaluator:
    cfg = dataclasses.replace(job.eval, batch_size=batch_size, cells_per_pass=cells_per_pass)
    curve = (job.directions.curve or "bezier") if dirs.bend is not None else None  # x is t along it
    # a model read by rows reads θ*'s rows again at each cell rather than keep a copy of them
    reread = loaded.rows.rereader if loaded.rows is not None and group is not None and group.mode == "shard" else None
    try:
        return Evaluator(loaded.model, loaded.theta, dirs, loaded.splits, cfg, device=device, task=task, group=group,
                         curve=curve, bn_data=bn_data(job, loaded), curvature_model=curvature_model, reread=reread)
    except ValueError as e:  # options the data or task cannot take
        raise UserError(f"{job.source}: {e}")


class SurfaceRun:
    """One job's surface, on one rank; see the module docstring for what the runner calls."""

    rank0_computes = True
    group_size = 1  # eval.group_size, once prepare read the job

    def __init__(self, ctx: runner.Context, get_job: Callable[[], Job], options: RunOptions = RunOptions(),
                 source: Source = Source(), should_stop: Callable[[], Optional[int]] = lambda: None):
        self.ctx, self.get_job, self.options, self.source, self.should_stop = ctx, get_job, options, source, should_stop
        _return_memory_at_once()
        self.job: Optional[Job] = None
        self.grid: Optional[Grid] = None
        self.output = None  # store.Output (rank 0)
        self.writer = None  # store.SurfaceWriter (rank 0)
        self.schedule = None
        self.evaluator: Optional[Evaluator] = None
        self.device, self.cells_per_pass, self.threads = "cpu", 1, 0
        self.pending = 0  # cells to compute when the run started (at most, on an adaptive grid)
        self.computed = 0  # cells this run has taken from the ranks
        self.t_start = None  # once every rank is up

    # ------------------------------------------------------------------ rank 0
    def prepare(self) -> Payload:
        job = self.job = self.get_job()
        self.output = Output(job.output)
        try:
            return self._prepare(job)
        except BaseException:
            self._release()
            raise

    def _prepare(self, job: Job) -> Payload:
        k = self.group_size = job.eval.group_size
        if k > 1 and (self.ctx.size % k or self.ctx.size < k):
            raise UserError(f"{job.source}: key 'eval.group_size' is {k}, but the run has {self.ctx.size} rank(s): "
                            f"launch a multiple of {k} (mpirun -n {k * max(1, self.ctx.size // k)} ...)")
        self.threads = set_threads(job, self.ctx.cpus, log)  # (training uses them too; timed on cells below)
        # an output this job may not write is refused now, not after an hour of training
        if not job.grid_auto:  # (an automatic grid's identity is known once the trajectory is read: below)
            self.output.refuse_foreign(identity.config(job), self.options.overwrite, job.text)
        ensure_checkpoint(job, self.should_stop, log)
        loaded = self._load(job)
        task = self.source.make_task(job)
        job = kinds.resolved(job, loaded, log)
        # the loss, metrics and outputs tried on two examples, before any file exists (a model
        # loaded by rows is tried by its group, on the rows: build)
        for data in loaded.splits.values() if loaded.rows is None else ():
            task.check(loaded.model, next(iter(data.batches(2))), getattr(data, "num_classes", 0))
        inputs = {**identity.inputs(job, task), **kinds.inputs(job), **(self.source.files or {})}
        hashes = {"job": identity.job(job, inputs), "config": identity.config(job)}
        self.grid = Grid(job.grid.x, job.grid.y, job.directions.repeats)
        meta = {"checkpoint_meta": loaded.meta, "checkpoint_sha256": inputs.get("checkpoint", ""),
                "num_parameters": sum(p.numel() for p in loaded.model.parameters()),
                "eval_samples": {k: len(v) for k, v in loaded.splits.items()}}
        if job.grid.adaptive is not None:  # how to read the file back (store.SurfaceReader.adaptive)
            ad = job.grid.adaptive  # stored resolved: the reader needs the stride and the budget in cells
            meta["grid_adaptive"] = {**dataclasses.asdict(ad), "coarse": ad.stride(job.grid), "budget": ad.cells(job.grid)}
        quantities = {q: task.long_name(q, "{split}") for q in task.names}
        kept = {}

        def check(sf) -> None:
            """A file to resume, read-only: it holds this task's quantities, and directions this
            model can take (rank 0 regenerates a recipe in full, with its checksums, unless its
            group shares the work)."""
            if sf.quantities != list(task.names):
                raise UserError(f"output {job.output} holds {', '.join(sf.quantities)}, this job computes "
                                f"{', '.join(task.names)}; use --out for a new file or --overwrite to replace it")
            kept["stored"] = sf.read_directions()
            kept["dirs"] = kinds.materialize(kept["stored"], job, loaded) if k == 1 else \
                kinds.check_stored(kept["stored"], job, loaded)
        sf = self.writer = self.output.open(
            job, hashes, self.grid, lambda: self._directions(job, loaded, task, len(job.splits) * len(quantities)),
            meta, self.options.overwrite, quantities, check)
        old_threads = sf.attr("eval_threads") if automatic(job) else None
        # every evaluation, first run or resume, uses the stored copy
        stored = kept["stored"] if kept else sf.read_directions()
        self.device = device_for_rank(self.ctx.local_rank, job.eval.device)
        if k > 1:  # rank 0 evaluates with its group: its evaluator is built with theirs (build)
            self.schedule = self._schedule(job)
            return Payload(job, stored, job.eval.batch_size, 1, self._same_threads(job, sf, old_threads),
                           loaded.rows is not None)
        # (regenerated here when the file keeps a recipe)
        dirs = kept["dirs"] if kept else kinds.materialize(stored, job, loaded)
        # rank 0 fixes the batch size and cells per pass for every rank: the last float bits
        # of a loss depend on them. "auto" is calibrated once and stored in the file, so a
        # resume reuses it; a number in the job is the user's choice and always wins.
        batch, group = job.eval.batch_size, job.eval.cells_per_pass
        if batch == "auto" and sf.attr("eval_batch_size") is not None:
            batch = int(sf.attr("eval_batch_size"))
        if group == "auto" and sf.attr("eval_cells_per_pass") is not None:
            group = int(sf.attr("eval_cells_per_pass"))
        ev = self.evaluator = make_evaluator(job, loaded, dirs, self.device, batch, group, task)
        if old_threads is None and automatic(job) and self.device == "cpu":  # a new file's count: timed on cells
            self.threads = timed(lambda: ev.evaluate_cells([(0.0, 0.0)] * ev.cells_per_pass),
                                 self.threads, self.grid.ncells, log)
        threads = self._same_threads(job, sf, old_threads)
        if not sf.points_done():  # kind plane: the three models, each from its own file, before the grid
            sf.write_points(np.stack([ev.evaluate_state(st) for st in kinds.points(job, loaded)]))
            log("the plane's three points evaluated from their own files")
        sf.set_attr("eval_batch_size", ev.batch_size)
        sf.set_attr("eval_cells_per_pass", ev.cells_per_pass)
        self.cells_per_pass = ev.cells_per_pass
        self.schedule = self._schedule(job)
        return Payload(job, stored, ev.batch_size, ev.cells_per_pass, threads)  # a recipe travels as the recipe

    def _load(self, job: Job) -> Loaded:
        """What rank 0 prepares from: in a shard group whose model can be read by rows, the
        model's shapes alone (no rank holds it whole); else the whole model, saying why."""
        why = rows.whole_because(job, self.source)
        if why is None:
            try:
                loaded = rows.shapes(job)
            except rows.Unbuildable as e:
                why = str(e)
            else:
                if kinds.kept_as_recipe(job, loaded):
                    log(f"model {job.model.name}: built on the meta device, each rank of a group reading its rows "
                        f"of {identity.theta_source(job)}")
                    return loaded
                why = "its directions are kept as tensors (directions.store: recipe reads them by rows)"
        if job.eval.group_size > 1 and job.eval.group_mode == "shard":
            log(f"note: model {job.model.name} is built whole on every rank before it is sharded: {why}")
        return self.source.load(job)

    def _same_threads(self, job: Job, sf, old) -> int:
        """An automatic thread count (runs/threads.py: it follows the machine's load) is chosen
        once per file: a resume takes the first run's (`old`), so that its cells' last float
        bits are those an unbroken run gives; every rank takes rank 0's. 0 when the user chose."""
        if automatic(job):
            if old and int(old) != self.threads:
                self.threads = set_threads(job, int(old), fixed=True)
                log(f"{self.threads} CPU thread(s), as this file's first run chose (the numbers stay the same)")
            sf.set_attr("eval_threads", self.threads)
            return self.threads
        return 0

    def _directions(self, job: Job, loaded: Loaded, task: Task, values_per_cell: int) -> Directions:
        """A new file's directions, once there is room for every plane's (directions.repeats):
        on the disk, where the file allocates them, and in each rank's memory, where the
        evaluator holds them (refused before any is made, not after hours of making them)."""
        planes, entries = job.directions.repeats, sum(t.numel() for t in loaded.theta.values())
        check_room(job.output, self.grid.ncells, values_per_cell, planes * job.ndim * entries)
        held = planes * job.ndim * sum(t.numel() * t.element_size() for t in loaded.theta.values())
        free = available_memory()
        if planes > 1 and free and held > free / 2:
            raise UserError(f"{job.source}: key 'directions.repeats': {planes:,} planes of {entries:,} parameters "
                            f"hold {size(held)} of directions on every rank, more than half of the {size(free)} "
                            "of memory available here")
        return kinds.make(kinds.Making(job, loaded, task, self.source, log))

    def _schedule(self, job: Job):
        done = self.writer.taken()  # the writer's own mask, shared with the schedule: read from the file once
        self.pending = int(done.size - np.count_nonzero(done))
        chunk = job.eval.chunk_size if job.eval.chunk_size != "auto" else auto_chunk_size(self.pending, self.ctx.size)
        ad = job.grid.adaptive
        if ad is None:
            return Sweep(done, chunk)
        # the deciding quantity: the first split's loss (NaN where not computed)
        known = np.where(done, self.writer.array(job.splits[0], "loss"), np.nan)
        return Adaptive(self.grid.plane_shape, self.grid.planes, done, known, chunk, ad.stride(job.grid),
                        ad.tolerance, ad.levels, ad.cells(job.grid), workers=max(1, self.ctx.size // self.group_size))

    def start(self, hosts: dict) -> Progress:
        job, grid, ev = self.job, self.grid, self.evaluator
        for r, (h, d) in sorted(hosts.items()):
            log(f"rank {r}/{self.ctx.size} on {h}: {d}")
        k = self.group_size
        if k > 1:
            log(f"{self.ctx.size // k} groups of {k} ranks ({job.eval.group_mode}): ranks "
                + ", ".join(f"{g}-{g + k - 1}" for g in range(0, self.ctx.size, k)))
            for g in range(0, self.ctx.size, k):
                nodes = sorted({hosts[r][0] for r in range(g, g + k) if r in hosts})
                if len(nodes) > 1:  # works, but every gather of a sharded block crosses the network
                    log(f"note: the group of ranks {g}-{g + k - 1} spans nodes {', '.join(nodes)}; place "
                        f"consecutive ranks on one node (Slurm's block distribution, mpirun --map-by slot)")
        adaptive = job.grid.adaptive is not None
        log(f"job {job.name} -> {job.output}: {grid.ncells} cells ({' x '.join(map(str, grid.shape))}), "
            f"{'at most ' + str(self.pending) if adaptive else self.pending} to compute "
            f"({self.schedule.describe()}), {self.ctx.size} rank(s), "
            f"batch {ev.batch_size}, {ev.cells_per_pass} cell(s) per pass, {self.threads} thread(s) on rank 0, "
            f"splits {', '.join(job.splits)}")
        cos = self.writer.attr("cosine_xy", group="directions")
        if cos is not None:
            log(f"cosine(x, y) of the directions: {cos:+.4f}")
        self.t_start = time.perf_counter()
        return Progress(grid.ncells, grid.ncells - self.pending, every=self.options.progress_every,
                        queued=self.schedule.queued if adaptive else None)

    def take_result(self, r: runner.ChunkResult) -> int:
        saved = self.writer.write_chunk(r)
        if self.group_size > 1:
            # rank 0 computes its next chunk in collectives with its group: a member that fails
            # there leaves it blocked until the job is aborted, with no chance to commit. So what
            # it holds is committed now (a flush a chunk: group cells are the costly ones)
            saved += self.writer.commit()
        self.schedule.returned(np.asarray(r.cells), np.asarray(r.values)[:, 0, 0])  # first split's loss
        self.computed += len(r.cells)
        return saved

    def tick(self) -> int:
        return self.writer.commit_due()

    def close(self, outcome: str, cost: Optional[dict]) -> None:
        try:
            if outcome == "done":
                self._finish(cost)
            elif self.writer is not None and self.writer.f.id.valid:
                self.writer.commit()
                print(f"lldist: {int(self.writer.done().sum())}/{self.grid.ncells} cells done and saved in "
                      f"{self.job.output}", file=sys.stderr, flush=True)
        finally:
            self._release()

    def _finish(self, cost: Optional[dict]) -> None:
        sf, grid, adaptive = self.writer, self.grid, self.job.grid.adaptive is not None
        dt = time.perf_counter() - self.t_start
        if cost and cost["messages"]:
            ms = 1000 * cost["seconds"] / cost["messages"]
            sf.set_attr("coordinator_ms_per_message", ms, flush=False)
            svc = 1000 * np.asarray(cost["service"]) if cost["service"] else np.full(1, np.nan)
            stats = {"median": float(np.median(svc)), "p99": float(np.percentile(svc, 99)), "max": float(svc.max())}
            for k, v in stats.items():
                sf.set_attr(f"coordinator_ms_{k}", v, flush=False)
            sf.set_attr("coordinator_results", cost["results"])
            log(f"coordinator: {cost['messages']} worker messages, {ms:.3f} ms each on average; per result "
                f"{stats['median']:.3f} ms median, {stats['p99']:.3f} ms p99, {stats['max']:.3f} ms at most "
                "(receive, take, answer)")
        if adaptive:
            n = int(np.count_nonzero(sf.taken()))
            err = max(self.schedule.errors)
            log(f"adaptive: {n}/{grid.ncells} cells computed ({100 * n / grid.ncells:.1f}%), the rest interpolated; "
                f"estimated error {err:.3g} of a contour spacing ({self.job.grid.adaptive.levels} levels), "
                f"after {max(self.schedule.tiers)} tiers")
        sf.finish(complete=True if adaptive else None)
        n = self.computed
        log(f"done: {n} cells in {dt:.3f}s ({n / dt if dt > 0 else 0:.2f} cells/s) -> {self.job.output}")

    def _release(self) -> None:
        if self.writer is not None:
            self.writer.close()
        if self.output is not None:
            self.output.release()

    # ------------------------------------------------------------------ every rank
    def build(self, payload: Payload, group=None) -> str:
        """Every rank but 0 (and rank 0 too in groups): its evaluator, with rank 0's batch size
        and cells per pass. `group`: the runner's Group of this rank (eval.group_size > 1): the
        group's process group is made here, together, and a sharded group regenerates only its
        rows of directions kept as a recipe."""
        job = self.job = payload.job
        if self.ctx.rank != 0:  # what loading says, rank 0 said already
            notes.quiet()
        self.grid = Grid(job.grid.x, job.grid.y, job.directions.repeats)
        set_threads(job, payload.threads or self.ctx.cpus, fixed=bool(payload.threads))
        self.device = device_for_rank(self.ctx.local_rank, job.eval.device)
        spec = None
        if group is not None and group.size > 1:
            spec = GroupSpec(group.rank, group.size, job.eval.group_mode)
            init_process_group(spec, group.bcast, self.device, group.collective_link(self.device))
        task = self.source.make_task(job)
        if payload.by_rows:  # on the meta device, sharded, each rank reading its own rows
            loaded = rows.by_rows(job, spec, self.device)
            for data in loaded.splits.values():  # (collective: each block's rows are gathered)
                task.check(loaded.model, next(iter(data.batches(2))), getattr(data, "num_classes", 0))
        else:
            loaded = self.source.load(job)
        mine = None
        if spec is not None and spec.mode == "shard":  # FSDP2 splits every parameter's dim 0
            params = {n for n, _ in loaded.model.named_parameters()}
            mine = {n: shard_rows(w.shape[0], spec.size, spec.rank) for n, w in loaded.theta.items()
                    if n in params and w.dim()}
        dirs = kinds.materialize(payload.dirs, job, loaded, mine)
        if mine is not None:
            kinds.check_rows(dirs, payload.dirs, job, loaded, mine, all_reduce_sum)
        twin = None
        if spec is not None and spec.mode == "shard" and task.curvature:
            # per-cell curvature maps: their products are differences of the sharded gradient,
            # taken in a float64 copy of the sharded model (evaluator.Evaluator._sharded_curvature)
            # (gathered in float64 too, whatever eval.precision: fp32 says the policy gathers as held)
            fp = dataclasses.replace(job, eval=dataclasses.replace(job.eval, precision="fp32"))
            twin = rows.for_group(fp, self.source, spec, self.device, log if self.ctx.rank == 0 else _quiet,
                                  torch.float64).model
        self.evaluator = make_evaluator(job, loaded, dirs, self.device, payload.batch_size, payload.cells_per_pass,
                                        task, spec, curvature_model=twin)
        del loaded, dirs  # a sharded rank keeps its rows only: the whole theta* and model go
        _return_freed_memory()
        self.cells_per_pass = self.evaluator.cells_per_pass
        return self.device

    def evaluate(self, cells: np.ndarray) -> np.ndarray:
        grid, ev = self.grid, self.evaluator
        if grid.planes == 1:
            return ev.evaluate_cells([grid.coords(k) for k in cells])
        planes = np.asarray(cells) // grid.plane_cells  # a chunk is runs of cells of one plane
        out = []
        for lo, hi in zip(np.r_[0, np.flatnonzero(np.diff(planes)) + 1], np.r_[np.flatnonzero(np.diff(planes)) + 1,
                                                                                len(cells)]):
            ev.use_plane(int(planes[lo]))
            out.append(ev.evaluate_cells([grid.coords(k) for k in cells[lo:hi]]))
        return np.concatenate(out)


def run_surface(ctx: runner.Context, get_job: Callable[[], Job], options: RunOptions = RunOptions(),
                source: Source = Source(), should_stop: Callable[[], Optional[int]] = lambda: None) -> int:
    """Compute one job's surface with every rank of `ctx` (collective: all ranks call it).
    `get_job` is called on rank 0 only; `source` (every rank's own) says where model, data and
    task come from when they are not the job file's. Returns the exit status (0 when done)."""
    return runner.run(ctx, SurfaceRun(ctx, get_job, options, source, should_stop), should_stop)
