"""Job files: YAML -> frozen, typed dataclasses, with `--set key.sub=value` overrides.

    python -m lldist.surface jobs/quickstart.yaml --set grid.x=[-1,1,11] --out /tmp/q.h5

Every key is declared below with its type and default; README.md's "Job files" documents them.
Unknown keys, wrong types and impossible values are rejected with one line that
names the file and the key (nanoGPT's configurator does the same, without exec).
Relative paths in a job file are relative to the current directory.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import typing
from dataclasses import dataclass, field
from typing import Any, Optional, Union

import yaml

from .errors import UserError

BUILTIN_MODELS = ("mlp", "cnn", "cnn_skip", "mobilenet_v2")
BUILTIN_DATA = ("digits", "cifar10", "imagefolder")
NORMS = ("filter", "layer", "weight", "none")
IGNORES = ("biasbn", "none")
DIRECTION_KINDS = ("random", "target", "pca", "hessian", "file", "plane", "curve")
CURVES = ("bezier", "polychain")  # lldist/evaluation/curves.py
SPLITS = ("train", "test", "both")
PRECISIONS = ("fp32", "tf32", "bf16")
OPTIMIZERS = ("adam", "adamw", "sgd")
DEVICES = ("auto", "cpu", "cuda")
BN_MODES = ("eval", "batch", "recompute")
LOSSES = ("cross_entropy", "mse", "lm")
OPERATORS_CURVATURE = ("hessian", "ggn", "fisher")  # lldist/evaluation/operators.py
BLOCK_KINDS = ("layers", "transformer")  # lldist/evaluation/blocks.py
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
# Every dataset of a surface is allocated when the file is made (about 160 bytes a cell with
# its work log): 2**27 cells is a 11585 x 11585 grid and a ~21 GB file.
MAX_CELLS = 2 ** 27


# ----------------------------------------------------------------------------- YAML

class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader with two fixes for job files:
    * numbers like 5e-4 are floats (YAML 1.2; PyYAML follows YAML 1.1, which wants 5.0e-4
      and reads the README's own notation as a string);
    * a key given twice is an error (PyYAML keeps the last silently: a second `grid:` turned
      a 2D job into a 1D one)."""


def _mapping_without_duplicates(loader, node, deep=False):
    loader.flatten_mapping(node)
    seen = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        try:
            duplicate = key in seen
        except TypeError:  # an unhashable key: let PyYAML say so
            break
        if duplicate:
            raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
        seen.add(key)
    return loader.construct_mapping(node, deep=deep)


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping_without_duplicates)
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."))


def load_yaml(text: str, path: str, what: str = "job file"):
    """Parse YAML text; a malformed file is a UserError naming the file and the line."""
    try:
        return yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as e:
        where = getattr(e, "problem_mark", None)
        line = f" at line {where.line + 1}" if where is not None else ""
        raise UserError(f"{path}: malformed YAML{line}: {getattr(e, 'problem', None) or e}")


def read_text(path: str, what: str = "job file") -> str:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except OSError as e:
        raise UserError(f"{path}: cannot read {what}: {e.strerror}")
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: the {what} is not UTF-8 text (byte {e.start}: {e.reason})")


@dataclass(frozen=True)
class ModelConfig:
    name: str = "cnn"  # mlp | cnn | cnn_skip | mobilenet_v2 | torchvision:<name> | python:<module>:<factory>
    checkpoint: Optional[str] = None  # .pt state dict; trained first when missing and `train:` is given
    pretrained: Optional[str] = None  # torchvision weights name, e.g. IMAGENET1K_V1 or DEFAULT
    seed: int = 0  # initialisation seed when there is no checkpoint
    args: dict = field(default_factory=dict)  # keyword arguments for the model factory


@dataclass(frozen=True)
class DataConfig:
    name: str = "digits"  # digits | cifar10 | imagefolder | python:<module>:<factory>
    root: Optional[str] = None  # dataset folder (cifar10, imagefolder)
    download: bool = False  # cifar10 only: fetch into root if absent
    subset: Optional[int] = None  # evaluate on this many samples per split (seeded draw)
    subset_seed: int = 0
    resize: int = 256  # imagefolder: shorter side before the centre crop
    crop: int = 224  # imagefolder: centre crop size
    args: dict = field(default_factory=dict)  # keyword arguments for a python: factory


@dataclass(frozen=True)
class TrainConfig:
    optimizer: str = "adam"
    lr: float = 5e-4
    batch_size: int = 64
    epochs: int = 10
    weight_decay: float = 0.0
    momentum: float = 0.9  # sgd only
    warmup_steps: int = 0  # learning rate rises linearly over these first steps (transformers)
    steps: Optional[int] = None  # stop after this many optimizer steps in all (a brief training of a big model)
    seed: int = 0
    device: str = "auto"


@dataclass(frozen=True)
class DirectionsConfig:
    kind: str = "random"  # random | target | pca | hessian | file | plane | curve (lldist/directions)
    seed: int = 0
    norm: str = "filter"  # random directions only
    ignore: str = "biasbn"  # biasbn: 1-D parameters (biases, BatchNorm) get a zero direction
    target: Optional[str] = None  # checkpoint theta': x direction = theta' - theta (interpolation)
    checkpoints: Optional[str] = None  # pca: a glob of the trajectory's checkpoints (default <stem>_epoch*.pt)
    file: Optional[str] = None  # file: an lldist file whose directions this job uses
    batches: int = 4  # hessian: batches of eval.batch_size of the first split the Hessian is taken on
    center: str = "final"  # pca: final (differences from theta*, uncentred) | mean (centred: Li et al.'s sklearn PCA)
    params: Optional[dict] = None  # {include: [regex], exclude: [regex], trainable_only: bool}: only these move
    store: str = "auto"  # tensors | recipe (random directions: regenerated by each rank) | auto (recipe above RECIPE_ABOVE)
    repeats: int = 1  # random: n planes in one file, plane k drawn with seed + k (the draw-to-draw error bar)
    align: Optional[str] = None  # with a target: weights (permute theta' to match theta* first: directions/align.py)
    points: Optional[list] = None  # plane: three checkpoints [a, b, c]; origin a, x = b - a, y = c - a made orthogonal
    #                                curve: [a, b, bend], the curve's ends and its bend (python -m lldist.connect)
    curve: Optional[str] = None  # bezier | polychain: kind curve's path (default bezier); on a plane through
    #                              [a, b, bend], the curve drawn on it


