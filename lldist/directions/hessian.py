"""directions.kind hessian: the top eigenvectors of the Hessian at θ*, taken on the first
directions.batches batches of eval.batch_size of the job's first split (evaluation/curvature.py).

    d = make(making)        # Directions(x, y): unit vectors; attrs: the eigenvalues
"""

from __future__ import annotations

from .record import Directions

NORM = "none (unit vectors)"


def make(m) -> Directions:
    from ..evaluation.curvature import Curvature, first_batches
    job, loaded = m.job, m.loaded
    first = next(iter(loaded.splits.values()))
    batches = first_batches(first, job.eval.batch_size, job.directions.batches)
    curv = Curvature(loaded.model, batches, m.task)
    vals, vecs = curv.eigs(k=job.ndim, which="LA")
    m.log(f"hessian directions: top eigenvalues {', '.join(f'{v:.5g}' for v in vals)} "
          f"({curv.matvecs} Hessian-vector products on {len(batches)} batches)")
    axes = {axis: curv.as_state(vecs[:, i], loaded.theta) for i, axis in enumerate(("x", "y")[:job.ndim])}
    return Directions(**axes, attrs={"hessian_eigenvalues": [float(v) for v in vals], "hessian_batches": len(batches),
                                     "hessian_batch_size": job.eval.batch_size})
