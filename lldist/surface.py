"""Compute a loss landscape into one HDF5 file.

    python -m lldist.surface jobs/quickstart.yaml                 # one process, CPU or one GPU
    mpirun -n 8 python -m lldist.surface jobs/cifar10_cnn.yaml    # one rank per GPU
    python -m lldist.surface job.yaml --set grid.x=[-1,1,51] --out runs/x.h5 [--overwrite]

Re-running the same command resumes: only cells not marked done are computed. A file made by
a different job is refused (exit status 2) unless --overwrite is given.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import torch

from .config import Job, identity_hash, load_job, sha256_file
from .directions import make_directions, model_state
from .errors import UserError, run_cli
from .evaluation.evaluator import Evaluator
from .evaluation.tasks import Task, task_from_config
from .grid import Grid, auto_chunk_size
from .store import Lock, SurfaceWriter, check_resumable, check_writable
from .transport import runner
from .transport.progress import Progress
from .transport.schedule import Adaptive, Sweep
from .workloads.data import data_fingerprint, load_split
from .workloads.models import build_model, load_checkpoint


def log(msg: str) -> None:
    print(f"lldist: {msg}", flush=True)


@dataclass
class Loaded:
    model: torch.nn.Module
    theta: dict
    kinds: dict
    splits: dict  # split name -> TensorSet (CPU)
    meta: dict  # checkpoint metadata (train/test accuracy at training time)


def load_model_and_data(job: Job) -> Loaded:
    """Everything each rank loads once: evaluation data, model at theta*."""
    if job.model.name.startswith("object:") or job.data.name.startswith("object:"):
        raise UserError(f"{job.source}: object: models and data are given from Python (lldist.landscape)")
    splits = {s: load_split(job.data, s, model_name=job.model.name) for s in job.splits}
    first = next(iter(splits.values()))
    model = build_model(job.model, first.in_shape, first.num_classes)
    meta = load_checkpoint(model, job.model.checkpoint) if job.model.checkpoint else {}
    theta, kinds = model_state(model)
    return Loaded(model, theta, kinds, splits, meta)


def ensure_checkpoint(job: Job, should_stop=lambda: None) -> None:
    """Train first when the job names a checkpoint that does not exist yet and can train."""
    ck = job.model.checkpoint
    if ck and not os.path.exists(ck):
        if job.train is None:
            raise UserError(f"{job.source}: key 'model.checkpoint': {ck} does not exist")
        from .train import train
        log(f"checkpoint {ck} missing: training it first")
        train(job, log=log, should_stop=should_stop)


def checkpoint_state(job: Job, loaded: Loaded, path: str) -> dict:
    """The float state of the job's model with another checkpoint loaded (a target, a
    trajectory's epoch)."""
    first = next(iter(loaded.splits.values()))
    other = build_model(job.model, first.in_shape, first.num_classes)
    load_checkpoint(other, path)
    return model_state(other)[0]


def trajectory_files(job: Job) -> list:
    """pca: the trajectory's checkpoints, in training order, the final one excluded."""
    import glob
    import re
    pattern = job.directions.checkpoints
    if pattern is None:
        if not job.model.checkpoint:
            raise UserError(f"{job.source}: directions.kind: pca needs directions.checkpoints or a model.checkpoint "
                            "whose <stem>_epoch<N>.pt series is the trajectory")
        pattern = os.path.splitext(job.model.checkpoint)[0] + "_epoch*.pt"
    final = os.path.abspath(job.model.checkpoint) if job.model.checkpoint else None

    def order(path):
        nums = re.findall(r"\d+", os.path.basename(path))
        return (int(nums[-1]) if nums else -1, path)
    files = sorted((f for f in glob.glob(pattern) if os.path.abspath(f) != final), key=order)
    if len(files) < 2:
        raise UserError(f"{job.source}: directions.kind: pca found {len(files)} checkpoint(s) matching {pattern}; "
                        "it needs at least 2 besides the final one")
    return files


def fingerprints(job: Job) -> dict:
    """What the job reads from files, for its identity: checkpoint, target, trajectory,
    directions of another file, and data."""
    files = {}
    if job.model.checkpoint:
        files["checkpoint"] = sha256_file(job.model.checkpoint)
    if job.directions.target:
        files["target"] = sha256_file(job.directions.target)
    if job.directions.kind == "pca":
        files["trajectory"] = [sha256_file(f) for f in trajectory_files(job)]
    if job.directions.kind == "file":
        from .store import directions_digest
        files["directions_file"] = directions_digest(job.directions.file)
    data = data_fingerprint(job.data, job.splits)
    if data:
        files["data"] = data
    return files