@dataclass(frozen=True)
class Axis:
    min: float
    max: float
    num: int


AUTO_NUM = 31  # cells per axis of an automatic grid


@dataclass(frozen=True)
class AutoAxis(Axis):
    """`grid.x: auto` (and the default of a pca job that gives no grid): an axis that covers
    the PCA trajectory's coordinates, with a margin, decided once the trajectory is read
    (directions/pca.py's covering, before the job's identity is taken)."""
    min: float = math.nan
    max: float = math.nan
    num: int = AUTO_NUM


def auto_coarse(n: int) -> int:
    """grid.adaptive.coarse: auto on an axis of n points: the largest power of 2 that leaves at
    least 16 intervals on the lattice (4 at 101 points, 8 at 201, 16 at 501). The lattice then
    has 17-32 points an axis whatever the resolution: a landscape's features have a size in
    alpha and beta, not in cells."""
    s = 2
    while (n - 1) / (2 * s) >= 16:
        s *= 2
    return s


@dataclass(frozen=True)
class AdaptiveConfig:
    """Compute a coarse lattice, then only the cells the contour picture needs (lldist/cells/schedule.py)."""
    coarse: Union[int, str] = "auto"  # the lattice: every coarse-th cell along each axis, and the last;
    #                                   auto: 17-32 points an axis (auto_coarse)
    tolerance: float = 0.02  # estimated interpolation error allowed, in spacings of `levels` levels
    levels: int = 30  # the densest levels (linear or geometric) the picture must hold at
    budget: Optional[Union[int, float]] = None  # at most this many cells a plane (or this fraction of them)

    def stride(self, grid: "GridConfig") -> int:
        """The lattice's stride on `grid`: `coarse`, or auto's choice for its longer axis."""
        n = max(grid.x.num, grid.y.num if grid.y is not None else 0)
        return auto_coarse(n) if self.coarse == "auto" else int(self.coarse)

    def lattice_cells(self, grid: "GridConfig") -> int:
        """The lattice's cells on a plane (cells/interpolation.lattice: every stride-th and the last)."""
        s = self.stride(grid)
        count = lambda n: len(range(0, n, s)) + ((n - 1) % s != 0)  # noqa: E731
        return count(grid.x.num) * (count(grid.y.num) if grid.y is not None else 1)

    def cells(self, grid: "GridConfig") -> Optional[int]:
        """The budget in cells of a plane, or None."""
        if self.budget is None:
            return None
        n = grid.x.num * (grid.y.num if grid.y is not None else 1)
        return int(self.budget) if isinstance(self.budget, int) else max(1, math.floor(self.budget * n))


@dataclass(frozen=True)
class GridConfig:
    x: Axis = Axis(-1.0, 1.0, 21)
    y: Optional[Axis] = None
    adaptive: Optional[AdaptiveConfig] = None  # a mapping ({} for the defaults); None: every cell


@dataclass(frozen=True)
class EvalConfig:
    split: str = "test"  # train | test | both
    batch_size: Union[int, str] = 256  # or "auto"
    device: str = "auto"
    precision: str = "fp32"
    channels_last: bool = False
    compile: Union[bool, str] = False  # true, or a torch.compile mode such as "reduce-overhead"
    bn: str = "eval"  # eval: running statistics; batch: statistics of each batch; recompute: running
    #                   statistics recomputed at every cell's weights on the train split (curves, interpolations)
    cells_per_pass: Union[int, str] = 1  # several cells in one vmapped pass, or "auto"
    chunk_size: Union[int, str] = "auto"  # cells per unit of work (and per HDF5 flush)
    loss: str = "cross_entropy"  # cross_entropy | mse | lm (next-token) | python:<module>:<function>
    metrics: Optional[dict] = None  # name -> python:<module>:<function>; None: the loss's own (acc, perplexity)
    curvature: bool = False  # per cell: lambda_max, lambda_min, |lambda_min/lambda_max| of the Hessian
    curvature_batches: int = 2  # batches (of batch_size) the per-cell Hessian is taken on
    group_size: int = 1  # ranks that evaluate each cell together (groups of consecutive ranks)
    group_mode: str = "data"  # data: the batches split over the group | shard: and the model sharded (FSDP2)
    threads: Optional[int] = None  # torch CPU threads per process (default: OMP_NUM_THREADS, else
    #                                 the CPUs this process may use, shared by the node's ranks)


