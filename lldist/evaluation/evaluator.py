"""Loss and accuracy of a model at theta + a*dx + b*dy. No MPI, no HDF5.

    ev = Evaluator(model, theta, dirs, {"test": testset}, EvalConfig(batch_size=512), device="cpu")
    out = ev.evaluate_cells([(0.0, 0.0), (0.1, -0.2)])   # (2, nsplits, 2): [loss, acc]

The model is built once; each cell overwrites its floating-point state in place from theta
and the directions (both kept on the device), so nothing is rebuilt or re-allocated per cell
and compiled or CUDA-graphed models keep their parameter addresses. Losses are summed per
batch in float32 and accumulated across batches in float64; NaN and inf pass through.
"""

from __future__ import annotations

import contextlib
import time
from typing import NamedTuple, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..config import BN_MODES, EvalConfig
from ..workloads.data import TensorSet
from .tasks import Task

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


class Slot(NamedTuple):
    """One floating-point state entry the evaluator moves. Shapes are those of the entry."""
    name: str
    live: torch.Tensor  # the model's own tensor, overwritten in place per cell
    theta: torch.Tensor  # theta*
    dx: torch.Tensor
    dy: Optional[torch.Tensor]  # None on 1D grids
    end: Optional[torch.Tensor]  # theta' on interpolation jobs: x moves by torch.lerp
    moving: bool  # False: zero directions, never changes


