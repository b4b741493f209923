"""Every measure at every checkpoint of a recorded run, as one distributed, resumable job
(`python -m lldist.series job.yaml`, `lldist.series(...)`): the room the runner hands units to.

    run_series(ctx, get_job, SeriesOptions(out=..., overwrite=...), source, should_stop)

The work is a set of units, one (checkpoint, measure) pair each, numbered
checkpoint × measures + measure. The runner's coordinator hands them out one at a time as ranks
ask (transport/runner.py), costliest first: every checkpoint's curvature, then the gradients,
the losses and the weights' geometry, so that the long units start early and the short ones
fill the ends. Each unit runs on one rank alone, with code that does not depend on which rank
or in which order, so 1 rank and N give the same file, and a killed run resumes to it.

The measures (series.measures; columns in docs/SERIES.md):
  curvature  the job's curvature: settings at the checkpoint: lambda_max with its jackknife
             error, lambda_min and the trace where asked, by runs/hessian.compute itself, so the
             value equals `python -m lldist.hessian` on that checkpoint bit for bit. Its
             examples are the curvature split's first curvature.batches batches: the same at
             every checkpoint, stated in the file (Cohen et al. take λmax on a fixed subset too)
  gradient   the gradient's norm of the mean loss on those same batches, and that loss
  loss       the job's quantities (loss, accuracy, ...) with standard errors, on eval.split
  weights    the distance from the first checkpoint and from the last, and the cosine between
             the update into this checkpoint and the update out of it (NaN at the ends)
  sharpness  the sharpness measures of `python -m lldist.sharpness` (worst- and average-case
             adaptive, SAM's m-sharpness, PAC-Bayes flatness) with the job's sharpness:
             settings, by runs/sharpness.compute itself: bit for bit the command's at that
             checkpoint. Asked for by name only (not in the default measures): it costs the
             section's ascents, draws and bisection at every checkpoint

Each checkpoint's stability threshold comes from its Recorder record (analysis/stability.py).
Rank groups are refused in one line for now: each unit runs on one rank.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import torch

from ..analysis import stability
from ..config import SERIES_DEFAULT_MEASURES, Job
from ..errors import UserError
from ..evaluation.tasks import to_device
from ..inputs.loading import Source
from ..inputs.series import check_fits, recorded
from ..store.output import Lock, check_writable
from ..store.series import Plan, SeriesWriter
from ..transport import runner
from ..transport.progress import Progress
from .threads import automatic, set_threads

ORDER = ("curvature", "sharpness", "gradient", "loss", "weights")  # handed out in this order: the costliest first
CURVATURE_COLUMNS = {"lambda_max": "largest eigenvalue of the {operator} (Lanczos)",
                     "lambda_max_se": "its jackknife standard error over the batches",
                     "lambda_min": "smallest eigenvalue of the {operator}",
                     "trace": "Hutchinson's estimate of its trace",
                     "trace_se": "the trace's standard error over the Rademacher vectors",
                     "preconditioned_lambda_max": "largest eigenvalue of P^-1 H, P Adam's preconditioner at the step "
                                                  "(Cohen et al. 2022; NaN without its second moments)"}
GRADIENT_COLUMNS = {"grad_norm": "norm of the gradient of the mean loss on the curvature's batches",
                    "grad_loss": "the mean loss on those batches"}
SHARPNESS_COLUMNS = {"worst_2": "worst-case adaptive sharpness in the l2 ball (the largest over the restarts)",
                     "worst_inf": "worst-case adaptive sharpness in the l-infinity ball",
                     "average_2": "average-case adaptive sharpness on the l2 sphere",
                     "average_2_se": "its standard error over the draws",
                     "sam": "SAM's m-sharpness",
                     "sam_se": "its standard error over the groups of m examples",
                     "pac_bayes_sigma": "PAC-Bayes: the largest sigma' whose expected loss rise is within the threshold",
                     "pac_bayes_flatness": "PAC-Bayes flatness, 1 / sigma'^2"}
WEIGHTS_COLUMNS = {"distance_first": "Euclidean distance of the parameters from the first checkpoint's",
                   "distance_last": "Euclidean distance of the parameters from the last checkpoint's",
                   "update_cosine": "cosine between the update into this checkpoint and the update out of it"}


def log(msg: str) -> None:
    print(f"lldist: {msg}", flush=True)


def _quiet(msg: str) -> None:
    pass


@dataclass(frozen=True)
class SeriesOptions:
    out: Optional[str] = None  # the series file (else series.output, else series.h5 beside the job's output)
    overwrite: bool = False
    progress_every: float = 10.0


def output_of(job: Job, options: SeriesOptions) -> str:
    return options.out or job.series.output or os.path.join(os.path.dirname(job.output) or ".", "series.h5")


def batch_size(job: Job) -> int:
    """A fixed batch size (eval.batch_size: auto would make the numbers depend on the machine)."""
    return job.eval.batch_size if job.eval.batch_size != "auto" else 256


def loss_names(job: Job, source: Source) -> list:
    task = source.make_task(dataclasses.replace(job, eval=dataclasses.replace(job.eval, curvature=False)))
    return [f"{split}/{q}" for split in job.splits for q in task.names]


def thresholds(run: list) -> tuple:
    """(learning rates, thresholds, what the thresholds bound, optimizer records as JSON text)."""
    lrs, edges, kinds, texts = [], [], set(), []
    for r in run:
        if r.optimizer is None:
            lrs.append(math.nan)
            edges.append(math.nan)
            texts.append("")
            continue
        try:
            opt = stability.Optimizer.of(r.optimizer)
        except (ValueError, KeyError, TypeError):  # an optimizer the thresholds do not know: no line
            opt = None
        lrs.append(float(r.optimizer.get("lr", math.nan)))
        edges.append(stability.threshold(opt) if opt is not None else math.nan)
        if opt is not None:
            kinds.add("preconditioned lambda_max (Adam)" if opt.kind == "adam" else "lambda_max")
        texts.append(json.dumps(r.optimizer, sort_keys=True))
    return tuple(lrs), tuple(edges), " and ".join(sorted(kinds)) or "none", tuple(texts)


def identity(job: Job, run: list, measures: tuple) -> str:
    """What makes two runs the same series: the checkpoints (path, step, size), the measures and
    the job's model, data, evaluation and curvature settings, and its sharpness settings where
    sharpness is measured (a series without it keeps the identity it had before that measure)."""
    what = {"checkpoints": [(os.path.abspath(r.path), r.step, os.path.getsize(r.path)) for r in run],
            "measures": list(measures), "model": dataclasses.asdict(job.model), "data": dataclasses.asdict(job.data),
            "eval": dataclasses.asdict(job.eval), "curvature": dataclasses.asdict(job.curvature)}
    what["model"].pop("checkpoint", None)
    if "sharpness" in measures:
        what["sharpness"] = dataclasses.asdict(job.sharpness)
    return hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()


class Units:
    """The pending units, costliest measure first (see ORDER), one at a time."""

    def __init__(self, done: np.ndarray, measures: tuple):
        m = len(measures)
        rank = {name: ORDER.index(name) for name in measures}
        pending = [i * m + j for i in range(done.shape[0]) for j in range(m) if not done[i, j]]
        self.queue = sorted(pending, key=lambda u: (rank[measures[u % m]], u // m))
        self.total = len(self.queue)

    def take(self) -> Optional[np.ndarray]:
        if not self.queue:
            return None
        return np.array([self.queue.pop(0)], dtype=np.int64)

    def returned(self, cells, values) -> None:
        pass

    @property
    def exhausted(self) -> bool:
        return not self.queue


@dataclass
class Payload:
    job: Job
    run: list
    measures: tuple
    width: int
    threads: int  # torch's CPU threads on every rank (rank 0's choice, or the file's first run's)


class SeriesRun:
    """One series, on one rank (see the module docstring for what the runner calls)."""

    rank0_computes = True
    group_size = 1
    cells_per_pass = 1

    def __init__(self, ctx: runner.Context, get_job: Callable[[], Job], options: SeriesOptions = SeriesOptions(),
                 source: Source = Source(), should_stop: Callable[[], Optional[int]] = lambda: None):
        self.ctx, self.get_job, self.options, self.source, self.should_stop = ctx, get_job, options, source, should_stop
        self.device = "cpu"
        self.writer, self.lock, self.schedule = None, None, None
        self.current = None  # the checkpoint index the model holds

    # ------------------------------------------------------------------ rank 0
    def prepare(self) -> Payload:
        job = self.get_job()
        if job.eval.group_size > 1:
            raise UserError(f"{job.source}: key 'eval.group_size' is {job.eval.group_size}: a series runs each "
                            "(checkpoint, measure) on one rank; rank groups are not supported in a series yet")
        run = recorded(job.series.checkpoints)
        measures = tuple(job.series.measures or SERIES_DEFAULT_MEASURES)
        # the model is built from the job, its weights from each checkpoint in turn
        job = dataclasses.replace(job, model=dataclasses.replace(job.model, checkpoint=run[0].path), train=None,
                                  eval=dataclasses.replace(job.eval, curvature=False))
        out = output_of(job, self.options)
        check_writable(out)
        self.lock = Lock(out)
        payload = Payload(job, run, measures, 0, set_threads(job, self.ctx.cpus, log))
        self._build(payload)
        check_fits(run, self.model)
        op = job.curvature.operator
        columns = {"curvature": list(CURVATURE_COLUMNS), "gradient": list(GRADIENT_COLUMNS),
                   "loss": loss_names(job, self.source), "weights": list(WEIGHTS_COLUMNS),
                   "sharpness": list(SHARPNESS_COLUMNS)}
        columns = {m: columns[m] for m in measures}
        descriptions = {**{c: d.format(operator={"hessian": "Hessian"}.get(op, op)) for c, d in CURVATURE_COLUMNS.items()},
                        **GRADIENT_COLUMNS, **WEIGHTS_COLUMNS, **SHARPNESS_COLUMNS}
        descriptions = {c: descriptions.get(c, c) for m in measures for c in columns[m]}
        lrs, edges, kind, texts = thresholds(run)
        split = job.curvature.split or job.splits[0]
        plan = Plan(measures, columns, descriptions, tuple(os.path.abspath(r.path) for r in run),
                    tuple(r.step for r in run), lrs, edges, kind, texts,
                    {"split": split, "batches": job.curvature.batches, "batch_size": batch_size(job), "operator": op,
                     "eval_split": job.eval.split}, job.text, identity(job, run, measures))
        self.writer = SeriesWriter.open(out, plan, self.options.overwrite)
        # the threads fix the float32 sums' order: a resumed file keeps its first run's
        first = self.writer.threads(payload.threads)
        if first != payload.threads and automatic(job):
            payload.threads = set_threads(job, first, fixed=True)
            log(f"{first} CPU thread(s), as this file's first run chose (the numbers stay the same)")
        self.out, self.plan = out, plan
        self.schedule = Units(self.writer.done(), measures)
        payload.width = max(len(c) for c in columns.values())
        self.payload = payload
        return payload

    def start(self, hosts: dict) -> Progress:
        for r, (h, d) in sorted(hosts.items()):
            log(f"rank {r}/{self.ctx.size} on {h}: {d}")
        n = len(self.plan.steps)
        log(f"series of {self.payload.job.name} -> {self.out}: {n} checkpoints (steps {self.plan.steps[0]}.."
            f"{self.plan.steps[-1]}), measures {', '.join(self.plan.measures)}: {self.schedule.total} of "
            f"{n * len(self.plan.measures)} units to compute on {self.ctx.size} rank(s)")
        total = n * len(self.plan.measures)
        return Progress(total, total - self.schedule.total, every=self.options.progress_every, unit="unit")

    def take_result(self, r: runner.ChunkResult) -> int:
        return self.writer.write(r.cells, r.values)

    def tick(self) -> int:
        return 0

    def close(self, outcome: str, cost: Optional[dict]) -> None:
        try:
            if self.writer is not None and self.writer.f.id.valid:
                done = self.writer.done()
                if outcome != "done":
                    print(f"lldist: {int(done.sum())}/{done.size} units done and saved in {self.out}",
                          file=sys.stderr, flush=True)
                else:
                    log(f"series done: {self.out}")
                self.writer.finish(bool(done.all()))
        finally:
            if self.lock is not None:
                self.lock.release()

    # ------------------------------------------------------------------ every rank
    def build(self, payload: Payload, group=None) -> str:
        self._build(payload)
        return self.device

    def _build(self, payload: Payload) -> None:
        from ..evaluation.evaluator import device_for_rank
        self.payload = payload
        set_threads(payload.job, payload.threads, fixed=True)
        self.device = device_for_rank(self.ctx.local_rank, payload.job.eval.device)
        loaded = self.source.load(payload.job)
        self.model, self.splits = loaded.model, loaded.splits
        self.task = self.source.make_task(payload.job)
        self.current = None

    def evaluate(self, cells: np.ndarray) -> np.ndarray:
        p = self.payload
        out = np.full((len(cells), p.width), np.nan)
        for k, u in enumerate(np.asarray(cells).tolist()):
            i, j = divmod(int(u), len(p.measures))
            row = MEASURES[p.measures[j]](self, i)
            out[k, :len(row)] = row
        return out

    # ------------------------------------------------------------------ the measures
    def _at(self, i: int) -> torch.nn.Module:
        """The model holding checkpoint i's weights."""
        if self.current != i:
            from ..workloads.models import load_checkpoint
            load_checkpoint(self.model, self.payload.run[i].path)
            self.current = i
        return self.model

    def _job_at(self, i: int) -> Job:
        job = self.payload.job
        return dataclasses.replace(job, model=dataclasses.replace(job.model, checkpoint=self.payload.run[i].path))

    def curvature(self, i: int) -> list:
        from .hessian import compute
        res = compute(self._job_at(i), None, _quiet, self.should_stop, self.source)
        return [res["lambda_max"], res.get("lambda_max_se", math.nan), res.get("lambda_min", math.nan),
                res.get("trace", math.nan), res.get("trace_stderr", math.nan), self.preconditioned(i)]

    def sharpness(self, i: int) -> list:
        from .sharpness import compute
        res = compute(self._job_at(i), None, _quiet, self.should_stop, self.source)
        return [res[c] for c in SHARPNESS_COLUMNS]

    def preconditioned(self, i: int) -> float:
        """λmax(P⁻¹H) on the curvature's batches, P Adam's preconditioner from the checkpoint's
        second moments (analysis/stability.py): the top eigenvalue of the symmetric
        P^-1/2 H P^-1/2, by eigsh with the seeded start vector and the job's tolerance. NaN
        where the run recorded no second moments (Recorder(second_moments=True))."""
        r = self.payload.run[i]
        if r.moments is None or r.optimizer is None:
            return math.nan
        from scipy.sparse.linalg import LinearOperator, eigsh

        from ..evaluation.curvature import Curvature, first_batches
        job = self.payload.job
        opt = stability.Optimizer.of(r.optimizer)
        moments = torch.load(r.moments, map_location="cpu", weights_only=True)
        model = self._at(i).to(self.device).eval()
        batches = first_batches(self.splits[job.curvature.split or job.splits[0]], batch_size(job),
                                job.curvature.batches)
        c = Curvature(model, [to_device(b, self.device) for b in batches], self.task).at(dict(model.named_parameters()))
        scale = np.concatenate([preconditioner_rows(moments, n, opt) for n in c.names])
        op = LinearOperator((c.n, c.n), matvec=lambda v: scale * c.matvec(scale * np.asarray(v).reshape(-1)),
                            dtype=np.float64)
        v0 = np.random.default_rng(0).standard_normal(c.n)
        return float(eigsh(op, k=1, which="LA", tol=job.curvature.tol, v0=v0, maxiter=50 * c.n)[0][0])

    def gradient(self, i: int) -> list:
        from ..evaluation.curvature import first_batches
        from ..evaluation.tasks import model_inputs
        job = self.payload.job
        split = job.curvature.split or job.splits[0]
        model = self._at(i).to(self.device).eval()
        batches = first_batches(self.splits[split], batch_size(job), job.curvature.batches)
        params = [p for p in model.parameters()]
        grads = [torch.zeros_like(p, dtype=torch.float64) for p in params]
        total = weight = 0.0
        for b in batches:
            b = to_device(b, self.device)
            args, kwargs = model_inputs(b)
            s, n = self.task.loss_terms(model(*args, **kwargs), b)
            for g, d in zip(grads, torch.autograd.grad(s, params, allow_unused=True)):
                if d is not None:
                    g += d.double()
            total, weight = total + float(s.detach()), weight + float(n)
        norm = math.sqrt(math.fsum(float((g * g).sum()) for g in grads)) / weight
        return [norm, total / weight]

    def loss(self, i: int) -> list:
        from ..directions.record import Directions
        from ..evaluation.evaluator import Evaluator
        job = self.payload.job
        model = self._at(i)
        theta = {n: t.detach().clone() for n, t in model.state_dict().items() if t.is_floating_point()}
        zero = Directions(x={n: torch.zeros_like(t) for n, t in theta.items()})
        cfg = dataclasses.replace(job.eval, batch_size=batch_size(job), cells_per_pass=1, compile=False)
        ev = Evaluator(model, theta, zero, self.splits, cfg, device=self.device, task=self.task)
        return list(ev.evaluate(0.0).reshape(-1))

    def weights(self, i: int) -> list:
        run = self.payload.run
        names = [n for n, _ in self.model.named_parameters()]
        here, first, last = (_params(run[k].path, names) for k in (i, 0, len(run) - 1))
        cos = math.nan
        if 0 < i < len(run) - 1:
            before, after = _params(run[i - 1].path, names), _params(run[i + 1].path, names)
            into, out = here - before, after - here
            denom = float(np.linalg.norm(into) * np.linalg.norm(out))
            cos = float(into @ out) / denom if denom else math.nan
        return [float(np.linalg.norm(here - first)), float(np.linalg.norm(here - last)), cos]