@dataclass(frozen=True)
class CurvatureConfig:
    """Which curvature, of which parameters, and how it is taken at θ* (python -m lldist.hessian,
    whose flags override these keys, and a study's variants, whose `curvature:` fills them): the
    one declaration of the Hessian's settings. `operator` applies to the per-cell maps
    (eval.curvature) too."""
    operator: str = "hessian"  # hessian | ggn (Gauss-Newton, J^T H_out J) | fisher (empirical Fisher)
    blocks: Optional[Union[str, dict]] = None  # at θ*, per block: layers | transformer | {name: regex}
    split: Optional[str] = None  # train | test: the split at θ* (default: the job's first; a study's: train)
    batches: int = 4  # the first batches of eval.batch_size it is taken on
    top: int = 5  # largest eigenvalues (Lanczos)
    trace_samples: int = 64  # Rademacher vectors of Hutchinson's trace (0: no trace)
    smallest: bool = True  # the smallest eigenvalue too
    tol: float = 1e-4  # Lanczos's relative tolerance (eigsh's tol)
    density: bool = False  # the spectral density too (stochastic Lanczos quadrature)
    density_runs: int = 4  # its start vectors
    density_steps: int = 80  # its Lanczos steps per start vector
    block_top: bool = True  # with blocks: each block's top eigenvalue (a Lanczos run each), not only its trace
    jackknife: bool = True  # lambda_max's standard error over the batches (a Lanczos run without each)
    basis_memory: float = 2e9  # bytes of Lanczos basis a rank keeps in memory (one process: eigsh's is cut
    #                            to fit; over ranks, each rank's piece goes on in a file in TMPDIR)


@dataclass(frozen=True)
class SharpnessConfig:
    """The sharpness measures at θ* (python -m lldist.sharpness, a study's variants; definitions
    in docs/METRICS.md and lldist/evaluation/sharpness.py). ρ is relative: ‖δ ⊘ |θ*|‖_p ≤ ρ."""
    split: str = "train"  # the split they are taken on (the generalization literature's: train)
    examples: int = 1024  # its first examples, in batches of eval.batch_size
    seed: int = 0  # of every random start and draw
    rho_2: float = 0.1  # worst- and average-case adaptive sharpness, ℓ2 ball
    rho_inf: float = 0.005  # worst-case adaptive sharpness, ℓ∞ ball
    steps: int = 20  # projected gradient ascent steps per restart
    restarts: int = 4  # of the ascent (the first from θ*, the others from random points of the ball)
    draws: int = 32  # random directions of the average case, and of each PAC-Bayes estimate (antithetic pairs)
    m: int = 128  # SAM's m: examples per group
    rho_sam: float = 0.05  # SAM's radius (plain ℓ2, not adaptive)
    sam_steps: int = 1  # ascent steps per group (1: SAM's own first-order step)
    pac_threshold: float = 0.1  # PAC-Bayes: the largest σ whose expected loss rise stays at or under this
    pac_tol: float = 0.02  # the bisection's relative width on σ


@dataclass(frozen=True)
class ConnectConfig:
    """Mode-connecting curves between two minima (python -m lldist.connect a.pt b.pt; Garipov et
    al. 2018): the bend trained with t ~ U(0, 1) per batch, then the curve, the straight line and
    the plane of the three control points evaluated."""
    curve: str = "bezier"  # bezier | polychain (one bend)
    train: Optional[TrainConfig] = None  # the bend's training (default: the job's train section, else its defaults)
    points: int = 21  # cells along the curve and the line, t from 0 to 1
    plane: int = 21  # cells per axis of the plane through a, b and the bend
    margin: float = 0.25  # the plane reaches this far beyond the three points, in its own units
    align: Optional[str] = None  # weights: permute b to match a first (directions/align.py); the line to b stays too
    output: Optional[str] = None  # folder for the bend and the three files (default runs/connect/<a>_<b>)


SERIES_MEASURES = ("loss", "curvature", "gradient", "weights", "sharpness")  # lldist/runs/series.py
# measured when series.measures is not given: sharpness only by name (hundreds of forward and
# backward passes a checkpoint, the sharpness: section's ascents, draws and bisection)
SERIES_DEFAULT_MEASURES = SERIES_MEASURES[:4]


@dataclass(frozen=True)
class SeriesConfig:
    """A recorded run's checkpoints and what is measured at each (python -m lldist.series). The
    curvature is the job's `curvature:` settings (operator, split, batches, top, ...), taken on
    the same first batches at every checkpoint; the losses are the job's eval.split."""
    checkpoints: Optional[Union[str, list]] = None  # a Recorder's <stem>_trajectory.json or folder, a glob, or a list of files
    measures: Optional[list] = None  # of SERIES_MEASURES (default: SERIES_DEFAULT_MEASURES)
    output: Optional[str] = None  # the series file (default: series.h5 beside the job's output)


@dataclass(frozen=True)
class Job:
    name: str = "job"
    output: str = "runs/job/surface.h5"
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    train: Optional[TrainConfig] = None
    directions: DirectionsConfig = DirectionsConfig()
    grid: GridConfig = GridConfig()
    eval: EvalConfig = EvalConfig()
    curvature: CurvatureConfig = CurvatureConfig()
    sharpness: SharpnessConfig = SharpnessConfig()
    connect: ConnectConfig = ConnectConfig()
    series: SeriesConfig = SeriesConfig()
    source: str = field(default="<job>", compare=False)  # the file it came from
    text: str = field(default="", compare=False)  # the YAML text, with overrides appended

    @property
    def splits(self) -> tuple[str, ...]:
        return ("train", "test") if self.eval.split == "both" else (self.eval.split,)

    @property
    def ndim(self) -> int:
        return 1 if self.grid.y is None else 2

    @property
    def grid_auto(self) -> bool:
        """Whether an axis is `auto` (made numbers by directions/kinds.resolved)."""
        return isinstance(self.grid.x, AutoAxis) or isinstance(self.grid.y, AutoAxis)


# ----------------------------------------------------------------------------- loading

