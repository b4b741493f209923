"""Training a job's model: the checkpoint a surface starts from (`python -m lldist.train`, and
every run whose checkpoint is missing), and the loop lldist.connect trains a curve's bend with.

    meta = train(job, log=print, should_stop=lambda: None)
    ensure_checkpoint(job)                                      # train it only when it is missing
    meta = fit(model, job, job.train, train_set, test_set)     # the loop, any trainable parameters

Writes `model.checkpoint` (final weights) and, beside it, `<stem>_epoch<N>.pt` after every
epoch (for trajectory and interpolation plots), each with metadata: epoch, train/test loss
and accuracy, generalization gap, the train config. Prints one line per epoch.
Training is seeded; on the CPU the same job gives the same checkpoint.
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from ..config import Job, TrainConfig
from ..errors import Stopped, UserError
from ..evaluation.curves import has_batchnorm
from ..evaluation.evaluator import plain_loss_acc, resolve_device
from ..evaluation.tasks import mean_over, task_from_config
from ..workloads.data import TensorSet, load_split
from ..workloads.models import build_model, save_checkpoint

PROGRESS_S = 30.0  # seconds between progress lines within an epoch


def epoch_path(checkpoint: str, epoch: int) -> str:
    stem, ext = os.path.splitext(checkpoint)
    return f"{stem}_epoch{epoch}{ext or '.pt'}"


@torch.no_grad()
def _measure(model, data, device, task):
    """(loss, accuracy or NaN) at the end of an epoch, the plain way."""
    model.eval()
    if isinstance(data, TensorSet) and task.classification:
        return plain_loss_acc(model, data, batch_size=512, device=device)
    means = mean_over(model, data.to(device), task, 128)
    return means["loss"], means.get("acc", float("nan"))


def _sample(data, job: Job):
    from ..workloads.data import subset_indices
    idx = subset_indices(len(data), job.data)
    return data if idx is None else data.select(torch.from_numpy(idx))


def _loss(model, batch, task):
    """The training loss of one batch: the task's weighted mean (per token for lm)."""
    if isinstance(batch, tuple) and task.classification:
        return F.cross_entropy(model(batch[0]), batch[1])  # as lldist has always trained classifiers
    sums = task.sums(task.forward(model, batch), batch)
    return sums[0] / sums[1]


def _optimizer(t, model):
    params = [p for p in model.parameters() if p.requires_grad]  # a curve trains its bend only
    if t.optimizer == "adam":
        return torch.optim.Adam(params, lr=t.lr, weight_decay=t.weight_decay)
    if t.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=t.lr, weight_decay=t.weight_decay)
    return torch.optim.SGD(params, lr=t.lr, momentum=t.momentum, weight_decay=t.weight_decay)


def ensure_checkpoint(job: Job, should_stop=lambda: None, log=print) -> None:
    """Train first when the job names a checkpoint that does not exist yet and can train."""
    ck = job.model.checkpoint
    if ck and not os.path.exists(ck):
        if job.train is None:
            raise UserError(f"{job.source}: key 'model.checkpoint': {ck} does not exist")
        log(f"checkpoint {ck} missing: training it first")
        train(job, log=log, should_stop=should_stop)
    target = job.directions.target  # (object:target: a model given from Python, lldist.landscape's target=)
    if target and not target.startswith("object:") and not os.path.exists(target):
        raise UserError(f"{job.source}: key 'directions.target': {job.directions.target} does not exist")


def train(job: Job, log=print, should_stop: Callable[[], Optional[int]] = lambda: None) -> dict:
    """Train per job.train; write checkpoints; return the final metadata.

    `should_stop()` is asked after every batch; once it returns a signal number, training
    ends by raising Stopped, keeping the epoch checkpoints written so far (under a Slurm time
    limit the job must be gone within the grace period, not at the end of training)."""
    if os.path.isdir(job.model.checkpoint):
        raise UserError(f"{job.source}: key 'model.checkpoint': {job.model.checkpoint} is a folder; training writes "
                        "a file (e.g. runs/job/model.pt)")
    train_set, test_set = training_splits(job)
    model = build_model(job.model, train_set.in_shape, train_set.num_classes)
    meta = fit(model, job, job.train, train_set, test_set, log, should_stop,
               on_epoch=lambda m, epoch, meta: save_checkpoint(m, epoch_path(job.model.checkpoint, epoch), meta))
    save_checkpoint(model, job.model.checkpoint, meta)
    log(f"train: wrote {job.model.checkpoint}")
    return meta


