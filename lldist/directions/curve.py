"""directions.kind curve: a curve between two minima (python -m lldist.connect): θ(t) =
c0(t)·a + c1(t)·bend + c2(t)·b over every float entry (evaluation/curves.py), t the grid's x;
exact at t = 0 and 1.

    d = make(making)        # Directions(x = b − a, target = b, bend)

The file keeps b as /directions/target, the bend as /directions/bend and, for the record and as
the moving-entry mask, x = b − a (the straight line's direction).
"""

from __future__ import annotations

import os

from .plane import inputs  # noqa: F401 - the three models [a, b, bend] by their content, as a plane's
from .record import Directions

NORM = "none (differences of the models)"


def make(m) -> Directions:
    from ..inputs.loading import point_states
    job = m.job
    a, b, bend = point_states(job, m.loaded)
    kind = job.directions.curve or "bezier"
    names = [os.path.basename(os.path.normpath(f)) for f in job.directions.points]
    m.log(f"{kind} curve from {names[0]} to {names[1]}, bend {names[2]}")
    return Directions(x={n: b[n] - a[n] for n in a}, target={n: b[n].clone() for n in a},
                      bend={n: bend[n].clone() for n in a}, attrs={"curve": kind, "point_files": names})