def preconditioner_rows(moments: dict, name: str, opt) -> np.ndarray:
    """P^-1/2 of one parameter, flat: Adam's P_t from its stored exp_avg_sq and step."""
    v = moments["exp_avg_sq"].get(name)
    if v is None:
        raise UserError(f"series: the second moments hold no {name} (recorded from another model?)")
    return 1 / np.sqrt(stability.preconditioner(v.double().numpy().reshape(-1), opt, int(moments["step"])))



def _params(path: str, names: list) -> np.ndarray:
    """The checkpoint's parameters, flat, in float64 (read by name, memory-mapped)."""
    from ..inputs.rows import Checkpoint
    ck = Checkpoint.open(path)
    return np.concatenate([ck.read(n).double().reshape(-1).numpy() for n in names if n in ck.files])


MEASURES = {"curvature": SeriesRun.curvature, "gradient": SeriesRun.gradient, "loss": SeriesRun.loss,
            "weights": SeriesRun.weights, "sharpness": SeriesRun.sharpness}


def run_series(ctx: runner.Context, get_job: Callable[[], Job], options: SeriesOptions = SeriesOptions(),
               source: Source = Source(), should_stop: Callable[[], Optional[int]] = lambda: None) -> int:
    """Compute one job's series with every rank of `ctx` (collective). Returns the exit status."""
    t = time.perf_counter()
    code = runner.run(ctx, SeriesRun(ctx, get_job, options, source, should_stop), should_stop)
    if ctx.rank == 0 and code == 0:
        log(f"series took {time.perf_counter() - t:.1f} s")
    return code
