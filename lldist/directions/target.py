"""directions.kind target (or kind random with a directions.target): the line from θ* to θ',
x = θ' − θ* (the evaluator interpolates by torch.lerp, exact at both ends), y random on 2D
grids; with directions.align: weights, θ' permuted to match θ* first (align.py).

    d = make(making)        # Directions(x, y, target), attrs with the alignment's numbers
"""

from __future__ import annotations

import torch

from ..errors import UserError
from .random import check_moves, make_directions
from .record import Directions
from .state import trainable_names

NORM = None  # the job's directions.norm (y's)
Y_KIND = "random"


def inputs(job) -> dict:
    """θ' by its content (sha256): a retrained target makes a different job. (A target given from
    Python, object:target, is fingerprinted by lldist.landscape itself.)"""
    from ..inputs.identity import file
    return {} if job.directions.target.startswith("object:") else {"target": file(job.directions.target)}


def aligned_to_theta(loaded, target: dict, log) -> tuple:
    """θ' with its hidden units permuted to match θ*'s (directions.align: weights; align.py),
    and what the file says of it."""
    from .align import permutation_spec, weight_matching
    try:
        spec = permutation_spec(loaded.model)
    except ValueError as e:
        raise UserError(str(e))
    aligned, perms = weight_matching(spec, loaded.theta, target)
    moved = sum(int((v != torch.arange(len(v))).sum()) for v in perms.values())
    total = sum(len(v) for v in perms.values())
    log(f"target aligned to theta* by weight matching: {moved} of {total} hidden units moved, "
        f"{len(perms)} permutations")
    return aligned, {"align": "weights", "align_units_moved": moved, "align_units": total}


def make(m) -> Directions:
    from ..inputs.loading import checkpoint_state
    job, loaded = m.job, m.loaded
    tgt = m.source.target if m.source.target is not None else checkpoint_state(job, loaded, job.directions.target)
    info = {}
    if job.directions.align == "weights":
        tgt, info = aligned_to_theta(loaded, tgt, m.log)
    d = make_directions(loaded.theta, loaded.kinds, job.directions, job.ndim, tgt, trainable_names(loaded.model))
    d.attrs.update(info)
    check_moves(job, loaded, d)
    return d