def special_directions(job: Job, loaded: Loaded, task: Task, log=lambda m: None) -> dict:
    """pca, hessian and file directions, with what the file keeps beside them ("_info":
    attributes of /directions, "_trajectory": the checkpoints' coordinates)."""
    kind, ndim = job.directions.kind, job.ndim
    if kind == "file":
        from .store import SurfaceReader
        with SurfaceReader(job.directions.file) as sf:
            theirs = sf.read_directions()
        for axis in ("x", "y")[:ndim]:
            if axis not in theirs:
                raise UserError(f"{job.source}: directions.file {job.directions.file} has no {axis} direction")
            if set(theirs[axis]) != set(loaded.theta) or any(theirs[axis][n].shape != w.shape for n, w in loaded.theta.items()):
                raise UserError(f"{job.source}: directions.file {job.directions.file} was made for another model "
                                "(its directions' entries or shapes differ from this model's state)")
        return {axis: {n: theirs[axis][n].to(w.dtype) for n, w in loaded.theta.items()} for axis in ("x", "y")[:ndim]}
    if kind == "pca":
        from .directions import pca_directions
        files = trajectory_files(job)
        states = [checkpoint_state(job, loaded, f) for f in files]
        try:
            dirs, info, coords = pca_directions(loaded.theta, loaded.kinds, states, job.directions.ignore)
        except ValueError as e:
            raise UserError(f"{job.source}: directions.kind: pca: {e}")
        log(f"pca of {len(files)} checkpoints: explained variance {info['explained_variance_ratio'][0]:.3f}, "
            f"{info['explained_variance_ratio'][1]:.3f}")
        info["checkpoints"] = [os.path.basename(f) for f in files]
        lo, hi = coords.min(0).values.tolist(), coords.max(0).values.tolist()
        log(f"trajectory of {len(files)} checkpoints spans alpha [{lo[0]:.3g}, {hi[0]:.3g}], beta [{lo[1]:.3g}, "
            f"{hi[1]:.3g}] (the final checkpoint is at 0, 0): the grid should cover it")
        dirs = {a: dirs[a] for a in ("x", "y")[:ndim]}
        dirs["_info"], dirs["_trajectory"] = info, coords
        return dirs
    # hessian: the top eigenvectors at theta*
    from .evaluation.curvature import Curvature, first_batches
    first = next(iter(loaded.splits.values()))
    batches = first_batches(first, job.eval.batch_size, job.directions.batches)
    curv = Curvature(loaded.model, batches, task)
    vals, vecs = curv.eigs(k=ndim, which="LA")
    log(f"hessian directions: top eigenvalues {', '.join(f'{v:.5g}' for v in vals)} "
        f"({curv.matvecs} Hessian-vector products on {len(batches)} batches)")
    dirs = {axis: curv.as_state(vecs[:, i], loaded.theta) for i, axis in enumerate(("x", "y")[:ndim])}
    dirs["_info"] = {"hessian_eigenvalues": [float(v) for v in vals], "hessian_batches": len(batches),
                     "hessian_batch_size": job.eval.batch_size}
    return dirs


def make_evaluator(job: Job, loaded: Loaded, dirs: dict, device: str, batch_size, cells_per_pass,
                   task: Task) -> Evaluator:
    cfg = dataclasses.replace(job.eval, batch_size=batch_size, cells_per_pass=cells_per_pass)
    try:
        return Evaluator(loaded.model, loaded.theta, dirs, loaded.splits, cfg, device=device, task=task)
    except ValueError as e:  # options the data or task cannot take
        raise UserError(f"{job.source}: {e}")


def set_threads(job: Job, ctx: runner.Context) -> int:
    """CPU threads for torch: the job's eval.threads, else OMP_NUM_THREADS, else this rank's
    share of the CPUs it may run on (runner.cpu_share). Returns the number chosen."""
    omp = os.environ.get("OMP_NUM_THREADS", "")
    n = job.eval.threads or (int(omp) if omp.isdigit() and int(omp) > 0 else 0) or ctx.cpus
    if n:
        torch.set_num_threads(n)
    return torch.get_num_threads()


def cells_function(ev: Evaluator, grid: Grid):
    return lambda cells: ev.evaluate_cells([grid.coords(k) for k in cells])


