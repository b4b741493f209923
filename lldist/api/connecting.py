"""lldist.connect_minima: a curve between two minima of the caller's own models (Garipov et al.
2018), from Python, by the parts `python -m lldist.connect` uses: the trainer (runs/train.py's
fit) trains the bend of evaluation/curves.py's CurveModel on the caller's training data, then
lldist.landscape evaluates the curve, the straight line and the plane through a, b and the bend.

    c = lldist.connect_minima(a, b, test, train=train, epochs=5)     # a Connection
    c.t, c.curve.loss, c.line.loss, c.barrier("curve"), c.barrier("line"), c.plot()

Everything lives in one folder (`out=`, default a temporary one): a.pt, b.pt and bend.pt in
lldist's checkpoint format, curve.h5, line.h5 and plane.h5. A rerun with the same models, data
and settings reuses the bend and resumes the files. The name is not the command module's
(lldist.connect): importing a module binds its name on the package.
"""

from __future__ import annotations

import copy
import dataclasses
import os
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
from torch import nn

from ..config import CURVES, EvalConfig, TrainConfig
from ..errors import UserError
from ..inputs import identity
from .inputs import check_model, kept, message, object_job, read_data, sort_options, state, task_of
from .landscapes import Landscape, landscape, temporary_file


@dataclass(frozen=True)
class Connection:
    """What connect_minima computed: the three surfaces (Landscapes), the bend's checkpoint and
    the curve's parameter t."""
    folder: str
    bend: str  # bend.pt
    t: np.ndarray  # the points along the curve and the line, 0 (a) to 1 (b)
    curve: Landscape
    line: Landscape
    plane: Optional[Landscape]  # None with plane=0

    def barrier(self, path: str = "curve") -> dict:
        """The path's barrier ("curve" or "line"), as python -m lldist.metrics gives it: the
        highest loss above the ends' line (barrier_loss, ± barrier_loss_se, and where), and the
        error's (barrier_error)."""
        if path not in ("curve", "line"):
            raise ValueError(f"path must be 'curve' or 'line', got {path!r}")
        m = getattr(self, path).metrics()
        return {k: v for k, v in m.items() if k.startswith("barrier")}

    def plot(self, dpi: Optional[int] = None):
        """The plane through a, b and the bend with the curve drawn on it; without a plane the
        loss along the curve and the line."""
        if self.plane is not None:
            return self.plane.plot(dpi=dpi)
        from ..analysis import figures
        return figures.for_caller(figures.paths_figure(self.t, {"curve": self.curve.loss, "line": self.line.loss},
                                                       f"{self.curve.splits[0]} loss"), dpi)

    def __repr__(self) -> str:
        c, line = self.barrier("curve"), self.barrier("line")
        return (f"<Connection {self.folder}: loss barrier along the line {line.get('barrier_loss', np.nan):.4g}, "
                f"along the curve {c.get('barrier_loss', np.nan):.4g}>")


