"""lldist.curvature and lldist.sharpness_measures: the Hessian (or the Gauss-Newton matrix, or
the empirical Fisher) and the sharpness measures at a model's own weights θ*, from Python, by
the computation `python -m lldist.hessian` and `python -m lldist.sharpness` run
(runs/hessian.py, runs/sharpness.py), in-process or over the ranks of mpirun.

    h = lldist.curvature(model, (x, y), top=3, trace_samples=32, density=True)
    h.lambda_max, h.top_eigenvalues, h.lambda_min, h.trace, h.trace_stderr, h.lambda_max_se
    h.plot()                                 # the spectral density (else the top eigenvalues)
    s = lldist.sharpness_measures(model, (x, y), rho_2=0.05)
    s.worst_2, s.worst_inf, s.average_2, s.sam, s.pac_bayes_flatness

The names are not those of the command modules (lldist.hessian, lldist.sharpness): importing a
command module binds its name on the package, which would replace a function of that name.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Optional

import numpy as np
from torch import nn

from ..config import CurvatureConfig, EvalConfig, SharpnessConfig
from ..errors import UserError
from .inputs import check_model, check_split, kept, message, object_job, read_data, sort_options, state, task_of
from .landscapes import landscape


@dataclass(frozen=True)
class Block:
    """One block's curvature (curvature.blocks): its size, top eigenvalue and trace."""
    name: str
    parameters: int
    lambda_max: float
    trace: float
    trace_stderr: float


@dataclass(frozen=True)
class Curvature:
    """The curvature at θ* (lldist.curvature): what /curvature/<split> of a file holds, as fields.
    A value not asked for is NaN (lambda_min with smallest=False, the trace with
    trace_samples=0) or None (the density without density=True)."""
    operator: str  # hessian | ggn | fisher
    split: str
    loss: float  # the mean loss on the batches it is taken on
    lambda_max: float
    top_eigenvalues: np.ndarray  # largest first
    lambda_min: float
    trace: float  # Hutchinson's estimate
    trace_stderr: float
    lambda_max_se: float  # the jackknife's over the batches (NaN on one batch)
    density_nodes: Optional[np.ndarray]  # (runs, steps): stochastic Lanczos quadrature
    density_weights: Optional[np.ndarray]
    blocks: tuple  # of Block (curvature.blocks)
    batches: int
    batch_size: int
    num_parameters: int
    products: int  # operator-vector products
    seconds: float
    stored: dict  # every value as the file stores it

    @classmethod
    def of(cls, d: dict) -> "Curvature":
        nan = float("nan")
        return cls(operator=d.get("operator", "hessian"), split=d["split"], loss=float(d["loss"]),
                   lambda_max=float(d["lambda_max"]), top_eigenvalues=np.asarray(d["top_eigenvalues"], dtype=float),
                   lambda_min=float(d.get("lambda_min", nan)), trace=float(d.get("trace", nan)),
                   trace_stderr=float(d.get("trace_stderr", nan)), lambda_max_se=float(d.get("lambda_max_se", nan)),
                   density_nodes=d.get("density_nodes"), density_weights=d.get("density_weights"),
                   blocks=tuple(Block(r["block"], int(r["parameters"]), float(r["lambda_max"]), float(r["trace"]),
                                      float(r["trace_stderr"])) for r in d.get("blocks") or ()),
                   batches=int(d["batches"]), batch_size=int(d["batch_size"]),
                   num_parameters=int(d["num_parameters"]), products=int(d["hessian_vector_products"]),
                   seconds=float(d["seconds"]), stored=dict(d))

    def plot(self, dpi: Optional[int] = None):
        """The spectral density (density=True), else the blocks (blocks=...), else the top
        eigenvalues: the figures python -m lldist.plot draws of a file's curvature."""
        from ..analysis import figures
        d, name = self.stored, "lldist.curvature"
        fig = figures.figure_density(d, name, self.split) or figures.figure_blocks(d, name, self.split) or \
            figures.figure_eigenvalues(d, name, self.split)
        return figures.for_caller(fig, dpi)

    def __repr__(self) -> str:
        extra = f", trace {self.trace:.6g} ± {self.trace_stderr:.2g}" if np.isfinite(self.trace) else ""
        return (f"<Curvature {self.operator} on {self.split}: lambda_max {self.lambda_max:.6g}, lambda_min "
                f"{self.lambda_min:.6g}{extra}; {self.num_parameters:,} parameters, {self.products} products>")


@dataclass(frozen=True)
class Sharpness:
    """The sharpness measures at θ* (lldist.sharpness_measures; docs/METRICS.md defines them)."""
    split: str
    examples: int
    loss: float
    worst_2: float  # worst-case adaptive sharpness, ℓ2 ball of radius rho_2
    worst_inf: float  # the same in the ℓ∞ ball of rho_inf
    average_2: float  # average-case adaptive sharpness, ℓ2 sphere of rho_2
    average_2_se: float
    sam: float  # SAM's m-sharpness
    sam_se: float
    pac_bayes_sigma: float  # the largest σ whose expected loss rise stays at or under pac_threshold
    pac_bayes_flatness: float  # 1/σ²
    forward_passes: int
    seconds: float
    stored: dict  # every value as the file stores it

    @classmethod
    def of(cls, d: dict) -> "Sharpness":
        names = [f.name for f in dataclasses.fields(cls) if f.name != "stored"]
        return cls(**{k: d[k] for k in names}, stored=dict(d))

    def __repr__(self) -> str:
        return (f"<Sharpness on {self.split} ({self.examples} examples): worst l2 {self.worst_2:.4g}, worst linf "
                f"{self.worst_inf:.4g}, average l2 {self.average_2:.4g}, SAM {self.sam:.4g}, PAC-Bayes 1/sigma^2 "
                f"{self.pac_bayes_flatness:.4g}>")