@dataclass
class Source:
    """Where a run's model, data and task come from: the job file (the defaults), or objects
    given from Python (lldist.landscape), with the fingerprints that stand for them."""
    loader: Callable[[Job], Loaded] = None  # job -> Loaded; None: load_model_and_data
    task: Optional[Task] = None  # None: the job's eval.loss and eval.metrics
    files: Optional[dict] = None  # extra identity entries (fingerprints of objects)
    target: Optional[dict] = None  # theta' as a state, instead of directions.target's file

    def load(self, job: Job) -> Loaded:
        return (self.loader or load_model_and_data)(job)

    def make_task(self, job: Job) -> Task:
        return self.task or task_from_config(job.eval)


def plan(ctx: runner.Context, job: Job, overwrite: bool, progress_every: float, should_stop,
         source: Source = Source()) -> runner.Plan:
    """Rank 0: lock the output, check it, train if needed, open or create the file, build
    rank 0's evaluator; say what the ranks compute and how results are stored."""
    check_writable(job.output)
    lock = Lock(job.output)
    sf = None
    threads = set_threads(job, ctx)  # before training, which uses them too
    try:
        # an output this job may not write is refused now, not after an hour of training
        check_resumable(job.output, identity_hash(job), overwrite)
        ensure_checkpoint(job, should_stop)
        if job.directions.target and not os.path.exists(job.directions.target):
            raise UserError(f"{job.source}: key 'directions.target': {job.directions.target} does not exist")
        loaded = source.load(job)
        task = source.make_task(job)
        hashes = {"job": identity_hash(job, {**fingerprints(job), **(source.files or {})}),
                  "config": identity_hash(job)}
        grid = Grid(job.grid.x, job.grid.y)

        def make_dirs():
            kind = job.directions.kind
            if kind in ("random", "target"):
                tgt = source.target if source.target is not None else \
                    (checkpoint_state(job, loaded, job.directions.target) if job.directions.target else None)
                return make_directions(loaded.theta, loaded.kinds, job.directions, job.ndim, tgt)
            return special_directions(job, loaded, task, log)

        meta = {"checkpoint_meta": loaded.meta, "checkpoint_sha256": sha256_file(job.model.checkpoint)
                if job.model.checkpoint else "",
                "num_parameters": sum(p.numel() for p in loaded.model.parameters()),
                "eval_samples": {k: len(v) for k, v in loaded.splits.items()}}
        if job.grid.adaptive is not None:  # how to read the file back (store.SurfaceReader.adaptive)
            meta["grid_adaptive"] = dataclasses.asdict(job.grid.adaptive)
        sf = SurfaceWriter.create_or_resume(job.output, job, hashes, grid, make_dirs, meta, overwrite,
                                            {q: task.long_name(q, "{split}") for q in task.names})
        if sf.quantities != list(task.names):
            raise UserError(f"output {job.output} holds {', '.join(sf.quantities)}, this job computes "
                            f"{', '.join(task.names)}; use --out for a new file or --overwrite to replace it")
        dirs = sf.read_directions()  # every evaluation, first run or resume, uses the stored copy
        device = runner.pick_device(ctx, job.eval.device)
        # rank 0 fixes the batch size and cells per pass for every rank: the last float bits
        # of a loss depend on them. "auto" is calibrated once and stored in the file, so a
        # resume reuses it; a number in the job is the user's choice and always wins.
        batch, group = job.eval.batch_size, job.eval.cells_per_pass
        if batch == "auto" and sf.attr("eval_batch_size") is not None:
            batch = int(sf.attr("eval_batch_size"))
        if group == "auto" and sf.attr("eval_cells_per_pass") is not None:
            group = int(sf.attr("eval_cells_per_pass"))
        ev = make_evaluator(job, loaded, dirs, device, batch, group, task)
        sf.set_attr("eval_batch_size", ev.batch_size)
        sf.set_attr("eval_cells_per_pass", ev.cells_per_pass)
    except BaseException:
        if sf is not None:
            sf.close()
        lock.release()
        raise

    done = sf.taken()  # the writer's own mask, shared with the schedule: read from the file once
    npending = int(done.size - np.count_nonzero(done))
    chunk = job.eval.chunk_size if job.eval.chunk_size != "auto" else auto_chunk_size(npending, ctx.size)
    ad = job.grid.adaptive
    if ad is None:
        schedule = Sweep(done, chunk)
    else:
        # the deciding quantity: the first split's loss (NaN where not computed)
        known = np.where(done, sf.array(job.splits[0], "loss"), np.nan)
        schedule = Adaptive(grid.shape, done, known, chunk, ad.coarse, ad.tolerance, ad.levels)
    del done
    started = {}  # the clock starts once every rank is up

    def start(hosts: dict) -> Progress:
        for r, (h, d) in sorted(hosts.items()):
            log(f"rank {r}/{ctx.size} on {h}: {d}")
        log(f"job {job.name} -> {job.output}: {grid.ncells} cells ({' x '.join(map(str, grid.shape))}), "
            f"{npending if ad is None else 'at most ' + str(npending)} to compute "
            f"({schedule.describe()}), {ctx.size} rank(s), "
            f"batch {ev.batch_size}, {ev.cells_per_pass} cell(s) per pass, {threads} thread(s) on rank 0, "
            f"splits {', '.join(job.splits)}")
        cos = sf.attr("cosine_xy", group="directions")
        if cos is not None:
            log(f"cosine(x, y) of the directions: {cos:+.4f}")
        started["t"] = time.perf_counter()
        return Progress(grid.ncells, grid.ncells - npending, every=progress_every)

    def write(r: runner.ChunkResult) -> int:
        saved = sf.write_chunk(r.cells, r.values, r.rank, r.host, r.device, r.t_start, r.t_end)
        schedule.returned(np.asarray(r.cells), np.asarray(r.values)[:, 0, 0])  # first split's loss
        computed[0] += len(r.cells)
        return saved

    computed = [0]

    def close(outcome: str, cost) -> None:
        try:
            if outcome == "done":
                dt = time.perf_counter() - started["t"]
                if cost and cost["messages"]:
                    ms = 1000 * cost["seconds"] / cost["messages"]
                    sf.set_attr("coordinator_ms_per_message", ms)
                    log(f"coordinator: {cost['messages']} worker messages, {ms:.2f} ms each (receive, write, answer)")
                if ad is not None:
                    n = int(np.count_nonzero(sf.taken()))
                    log(f"adaptive: {n}/{grid.ncells} cells computed ({100 * n / grid.ncells:.1f}%), "
                        "the rest interpolated")
                sf.finish(complete=True if ad is not None else None)
                n = computed[0]
                log(f"done: {n} cells in {dt:.3f}s ({n / dt if dt > 0 else 0:.2f} cells/s) -> {job.output}")
            else:
                if sf.f.id.valid:
                    sf.commit()
                    print(f"lldist: {int(sf.done().sum())}/{grid.ncells} cells done and saved in {job.output}",
                          file=sys.stderr, flush=True)
                sf.close()
        finally:
            lock.release()

    return runner.Plan(payload=(job, dirs, (ev.batch_size, ev.cells_per_pass)), schedule=schedule,
                       evaluate=cells_function(ev, grid), group=ev.cells_per_pass, device=device,
                       write=write, tick=sf.commit_due, start=start, close=close)