def load_job(path: str, overrides: list[str] = (), out: Optional[str] = None) -> Job:
    text = read_text(path)
    raw = load_yaml(text, path)
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise UserError(f"{path}: a job file must be a mapping of keys, got {type(raw).__name__}")
    for item in overrides:
        apply_override(raw, item, path)
    if out is not None:
        raw["output"] = out
    if overrides or out is not None:
        text = text.rstrip("\n") + "\n# overrides: " + json.dumps({"set": list(overrides), "out": out}) + "\n"
    return job_from_dict(raw, path, text)


def effective_raw(text: str, source: str) -> dict:
    """The job mapping a stored job text stands for: the file's YAML with the `--set`/`--out`
    overrides its last line records applied again (load_job's own order)."""
    raw = load_yaml(text, source) or {}
    last = [ln for ln in text.splitlines() if ln.startswith("# overrides: ")]
    if last and isinstance(raw, dict):
        rec = json.loads(last[-1][len("# overrides: "):])
        for item in rec.get("set", []):
            apply_override(raw, item, source)
        if rec.get("out") is not None:
            raw["output"] = rec["out"]
    return raw


def dotted(raw: dict, prefix: str = "") -> dict:
    """A job mapping flattened: {"grid.x": [-1, 1, 21], "model.args.width": 16, ...}."""
    out = {}
    for k, v in (raw or {}).items():
        out.update(dotted(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def differences(text_a: str, text_b: str, source: str = "<job>") -> list:
    """What two stored job texts set differently, as "key: a -> b" (keys of the mapping, nested
    ones by their dots; where the output goes and the job's name left out)."""
    try:
        a, b = dotted(effective_raw(text_a, source)), dotted(effective_raw(text_b, source))
    except (UserError, ValueError, TypeError):  # an unreadable stored text: nothing to say
        return []
    first = ("grid.", "directions.", "data.", "model.", "eval.")  # the keys a job's identity is made of
    keys = sorted((k for k in set(a) | set(b) if a.get(k) != b.get(k) and k not in ("output", "name")),
                  key=lambda k: (next((i for i, p in enumerate(first) if k.startswith(p)), len(first)), k))
    return [f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in keys]


def job_from_dict(raw: dict, source: str, text: Optional[str] = None) -> Job:
    """A validated Job from a mapping (a parsed job file, or a study's variant)."""
    job = _build(Job, raw, "", source)
    d = job.directions
    if d.kind == "pca" and "grid" not in raw:  # a trajectory's extent is not [-1, 1]: the grid covers it
        job = dataclasses.replace(job, grid=dataclasses.replace(job.grid, x=AutoAxis(), y=AutoAxis()))
    if d.kind in ("plane", "curve") and isinstance(d.points, list) and d.points and job.model.checkpoint is None:
        # a plane's origin and a curve's start are the first point: the model's theta*
        job = dataclasses.replace(job, model=dataclasses.replace(job.model, checkpoint=d.points[0]))
    if text is None:
        text = yaml.safe_dump(raw, sort_keys=False)
    job = dataclasses.replace(job, source=source, text=text)
    validate(job)
    return job


def apply_override(raw: dict, item: str, path: str) -> None:
    """`key.sub=value`: the value is parsed as YAML, so numbers, lists and null work."""
    if "=" not in item:
        raise UserError(f"--set {item!r}: expected key.sub=value")
    key, value = item.split("=", 1)
    try:
        parsed = yaml.load(value, Loader=_Loader)
    except yaml.YAMLError:
        raise UserError(f"--set {key}: cannot parse value {value!r}")
    glued = _glued_keys(parsed)
    if glued:  # YAML reads {width:8} as the key "width:8" with no value, which no model takes
        raise UserError(f"--set {key}: {glued[0]!r} is read as a key without a value; write a space after "
                        f"each colon ({{{glued[0].replace(':', ': ', 1)}, ...}})")
    node = raw
    parts = key.strip().split(".")
    for p in parts[:-1]:
        if not isinstance(node.get(p), dict):
            node[p] = {}
        node = node[p]
    node[parts[-1]] = parsed


def _glued_keys(value) -> list:
    """Keys like 'width:8' with a null value, at any depth: a flow mapping written without the
    space YAML needs after a colon."""
    if isinstance(value, dict):
        return [k for k, v in value.items() if v is None and isinstance(k, str) and ":" in k] + \
            [g for v in value.values() for g in _glued_keys(v)]
    if isinstance(value, list):
        return [g for v in value for g in _glued_keys(v)]
    return []


def _typename(t) -> str:
    return getattr(t, "__name__", str(t).replace("typing.", ""))


def _coerce(value: Any, t, key: str, path: str):
    origin = typing.get_origin(t)
    if origin is Union:
        args = typing.get_args(t)
        if value is None and type(None) in args:
            return None
        real = [a for a in args if a is not type(None)]
        if len(real) == 1:  # Optional[X]: X's own, more precise, message
            return _coerce(value, real[0], key, path)
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, key, path)
            except UserError:
                pass  # the next type may take it; the message below names them all
        wanted = " or ".join(_typename(a) for a in args if a is not type(None))
        raise UserError(f"{path}: key '{key}' must be {wanted}, got {value!r}")
    if t is Axis and value == "auto":
        return AutoAxis()
    if t is Axis:
        if (not isinstance(value, (list, tuple)) or len(value) != 3
                or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)):
            raise UserError(f"{path}: key '{key}' must be [min, max, num], got {value!r}")
        if isinstance(value[2], float) and not float(value[2]).is_integer():
            raise UserError(f"{path}: key '{key}': num must be an integer, got {value[2]!r}")
        return Axis(float(value[0]), float(value[1]), int(value[2]))
    if dataclasses.is_dataclass(t):
        if not isinstance(value, dict):
            raise UserError(f"{path}: key '{key}' must be a mapping, got {value!r}")
        return _build(t, value, key + ".", path)
    if t is bool:
        if not isinstance(value, bool):
            raise UserError(f"{path}: key '{key}' must be true or false, got {value!r}")
        return value
    if t is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise UserError(f"{path}: key '{key}' must be an integer, got {value!r}")
        return value
    if t is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise UserError(f"{path}: key '{key}' must be a number, got {value!r}")
        return float(value)
    if t is str:
        if not isinstance(value, str):
            raise UserError(f"{path}: key '{key}' must be a string, got {value!r}")
        return value
    if t is dict:
        if not isinstance(value, dict):
            raise UserError(f"{path}: key '{key}' must be a mapping, got {value!r}")
        return dict(value)
    if t is list:
        if not isinstance(value, list):
            raise UserError(f"{path}: key '{key}' must be a list, got {value!r}")
        return list(value)
    raise TypeError(f"unsupported config type {t}")


