"""Random directions by recipe: what a direction is, such that any rank can make exactly its
part of it. No MPI, no HDF5.

    recipe = Recipe.of(job.directions, trainable)                   # seed, normalization, subset
    d = direction(theta, kinds, recipe, "x")                        # {name: tensor}, the whole direction
    part = direction(theta, kinds, recipe, "x", rows={"fc.weight": slice(0, 128)})   # a shard's rows

A random direction is fully defined by its recipe: the seed, the parameters it moves, the
normalization, and the random stream. Every row of every parameter (a weight's dim-0 slice; a
vector or a scalar is one row) draws from a torch.Generator of its own, seeded from
sha256("lldist.directions:<seed>:<axis>:<parameter name>") mixed with the row index
(splitmix64). So a row's values depend on nothing else: not on the other parameters or their
order, not on the sharding, the number of ranks or the device; a 1D and a 2D job with one seed
share x; two models that share a layer's name and shape share its direction.

Filter normalization needs only the rows themselves for weights whose filters are rows
(nn.Linear, convolutions, embeddings: `weight`) with the `filter`, `weight` and `none` norms:
those are made row by row. Where a norm spans rows (a `weight_t` weight, transformers' Conv1D,
whose filters are columns; the `layer` norm; a vector) the parameter is made whole, normalized,
and the rows kept: bit for bit the same values, at the cost of one parameter's memory for a
moment.
"""

from __future__ import annotations

import hashlib
import math
import re
from dataclasses import dataclass
from typing import Callable, Optional

import torch

MASK64 = (1 << 64) - 1
EPS = 1e-10  # guards zero-norm directions; a zero filter of theta gives a zero direction
STREAM_TAG = "lldist.directions"


def filter_dim(kind: str) -> int:
    """The dimension a weight's filters (output units) run along: 1 for `weight_t` (stored
    (in, out): transformers' Conv1D, ConvTranspose), else 0."""
    return 1 if kind == "weight_t" else 0


def normalize(d: torch.Tensor, w: torch.Tensor, norm: str, dim: int = 0) -> torch.Tensor:
    """d rescaled to w's norms; with `filter`, each filter along `dim` to the same filter's."""
    if norm == "none":
        return d
    if norm == "weight":
        return d * w
    if norm == "layer":
        return d * (w.norm() / (d.norm() + EPS))
    if norm == "filter":
        if d.dim() <= 1:  # a 1-D vector is one filter
            return d * (w.norm() / (d.norm() + EPS))
        dn = d.transpose(0, dim).flatten(1).norm(dim=1)  # (filters,)
        wn = w.transpose(0, dim).flatten(1).norm(dim=1)
        shape = [1] * d.dim()
        shape[dim] = -1
        return d * (wn / (dn + EPS)).view(shape)
    raise ValueError(f"unknown normalization {norm!r}")  # config validation makes this unreachable


@dataclass(frozen=True)
class Recipe:
    """Everything a random direction depends on (with the model's theta* for its norms)."""
    seed: int = 0
    norm: str = "filter"  # filter | layer | weight | none
    ignore: str = "biasbn"  # biasbn: vectors (biases, normalization layers) do not move
    include: tuple = ()  # regexes of parameter names (re.search); empty: every parameter
    exclude: tuple = ()
    trainable: Optional[frozenset] = None  # names of the parameters that require grad; None: all

    @classmethod
    def of(cls, cfg, trainable: Optional[set] = None) -> "Recipe":
        """The job's directions section as a recipe; `trainable`: the model's parameters that
        require grad, used when directions.params.trainable_only is set."""
        p = cfg.params or {}
        only = bool(p.get("trainable_only"))
        return cls(cfg.seed, cfg.norm, cfg.ignore, tuple(p.get("include") or ()), tuple(p.get("exclude") or ()),
                   frozenset(trainable) if only and trainable is not None else None)

    @property
    def subset(self) -> bool:
        """Whether directions.params chooses some parameters (else all move)."""
        return bool(self.include or self.exclude) or self.trainable is not None

    def selects(self, name: str) -> bool:
        """Whether directions.params chooses the entry `name` (by its name alone)."""
        if self.include and not any(re.search(p, name) for p in self.include):
            return False
        if any(re.search(p, name) for p in self.exclude):
            return False
        return self.trainable is None or name in self.trainable

    def moves(self, name: str, kind: str) -> bool:
        """Whether the entry `name` of kind `kind` gets a non-zero random direction."""
        if kind == "buffer" or (kind == "vector" and self.ignore == "biasbn"):
            return False
        return self.selects(name)

    def describe(self) -> str:
        return (f"seed {self.seed}, norm {self.norm}, ignore {self.ignore}"
                + (f", include {list(self.include)}" if self.include else "")
                + (f", exclude {list(self.exclude)}" if self.exclude else "")
                + (", trainable parameters only" if self.trainable is not None else ""))


