"""Recording your own training for lldist: the checkpoint series `directions.kind: pca` (and an
interpolation's ends) read, from any loop.

    rec = lldist.Recorder("runs/mine/model.pt", every=50)     # every 50 steps
    for step, (x, y) in enumerate(loader, 1):
        ...; opt.step()
        rec.step(model, loss=loss.item())                     # one call a step: saves every 50th
    rec.step(model, optimizer=opt)                        # and its lr, momentum, betas (lldist.series)
    rec.finish(model)                                         # runs/mine/model.pt: theta*

    trainer = transformers.Trainer(..., callbacks=[rec.huggingface()])   # the same, as a callback
    lightning.Trainer(callbacks=[rec.lightning()])

Files: `<stem>_step<N>.pt` (or `_epoch<N>.pt` with unit="epoch"), each lldist's checkpoint
format ({"state_dict", "meta"}, written to a temporary name and renamed), and `<stem>.pt` from
finish(); `<stem>_trajectory.json` lists them in order with their metadata (step, epoch, time,
what the caller passed). A job whose `model.checkpoint` is `<stem>.pt` finds the series by
itself (directions/pca.py's trajectory_files: the epoch series, else the step series).
"""

from __future__ import annotations

import json
import os
import time
from typing import Optional

UNITS = ("step", "epoch")


def _module(model) -> None:
    import torch
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")


def optimizer_record(optimizer) -> dict:
    """What the stability thresholds need of an optimizer (analysis/stability.py), as plain JSON:
    its class and its first parameter group's hyperparameters (lr, momentum, dampening, nesterov,
    betas, eps, weight_decay), read now, so a schedule's learning rate is the step's own."""
    groups = getattr(optimizer, "param_groups", None)
    if not groups:  # (a wrapper, HF's AcceleratedOptimizer, has them too)
        raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
    group = groups[0]
    inner = getattr(optimizer, "optimizer", optimizer)  # the wrapped one names the algorithm
    out = {"class": type(inner).__name__}
    for key in ("lr", "momentum", "dampening", "nesterov", "betas", "eps", "weight_decay"):
        if key in group:
            v = group[key]
            out[key] = [float(x) for x in v] if isinstance(v, (tuple, list)) else \
                (float(v) if not isinstance(v, bool) else v)
    if len(groups) > 1:
        out["param_groups"] = len(groups)  # (the thresholds read the first)
    return out