def _build(cls, raw: dict, prefix: str, path: str):
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.compare}
    for k in raw:
        if k not in names:
            known = ", ".join(sorted(names))
            raise UserError(f"{path}: unknown key '{prefix}{k}' (known keys here: {known})")
    kwargs = {k: _coerce(v, hints[k], prefix + k, path) for k, v in raw.items()}
    return cls(**kwargs)


def _check_params(params, path: str) -> None:
    """directions.params: which parameters the directions move (directions/recipe.py)."""
    if params is None:
        return
    unknown = set(params) - {"include", "exclude", "trainable_only"}
    if unknown:
        raise UserError(f"{path}: unknown key 'directions.params.{sorted(unknown)[0]}' "
                        "(known: include, exclude, trainable_only)")
    for key in ("include", "exclude"):
        pats = params.get(key) or []
        if not isinstance(pats, list) or not all(isinstance(x, str) for x in pats):
            raise UserError(f"{path}: key 'directions.params.{key}' must be a list of regular expressions, got {pats!r}")
        for x in pats:
            try:
                re.compile(x)
            except re.error as e:
                raise UserError(f"{path}: key 'directions.params.{key}': {x!r} is not a regular expression ({e})")
    if not isinstance(params.get("trainable_only", False), bool):
        raise UserError(f"{path}: key 'directions.params.trainable_only' must be true or false")


def _check_align(job: "Job", path: str) -> None:
    a = job.directions.align
    if a is None:
        return
    _choice(a, ("weights",), "directions.align", path)
    if job.directions.target is None:
        raise UserError(f"{path}: key 'directions.align' aligns the target to theta*: it needs directions.target")


def _check_train(t: TrainConfig, key: str, p: str) -> None:
    _choice(t.optimizer, OPTIMIZERS, f"{key}.optimizer", p)
    _choice(t.device, DEVICES, f"{key}.device", p)
    if not t.lr > 0:
        raise UserError(f"{p}: key '{key}.lr' must be positive, got {t.lr}")
    if t.batch_size < 1 or t.epochs < 1 or (t.steps is not None and t.steps < 1):
        raise UserError(f"{p}: keys '{key}.batch_size', '{key}.epochs' and '{key}.steps' must be at least 1")


def _check_connect(c: ConnectConfig, path: str) -> None:
    _choice(c.curve, CURVES, "connect.curve", path)
    if c.points < 3 or c.plane < 3:
        raise UserError(f"{path}: keys 'connect.points' and 'connect.plane' must be at least 3, got {c.points} and {c.plane}")
    if not c.margin >= 0:
        raise UserError(f"{path}: key 'connect.margin' must be at least 0, got {c.margin}")
    if c.train is not None:
        _check_train(c.train, "connect.train", path)
    if c.align is not None:
        _choice(c.align, ("weights",), "connect.align", path)


def _check_repeats(job: "Job", path: str) -> None:
    n = job.directions.repeats
    if n < 1:
        raise UserError(f"{path}: key 'directions.repeats' must be at least 1, got {n}")
    if n == 1:
        return
    cells = job.grid.x.num * (job.grid.y.num if job.grid.y is not None else 1)
    if n * cells > MAX_CELLS:  # every plane's cells live in the one file
        raise UserError(f"{path}: key 'directions.repeats': {n:,} planes of {cells:,} cells are {n * cells:,} cells, "
                        f"more than lldist stores in one file ({MAX_CELLS:,})")
    why = [w for w, bad in (("directions.kind: random", job.directions.kind != "random"),
                            ("no directions.target", job.directions.target is not None)) if bad]
    if why:
        raise UserError(f"{path}: key 'directions.repeats' above 1 (independent random planes) needs {', '.join(why)}")


def _check_series(c: SeriesConfig, path: str) -> None:
    if isinstance(c.checkpoints, list) and not all(isinstance(f, str) for f in c.checkpoints):
        raise UserError(f"{path}: key 'series.checkpoints' must be a list of file names, got {c.checkpoints!r}")
    if c.measures is not None:
        if not c.measures:
            raise UserError(f"{path}: key 'series.measures' is empty; allowed: {', '.join(SERIES_MEASURES)}")
        for m in c.measures:
            _choice(m, SERIES_MEASURES, "series.measures", path)
        if len(set(c.measures)) != len(c.measures):
            raise UserError(f"{path}: key 'series.measures' names a measure twice: {c.measures}")