def curvature(model: nn.Module, data, *, operator: str = "hessian", split: str = "train", loss="cross_entropy",
              metrics=None, out: Optional[str] = None, resume: bool = True, **options) -> Optional[Curvature]:
    """The curvature of the mean loss at the model's current weights θ*: the top eigenvalues
    (Lanczos), the smallest, Hutchinson's trace with its standard error, λmax's jackknife error
    over the batches, and on request the spectral density and per-block spectra.

    model, data, loss, metrics: as lldist.landscape takes them (the model comes back unchanged).
    operator: "hessian", "ggn" (Gauss-Newton) or "fisher" (empirical Fisher).
    split: "train" (the literature's Hessian) or "test": the name it is stored under.
    **options: the job file's curvature keys (top=5, batches=4, trace_samples=64, smallest=True,
        tol=1e-4, density=False, density_runs, density_steps, blocks=None | "layers" |
        "transformer" | {name: regex}, block_top, jackknife) and its eval keys (batch_size,
        device, precision, threads): the first `batches` batches of `batch_size` examples.
    out: an HDF5 file to keep it in (a one-cell landscape at θ* with /curvature); a rerun with
        the same model, data and settings reads it back instead of computing.

    Returns a Curvature record (None on MPI ranks other than 0: under mpirun every rank calls
    it and computes its share of every product)."""
    from ..runs.hessian import HESSIAN
    settings, eval_options = sort_options("curvature", options, CurvatureConfig, EvalConfig)
    settings = {**settings, "operator": operator, "split": split}
    d = _measure(HESSIAN, "curvature", model, data, split, loss, metrics, out, resume, eval_options,
                 {"curvature": settings}, lambda sf: sf.curvature(operator=operator).get(split))
    return Curvature.of(d) if d is not None else None


def sharpness_measures(model: nn.Module, data, *, split: str = "train", loss="cross_entropy", metrics=None,
                       out: Optional[str] = None, resume: bool = True, **options) -> Optional[Sharpness]:
    """The sharpness measures at the model's current weights θ*: worst-case adaptive sharpness
    in the ℓ2 and ℓ∞ balls, the average case, SAM's m-sharpness and the PAC-Bayes flatness,
    on the first `examples` examples of the data.

    model, data, loss, metrics: as lldist.landscape takes them (the model comes back unchanged).
    **options: the job file's sharpness keys (examples=1024, seed, rho_2=0.1, rho_inf=0.005,
        steps, restarts, draws, m=128, rho_sam, sam_steps, pac_threshold, pac_tol) and its eval
        keys (batch_size, device, precision, threads).
    out: an HDF5 file to keep them in, read back by a rerun with the same settings.

    Returns a Sharpness record (None on MPI ranks other than 0, which compute their share of
    the restarts and draws)."""
    from ..runs.sharpness import SHARPNESS
    settings, eval_options = sort_options("sharpness_measures", options, SharpnessConfig, EvalConfig)
    settings = {**settings, "split": split}
    d = _measure(SHARPNESS, "sharpness", model, data, split, loss, metrics, out, resume, eval_options,
                 {"sharpness": settings}, lambda sf: sf.sharpness().get(split))
    return Sharpness.of(d) if d is not None else None


def _measure(m, name: str, model, data, split: str, loss, metrics, out, resume: bool, eval_options: dict,
             sections: dict, stored) -> Optional[dict]:
    """A measure at θ* (runs.optimum.Measure) of the caller's objects, with every rank of the
    run; rank 0 returns its result (read from `out` when the file holds it), the others None."""
    from ..inputs.loading import Loaded, Source
    from ..runs.optimum import compute, log, spread_over, together
    from ..runs.threads import set_threads
    from ..store import SurfaceReader
    from ..transport import runner
    check_model(model)
    check_split(split)
    if out is not None and not isinstance(out, (str, os.PathLike)):
        raise TypeError(f"out must be a path, got {type(out).__name__}")
    task = task_of(loss, metrics)
    ts = read_data(data, eval_options)
    job = object_job(model, data, task, name=name, out=os.fspath(out) if out is not None else "<none>",
                     split=split, grid={"x": [0.0, 0.0, 1]}, options=eval_options, sections=sections)
    ctx = runner.launch()
    try:
        m.check(job, ctx.size)
    except UserError as e:
        raise ValueError(message(e)) from None

    def load(job):
        theta, kinds = state(model)
        return Loaded(model, theta, kinds, {split: ts}, {})
    source = Source(loader=load, task=task)  # (its identity is the one-cell file's, which landscape() fingerprints)
    driver = ctx.rank == 0
    with kept(model):
        if out is not None:  # the file: a one-cell landscape at θ*, its identity this call's objects
            landscape(model, data, x=(0.0, 0.0, 1), y=None, split=split, loss=loss, metrics=metrics, out=out,
                      resume=resume, name=name, progress_every=0, **eval_options)
        set_threads(job, ctx.cpus)
        spread = spread_over(ctx, m.what)
        with together(spread):
            todo = out is None or (not m.held(os.fspath(out), job) if driver else None)
            if spread is not None:
                todo = spread.gate(todo)
            try:
                res = compute(job, m, spread, log, source=source) if todo else None
            except UserError as e:
                raise ValueError(message(e)) from None
        if not driver:
            return None
        if out is not None:
            if todo:
                m.write(os.fspath(out), res)
            else:
                log(f"{m.what} read from {os.fspath(out)} (computed before with these settings)")
            with SurfaceReader(os.fspath(out)) as sf:
                res = {"split": split, **stored(sf)}  # (the file keeps the split as the group's name)
        return res