def connect_minima(a: nn.Module, b: nn.Module, data, *, train, curve: str = "bezier", points: int = 21,
                   plane: int = 21, margin: float = 0.25, split: str = "test", loss="cross_entropy", metrics=None,
                   out: Optional[str] = None, resume: bool = True, progress_every: float = 10.0,
                   **options) -> Optional[Connection]:
    """A curve between two minima: its bend trained so that the expected loss along it, t drawn
    uniformly for every batch, falls (Garipov et al. 2018), then the loss (and metrics) along
    the curve and the straight line, and on the plane through a, b and the bend.

    a, b: two models of one architecture (their weights come back unchanged), trained minima.
    data: what the paths are evaluated on (as lldist.landscape takes it), stored as `split`.
    train: the bend's training data: an (x, y) pair of tensors.
    curve: "bezier" (quadratic) or "polychain" (a -> bend -> b). points: cells along the curve
        and the line; plane: cells per axis of the plane (0: none); margin: how far the plane
        reaches beyond the three models.
    **options: the job file's train keys for the bend (epochs, lr, batch_size, optimizer,
        weight_decay, seed, ...) and its eval keys but batch_size (threads, device, precision, ...).
    out: the folder (default a temporary one, removed when Python exits); a rerun resumes it.

    Returns a Connection (None on MPI ranks other than 0). BatchNorm models are refused: their
    statistics along the curve must be recomputed on the training data (python -m lldist.connect
    does it)."""
    from ..directions.plane import plane_frame
    from ..evaluation.curves import CurveModel, has_batchnorm
    from ..runs.train import fit
    from ..transport import runner
    from ..workloads.models import save_checkpoint
    check_model(a, "a")
    check_model(b, "b")
    if type(a) is not type(b):
        raise TypeError(f"a and b must be one architecture, got {type(a).__name__} and {type(b).__name__}")
    theta_a, theta_b = state(a)[0], state(b)[0]
    for n, w in theta_a.items():
        if n not in theta_b or theta_b[n].shape != w.shape:
            raise ValueError(f"b: its state has no {n!r} of shape {tuple(w.shape)} (it must be a's architecture)")
    if all(torch.equal(w, theta_b[n]) for n, w in theta_a.items()):
        raise ValueError("a and b hold the same weights: there is nothing between them to connect")
    if has_batchnorm(a):
        raise ValueError("a: a BatchNorm model's statistics along the curve must be recomputed on the training "
                         "data (eval.bn: recompute): use python -m lldist.connect")
    if curve not in CURVES:
        raise ValueError(f"curve must be one of {', '.join(CURVES)}, got {curve!r}")
    for name, v, least in (("points", points, 2), ("plane", plane, 0)):
        if isinstance(v, bool) or not isinstance(v, int) or v < least:
            raise ValueError(f"{name} must be an integer of at least {least}, got {v!r}")
    if plane == 1:
        raise ValueError("plane must be 0 (no plane) or at least 2 cells per axis, got 1")
    if not (isinstance(margin, (int, float)) and margin >= 0 and np.isfinite(margin)):
        raise ValueError(f"margin must be a finite number of at least 0, got {margin!r}")
    train_options, eval_options = sort_options("connect_minima", options, TrainConfig, EvalConfig)
    if not (isinstance(train, (tuple, list)) and len(train) == 2 and all(isinstance(t, torch.Tensor) for t in train)):
        raise TypeError(f"train must be an (x, y) pair of tensors (the bend's training data), got "
                        f"{type(train).__name__}")
    train_set = read_data(train, {})
    task = task_of(loss, metrics)
    ctx = runner.launch()
    if out is None:
        if ctx.mpi:
            raise ValueError("out: under MPI give the folder's path (every rank must name the same one)")
        out = os.path.dirname(temporary_file("lldist-connect-"))
    if not isinstance(out, (str, os.PathLike)):
        raise TypeError(f"out must be a folder's path, got {type(out).__name__}")
    out = os.fspath(out)
    if os.path.exists(out) and not os.path.isdir(out):
        raise ValueError(f"out: {out} is a file, not a folder (the bend and the surfaces go into it)")
    paths = {k: os.path.join(out, f"{k}.pt") for k in ("a", "b", "bend")}
    # the job the trainer reads, its train: section the bend's settings, checked as a job file's
    # are (a bad value is a ValueError naming it); model.checkpoint: where a lands (train: needs one)
    job = object_job(a, data, task, name="connect", out=os.path.join(out, "curve.h5"), split=split,
                     grid={"x": [0.0, 1.0, points]}, options=eval_options,
                     sections={"model": {"name": f"object:{type(a).__name__}", "checkpoint": paths["a"]},
                               "train": train_options})
    settings = job.train
    with kept(a), kept(b):
        if ctx.rank == 0:
            os.makedirs(out, exist_ok=True)
            for k, m in (("a", a), ("b", b)):  # as files: the curve's and the plane's directions read them
                if not _holds(paths[k], m):
                    save_checkpoint(m, paths[k], {"source": "lldist.connect_minima"})
            wanted = {"curve": curve, "ends_sha256": [identity.file(paths["a"]), identity.file(paths["b"])],
                      "train_config": dataclasses.asdict(settings), "train_data": identity.tensors(train_set),
                      "task": identity.task(task)}
            stored = _meta(paths["bend"]) if resume else None
            if stored is None or any(stored.get(k) != v for k, v in wanted.items()):
                cm = CurveModel(copy.deepcopy(a), theta_a, theta_b, curve, seed=settings.seed)
                try:
                    fit(cm, job, settings, train_set, read_data(data, eval_options), print, task=task,
                        what=f"connect ({curve} bend, at t = 0.5)")
                except UserError as e:
                    raise ValueError(message(e)) from None
                bend_state = cm.bend_state()
                bend = copy.deepcopy(a).cpu()
                bend.load_state_dict({**{n: v.cpu() for n, v in theta_a.items()}, **bend_state}, strict=False)
                save_checkpoint(bend, paths["bend"], wanted)
        if ctx.mpi:
            from ..runs.optimum import spread_over
            spread = spread_over(ctx, "connect_minima")
            spread.gate()  # the others read the bend rank 0 may just have trained
        pts = [paths["a"], paths["b"], paths["bend"]]
        common = dict(split=split, loss=loss, metrics=metrics, resume=resume, progress_every=progress_every,
                      **eval_options)
        curve_ls = landscape(a, data, x=(0.0, 1.0, points), y=None, name="connect: curve",
                             directions={"kind": "curve", "points": pts, "curve": curve},
                             out=os.path.join(out, "curve.h5"), **common)
        line_ls = landscape(a, data, x=(0.0, 1.0, points), y=None, name="connect: line", target=b,
                            out=os.path.join(out, "line.h5"), **common)
        plane_ls = None
        if plane:
            from ..workloads.models import load_checkpoint
            bend_model = copy.deepcopy(a).cpu()
            load_checkpoint(bend_model, paths["bend"])
            tc = plane_frame(theta_a, theta_b, state(bend_model)[0])[2]
            plane_ls = landscape(a, data, x=(min(0.0, tc) - margin, max(1.0, tc) + margin, plane),
                                 y=(-margin, 1.0 + margin, plane), name="connect: plane",
                                 directions={"kind": "plane", "points": pts, "curve": curve},
                                 out=os.path.join(out, "plane.h5"), **common)
    if ctx.rank != 0:
        return None
    return Connection(out, paths["bend"], np.linspace(0.0, 1.0, points), curve_ls, line_ls, plane_ls)


def _holds(path: str, model: nn.Module) -> bool:
    """Whether the checkpoint at `path` holds exactly the model's state (kept, so its sha256,
    which the surfaces' identities hold, stays)."""
    if not os.path.exists(path):
        return False
    saved = torch.load(path, map_location="cpu", weights_only=True).get("state_dict", {})
    own = model.state_dict()
    return saved.keys() == own.keys() and all(torch.equal(saved[k], own[k].detach().cpu()) for k in own)


def _meta(path: str) -> Optional[dict]:
    if not os.path.exists(path):
        return None
    return torch.load(path, map_location="cpu", weights_only=True).get("meta")
