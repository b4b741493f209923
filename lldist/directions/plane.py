"""directions.kind plane: the plane through three models (Garipov et al. 2018). Origin a = θ*,
x = b − a, y = (c − a) − t·x with t = <c − a, x>/<x, x> (float64, over every float entry:
parameters and BatchNorm statistics, as an interpolation moves them), so a sits at (0, 0), b at
(1, 0) and c at (t, 1). The run evaluates the three models themselves from their files, bit
for bit (`points`).

    u, v, t, uu, vv = plane_frame(a, b, c)     # the frame of three states
    d = make(making)                           # Directions(x, y), attrs: the points and their names
"""

from __future__ import annotations

import os

from ..errors import UserError
from .record import Directions

NORM = "none (differences of the models)"


def inputs(job) -> dict:
    """The three models by their content."""
    from ..inputs.identity import file
    return {"points": [file(f) for f in job.directions.points]}


def points(job, loaded) -> list:
    """The three models' float states, exactly as their files hold them, evaluated apart."""
    from ..inputs.loading import point_states
    return point_states(job, loaded)


def plane_frame(a: dict, b: dict, c: dict) -> tuple:
    """(u, v, t, |u|², |v|²) of the plane through states a, b, c, in float64: u = b − a,
    v = (c − a) − t·u with t = <c − a, u>/<u, u>, so c = a + t·u + v."""
    u = {n: b[n].double() - a[n].double() for n in a}
    w = {n: c[n].double() - a[n].double() for n in a}
    uu = sum(float((x * x).sum()) for x in u.values())
    if not uu > 0:
        raise ValueError("the first two models are the same weights")
    t = sum(float((w[n] * u[n]).sum()) for n in a) / uu
    v = {n: w[n] - t * u[n] for n in a}
    vv = sum(float((x * x).sum()) for x in v.values())
    if not vv > 1e-12 * uu:
        raise ValueError("the three models lie on one line; they span no plane")
    return u, v, t, uu, vv


def make(m) -> Directions:
    job = m.job
    a, b, c = points(job, m.loaded)
    try:
        u, v, t, uu, vv = plane_frame(a, b, c)
    except ValueError as e:
        raise UserError(f"{job.source}: directions.points: {e}")
    names = [os.path.basename(os.path.normpath(f)) for f in job.directions.points]
    m.log(f"plane through {', '.join(names)}: |b - a| {uu ** 0.5:.4g}, c at ({t:.4g}, 1), |y| {vv ** 0.5:.4g}")
    attrs = {"points": [[0.0, 0.0], [1.0, 0.0], [t, 1.0]], "point_files": names,
             "plane_x_norm": uu ** 0.5, "plane_y_norm": vv ** 0.5}
    if job.directions.curve:  # c is the bend of a curve from a to b: the plane holds it whole
        from ..evaluation.curves import coefficients
        # θ(t) = c0·a + c1·c + c2·b, and the plane is affine: its coordinates are c1·(t_c, 1) + c2·(1, 0)
        path = [(c1 * t + c2, c1) for c0, c1, c2 in (coefficients(job.directions.curve, s / 100) for s in range(101))]
        attrs.update(curve=job.directions.curve, curve_path=[list(p) for p in path])
    return Directions(x={n: x.to(a[n].dtype) for n, x in u.items()}, y={n: x.to(a[n].dtype) for n, x in v.items()},
                      attrs=attrs)