def param_seed(seed: int, axis: str, name: str) -> int:
    digest = hashlib.sha256(f"{STREAM_TAG}:{int(seed)}:{axis}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little")


def row_seed(base: int, row: int) -> int:
    """splitmix64 of the parameter's seed and the row: neighbouring rows get unrelated seeds."""
    z = (base + (row + 1) * 0x9E3779B97F4A7C15) & MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK64
    return (z ^ (z >> 31)) & ((1 << 63) - 1)


def gaussian(name: str, shape: tuple, seed: int, axis: str, rows: Optional[slice] = None) -> torch.Tensor:
    """Standard normal float32 values of the parameter `name` of `shape`, its rows `rows` (all
    by default): each row from its own generator (see the module docstring)."""
    shape = tuple(shape)
    if len(shape) < 2:  # a vector or a scalar is one row
        g = torch.Generator().manual_seed(row_seed(param_seed(seed, axis, name), 0))
        full = torch.randn(shape, generator=g, dtype=torch.float32)
        return full if rows is None else full[rows]
    start, stop, _ = (rows or slice(0, shape[0])).indices(shape[0])
    width = math.prod(shape[1:])
    out = torch.empty((max(0, stop - start), width), dtype=torch.float32)
    base = param_seed(seed, axis, name)
    g = torch.Generator()
    for i, r in enumerate(range(start, stop)):
        g.manual_seed(row_seed(base, r))
        torch.randn(width, generator=g, dtype=torch.float32, out=out[i])
    return out.view(out.shape[0], *shape[1:])


def _rowwise(kind: str, norm: str, ndim: int) -> bool:
    """Whether a parameter's normalized direction can be made from its rows alone."""
    return ndim >= 2 and kind == "weight" and norm in ("filter", "weight", "none")


def parameter(name: str, w: torch.Tensor, kind: str, recipe: Recipe, axis: str,
              rows: Optional[slice] = None, read: Optional[Callable] = None) -> torch.Tensor:
    """One parameter's direction (its rows `rows`, all by default), normalized to theta*'s `w`
    (the whole parameter), in w's dtype. Zero where the recipe does not move it. Where `w` is
    a meta tensor (a model loaded by rows: its shape alone), `read(name, rows)` gives its
    values: only the rows `rows` where the norm needs no others, else the whole parameter."""
    def values(r: Optional[slice]) -> torch.Tensor:
        if w.is_meta:
            return read(name, r if w.dim() else None)
        return w if r is None or w.dim() == 0 else w[r]
    if not recipe.moves(name, kind):
        shape = tuple(w.shape) if rows is None or w.dim() == 0 else \
            (len(range(*rows.indices(w.shape[0]))),) + tuple(w.shape[1:])
        return torch.zeros(shape, dtype=w.dtype)
    if _rowwise(kind, recipe.norm, w.dim()):
        d = gaussian(name, w.shape, recipe.seed, axis, rows)
        return normalize(d, values(rows).float(), recipe.norm, 0).to(w.dtype)
    d = normalize(gaussian(name, w.shape, recipe.seed, axis), values(None).float(), recipe.norm, filter_dim(kind))
    # the rows as a tensor of their own: a view would keep the whole parameter's direction alive
    return (d if rows is None or d.dim() == 0 else d[rows].clone()).to(w.dtype)


