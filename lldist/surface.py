"""Compute a loss landscape into one HDF5 file.

    python -m lldist.surface jobs/quickstart.yaml                 # one process, CPU or one GPU
    mpirun -n 8 python -m lldist.surface jobs/cifar10_cnn.yaml    # one rank per GPU
    python -m lldist.surface job.yaml --set grid.x=[-1,1,51] --out runs/x.h5 [--overwrite]

Re-running the same command resumes: only cells not marked done are computed. A file made by
a different job is refused (exit status 2) unless --overwrite is given.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import traceback
from dataclasses import dataclass

import torch

from .config import Job, identity_hash, load_job, sha256_file
from .data import load_split
from .directions import make_directions, model_state
from .errors import UserError, run_cli, EXIT_USAGE
from .evaluate import EvalOptions, Evaluator
from .grid import Grid, auto_chunk_size, split_chunks
from .models import build_model, load_checkpoint
from .progress import Progress
from . import runner


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
    splits = {s: load_split(job.data, s) for s in job.splits}
    first = next(iter(splits.values()))
    model = build_model(job.model, first.in_shape, first.num_classes)
    meta = load_checkpoint(model, job.model.checkpoint) if job.model.checkpoint else {}
    theta, kinds = model_state(model)
    return Loaded(model, theta, kinds, splits, meta)


def ensure_checkpoint(job: Job) -> None:
    """Train first when the job names a checkpoint that does not exist yet and can train."""
    ck = job.model.checkpoint
    if ck and not os.path.exists(ck):
        if job.train is None:
            raise UserError(f"{job.source}: key 'model.checkpoint': {ck} does not exist")
        from .train import train
        log(f"checkpoint {ck} missing: training it first")
        train(job, log=log)


def target_state(job: Job, loaded: Loaded) -> dict:
    other = build_model(job.model, next(iter(loaded.splits.values())).in_shape,
                        next(iter(loaded.splits.values())).num_classes)
    load_checkpoint(other, job.directions.target)
    return model_state(other)[0]


def plan(job: Job, overwrite: bool):
    """Rank 0: train if needed, open or create the output file. Returns (loaded, file, dirs)."""
    from .store import SurfaceFile, check_writable
    check_writable(job.output)
    ensure_checkpoint(job)
    if job.directions.target and not os.path.exists(job.directions.target):
        raise UserError(f"{job.source}: key 'directions.target': {job.directions.target} does not exist")
    loaded = load_model_and_data(job)
    files = {}
    if job.model.checkpoint:
        files["checkpoint"] = sha256_file(job.model.checkpoint)
    if job.directions.target:
        files["target"] = sha256_file(job.directions.target)
    job_hash = identity_hash(job, files)
    grid = Grid(job.grid.x, job.grid.y)

    def make_dirs():
        tgt = target_state(job, loaded) if job.directions.target else None
        return make_directions(loaded.theta, loaded.kinds, job.directions, job.ndim, tgt)

    meta = {"checkpoint_meta": loaded.meta, "checkpoint_sha256": files.get("checkpoint", ""),
            "num_parameters": sum(p.numel() for p in loaded.model.parameters()),
            "eval_samples": {k: len(v) for k, v in loaded.splits.items()}}
    sf = SurfaceFile.open_or_create(job.output, job, job_hash, grid, make_dirs, meta, overwrite)
    dirs = sf.read_directions()  # every evaluation, first run or resume, uses the stored copy
    return loaded, sf, dirs, grid


def make_evaluator(job: Job, loaded: Loaded, dirs: dict, device: str, batch_size, cells_per_pass) -> Evaluator:
    opts = EvalOptions(device=device, batch_size=batch_size, precision=job.eval.precision,
                       channels_last=job.eval.channels_last, compile=job.eval.compile, bn=job.eval.bn,
                       cells_per_pass=cells_per_pass)
    return Evaluator(loaded.model, loaded.theta, dirs, loaded.splits, opts)


def set_threads(job: Job, ctx: runner.Context) -> None:
    if job.eval.threads:
        torch.set_num_threads(job.eval.threads)
    elif ctx.mpi:  # share the node's cores between its ranks instead of oversubscribing
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, ctx.local_size)))


def parse_args(argv):
    ap = argparse.ArgumentParser(prog="python -m lldist.surface", description=__doc__.split("\n")[0])
    ap.add_argument("job", help="job file (YAML)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a job key, e.g. --set grid.x=[-1,1,11] (repeatable)")
    ap.add_argument("--out", help="output file (overrides the job's 'output')")
    ap.add_argument("--overwrite", action="store_true", help="replace an output file made by another job")
    ap.add_argument("--progress-every", type=float, default=10.0, metavar="S",
                    help="seconds between progress lines when not on a terminal")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    ctx = runner.launch()
    stop_flag = {}
    if ctx.rank == 0:
        runner.install_sigterm(stop_flag)
    return run_job(ctx, lambda: load_job(args.job, args.set, args.out), args.overwrite,
                   args.progress_every, stop_flag)


def run_job(ctx: runner.Context, get_job, overwrite: bool = False, progress_every: float = 10.0,
            stop_flag: dict = None) -> int:
    """Compute one job's surface with every rank of `ctx` (collective: all ranks call it).
    `get_job` is called on rank 0 only. Returns the exit status (0 when done)."""
    stop_flag = {} if stop_flag is None else stop_flag
    job = loaded = sf = dirs = grid = ev = None
    err, device, shape = None, "?", None
    if ctx.rank == 0:
        try:
            job = get_job()
            loaded, sf, dirs, grid = plan(job, overwrite)
            set_threads(job, ctx)
            device = runner.pick_device(ctx, job.eval.device)
            # rank 0 fixes the batch size and cells per pass for every rank: the last float bits
            # of a loss depend on them. "auto" is calibrated once and stored in the file, so a
            # resume reuses it; a number in the job is the user's choice and always wins.
            batch, group = job.eval.batch_size, job.eval.cells_per_pass
            if batch == "auto" and sf.attr("eval_batch_size") is not None:
                batch = int(sf.attr("eval_batch_size"))
            if group == "auto" and sf.attr("eval_cells_per_pass") is not None:
                group = int(sf.attr("eval_cells_per_pass"))
            ev = make_evaluator(job, loaded, dirs, device, batch, group)
            sf.set_attr("eval_batch_size", ev.batch_size)
            sf.set_attr("eval_cells_per_pass", ev.cells_per_pass)
            shape = (ev.batch_size, ev.cells_per_pass)
        except UserError as e:
            err = str(e)
            if sf is not None:
                sf.close(finished=False)
    if ctx.mpi:
        err = ctx.comm.bcast(err, root=0)
    if err is not None:
        if ctx.rank == 0:
            raise UserError(err)
        return EXIT_USAGE
    if not ctx.mpi:
        log(f"rank 0/1 on {ctx.host}: {device}")
        return coordinate(ctx, progress_every, job, sf, grid, ev, device, {0: (ctx.host, device)}, stop_flag)

    job, dirs, shape = ctx.comm.bcast((job, dirs, shape) if ctx.rank == 0 else None, root=0)
    grid = Grid(job.grid.x, job.grid.y)
    status = None
    if ctx.rank != 0:  # every worker: device, model, data, evaluator; failures reported, not hung on
        try:
            set_threads(job, ctx)
            device = runner.pick_device(ctx, job.eval.device)
            ev = make_evaluator(job, load_model_and_data(job), dirs, device, *shape)
        except UserError as e:
            status = str(e)
        except Exception:
            status = traceback.format_exc()
    everyone = ctx.comm.gather((ctx.host, device, status), root=0)
    if ctx.rank != 0:
        # wait for the coordinator's verdict; it aborts the job if any rank failed
        if ctx.comm.bcast(None, root=0) == "go":
            runner.work(ctx, lambda cells: ev.evaluate_cells([grid.coords(k) for k in cells]))
        return 0
    hosts = {r: (h, d) for r, (h, d, _) in enumerate(everyone)}
    bad = [(r, s) for r, (_, _, s) in enumerate(everyone) if s]
    for r, (h, d) in hosts.items():
        log(f"rank {r}/{ctx.size} on {h}: {d}")
    if bad:
        sf.close(finished=False)
        r, s = bad[0]
        print(f"lldist: error: rank {r} ({hosts[r][0]}) could not start: {s.strip().splitlines()[-1]}",
              file=sys.stderr, flush=True)
        ctx.comm.bcast("abort", root=0)
        ctx.abort(EXIT_USAGE)
    return coordinate(ctx, progress_every, job, sf, grid, ev, device, hosts, stop_flag)


def coordinate(ctx, progress_every, job, sf, grid, ev, device, hosts, stop_flag) -> int:
    pending = sf.pending()
    chunk = job.eval.chunk_size if job.eval.chunk_size != "auto" else auto_chunk_size(len(pending), ctx.size)
    chunks = split_chunks(pending, chunk)
    info = f"{grid.ncells} cells ({' x '.join(map(str, grid.shape))})"
    log(f"job {job.name} -> {job.output}: {info}, {len(pending)} to compute in {len(chunks)} chunks of "
        f"{chunk}, {ctx.size} rank(s), batch {ev.batch_size}, {ev.cells_per_pass} cell(s) per pass, "
        f"splits {', '.join(job.splits)}")
    cos = sf.attr("cosine_xy", group="directions")
    if cos is not None:
        log(f"cosine(x, y) of the directions: {cos:+.4f}")
    if ctx.mpi:
        ctx.comm.bcast("go", root=0)
    progress = Progress(grid.ncells, grid.ncells - len(pending), every=progress_every)
    t0 = time.perf_counter()

    def write(r: runner.ChunkResult):
        sf.write_chunk(r.cells, r.values, r.rank, r.host, r.device, r.t_start, r.t_end)

    try:
        cost = runner.coordinate(ctx, chunks, lambda cells: ev.evaluate_cells([grid.coords(k) for k in cells]),
                                 ev.cells_per_pass, (len(job.splits), 2), write, progress, device, hosts,
                                 should_stop=lambda: "stop" in stop_flag)
    except runner.Stop:
        progress.close()
        done = int(sf.done().sum())
        sf.close(finished=False)
        print(f"lldist: stopped by signal {stop_flag['stop']}: {done}/{grid.ncells} cells done and saved in "
              f"{job.output}; run the same command to resume", file=sys.stderr, flush=True)
        ctx.abort(128 + int(stop_flag["stop"]))
    except Exception as e:
        progress.close()
        sf.close(finished=False)
        text = str(e) if isinstance(e, runner.RankFailed) else f"rank 0 ({ctx.host}) failed:\n{traceback.format_exc()}"
        print(f"lldist: error: {text.strip()}", file=sys.stderr)
        print(f"lldist: finished cells are saved in {job.output}; run the same command to resume",
              file=sys.stderr, flush=True)
        ctx.abort(1)
    progress.close()
    dt = time.perf_counter() - t0
    if cost["messages"]:
        ms = 1000 * cost["seconds"] / cost["messages"]
        sf.set_attr("coordinator_ms_per_message", ms)
        log(f"coordinator: {cost['messages']} worker messages, {ms:.2f} ms each (receive, write, answer)")
    sf.close()
    log(f"done: {len(pending)} cells in {dt:.3f}s ({len(pending) / dt if dt > 0 else 0:.2f} cells/s) -> {job.output}")
    return 0


def cli() -> None:
    sys.exit(run_cli(main))


if __name__ == "__main__":
    sys.exit(run_cli(main))
