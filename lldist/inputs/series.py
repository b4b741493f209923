"""The checkpoints of a recorded run, in training order, with their steps and optimizers: what
`python -m lldist.series` measures (series.checkpoints).

    run = recorded("runs/mine/model_trajectory.json")    # a Recorder's index (or its folder)
    run = recorded("runs/mine/model_step*.pt")           # a glob: steps from the names
    run = recorded(["a_step10.pt", "a_step20.pt"])       # a list, in training order
    check_fits(run, model)                               # every file is this model's

A Recorder's index gives each checkpoint's step (or epoch) and, where the loop passed its
optimizer, the step's learning rate and hyperparameters (analysis/stability.py reads them). A
glob or a list takes the step from the file's name (`..._step<N>.pt`, `..._epoch<N>.pt`). Bad
input is one line: no files, a file missing, a name without a step, steps out of order or twice,
a checkpoint that is not the job's model.
"""

from __future__ import annotations

import glob as globbing
import json
import os
import re
from dataclasses import dataclass
from typing import Optional, Union

from ..errors import UserError

STEP = re.compile(r"(?:step|epoch)[_-]?(\d+)")


@dataclass(frozen=True)
class Recorded:
    """One checkpoint of the run."""
    path: str
    step: int
    optimizer: Optional[dict] = None  # the Recorder's record of the step's optimizer (lr, momentum, betas, ...)
    moments: Optional[str] = None  # Adam's second moments beside it (Recorder(second_moments=True))


def _step_of(path: str) -> int:
    found = STEP.findall(os.path.basename(path))
    if not found:
        raise UserError(f"series.checkpoints: {path} has no step in its name (<stem>_step<N>.pt or _epoch<N>.pt); "
                        "give a Recorder's <stem>_trajectory.json to take the steps from it")
    return int(found[-1])


def _from_index(path: str) -> list:
    try:
        with open(path) as f:
            index = json.load(f)
        unit, rows = index.get("unit", "step"), index["checkpoints"]
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise UserError(f"series.checkpoints: {path} is not a Recorder's trajectory index ({type(e).__name__}: {e})")
    folder = os.path.dirname(os.path.abspath(path))
    out = []
    for r in rows:
        if not isinstance(r, dict) or "file" not in r or unit not in r:
            raise UserError(f"series.checkpoints: {path}: an entry without its file or its {unit}: {r!r}")
        moments = os.path.join(folder, r["second_moments"]) if r.get("second_moments") else None
        out.append(Recorded(os.path.join(folder, r["file"]), int(r[unit]), r.get("optimizer"), moments))
    return out


def recorded(spec: Union[str, list, None]) -> list:
    """[Recorded] in training order (see the module's docstring)."""
    if spec is None or spec == [] or spec == "":
        raise UserError("series.checkpoints is not given: name a Recorder's <stem>_trajectory.json, a glob of "
                        "checkpoints or a list of them")
    if isinstance(spec, str) and os.path.isdir(spec):  # a Recorder's folder: its one index
        found = sorted(globbing.glob(os.path.join(spec, "*_trajectory.json")))
        if len(found) != 1:
            raise UserError(f"series.checkpoints: folder {spec} holds {len(found)} Recorder indexes "
                            f"(*_trajectory.json){': ' + ', '.join(found) if found else ''}; name one")
        spec = found[0]
    if isinstance(spec, str) and spec.endswith(".json"):
        if not os.path.exists(spec):
            raise UserError(f"series.checkpoints: {spec} does not exist")
        run = _from_index(spec)
        given_order = True
    elif isinstance(spec, str):
        files = globbing.glob(spec)
        if not files:
            raise UserError(f"series.checkpoints: no file matches {spec}")
        run = sorted((Recorded(f, _step_of(f)) for f in files), key=lambda r: r.step)
        given_order = False
    else:
        run = [Recorded(f, _step_of(f)) for f in spec]
        given_order = True
    if not run:
        raise UserError(f"series.checkpoints: {spec} lists no checkpoint")
    for r in run:
        if not os.path.exists(r.path):
            raise UserError(f"series.checkpoints: {r.path} does not exist")
    steps = [r.step for r in run]
    for a, b, ra, rb in zip(steps, steps[1:], run, run[1:]):
        if b == a:
            raise UserError(f"series.checkpoints: {ra.path} and {rb.path} are both step {a}")
        if given_order and b < a:
            raise UserError(f"series.checkpoints: out of training order: step {b} ({rb.path}) after step {a}")
    return run


def check_fits(run: list, model) -> None:
    """Every checkpoint holds the model's entries in the model's shapes (read from the files'
    headers, memory-mapped: no weights loaded): one line naming the first that does not."""
    from .rows import Checkpoint
    want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    for r in run:
        ck = Checkpoint.open(r.path)
        have = set(ck.files)
        missing = [k for k in want if k not in have]
        # (a tied entry saved once: the loader fills its twin; the header need not list it)
        from ..workloads.models import tied
        twins = tied(model)
        missing = [k for k in missing if k not in twins]
        if missing:
            raise UserError(f"series.checkpoints: {r.path} is not this job's model: it has no {missing[0]}")
        for k in want:
            if k in have and tuple(ck.shape(k)) != want[k]:
                raise UserError(f"series.checkpoints: {r.path} is not this job's model: {k} is "
                                f"{tuple(ck.shape(k))}, the model's {want[k]}")
