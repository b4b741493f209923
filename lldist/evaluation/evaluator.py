"""Loss and accuracy of a model at theta + a*dx + b*dy (or at t along a curve: curves.py). No
MPI, no HDF5.

    ev = Evaluator(model, theta, Directions(x=dx, y=dy), {"test": testset}, EvalConfig(batch_size=512), device="cpu")
    out = ev.evaluate_cells([(0.0, 0.0), (0.1, -0.2)])   # (2, nsplits, 2): [loss, acc]

The model is built once; each cell overwrites its floating-point state in place from theta
and the directions (both kept on the device), so nothing is rebuilt or re-allocated per cell
and compiled or CUDA-graphed models keep their parameter addresses. Losses are summed per
batch in float32 and accumulated across batches in float64; NaN and inf pass through.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from typing import Callable, NamedTuple, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..config import BN_MODES, EvalConfig, eval_conflict
from ..directions.record import Directions
from ..workloads.data import TensorSet
from .groups import GroupSpec, all_reduce_sum, held_rows, local, shard_model, sharded_modules, write_point
from .curves import coefficients, combine, update_bn
from .tasks import Task, standard_error

MAP_TOL = 1e-3  # per-cell curvature maps: Lanczos's tolerance (curvature.Curvature.extremes's default)
AUTOCAST = {"fp32": None, "tf32": None, "bf16": torch.bfloat16}  # precision -> autocast dtype
TF32 = {"fp32": False, "tf32": True, "bf16": False}  # precision -> TF32 matmuls and convolutions


def resolve_device(name: str) -> str:
    """"auto" -> cuda when torch sees a GPU, else cpu; "cuda" without one is a UserError."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        from ..errors import UserError
        raise UserError("eval.device is cuda, but torch sees no CUDA device")
    return name


def device_for_rank(local_rank: int, requested: str) -> str:
    """The device of one rank: cuda:<node-local rank mod visible GPUs> (one GPU per rank of a
    node), or cpu."""
    if resolve_device(requested) == "cpu":
        return "cpu"
    dev = f"cuda:{local_rank % torch.cuda.device_count()}"
    torch.cuda.set_device(dev)
    return dev


def set_bn_mode(model: nn.Module, bn: str) -> None:
    model.eval()
    if bn == "batch":  # batch statistics; running stats still update but are reset every cell
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.train()


def _rows(v: torch.Tensor, w: torch.Tensor, rows: Optional[slice]) -> torch.Tensor:
    """A rank's part of an entry shaped like w: all of it, or its rows (as a copy of its own, so
    the whole can be freed); a tensor already of the rows' length is those rows."""
    if rows is None or v.shape[0] != w.shape[0] or rows == slice(0, w.shape[0]):
        return v
    return v[rows].clone()


class Slot(NamedTuple):
    """One floating-point state entry the evaluator moves. Shapes are those of the entry."""
    name: str
    live: torch.Tensor  # the model's own tensor, overwritten in place per cell
    theta: torch.Tensor  # theta*
    dx: torch.Tensor
    dy: Optional[torch.Tensor]  # None on 1D grids
    end: Optional[torch.Tensor]  # theta' on interpolation jobs: x moves by torch.lerp
    moving: bool  # False: zero directions, never changes
    owner: Optional[tuple] = None  # (module, attribute) of a sharded parameter: its local rows are
    #                                fetched at every update (FSDP2 re-makes their storage at its
    #                                first forward, so a view taken before goes stale)
    bend: Optional[torch.Tensor] = None  # a curve's bend (kind curve): x is t along the curve
    reread: Optional[Callable] = None  # where theta is None: fills a tensor with theta*'s rows from
    #                                    the checkpoint (a shard group's model read by rows)

    def put_theta(self, out: torch.Tensor) -> None:
        """theta* into `out`: the copy kept, or read again."""
        if self.theta is None:
            self.reread(out)
        else:
            out.copy_(self.theta)

    def target(self) -> torch.Tensor:
        """The tensor to overwrite: the model's own, or a sharded parameter's local rows now."""
        return self.live if self.owner is None else local(getattr(*self.owner))