def _check_sharpness(c: SharpnessConfig, path: str) -> None:
    _choice(c.split, ("train", "test"), "sharpness.split", path)
    for k in ("examples", "steps", "restarts", "draws", "m", "sam_steps"):
        if getattr(c, k) < 1:
            raise UserError(f"{path}: key 'sharpness.{k}' must be at least 1, got {getattr(c, k)}")
    for k in ("rho_2", "rho_inf", "rho_sam", "pac_threshold", "pac_tol"):
        if not (getattr(c, k) > 0 and math.isfinite(getattr(c, k))):
            raise UserError(f"{path}: key 'sharpness.{k}' must be a positive finite number, got {getattr(c, k)}")
    if c.m > c.examples:
        raise UserError(f"{path}: key 'sharpness.m' is {c.m}, more than sharpness.examples ({c.examples})")


MAX_TOP = 1000  # eigenpairs by Lanczos: beyond a few hundred, the density is the tool


def curvature_problem(c: CurvatureConfig) -> Optional[tuple]:
    """The first thing wrong with the settings at θ*: (field, what is wrong), or None. One check
    for every way they are given (the job's `curvature:` keys, lldist.hessian's flags, a study's
    `curvature:`), each of which names the field its own way."""
    if c.split not in (None, "train", "test"):
        return "split", "must be train or test"
    for k in ("batches", "top", "density_runs", "density_steps"):
        if getattr(c, k) < 1:
            return k, "must be at least 1"
    if c.trace_samples < 0:
        return "trace_samples", "must be 0 (no trace) or more"
    if not c.basis_memory > 0:
        return "basis_memory", "must be a positive number of bytes"
    if not 0 < c.tol < 1:
        return "tol", "must be between 0 and 1 (a relative tolerance)"
    if c.top > MAX_TOP:
        return "top", f"at most {MAX_TOP} eigenvalues by Lanczos; --density gives the shape of the whole spectrum"
    return None


def _check_curvature(c: CurvatureConfig, path: str) -> None:
    _choice(c.operator, OPERATORS_CURVATURE, "curvature.operator", path)
    _check_blocks(c.blocks, path)
    bad = curvature_problem(c)
    if bad:
        raise UserError(f"{path}: key 'curvature.{bad[0]}' is {getattr(c, bad[0])!r}: {bad[1]}")


def _check_blocks(blocks, path: str) -> None:
    """curvature.blocks: layers, transformer, or a mapping of block name -> regular expression."""
    if blocks is None:
        return
    if isinstance(blocks, str):
        _choice(blocks, BLOCK_KINDS, "curvature.blocks", path)
        return
    if not blocks:
        raise UserError(f"{path}: key 'curvature.blocks' is an empty mapping; give name: regular expression pairs")
    for name, rx in blocks.items():
        if not isinstance(name, str) or not isinstance(rx, str):
            raise UserError(f"{path}: key 'curvature.blocks.{name}' must be a regular expression (a string), "
                            f"got {rx!r}")
        try:
            re.compile(rx)
        except re.error as e:
            raise UserError(f"{path}: key 'curvature.blocks.{name}': {rx!r} is not a regular expression ({e})")


def _callable(spec: str, key: str, path: str) -> None:
    """A python: reference must import to a callable (a job file is code: README, "Job files")."""
    from .workloads.factory import import_object
    try:
        import_object(spec, f"key '{key}':")
    except UserError as e:
        raise UserError(f"{path}: {e}")


def _choice(value, allowed, key, path):
    if value not in allowed:
        raise UserError(f"{path}: key '{key}' is {value!r}; allowed: {', '.join(allowed)}")


def validate(job: Job) -> None:
    """Every key of the job checked, section by section, and the rules between keys: the first
    problem is one UserError naming the file, the key, its value and what is allowed."""
    p = job.source
    _check_model(job, p)
    _check_data(job.data, p)
    _check_grid(job.grid, p)
    _check_directions(job, p)
    _check_eval(job.eval, p)
    _check_curvature(job.curvature, p)
    _check_sharpness(job.sharpness, p)
    _check_repeats(job, p)
    _check_align(job, p)
    _check_connect(job.connect, p)
    _check_series(job.series, p)
    if job.train is not None:
        _check_train(job.train, "train", p)
    if not job.output:
        raise UserError(f"{p}: key 'output' must name a file")


def _check_model(job: Job, p: str) -> None:
    m = job.model
    if not (m.name in BUILTIN_MODELS or m.name.startswith("torchvision:")
            or (m.name.startswith("python:") and m.name.count(":") == 2)
            or m.name.startswith(("object:", "hf:"))):
        raise UserError(f"{p}: key 'model.name' is {m.name!r}; allowed: {', '.join(BUILTIN_MODELS)}, "
                        "torchvision:<name>, hf:<name or folder>, python:<module>:<factory>")
    if m.checkpoint and m.pretrained:
        raise UserError(f"{p}: keys 'model.checkpoint' and 'model.pretrained' exclude each other")
    if m.checkpoint and not os.path.exists(m.checkpoint) and job.train is None:
        raise UserError(f"{p}: key 'model.checkpoint': {m.checkpoint} does not exist "
                        "(and the job has no 'train:' section to make it)")
    if job.train is not None and not m.checkpoint:
        raise UserError(f"{p}: a job with 'train:' needs 'model.checkpoint' to say where the model goes")


def _check_data(d: DataConfig, p: str) -> None:
    if not (d.name in BUILTIN_DATA or (d.name.startswith("python:") and d.name.count(":") == 2)
            or d.name.startswith(("object:", "hf:"))):
        raise UserError(f"{p}: key 'data.name' is {d.name!r}; allowed: {', '.join(BUILTIN_DATA)}, "
                        "python:<module>:<factory>")
    if d.name in ("cifar10", "imagefolder") and not d.root:
        raise UserError(f"{p}: key 'data.root' is required for data.name={d.name}")
    if d.subset is not None and d.subset < 1:
        raise UserError(f"{p}: key 'data.subset' must be at least 1, got {d.subset}")