class Evaluator:
    def __init__(self, model: nn.Module, theta: dict, dirs: dict, splits: dict,
                 cfg: EvalConfig = EvalConfig(), device: Optional[str] = None,
                 prenormalize_bytes: int = 1 << 30, task: Optional[Task] = None):
        if cfg.precision not in AUTOCAST:
            raise ValueError(f"precision {cfg.precision!r}; allowed: {', '.join(AUTOCAST)}")
        if cfg.bn not in BN_MODES:
            raise ValueError(f"bn {cfg.bn!r}; allowed: {', '.join(BN_MODES)}")
        if cfg.bn == "batch" and cfg.cells_per_pass not in (1, "auto"):
            raise ValueError("bn='batch' needs cells_per_pass=1 (vmap runs BatchNorm in eval mode only)")
        self.task = task or Task()
        # the fast paths (vmapped cells, batch calibration) know (x, y) tensors and cross-entropy
        self.plain = self.task.classification and all(isinstance(d, TensorSet) for d in splits.values())
        if not self.plain and cfg.cells_per_pass not in (1, "auto"):
            raise ValueError("cells_per_pass > 1 needs the default cross-entropy task on (x, y) tensors")
        if cfg.batch_size == "auto" and not all(isinstance(d, TensorSet) for d in splits.values()):
            raise ValueError("batch_size='auto' needs (x, y) tensors: batches given as they come keep their size")
        if self.task.curvature and cfg.cells_per_pass not in (1, "auto"):
            raise ValueError("curvature needs cells_per_pass=1 (the Hessian is taken cell by cell)")
        self.cfg = cfg
        self._curvature = {}  # split -> curvature.Curvature on its fixed batches
        self.prenormalize_bytes = prenormalize_bytes
        self.device = torch.device(device or resolve_device(cfg.device))
        self.autocast_dtype = AUTOCAST[cfg.precision]
        fmt = torch.channels_last if cfg.channels_last else torch.contiguous_format
        model = model.to(self.device, memory_format=fmt)
        set_bn_mode(model, cfg.bn)
        live = model.state_dict(keep_vars=True)
        end_state = dirs.get("target")
        self.slots = []
        for name, w in theta.items():
            t = live[name].data
            dx = dirs["x"][name].to(self.device)
            dy = dirs["y"][name].to(self.device) if "y" in dirs else None
            end = end_state[name].to(self.device) if end_state is not None else None
            # entries with zero directions never change: skip them per cell
            moving = bool(dx.any()) or (dy is not None and bool(dy.any()))
            self.slots.append(Slot(name, t, w.to(self.device), dx, dy, end, moving))
            t.copy_(w)
        self.eager = model
        # compiled once; the weights are then changed in place, so their addresses stay fixed
        # (what CUDA-graph modes require) and nothing recompiles between cells
        if cfg.compile:
            self.model = torch.compile(model, mode=cfg.compile if isinstance(cfg.compile, str) else None)
        else:
            self.model = model
        self.splits = {k: self._on_device(v) for k, v in splits.items()}
        self.dtype = torch.float32
        self.batch_size = cfg.batch_size if cfg.batch_size != "auto" else self.calibrate_batch()
        self.cells_per_pass = 1
        if cfg.cells_per_pass == "auto" and not self.task.curvature:
            self.cells_per_pass = self.calibrate_group()
        elif cfg.cells_per_pass > 1:
            self.cells_per_pass = cfg.cells_per_pass

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
        for s in self.slots:
            if not s.moving:
                continue
            if s.end is not None:  # (1 - a) theta + a theta': exact at a = 0 and at a = 1
                torch.lerp(s.theta, s.end, a, out=s.live)
            else:
                torch.add(s.theta, s.dx, alpha=a, out=s.live)
            if s.dy is not None:
                s.live.add_(s.dy, alpha=b)

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
    def loss_acc(self, data: TensorSet, batch_size: Optional[int] = None) -> tuple[float, float]:
        bs = batch_size or self.batch_size
        cl = self.cfg.channels_last and data.x.dim() == 4
        losses, corrects = [], []  # per batch: float32 sum of losses, int64 count of hits
        with self._precision():
            for xb, yb in data.batches(bs, self.dtype):
                if cl:
                    xb = xb.contiguous(memory_format=torch.channels_last)
                logits = self.model(xb).float()
                losses.append(F.cross_entropy(logits, yb, reduction="sum"))
                corrects.append((logits.argmax(1) == yb).sum())
        n = len(data)
        total = torch.stack(losses).double().sum()  # batch sums accumulated in float64
        correct = torch.stack(corrects).sum()
        return float(total) / n, float(correct) / n  # the one device sync per split

    @torch.inference_mode()
    def quantities(self, data) -> list:
        """The task's quantities on one split, in task.names order: per batch the float32 sums
        of values and weights, accumulated in float64, one device sync per split."""
        if self.plain:
            return list(self.loss_acc(data))
        sums = []
        with self._precision():
            for batch in data.batches(self.batch_size, self.dtype):
                if self.cfg.channels_last and isinstance(batch, tuple) and batch[0].dim() == 4:
                    batch = (batch[0].contiguous(memory_format=torch.channels_last),) + tuple(batch[1:])
                sums.append(self.task.sums(self.task.forward(self.model, batch), batch))
        return self.task.means(torch.stack(sums).double().sum(0))

    def evaluate(self, a: float, b: float = 0.0) -> np.ndarray:
        """(nsplits, nquantities) float64: the task's quantities ([loss, accuracy] by default)
        per split at theta + a*dx + b*dy."""
        self.set_weights(a, b)
        rows = []
        for name, d in self.splits.items():
            q = self.quantities(d)
            if self.task.curvature:
                q = list(q) + self.curvature(name, d)
            rows.append(q)
        return np.array(rows, dtype=np.float64)

    def curvature(self, name: str, data) -> list:
        """[lambda_max, lambda_min, |lambda_min / lambda_max|] of the loss Hessian at the current
        weights, on the split's first eval.curvature_batches batches (curvature.py)."""
        from .curvature import Curvature, first_batches
        if name not in self._curvature:
            batches = first_batches(data, self.batch_size, self.cfg.curvature_batches, self.dtype)
            self._curvature[name] = Curvature(self.eager, batches, self.task)
        c = self._curvature[name]
        with torch.enable_grad():
            c.at(dict(self.eager.named_parameters()))
            hi, lo = c.extremes()
        return [hi, lo, abs(lo / hi) if hi != 0 else float("nan")]

    def evaluate_cells(self, coords: Sequence[tuple]) -> np.ndarray:
        """(ncells, nsplits, nquantities) float64 for a list of (alpha, beta)."""
        if not len(coords):
            return np.zeros((0, len(self.splits), len(self.task.names)))
        if self.cells_per_pass == 1:
            return np.stack([self.evaluate(a, b) for a, b in coords])
        g = self.cells_per_pass
        return np.concatenate([self.evaluate_group(coords[i:i + g]) for i in range(0, len(coords), g)])

    @torch.inference_mode()
    def evaluate_group(self, coords: Sequence[tuple]) -> np.ndarray:
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
        out = np.zeros((G, len(self.splits), 2))
        for j, data in enumerate(self.splits.values()):
            total = torch.zeros(G, dtype=torch.float64, device=self.device)
            correct = torch.zeros(G, dtype=torch.int64, device=self.device)
            for xb, yb in data.batches(self.batch_size, self.dtype):
                with self._precision():
                    logits = vmap(f, in_dims=(0, None))(batched, xb)  # (G, B, C)
                logits = logits.float()
                B = yb.shape[0]
                losses = F.cross_entropy(logits.reshape(G * B, -1), yb.repeat(G), reduction="none")
                total += losses.view(G, B).sum(1).double()
                correct += (logits.argmax(2) == yb.unsqueeze(0)).sum(1)
            out[:, j, 0] = (total / len(data)).cpu().numpy()
            out[:, j, 1] = (correct.double() / len(data)).cpu().numpy()
        return out

    def calibrate_group(self, candidates=(8, 32, 128), budget_s: float = 3.0) -> int:
        """Cells per pass that evaluates fastest; 1 unless grouping is at least 10% faster."""
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