def parse_args(argv):
    ap = argparse.ArgumentParser(prog="python -m lldist.surface", description=__doc__.split("\n")[0])
    ap.add_argument("job", help="job file (YAML)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a job key, e.g. --set grid.x=[-1,1,11] (repeatable)")
    ap.add_argument("--out", help="output file (overrides the job's 'output')")
    ap.add_argument("--overwrite", action="store_true",
                    help="replace an output file made by another job (the new file replaces it once created)")
    ap.add_argument("--progress-every", type=float, default=10.0, metavar="S",
                    help="seconds between progress lines when not on a terminal")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    ctx = runner.launch()
    should_stop = runner.install_sigterm() if ctx.rank == 0 else (lambda: None)
    return run_job(ctx, lambda: load_job(args.job, args.set, args.out), args.overwrite,
                   args.progress_every, should_stop)


def run_job(ctx: runner.Context, get_job, overwrite: bool = False, progress_every: float = 10.0,
            should_stop=lambda: None, source: Source = Source()) -> int:
    """Compute one job's surface with every rank of `ctx` (collective: all ranks call it).
    `get_job` is called on rank 0 only; `source` (every rank's own) says where model, data and
    task come from when they are not the job file's. Returns the exit status (0 when done)."""

    def prepare() -> runner.Plan:
        return plan(ctx, get_job(), overwrite, progress_every, should_stop, source)

    def build(payload) -> runner.Built:
        job, dirs, (batch, group) = payload
        set_threads(job, ctx)
        device = runner.pick_device(ctx, job.eval.device)
        ev = make_evaluator(job, source.load(job), dirs, device, batch, group, source.make_task(job))
        return runner.Built(cells_function(ev, Grid(job.grid.x, job.grid.y)), device)

    return runner.run(ctx, prepare, build, should_stop)


def cli() -> None:
    sys.exit(run_cli(main))


if __name__ == "__main__":
    sys.exit(run_cli(main))