def _check_grid(g: GridConfig, p: str) -> None:
    for key, ax in (("grid.x", g.x), ("grid.y", g.y)):
        if ax is None or isinstance(ax, AutoAxis):
            continue
        if ax.num < 1:
            raise UserError(f"{p}: key '{key}': num must be at least 1 (empty grid), got {ax.num}")
        if not (math.isfinite(ax.min) and math.isfinite(ax.max)):
            raise UserError(f"{p}: key '{key}': min and max must be finite numbers, got [{ax.min}, {ax.max}]")
        if ax.num == 1 and ax.min != ax.max:  # one point: where? (linspace would put it at min, silently)
            raise UserError(f"{p}: key '{key}': one point needs min = max (its coordinate: [0, 0, 1] is θ*), "
                            f"got [{ax.min}, {ax.max}, 1]")
        if not (ax.min < ax.max or (ax.num == 1 and ax.min == ax.max)):
            raise UserError(f"{p}: key '{key}': min must be below max, got [{ax.min}, {ax.max}]")
    ncells = g.x.num * (g.y.num if g.y is not None else 1)
    if ncells > MAX_CELLS:
        raise UserError(f"{p}: key 'grid': {ncells:,} cells is more than lldist stores in one file "
                        f"({MAX_CELLS:,}, e.g. 11585 x 11585)")
    if g.adaptive is not None:
        _check_adaptive(g, p)


def _check_adaptive(g: GridConfig, p: str) -> None:
    a = g.adaptive
    if not (a.coarse == "auto" or (isinstance(a.coarse, int) and a.coarse >= 2)):
        raise UserError(f"{p}: key 'grid.adaptive.coarse' must be an integer of at least 2 or 'auto', got {a.coarse!r}")
    if not (a.tolerance >= 0 and math.isfinite(a.tolerance)) or (a.tolerance == 0 and a.budget is None):
        raise UserError(f"{p}: key 'grid.adaptive.tolerance' must be a positive number (0 only with a budget: "
                        f"spend all of it), got {a.tolerance}")
    if a.levels < 3:
        raise UserError(f"{p}: key 'grid.adaptive.levels' must be at least 3, got {a.levels}")
    stride = a.stride(g)
    if max(g.x.num, g.y.num if g.y is not None else 0) <= stride:
        raise UserError(f"{p}: key 'grid.adaptive': a grid of {g.x.num} points is no larger than its "
                        f"coarse lattice (every {stride}th point); compute it in full")
    if a.budget is None:
        return
    n = g.x.num * (g.y.num if g.y is not None else 1)
    lat = a.lattice_cells(g)
    b = a.budget
    if isinstance(b, float) and not 0 < b < 1:
        raise UserError(f"{p}: key 'grid.adaptive.budget' as a fraction of the cells must lie strictly between 0 "
                        f"and 1, got {b}")
    cells = a.cells(g)
    if cells < 1 or cells > n:
        raise UserError(f"{p}: key 'grid.adaptive.budget' must be between 1 and the grid's {n:,} cells, got {b}")
    if cells < lat:
        raise UserError(f"{p}: key 'grid.adaptive.budget': {cells:,} cells do not cover the coarse lattice's "
                        f"{lat:,} (every {stride}th point); raise the budget or grid.adaptive.coarse")


def _check_directions(job: Job, p: str) -> None:
    dr, e = job.directions, job.eval
    _choice(dr.kind, DIRECTION_KINDS, "directions.kind", p)
    auto = [k for k, a in (("grid.x", job.grid.x), ("grid.y", job.grid.y)) if isinstance(a, AutoAxis)]
    if auto and dr.kind != "pca":
        raise UserError(f"{p}: key '{auto[0]}: auto' covers a training trajectory: it is for directions.kind: pca "
                        "(give [min, max, num])")
    if dr.target and dr.kind not in ("random", "target"):
        raise UserError(f"{p}: key 'directions.target' is for kind: target, not {dr.kind}")
    if dr.kind == "target" and not dr.target:
        raise UserError(f"{p}: key 'directions.target' is required with directions.kind: target")
    if dr.kind == "file" and not dr.file:
        raise UserError(f"{p}: key 'directions.file' is required with directions.kind: file")
    if dr.kind == "file" and not os.path.exists(dr.file):
        raise UserError(f"{p}: key 'directions.file': {dr.file} does not exist")
    if dr.kind in ("plane", "curve"):
        pts = dr.points
        what = "three checkpoints" if dr.kind == "plane" else "three checkpoints [a, b, bend]"
        if not (isinstance(pts, list) and len(pts) == 3 and all(isinstance(x, str) for x in pts)):
            raise UserError(f"{p}: directions.kind: {dr.kind} needs directions.points, a list of {what} "
                            f"(files or HuggingFace folders), got {pts!r}")
        for x in pts:
            if not os.path.exists(x):
                raise UserError(f"{p}: key 'directions.points': {x} does not exist")
        grid = "a 2D grid" if dr.kind == "plane" else "a 1D grid (t along the curve)"
        if (job.grid.y is None) != (dr.kind == "curve") or job.eval.group_size != 1 or job.model.checkpoint != pts[0]:
            raise UserError(f"{p}: directions.kind: {dr.kind} needs {grid} and eval.group_size: 1 (the model is the "
                            "first point, model.checkpoint left out)")
    elif dr.points is not None:
        raise UserError(f"{p}: key 'directions.points' is for kind: plane or curve, not {dr.kind}")
    if dr.curve is not None:
        _choice(dr.curve, CURVES, "directions.curve", p)
        if dr.kind not in ("plane", "curve"):
            raise UserError(f"{p}: key 'directions.curve' is for kind: curve (or plane, to draw it), not {dr.kind}")
    if dr.kind == "hessian" and (dr.batches < 1 or e.batch_size == "auto"):
        raise UserError(f"{p}: directions.kind: hessian needs directions.batches >= 1 and a number for "
                        "eval.batch_size (the Hessian is taken on those batches)")
    _choice(dr.norm, NORMS, "directions.norm", p)
    _choice(dr.center, ("final", "mean"), "directions.center", p)
    _check_params(dr.params, p)
    _choice(dr.store, ("auto", "tensors", "recipe"), "directions.store", p)
    if dr.store == "recipe" and (dr.kind != "random" or dr.target):
        raise UserError(f"{p}: key 'directions.store: recipe' is for random directions (a target, a PCA plane or "
                        "eigenvectors are kept as tensors)")
    if dr.params and dr.kind not in ("random", "target", "pca"):  # the others move every float entry
        raise UserError(f"{p}: key 'directions.params' is for random, target and pca directions, not {dr.kind}")
    _choice(dr.ignore, IGNORES, "directions.ignore", p)
    if dr.target and not dr.target.startswith("object:") and not os.path.exists(dr.target) and job.train is None:
        raise UserError(f"{p}: key 'directions.target': {dr.target} does not exist")