class Evaluator:
    def __init__(self, model: nn.Module, theta: dict, dirs: Directions, splits: dict,
                 cfg: EvalConfig = EvalConfig(), device: Optional[str] = None,
                 prenormalize_bytes: int = 1 << 30, task: Optional[Task] = None,
                 group: Optional[GroupSpec] = None, curve: Optional[str] = None, bn_data=None,
                 curvature_model: Optional[nn.Module] = None, reread: Optional[Callable] = None):
        """`group`: the ranks this one evaluates each cell with (evaluation/groups.py), its
        process group already made; `theta` and the directions whole, or for a sharded group
        the directions' local rows already (a recipe regenerated by rows); a model sharded
        already with θ*'s rows in it has `theta` as meta tensors (inputs/rows.py). `curve`: bezier or
        polychain when dirs hold a curve's "target" (b) and "bend": x is then t along it
        (curves.py). `bn_data`: the data cfg.bn = "recompute" takes BatchNorm statistics on.
        `curvature_model`: a shard group's per-cell curvature maps, the same model sharded the
        same way in float64 (inputs/rows.for_group), into which each cell's weights are copied:
        its products are differences of gradients (sharded.py), which want float64.
        `reread(name, rows)`: for a model loaded by rows, a function filling a tensor with θ*'s
        rows of `name` from the checkpoint, or None (inputs/rows.Rows.rereader): such rows are
        read again at each cell rather than kept, where the cell moves from θ* alone (no
        target, no curve)."""
        if cfg.precision not in AUTOCAST:
            raise ValueError(f"precision {cfg.precision!r}; allowed: {', '.join(AUTOCAST)}")
        if cfg.bn not in BN_MODES:
            raise ValueError(f"bn {cfg.bn!r}; allowed: {', '.join(BN_MODES)}")
        self.task = task or Task()
        # (a shard group of 1 is FSDP2 over a world of one: the benchmark's measure of its cost alone)
        self.group = group if group is not None and (group.size > 1 or group.mode == "shard") else None
        # the keys that cannot go together, as config.py states them for job files: here with
        # what this evaluator was given (the task's curvature, the group's size)
        bad = eval_conflict(dataclasses.replace(cfg, curvature=bool(self.task.curvature),
                                                group_size=self.group.size if self.group else 1,
                                                cells_per_pass=1 if cfg.cells_per_pass == "auto" else cfg.cells_per_pass))
        if bad:
            raise ValueError(bad)
        # what only the data and directions tell: the fast paths (several cells per pass, batch
        # calibration) know (x, y) tensors and cross-entropy; a curve needs its end and bend
        self.plain = self.task.classification and all(isinstance(d, TensorSet) for d in splits.values())
        if not self.plain and cfg.cells_per_pass not in (1, "auto"):
            raise ValueError("cells_per_pass > 1 needs the default cross-entropy task on (x, y) tensors")
        if cfg.batch_size == "auto" and not all(isinstance(d, TensorSet) for d in splits.values()):
            raise ValueError("batch_size='auto' needs (x, y) tensors: batches given as they come keep their size")
        if cfg.bn == "recompute" and bn_data is None:
            raise ValueError("bn='recompute' needs bn_data (the train split)")
        shard = self.group is not None and self.group.mode == "shard"
        if shard and self.task.curvature and curvature_model is None:
            raise ValueError("curvature maps in a shard group need curvature_model: the model sharded over the "
                             "same group in float64")
        self.curvature_model = curvature_model if shard else None
        if curve is not None:
            coefficients(curve, 0.0)  # the kind, checked
            if dirs.bend is None or dirs.target is None:
                raise ValueError("a curve needs its end (dirs.target) and its bend (dirs.bend)")
            if cfg.cells_per_pass not in (1, "auto"):
                raise ValueError("a curve is evaluated one cell at a time (cells_per_pass=1)")
        self.curve = curve
        self.cfg = cfg
        self._curvature = {}  # split -> curvature.Curvature on its fixed batches
        self.prenormalize_bytes = prenormalize_bytes
        self.device = torch.device(device or resolve_device(cfg.device))
        self.autocast_dtype = AUTOCAST[cfg.precision]
        fmt = torch.channels_last if cfg.channels_last else torch.contiguous_format
        if self.group is not None and self.group.mode == "shard":
            # the whole model stays on the host: fully_shard moves each block to the device as
            # it shards it, so a GPU holds its rows plus one block, never the whole model. A
            # model loaded by rows (inputs/rows.py) comes sharded, holding θ*'s rows already
            if not sharded_modules(model):
                model = shard_model(model.to(memory_format=fmt), self.group, str(self.device), AUTOCAST[cfg.precision])
            set_bn_mode(model, cfg.bn)
        else:
            model = model.to(self.device, memory_format=fmt)
            set_bn_mode(model, cfg.bn)
        live = model.state_dict(keep_vars=True)
        end_state = dirs.target
        planes = dirs.planes  # directions.repeats: planes 1..n-1 (plane 0 is dirs itself)
        self.slots = []
        self._shard_rows = {}  # entry -> (its rows here or None, θ*'s entry for its shape): other planes' too
        with torch.no_grad():
            for name, w in theta.items():
                t = local(live[name]) if hasattr(live[name], "to_local") else live[name].data
                rows = None
                if hasattr(live[name], "to_local") and w.dim():  # a sharded parameter: this rank's rows
                    rows = held_rows(name, t, w.shape[0], self.group)
                part = lambda v: _rows(v, w, rows).to(self.device)  # noqa: E731
                self._shard_rows[name] = (rows, w)
                dx = part(dirs.x[name])
                dy = part(dirs.y[name]) if dirs.y is not None else None
                end = part(end_state[name]) if end_state is not None else None
                bend = part(dirs.bend[name]) if curve is not None else None
                fill = reread(name, rows) if reread is not None and w.is_meta and rows is not None \
                    and end is None and bend is None else None
                # θ*: a meta w's rows are the model's; not kept where they can be read again
                wl = None if fill is not None else t.detach().clone() if w.is_meta else part(w)
                # entries with zero directions never change: skip them per cell
                moving = bool(dx.any()) or (dy is not None and bool(dy.any())) or \
                    (bend is not None and not torch.equal(bend, wl))
                owner = None
                if hasattr(live[name], "to_local"):
                    prefix, _, attr = name.rpartition(".")
                    owner = (model.get_submodule(prefix) if prefix else model, attr)
                self.slots.append(Slot(name, t, wl, dx, dy, end, moving, owner, bend, fill))
                if wl is not None:
                    t.copy_(wl)
        # every plane's slots share the model's tensors and theta*, each its own directions
        self.plane_slots = [self.slots] + [self._plane_slots(p) for p in planes]
        self.eager = model
        # compiled once; the weights are then changed in place, so their addresses stay fixed
        # (what CUDA-graph modes require) and nothing recompiles between cells
        if cfg.compile:
            self.model = torch.compile(model, mode=cfg.compile if isinstance(cfg.compile, str) else None)
        else:
            self.model = model
        self.splits = {k: self._on_device(v) for k, v in splits.items()}
        self.bn_data = self._on_device(bn_data) if cfg.bn == "recompute" else None
        self.dtype = torch.float32
        self._sharded = sharded_modules(model)
        if self._sharded:
            self._first_forward()
        self.batch_size = cfg.batch_size if cfg.batch_size != "auto" else self.calibrate_batch()
        self.cells_per_pass = 1
        if cfg.cells_per_pass == "auto" and not self.task.curvature and curve is None and self.bn_data is None:
            self.cells_per_pass = self.calibrate_pass()
        elif cfg.cells_per_pass > 1:
            self.cells_per_pass = cfg.cells_per_pass

    def _plane_slots(self, dirs: Directions) -> list:
        out = []
        for s in self.slots:
            rows, w = self._shard_rows[s.name]
            dx = _rows(dirs.x[s.name], w, rows).to(self.device)
            dy = _rows(dirs.y[s.name], w, rows).to(self.device) if dirs.y is not None else None
            moving = bool(dx.any()) or (dy is not None and bool(dy.any()))
            out.append(s._replace(dx=dx, dy=dy, moving=moving))
        return out

    def use_plane(self, k: int) -> None:
        """Evaluate the next cells in plane k (directions.repeats): its directions, the same
        theta* and model."""
        self.slots = self.plane_slots[k]

    def _on_device(self, ts):
        """Data on the device; normalized once in float32 when that copy is small enough, else
        kept compact (uint8) and normalized batch by batch. Same arithmetic either way."""
        ts = ts.to(self.device)
        if not isinstance(ts, TensorSet):
            return ts  # the caller's batches, as they are
        if ts.x.numel() * 4 <= self.prenormalize_bytes and (ts.scale != 1.0 or ts.mean is not None
                                                                  or ts.x.dtype != torch.float32):
            ts = TensorSet(ts.normalize(ts.x), ts.y, ts.num_classes)
        return ts

    @torch.no_grad()
    def set_weights(self, a: float, b: float = 0.0) -> None:
        for m in self._sharded:  # FSDP2 leaves the root gathered after a forward: shard it again,
            m.reshard()          # so that the module's parameters are the sharded ones
        c = coefficients(self.curve, a) if self.curve is not None else None
        for s in self.slots:
            if not s.moving:
                continue
            live = s.target()
            if s.bend is not None:  # t along a curve: c0·a + c1·bend + c2·b, exact at t = 0 and 1
                combine(c, s.theta, s.bend, s.end, out=live)
            elif s.end is not None:  # (1 - a) theta + a theta': exact at a = 0 and at a = 1
                torch.lerp(s.theta, s.end, a, out=live)
            elif s.theta is None:  # read again: θ* into the rows, then the same sum in place
                s.reread(live)
                live.add_(s.dx, alpha=a)
            else:
                torch.add(s.theta, s.dx, alpha=a, out=live)
            if s.dy is not None:
                live.add_(s.dy, alpha=b)

    def _first_forward(self) -> None:
        """FSDP2 sets itself up at a model's first forward, re-making the sharded parameters'
        storage: done here, with two examples, outside inference mode (storage made inside it
        could not be updated in place afterwards)."""
        from .tasks import head
        batch = next(iter(next(iter(self.splits.values())).batches(2, self.dtype)))
        with torch.no_grad(), self._precision():
            self.task.forward(self.model, head(batch, 2))

    @contextlib.contextmanager
    def _precision(self):
        """Autocast, and the TF32 switches set for this evaluation and restored after it
        (they are process-wide: setting them once in the constructor would change every
        other computation in the process)."""
        cuda = self.device.type == "cuda"
        saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
        if cuda:
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = TF32[self.cfg.precision]
        try:
            if self.autocast_dtype is None:
                yield
            else:
                with torch.autocast(self.device.type, dtype=self.autocast_dtype):
                    yield
        finally:
            if cuda:
                torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved

    @torch.inference_mode()
    def loss_acc(self, data: TensorSet, batch_size: Optional[int] = None) -> tuple[float, float, float]:
        """(mean loss, accuracy, standard error of the mean loss) of the plain classification task."""
        bs = batch_size or self.batch_size
        cl = self.cfg.channels_last and data.x.dim() == 4
        nb = math.ceil(len(data) / bs)
        losses = torch.zeros(nb, dtype=torch.float32, device=self.device)  # per batch: float32 sum of losses
        squares = torch.zeros(nb, dtype=torch.float32, device=self.device)  # of their squares (loss_se)
        corrects = torch.zeros(nb, dtype=torch.int64, device=self.device)  # and int64 count of hits
        ran, first = 0, None
        with self._precision():
            for i, (xb, yb) in enumerate(data.batches(bs, self.dtype)):
                first = xb if first is None else first
                if not self._mine(i):
                    continue
                if cl:
                    xb = xb.contiguous(memory_format=torch.channels_last)
                logits = self.model(xb).float()
                each = F.cross_entropy(logits, yb, reduction="none")
                losses[i], squares[i] = each.sum(), (each * each).sum()
                corrects[i] = (logits.argmax(1) == yb).sum()
                ran += 1
            self._pad_forwards(ran, nb, lambda: self.model(
                first.contiguous(memory_format=torch.channels_last) if cl else first))
        if self.group is not None:  # each slot filled by one rank, zeros elsewhere: the sums are exact
            all_reduce_sum(losses), all_reduce_sum(squares), all_reduce_sum(corrects)
        n = len(data)
        # batch sums accumulated in float64, in batch order; one device sync per split
        total, square, correct = torch.stack([losses.double().sum(), squares.double().sum(),
                                              corrects.sum().double()]).tolist()
        return total / n, correct / n, standard_error(total, n, square, total, n, n)

    @torch.inference_mode()
    def quantities(self, data) -> list:
        """The task's quantities on one split, in task.names order: per batch the float32 sums
        of values and weights, accumulated in float64, one device sync per split."""
        if self.plain:
            return list(self.loss_acc(data))
        sums, ran, first = [], 0, None
        with self._precision():
            for i, batch in enumerate(data.batches(self.batch_size, self.dtype)):
                first = batch if first is None else first
                if not self._mine(i):
                    sums.append(None)
                    continue
                batch = self._channels_last(batch)
                sums.append(self.task.sums(self.task.forward(self.model, batch), batch))
                ran += 1
            self._pad_forwards(ran, len(sums), lambda: self.task.forward(self.model, self._channels_last(first)))
        if self.group is not None:  # each batch's slot filled by the rank that ran it (see loss_acc)
            width = self.task.width
            stacked = torch.stack([s if s is not None else torch.zeros(width, device=self.device) for s in sums])
            return self.task.means(all_reduce_sum(stacked).double().sum(0))
        return self.task.means(torch.stack(sums).double().sum(0))

    def _channels_last(self, batch):
        """An (x, ...) batch of images in channels-last memory when eval.channels_last asks."""
        if self.cfg.channels_last and isinstance(batch, tuple) and batch[0].dim() == 4:
            return (batch[0].contiguous(memory_format=torch.channels_last),) + tuple(batch[1:])
        return batch

    def _mine(self, batch: int) -> bool:
        """Whether this rank runs batch `batch`: all of them alone, in a group every size-th
        (both modes: a sharded group's ranks gather each block's weights and run their own
        batches through it, as FSDP's data parallelism does)."""
        return self.group is None or batch % self.group.size == self.group.rank

    def _pad_forwards(self, ran: int, batches: int, forward) -> None:
        """In a sharded group every forward gathers each block's weights collectively, so every
        rank must run as many forwards as the busiest: a rank with a batch fewer (the batches
        do not divide by the group's size) repeats one and throws its output away."""
        if self.group is not None and self.group.mode == "shard":
            for _ in range(-(-batches // self.group.size) - ran):
                forward()

    def evaluate(self, a: float, b: float = 0.0) -> np.ndarray:
        """(nsplits, nquantities) float64: the task's quantities ([loss, accuracy] by default)
        per split at theta + a*dx + b*dy."""
        self.set_weights(a, b)
        return self._rows()

    def _rows(self) -> np.ndarray:
        """(nsplits, nquantities) at the weights the model holds now."""
        if self.bn_data is not None:  # BatchNorm statistics of these weights (Garipov et al.'s update_bn);
            with torch.no_grad():     # in a group every rank takes them on every batch (they are not sharded)
                update_bn(self.eager, self.bn_data.batches(self.batch_size, self.dtype), self.task.forward)
        rows = []
        for name, d in self.splits.items():
            q = self.quantities(d)
            if self.task.curvature:
                q = list(q) + self.curvature(name, d)
            rows.append(q)
        for m in self._sharded:  # FSDP2 leaves the root gathered after a forward: between cells a
            m.reshard()          # rank holds its rows only (GPT-2's tied embedding: 154 MB less)
        return np.array(rows, dtype=np.float64)

    @torch.no_grad()
    def evaluate_state(self, state: dict) -> np.ndarray:
        """(nsplits, nquantities) at the weights `state` itself, copied in bit for bit (a plane's
        three models: no θ + αδ arithmetic), then θ* put back in every entry."""
        for m in self._sharded:
            m.reshard()
        for s in self.slots:
            s.target().copy_(state[s.name].to(self.device, s.target().dtype))
        try:
            return self._rows()
        finally:
            for s in self.slots:
                s.put_theta(s.target())

    def curvature(self, name: str, data) -> list:
        """[lambda_max, lambda_min, |lambda_min / lambda_max|] of the task's curvature operator (the
        Hessian, GGN or Fisher of the loss) at the current weights, on the split's first eval.curvature_batches batches (curvature.py)."""
        from .curvature import Curvature, first_batches
        if self.curvature_model is not None:
            return self._sharded_curvature(name, data)
        if name not in self._curvature:
            batches = first_batches(data, self.batch_size, self.cfg.curvature_batches, self.dtype)
            self._curvature[name] = Curvature(self.eager, batches, self.task, operator=self.task.operator)
        c = self._curvature[name]
        with torch.enable_grad():
            c.at(dict(self.eager.named_parameters()))
            hi, lo = c.extremes()
        return [hi, lo, abs(lo / hi) if hi != 0 else float("nan")]

    def _sharded_curvature(self, name: str, data) -> list:
        """curvature() in a shard group (collective): this cell's rows, as the float32 model
        holds them, copied exactly into the float64 twin, and Lanczos on sharded vectors
        there (sharded.py), to the tolerance the one-process maps' eigsh is given."""
        from .curvature import first_batches
        from .sharded import Sharded
        if name not in self._curvature:
            self._curvature[name] = first_batches(data, self.batch_size, self.cfg.curvature_batches, torch.float64)
        for m in self._sharded:  # the rows, not the gathered root
            m.reshard()
        twin = self.curvature_model
        point = {n: local(p).detach() for n, p in self.eager.named_parameters() if p.is_floating_point()}
        write_point(twin, list(point), point)
        with torch.enable_grad():
            op = Sharded(twin, self._curvature[name], self.task, self.group, operator=self.task.operator)
            (hi,), lo, _, _ = op.extremes(1, MAP_TOL, smallest=True)
        return [hi, lo, abs(lo / hi) if hi != 0 else float("nan")]

    def evaluate_cells(self, coords: Sequence[tuple]) -> np.ndarray:
        """(ncells, nsplits, nquantities) float64 for a list of (alpha, beta)."""
        if not len(coords):
            return np.zeros((0, len(self.splits), len(self.task.names)))
        if self.cells_per_pass == 1:
            return np.stack([self.evaluate(a, b) for a, b in coords])
        g = self.cells_per_pass
        return np.concatenate([self.evaluate_pass(coords[i:i + g]) for i in range(0, len(coords), g)])

    @torch.inference_mode()
    def evaluate_pass(self, coords: Sequence[tuple]) -> np.ndarray:
        """Several cells in one pass: torch.func.vmap over stacked weights (G, *shape), the data
        shared. Pays for small dense models on a GPU (one big matmul instead of G small ones);
        eval-mode BatchNorm only, buffers passed unbatched."""
        from torch.func import functional_call, vmap
        G = len(coords)
        a = torch.tensor([c[0] for c in coords], dtype=torch.float32, device=self.device)
        b = torch.tensor([c[1] for c in coords], dtype=torch.float32, device=self.device)
        batched, fixed = {}, {}
        for s in self.slots:
            if not s.moving:
                fixed[s.name] = s.live
                continue
            shape = (G,) + (1,) * s.theta.dim()
            if s.end is not None:
                p = torch.lerp(s.theta.unsqueeze(0), s.end.unsqueeze(0), a.view(shape))
            else:
                p = s.theta.unsqueeze(0) + a.view(shape) * s.dx.unsqueeze(0)
            if s.dy is not None:
                p = p + b.view(shape) * s.dy.unsqueeze(0)
            batched[s.name] = p  # (G, *theta.shape)

        def f(params, xb):
            return functional_call(self.eager, {**params, **fixed}, (xb,))
        out = np.zeros((G, len(self.splits), 3))
        for j, data in enumerate(self.splits.values()):
            total = torch.zeros(G, dtype=torch.float64, device=self.device)
            square = torch.zeros(G, dtype=torch.float64, device=self.device)
            correct = torch.zeros(G, dtype=torch.int64, device=self.device)
            for xb, yb in data.batches(self.batch_size, self.dtype):
                with self._precision():
                    logits = vmap(f, in_dims=(0, None))(batched, xb)  # (G, B, C)
                logits = logits.float()
                B = yb.shape[0]
                losses = F.cross_entropy(logits.reshape(G * B, -1), yb.repeat(G), reduction="none")
                total += losses.view(G, B).sum(1).double()
                square += losses.view(G, B).pow(2).sum(1).double()
                correct += (logits.argmax(2) == yb.unsqueeze(0)).sum(1)
            n = len(data)
            out[:, j, 0] = (total / n).cpu().numpy()
            out[:, j, 1] = (correct.double() / n).cpu().numpy()
            out[:, j, 2] = [standard_error(t, n, q, t, n, n) for t, q in zip(total.tolist(), square.tolist())]
        return out

    def calibrate_pass(self, candidates=(8, 32, 128), budget_s: float = 3.0) -> int:
        """Cells per pass that evaluates fastest; 1 unless several a pass is at least 10% faster."""
        if self.cfg.bn != "eval" or not self.plain:
            return 1
        rng = np.random.RandomState(0)
        coords = [tuple(c) for c in rng.uniform(-1, 1, size=(max(candidates), 2))]
        def rate(g):
            self.cells_per_pass = g
            self.evaluate_cells(coords[:g])  # warm-up
            if self.device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            self.evaluate_cells(coords[:g])
            return g / (time.perf_counter() - t0)
        best, best_rate = 1, rate(1)
        deadline = time.perf_counter() + budget_s
        for g in candidates:
            if time.perf_counter() > deadline:
                break
            try:
                r = rate(g)
            except (torch.OutOfMemoryError, RuntimeError):  # memory, or an op vmap cannot batch
                break
            if r > 1.1 * best_rate:
                best, best_rate = g, r
        self.cells_per_pass = best
        return best

    def calibrate_batch(self, budget_s: float = 2.0) -> int:
        """The fastest batch size among powers of two, on the first split, within the memory."""
        data = next(iter(self.splits.values()))
        self.batch_rates = {}  # batch size -> examples/s, what the choice was made from
        best, best_rate = 64, 0.0
        bs, deadline = 32, time.perf_counter() + budget_s
        while bs <= max(32, len(data)) and time.perf_counter() < deadline:
            sub = TensorSet(data.x[:bs * 2], data.y[:bs * 2], data.num_classes, data.scale, data.mean, data.std)
            self.batch_size = bs
            try:
                self.quantities(sub)  # warm-up (cudnn autotune, compile)
                t0 = time.perf_counter()
                self.quantities(sub)
                rate = len(sub) / (time.perf_counter() - t0)
            except torch.OutOfMemoryError:
                break
            self.batch_rates[bs] = rate
            if rate > best_rate:
                best, best_rate = bs, rate
            if len(sub) < bs * 2:
                break
            bs *= 2
        return best


@torch.inference_mode()
def plain_loss_acc(model: nn.Module, data: TensorSet, batch_size: int = 128,
                   device: str = "cpu") -> tuple[float, float]:
    """Mean loss and accuracy the plain way: one batch at a time, a float per batch, no
    tricks. Training reports with it; tests and the benchmark's naive baseline compare the
    evaluator against it."""
    total, correct = 0.0, 0
    for i in range(0, len(data), batch_size):
        xb = data.normalize(data.x[i:i + batch_size]).to(device)
        yb = data.y[i:i + batch_size].to(device)
        logits = model(xb)
        total += float(F.cross_entropy(logits, yb, reduction="sum"))
        correct += int((logits.argmax(1) == yb).sum())
    return total / len(data), correct / len(data)


def evaluate_plain(model: nn.Module, state: dict, data: TensorSet, batch_size: int = 128,
                   device: str = "cpu") -> tuple[float, float]:
    """The plain reference at a given state: load the state dict, then plain_loss_acc."""
    model.load_state_dict(state, strict=False)
    model.to(device).eval()
    return plain_loss_acc(model, data, batch_size, device)
