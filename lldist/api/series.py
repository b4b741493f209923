"""lldist.series(): every measure at every checkpoint of a recorded run, from Python (the command
`python -m lldist.series` in-process, or under mpirun over every rank).

    s = lldist.series("job.yaml", out="runs/mine/series.h5")     # a Series (lldist/store/series.py)
    s.steps, s.column("lambda_max"), s.thresholds
"""

from __future__ import annotations

from typing import Optional, Union

from ..config import Job, load_job
from ..runs.series import SeriesOptions, output_of, run_series
from ..store.series import Series, read_series
from ..transport import runner


def series(job: Union[str, Job], out: Optional[str] = None, overwrite: bool = False, overrides: tuple = (),
           progress_every: float = 0.0) -> Optional[Series]:
    """The series of `job` (a job file, or a Job whose `series:` names the checkpoints), computed
    or resumed into `out` (default: series.output, else series.h5 beside the job's output).
    `overrides`: "key=value" as the command's --set. Returns the Series on rank 0 (None on the
    other ranks); bad input raises UserError (a ValueError) naming the key."""
    if not isinstance(job, (str, Job)):
        raise TypeError(f"job must be a job file's path or a lldist.config.Job, got {type(job).__name__}")
    loaded = load_job(job, list(overrides)) if isinstance(job, str) else job
    options = SeriesOptions(out=out, overwrite=overwrite, progress_every=progress_every)
    ctx = runner.launch()
    code = run_series(ctx, lambda: loaded, options)
    if ctx.rank != 0:
        return None
    if code:
        raise RuntimeError(f"lldist.series ended with exit status {code} (its log says why)")
    return read_series(output_of(loaded, options))