def _check_eval(e: EvalConfig, p: str) -> None:
    _choice(e.split, SPLITS, "eval.split", p)
    _choice(e.device, DEVICES, "eval.device", p)
    _choice(e.precision, PRECISIONS, "eval.precision", p)
    _choice(e.bn, BN_MODES, "eval.bn", p)
    _choice(e.group_mode, ("data", "shard"), "eval.group_mode", p)
    for key in ("batch_size", "cells_per_pass", "chunk_size"):
        v = getattr(e, key)
        if not (v == "auto" or (isinstance(v, int) and v >= 1)):
            raise UserError(f"{p}: key 'eval.{key}' must be a positive integer or 'auto', got {v!r}")
    if isinstance(e.compile, str) and e.compile not in COMPILE_MODES:
        raise UserError(f"{p}: key 'eval.compile' is {e.compile!r}; allowed: true, false, {', '.join(COMPILE_MODES)}")
    if not (e.loss in LOSSES or (e.loss.startswith("python:") and e.loss.count(":") == 2)
            or e.loss.startswith("object:")):
        raise UserError(f"{p}: key 'eval.loss' is {e.loss!r}; allowed: {', '.join(LOSSES)}, python:<module>:<function>")
    if e.loss.startswith("python:"):
        _callable(e.loss, "eval.loss", p)
    for k, v in (e.metrics or {}).items():
        if not (isinstance(k, str) and k.isidentifier() and k != "loss"):
            raise UserError(f"{p}: key 'eval.metrics': {k!r} is not a usable name (an identifier other than 'loss')")
        if not (isinstance(v, str) and ((v.startswith("python:") and v.count(":") == 2) or v.startswith("object:"))):
            raise UserError(f"{p}: key 'eval.metrics.{k}' must be python:<module>:<function>, got {v!r}")
        if v.startswith("python:"):
            _callable(v, f"eval.metrics.{k}", p)
    for key in ("group_size", "curvature_batches", "threads"):
        v = getattr(e, key)
        if v is not None and v < 1:
            raise UserError(f"{p}: key 'eval.{key}' must be at least 1, got {v}")
    bad = eval_conflict(e)
    if bad:
        raise UserError(f"{p}: {bad}")


def eval_conflict(e: EvalConfig) -> Optional[str]:
    """The first pair of eval keys that cannot go together, in words ("key 'eval.x' ..."), or
    None: the one home of these rules. validate() refuses a job file with them; the Evaluator
    refuses a Python caller's EvalConfig with them (ValueError)."""
    if e.bn in ("batch", "recompute"):
        # batch statistics make every number depend on the batch size: it must be fixed (and
        # is then part of the job's identity), and vmapped cells run BatchNorm in eval mode
        if e.batch_size == "auto":
            return (f"key 'eval.batch_size' must be a number with eval.bn: {e.bn} "
                    "(batch statistics depend on it; 'auto' would make them machine-dependent)")
        if e.cells_per_pass != 1:
            return (f"key 'eval.cells_per_pass' must be 1 with eval.bn: {e.bn} "
                    "(several cells per pass run BatchNorm with running statistics only)")
    if (e.loss != "cross_entropy" or e.metrics) and e.cells_per_pass != 1:
        return ("key 'eval.cells_per_pass' must be 1 with another loss or metrics than the "
                "default (several cells per pass know cross-entropy and accuracy only)")
    if e.curvature and (e.batch_size == "auto" or e.cells_per_pass != 1 or e.bn != "eval"):
        return ("key 'eval.curvature' needs a number for eval.batch_size, eval.cells_per_pass: 1, "
                "eval.bn: eval and eval.curvature_batches >= 1 (the Hessian is taken on fixed batches)")
    if e.group_size > 1 and (e.batch_size == "auto" or e.cells_per_pass != 1
                             or (e.group_mode == "shard" and e.compile)):
        return ("key 'eval.group_size' above 1 needs a number for eval.batch_size, eval.cells_per_pass: 1, "
                "and with group_mode: shard no eval.compile (FSDP2's hooks make dynamo recompile every forward)")
    return None


def as_dict(obj) -> dict:
    d = dataclasses.asdict(obj)
    d.pop("source", None)
    d.pop("text", None)
    return d
