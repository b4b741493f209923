"""directions.kind random: filter-normalized Gaussian directions (Li et al. 2018, section 4),
each made by its recipe (recipe.py: a stream per row, so any shard makes its rows), kept as
tensors or, above RECIPE_ABOVE parameters or with directions.store: recipe, as the recipe alone.
(This module's name is the kind's; `import random` elsewhere still finds Python's.)

    d = make_directions(theta, kinds, job.directions, ndim=2)               # Directions(x, y)
    d = make_directions(theta, kinds, job.directions, 1, theta_target)      # x = θ' − θ (kind target)

Norms: filter (d_i <- d_i * |theta_i| / |d_i| for each filter i), layer (the same per tensor),
weight (d <- d * theta, elementwise), none (raw Gaussian).
"""

from __future__ import annotations

from typing import Optional

from . import recipe as recipes
from .record import Directions
from .recipe import Recipe, direction
from .state import trainable_names

NORM = None  # the job's directions.norm

RECIPE_ABOVE = 50_000_000  # parameters: above it, directions.store: auto keeps random directions as their recipe


def target_direction(theta: dict, theta_target: dict) -> dict:
    """theta' - theta over every float entry (buffers included). Stored for plots and cosines;
    the evaluator interpolates with torch.lerp from theta and theta' themselves, so that
    alpha = 0 is theta and alpha = 1 is theta' exactly (theta + 1*(theta' - theta) is not:
    float32 rounding leaves about 10% of the entries off by up to hundreds of ulp)."""
    return {n: (theta_target[n].to(w.dtype) - w) for n, w in theta.items()}


def make_directions(theta: dict, kinds: dict, cfg, ndim: int, theta_target: Optional[dict] = None,
                    trainable: Optional[set] = None) -> Directions:
    """x (and y on 2D grids) random from their recipe: a 1D job and a 2D job with one seed share
    x. With a target, x is θ' − θ and Directions.target holds θ' (y, 2D, random). With
    directions.params, only the chosen parameters move (`trainable`: the model's parameters
    that require grad, for trainable_only); a target moves them only."""
    recipe = Recipe.of(cfg, trainable)
    d = Directions()
    if theta_target is not None:
        # every float entry moves to theta' (biases and BatchNorm statistics too), or with
        # directions.params only the chosen parameters: theta' is theta elsewhere, so lerp keeps them
        moving = {n for n in theta if not recipe.subset or (kinds[n] != "buffer" and recipe.selects(n))}
        d.target = {n: (theta_target[n] if n in moving else theta[n]).to(w.dtype).clone() for n, w in theta.items()}
        d.x = target_direction(theta, d.target)
    else:
        d.x = direction(theta, kinds, recipe, "x")
    if ndim == 2:
        d.y = direction(theta, kinds, recipe, "y")
    return d


def num_parameters(loaded) -> int:
    return sum(t.numel() for t in loaded.theta.values())


def kept_as_recipe(job, loaded) -> bool:
    """Whether the job's directions are kept as their recipe (directions.store)."""
    dr = job.directions
    if dr.kind != "random" or dr.target:
        return False
    return dr.store == "recipe" or (dr.store == "auto" and num_parameters(loaded) > RECIPE_ABOVE)


def check_moves(job, loaded, d: Directions) -> None:
    """directions.params must choose a parameter the directions move: a direction held whole
    moves somewhere, a recipe selects an entry it moves."""
    from ..errors import UserError
    if not job.directions.params:
        return
    if d.recipe is not None:
        r = recipes.from_dict(d.recipe)
        moves = any(r.moves(n, loaded.kinds[n]) for n in loaded.theta)
    else:
        moves = any(t.any() for axis in (d.x, d.y) if axis is not None for t in axis.values())
    if not moves:
        raise UserError(f"{job.source}: key 'directions.params' chooses no parameter the directions can move "
                        f"(the model's: {', '.join(list(loaded.theta)[:6])}, ...)")


def make(m) -> Directions:
    """The job's random plane: as tensors, or as the recipe, its norms and checksums (no
    direction held whole)."""
    job, loaded = m.job, m.loaded
    names = trainable_names(loaded.model)
    if kept_as_recipe(job, loaded):
        r = Recipe.of(job.directions, names)
        check_moves(job, loaded, Directions(recipe=recipes.to_dict(r)))  # before the work of summing
        summary = recipes.summarize(loaded.theta, loaded.kinds, r, ("x", "y")[:job.ndim], loaded.read)
        d = Directions(recipe=recipes.to_dict(r), summary=summary)
        m.log(f"directions kept as their recipe ({r.describe()}): {num_parameters(loaded):,} parameters")
        return d
    d = make_directions(loaded.theta, loaded.kinds, job.directions, job.ndim, None, names)
    check_moves(job, loaded, d)
    return d
