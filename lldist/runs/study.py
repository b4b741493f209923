"""A study's run, on every rank: each variant's surface (runs/surface.py), then the Hessian and
the sharpness measures at its θ* (runs/optimum.py), then, on rank 0, the report
(analysis/report.py). `python -m lldist.study` reads the file and calls it.

    code = run_study(ctx, load_study("jobs/study_digits.yaml"), StudyOptions())

Everything resumes: a surface by its done mask, a measure at θ* when its file holds it with
the same settings already, a checkpoint when it exists.
"""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass
from typing import Optional

from ..errors import Stopped
from ..inputs.study_file import Study
from ..transport import runner
from .hessian import HESSIAN
from .optimum import log, measure_unless_held, spread_over
from .sharpness import SHARPNESS
from .surface import RunOptions, run_surface


@dataclass(frozen=True)
class StudyOptions:
    only: Optional[tuple] = None  # run only these variants (no report)
    report_only: bool = False  # redraw the report from finished surfaces
    progress_every: float = 30.0  # seconds between progress lines when not on a terminal (0: none)
    made_by: str = ""  # the command line, recorded at the top of the report


def machine() -> str:
    """The CPU and torch a report was made with: a CNN's float32 training sums in the order of its
    CPU's kernels (oneDNN picks them by instruction set), so its digits repeat on that family."""
    import torch
    cpu = ""
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "")
    except OSError:
        pass
    import platform
    return f"{cpu or platform.processor() or platform.machine()}, torch {torch.__version__}"


def at_theta(job, splits: tuple):
    """The variant's job with its Hessian on the study's split, or the job's first when it does
    not evaluate that one (a study of test-only jobs)."""
    c = job.curvature
    return dataclasses.replace(job, curvature=dataclasses.replace(c, split=c.split if c.split in splits else splits[0]))


def run_study(ctx: runner.Context, study: Study, options: StudyOptions = StudyOptions()) -> int:
    """Every variant's surface and measures at θ* with every rank of `ctx` (collective), then the
    report on rank 0. Returns the exit status."""
    from ..analysis.report import report
    variants = [v for v in study.variants if options.only is None or v.name in options.only]
    should_stop = lambda: None  # noqa: E731
    if ctx.rank == 0:
        should_stop = runner.install_sigterm()
        log(f"study {study.name}: {len(variants)} variants -> {study.out}: {', '.join(v.name for v in variants)}")
    measures = [m for m, on in ((HESSIAN, study.curvature), (SHARPNESS, study.sharpness)) if on]
    try:
        if not options.report_only:
            for v in variants:
                if ctx.rank == 0:
                    log(f"--- variant {v.name}")
                code = run_surface(ctx, lambda v=v: v.job, RunOptions(progress_every=options.progress_every),
                                   should_stop=should_stop)
                if code:
                    return code
                for m in measures:  # every rank its share: the products' batches, the restarts and draws
                    measure_unless_held(at_theta(v.job, v.job.splits), m, spread_over(ctx, m.what), log, should_stop)
        if ctx.rank == 0 and options.only is None:
            if options.report_only:  # a study run before curvature or sharpness existed: fill them in, alone
                for v in variants:
                    for m in measures:
                        measure_unless_held(at_theta(v.job, v.job.splits), m, None, log, should_stop)
            report(study.name, study.out, variants, log=log, made_by=options.made_by, made_on=machine())
    except Stopped as e:
        if ctx.size > 1:  # the other ranks wait for rank 0's next run: end them too
            print(f"lldist: {e}", file=sys.stderr, flush=True)
            ctx.abort(e.exit_code)
        raise
    return 0
