"""The directions of one plane, as they travel: from the kind that made them (directions/kinds.py)
to the file (store/), to every rank and into the evaluator. Plain data: no torch import here, so
that the store, which writes and reads them, stays free of it.

    d = Directions(x={"fc.weight": t, ...}, y={...})     # tensors, entries by state-dict name
    d.axes                                               # ("x", "y"): the axes it has
    d.tensors()                                          # {"x": {...}, "y": {...}, "target": {...}}

A direction is a dict {state-dict name: tensor shaped like that entry} over the model's float
state (parameters and float buffers). As the store reads them back they are numpy arrays, or a
recipe; directions.kinds.materialize makes tensors of them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

TENSORS = ("x", "y", "target", "bend")  # the entries a plane may hold as tensors, by their group in the file


@dataclass
class Directions:
    x: Optional[dict] = None  # the first axis; None while kept as a recipe (until materialized)
    y: Optional[dict] = None  # the second (2D grids)
    target: Optional[dict] = None  # θ' of an interpolation, or a curve's end b: x moves by torch.lerp to it
    bend: Optional[dict] = None  # a curve's bend (kind curve): x is t along the curve
    recipe: Optional[dict] = None  # random directions kept as their recipe (recipe.to_dict): no tensor held
    summary: Optional[dict] = None  # the recipe's norms, checksums and row sums, per axis
    attrs: dict = field(default_factory=dict)  # what made them (kind, norm, seed, ...): /directions' attributes
    trajectory: Optional[Any] = None  # pca: the checkpoints' (m, 2) coordinates in the plane
    trajectory_fit: Optional[dict] = None  # pca: how well the plane holds each checkpoint
    planes: list = field(default_factory=list)  # directions.repeats: planes 1..n-1, each a Directions

    @property
    def axes(self) -> tuple:
        """The axes it has: ("x",) or ("x", "y"), held as tensors or as a recipe."""
        if self.recipe is not None:
            return tuple(self.summary["norms"])
        return tuple(a for a in ("x", "y") if getattr(self, a) is not None)

    def tensors(self) -> dict:
        """{group: {name: tensor}} of every entry held as tensors (x, y, target, bend)."""
        return {k: getattr(self, k) for k in TENSORS if getattr(self, k) is not None}