def direction(theta: dict, kinds: dict, recipe: Recipe, axis: str, rows: Optional[dict] = None,
              read: Optional[Callable] = None) -> dict:
    """{name: tensor}: the direction `axis` over the float state theta (whole tensors), or for
    each name in `rows` only those rows (a shard's; names missing from `rows` are whole).
    `read`: θ*'s values where theta holds meta tensors (see parameter)."""
    rows = rows or {}
    return {n: parameter(n, w, kinds[n], recipe, axis, rows.get(n), read) for n, w in theta.items()}


def norms(d: dict) -> dict:
    """Each entry's float64 norm: what a file that keeps the recipe stores beside it."""
    return {n: float(t.double().norm()) for n, t in d.items()}


def checksum(t: torch.Tensor) -> str:
    return hashlib.sha256(t.contiguous().view(-1).view(torch.uint8).numpy().tobytes()).hexdigest()


def row_sum(t: torch.Tensor) -> float:
    """An entry's (or some of its rows') float64 sum, row by row: rows summed on different
    ranks add up to the whole's within round-off."""
    return float(t.double().reshape(t.shape[0], -1).sum(1).sum()) if t.dim() else float(t.double())


SUM_TOLERANCE = 1e-9  # relative to the entry's norm times sqrt(its size): round-off is ~1e-16 of it,
#                      a different random stream changes the sum by about the norm itself


def rows_agree(total: float, stored: float, norm: float, numel: int) -> bool:
    """Whether a sum of regenerated rows over a group matches the sum the file stores."""
    return abs(total - stored) <= SUM_TOLERANCE * norm * math.sqrt(max(numel, 1)) + 1e-300



# ----------------------------------------------------------------------------- kept in a file

def to_dict(recipe: Recipe) -> dict:
    """The recipe as JSON values, for the file (directions.store: recipe)."""
    return {"version": 1, "stream": "per-row splitmix64(sha256(tag:seed:axis:name)[:8], row)", "seed": recipe.seed,
            "norm": recipe.norm, "ignore": recipe.ignore, "include": list(recipe.include),
            "exclude": list(recipe.exclude),
            "trainable": sorted(recipe.trainable) if recipe.trainable is not None else None}


def from_dict(d: dict) -> Recipe:
    if d.get("version") != 1:
        raise ValueError(f"a direction recipe of version {d.get('version')!r}; this lldist makes version 1")
    return Recipe(int(d["seed"]), d["norm"], d["ignore"], tuple(d["include"]), tuple(d["exclude"]),
                  frozenset(d["trainable"]) if d.get("trainable") is not None else None)


def summarize(theta: dict, kinds: dict, recipe: Recipe, axes: tuple, read: Optional[Callable] = None) -> dict:
    """What a file keeps beside a recipe, made one parameter at a time (so a model of billions
    of parameters never holds a whole direction): each entry's norm and sha256 per axis, and
    the cosine of x and y. Each entry's float64 sum too: a shard cannot hash the whole, but its
    rows' sums, added over the group, must give it (see rows_agree). `read`: as for parameter,
    where theta holds meta tensors (one parameter whole at a time)."""
    out = {"norms": {a: {} for a in axes}, "checksums": {a: {} for a in axes}, "sums": {a: {} for a in axes}}
    dot, sq = 0.0, {a: 0.0 for a in axes}
    for name, w in theta.items():
        parts = {a: parameter(name, w, kinds[name], recipe, a, read=read) for a in axes}
        for a, t in parts.items():
            v = t.double()
            out["norms"][a][name] = float(v.norm())
            out["checksums"][a][name] = checksum(t)
            out["sums"][a][name] = row_sum(v)
            sq[a] += float((v * v).sum())
        if len(axes) == 2:
            dot += float((parts[axes[0]].double() * parts[axes[1]].double()).sum())
    out["cosine"] = dot / math.sqrt(sq[axes[0]] * sq[axes[1]]) if len(axes) == 2 and sq[axes[0]] * sq[axes[1]] > 0 \
        else None
    return out