class Recorder:
    def __init__(self, path: str, every: int = 1, unit: str = "step", second_moments: bool = False):
        if unit not in UNITS:
            raise ValueError(f"unit {unit!r}: allowed {', '.join(UNITS)}")
        if not isinstance(every, int) or isinstance(every, bool) or every < 1:
            raise ValueError(f"every must be a whole number >= 1, got {every!r}")
        if not isinstance(path, str) or not path.endswith(".pt"):
            raise ValueError(f"path must name the final checkpoint, a .pt file, got {path!r}")
        self.path, self.every, self.unit = path, every, unit
        self.second_moments = bool(second_moments)  # Adam's exp_avg_sq beside each checkpoint
        self.stem = os.path.splitext(path)[0]
        self.count = 0  # steps (or epochs) seen
        self.saved: list = []  # [{file, step|epoch, time, ...}] in order

    def _save(self, model, n: int, meta: dict, optimizer=None) -> str:
        from ..workloads.models import plain_meta, save_checkpoint
        path = f"{self.stem}_{self.unit}{n}.pt"
        record = {self.unit: n, "time": time.time(), **plain_meta(meta)}
        if optimizer is not None:
            record["optimizer"] = optimizer_record(optimizer)
            if self.second_moments:
                record["second_moments"] = self._moments(model, optimizer, path)
        save_checkpoint(model, path, record)
        self.saved.append({"file": os.path.basename(path), **record})
        self._index()
        return path

    def _moments(self, model, optimizer, path: str) -> str:
        """Adam's second-moment estimates (exp_avg_sq) and its step count, by the model's
        parameter names, into `<checkpoint>_moments.pt` (renamed into place): the preconditioner
        of Cohen et al. 2022's preconditioned sharpness. Returns the file's name."""
        import torch
        names = {id(p): n for n, p in model.named_parameters()}
        v, steps = {}, set()
        for group in optimizer.param_groups:
            for p in group["params"]:
                st = optimizer.state.get(p, {})
                if "exp_avg_sq" in st and id(p) in names:
                    v[names[id(p)]] = st["exp_avg_sq"].detach().cpu().clone()
                    steps.add(int(st["step"]))
        if not v:
            raise ValueError(f"second_moments: optimizer {type(optimizer).__name__} keeps no exp_avg_sq (Adam's) "
                             "for the model's parameters, or has not stepped yet")
        out = path[:-3] + "_moments.pt"
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        torch.save({"exp_avg_sq": v, "step": max(steps)}, out + ".tmp")
        os.replace(out + ".tmp", out)
        return os.path.basename(out)

    def _index(self, final: Optional[dict] = None) -> None:
        index = {"unit": self.unit, "every": self.every, "checkpoints": self.saved}
        if final is not None:
            index["final"] = final
        tmp = f"{self.stem}_trajectory.json.tmp"
        with open(tmp, "w") as f:
            json.dump(index, f, indent=1)
        os.replace(tmp, f"{self.stem}_trajectory.json")

    def step(self, model, n: Optional[int] = None, optimizer=None, **meta) -> Optional[str]:
        """One step (or epoch) done: saves every `every`-th. `n`: the caller's own count (a
        trainer's global step); else this recorder counts. `optimizer`: the step's optimizer,
        whose learning rate and hyperparameters go into the record (lldist.series's stability
        thresholds), with Adam's second moments if the recorder was asked for them. Returns the
        file written, or None."""
        _module(model)
        if self.second_moments and optimizer is None:
            raise ValueError("optimizer: a Recorder with second_moments=True needs the optimizer at every step")
        self.count = int(n) if n is not None else self.count + 1
        # a trainer's count repeats across accumulated batches: one file per count
        if self.count % self.every == 0 and not (self.saved and self.saved[-1][self.unit] == self.count):
            return self._save(model, self.count, meta, optimizer)
        return None

    epoch = step  # unit="epoch": one call an epoch

    def finish(self, model, **meta) -> str:
        """The final weights, θ*: `path` itself."""
        _module(model)
        from ..workloads.models import plain_meta, save_checkpoint
        record = {self.unit: self.count, "time": time.time(), **plain_meta(meta)}
        save_checkpoint(model, self.path, record)
        self._index(final={"file": os.path.basename(self.path), **record})
        return self.path

    # ------------------------------------------------------------------ as a callback
    def huggingface(self):
        """A transformers.TrainerCallback that records every `every` optimizer steps and the
        final model (transformers is an optional extra: imported here)."""
        from transformers import TrainerCallback
        rec = self

        class LldistRecorder(TrainerCallback):
            def on_step_end(self, args, state, control, model=None, optimizer=None, **kw):
                if model is not None:
                    rec.step(model, n=state.global_step, optimizer=optimizer, epoch=state.epoch)

            def on_train_end(self, args, state, control, model=None, **kw):
                if model is not None:
                    rec.finish(model, epoch=state.epoch)
        return LldistRecorder()

    def lightning(self, attribute: Optional[str] = None):
        """A Lightning Callback (lightning.pytorch, else pytorch_lightning: an optional extra)
        that records every `every` optimizer steps and the final module; `attribute` names the
        LightningModule's attribute holding the network the job loads (its state without the
        attribute's prefix), else the whole LightningModule is recorded."""
        try:
            from lightning.pytorch import Callback
        except ImportError:
            try:
                from pytorch_lightning import Callback
            except ImportError:
                raise ImportError("Recorder.lightning needs Lightning: pip install lightning") from None
        rec = self

        class LldistRecorder(Callback):
            def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
                net = getattr(pl_module, attribute) if attribute else pl_module
                opts = trainer.optimizers
                rec.step(net, n=trainer.global_step, optimizer=opts[0] if opts else None,
                         epoch=trainer.current_epoch)

            def on_train_end(self, trainer, pl_module):
                net = getattr(pl_module, attribute) if attribute else pl_module
                rec.finish(net, epoch=trainer.current_epoch)
        return LldistRecorder()