def training_splits(job: Job) -> tuple:
    """The train and test splits, whole, as training reads them."""
    return (load_split(job.data, "train", subset=False, model_name=job.model.name),
            load_split(job.data, "test", subset=False, model_name=job.model.name))


def _clock(seconds: float) -> str:
    s = int(seconds + 0.5)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def fit(model: torch.nn.Module, job: Job, t: TrainConfig, train_set, test_set, log=print,
        should_stop: Callable[[], Optional[int]] = lambda: None, on_epoch=None, what: str = "train",
        task=None) -> dict:
    """The training loop: `model`'s trainable parameters (a curve's bend: lldist.connect) by
    t's optimizer on the job's task, seeded by t.seed. After each epoch the loss and accuracy
    of both splits, then on_epoch(model, epoch, meta). Returns the last epoch's metadata."""
    device = resolve_device(t.device)
    model = model.to(device)
    task = task or task_from_config(job.eval)  # (a task of Python callables: lldist.connect_minima)
    opt = _optimizer(t, model)
    # linear warm-up over the first warmup_steps steps, then the constant rate
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: min(1.0, (step + 1) / t.warmup_steps)) \
        if t.warmup_steps else None
    gen = torch.Generator().manual_seed(t.seed)
    log(f"{what}: {job.model.name} on {job.data.name} ({len(train_set)} train / {len(test_set)} test), "
        f"{t.optimizer} lr={t.lr} batch={t.batch_size} epochs={t.epochs} on {device}")
    meta = {}
    step, last_report = 0, time.perf_counter()
    started = last_report
    for epoch in range(1, t.epochs + 1):
        model.train()
        t0 = time.perf_counter()
        order = torch.randperm(len(train_set), generator=gen)
        for i in range(0, len(order), t.batch_size):
            if t.steps is not None and step >= t.steps:
                break
            idx = order[i:i + t.batch_size]
            if len(idx) < 2 and has_batchnorm(model):
                continue  # BatchNorm cannot train on a batch of one
            batch = train_set.take(idx)
            batch = {k: v.to(device) for k, v in batch.items()} if isinstance(batch, dict) else \
                tuple(v.to(device) for v in batch)
            loss = _loss(model, batch, task)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if sched is not None:
                sched.step()
            step += 1
            if time.perf_counter() - last_report >= PROGRESS_S:  # a long epoch shows it moves
                last_report = time.perf_counter()
                per_epoch = -(-len(order) // t.batch_size)
                total = min(t.steps, per_epoch * t.epochs) if t.steps is not None else per_epoch * t.epochs
                eta = (last_report - started) / step * (total - step)
                log(f"epoch {epoch}: step {step} of {total}, batch {i // t.batch_size + 1} of {per_epoch}, "
                    f"loss {loss.item():.4f}, ETA {_clock(eta)}")
            signum = should_stop()
            if signum is not None:
                kept = f"the checkpoints of epochs 1..{epoch - 1} are kept" if epoch > 1 and on_epoch is not None \
                    else "no epoch was kept" if on_epoch is None else "no epoch was finished"
                raise Stopped(signum, f"stopped by signal {signum} while training epoch {epoch} ({kept}); "
                                      "run the same command to train again")
        # measured on data.subset examples of each split when the job gives one (a model too big to
        # run every example at every epoch's end), else on all of them
        tr_loss, tr_acc = _measure(model, _sample(train_set, job), device, task)
        te_loss, te_acc = _measure(model, _sample(test_set, job), device, task)
        meta = {"epoch": epoch, "train_loss": tr_loss, "train_acc": tr_acc, "test_loss": te_loss,
                "test_acc": te_acc, "gap": tr_acc - te_acc, "train_config": dataclasses.asdict(t),
                "model": job.model.name, "data": job.data.name}
        if on_epoch is not None:
            on_epoch(model, epoch, meta)
        log(f"epoch {epoch:3d}/{t.epochs}  train loss {tr_loss:.4f} acc {tr_acc:.4f}  "
            f"test loss {te_loss:.4f} acc {te_acc:.4f}  ({time.perf_counter() - t0:.1f}s)")
        if t.steps is not None and step >= t.steps:
            log(f"{what}: {step} steps, as {what}.steps asks")
            break
    return meta
