"""What makes two runs "the same job": the one home of that decision. A surface file stores two
hashes; a run resumes a file only when both match its own.

    identity.config(job)                 # the job file's keys that change the numbers (known before training)
    identity.job(job, inputs)            # ... and the content of everything it reads
    identity.inputs(job, task)           # those contents, one entry per input kind:
        identity.file(path)              #   a checkpoint, a target, a plane's model (sha256 of its bytes)
        identity.data_files(cfg, splits) #   the data set's files (CIFAR-10 batches, an image folder, text files)
    directions.kinds.inputs(job)         # and what the directions' kind reads, beside them
    identity.tensors(obj)                # objects given from Python: a state dict, (x, y) tensors, batches
    identity.task(task)                  # the loss and metrics, callables by their code

Not part of the identity: where the output goes, batch and chunk sizes, device, threads,
compile and channels_last (they change speed, not results beyond float round-off).
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import types
from typing import Optional

import torch

from ..config import Job, as_dict

# ----------------------------------------------------------------------------- the job's keys


def config(job: Job) -> str:
    """Hash of the job's keys that determine the numbers in the output file.

    The precision and the BatchNorm mode are included: they change the numbers; so is the batch
    size under `bn: batch`, where each batch's statistics depend on it. Keys at their defaults
    that older files did not know are left out, so those files keep their hash."""
    return job_hash(job, None)


def job(job_: Job, inputs: dict) -> str:
    """config(job) with the content of what it reads (`inputs`): a retrained checkpoint or other
    images make a different job."""
    return job_hash(job_, inputs)


def job_hash(job: Job, inputs: Optional[dict]) -> str:
    ev = {"split": job.eval.split, "precision": job.eval.precision, "bn": job.eval.bn}
    if job.eval.loss != "cross_entropy" or job.eval.metrics:  # (absent: files made before they existed)
        ev.update(loss=job.eval.loss, metrics=job.eval.metrics)
    if job.eval.bn in ("batch", "recompute"):
        ev["batch_size"] = job.eval.batch_size
    if job.eval.curvature:  # the Hessian's batches: their size and number fix the numbers
        ev.update(curvature=True, batch_size=job.eval.batch_size, curvature_batches=job.eval.curvature_batches)
        if job.curvature.operator != "hessian":  # (absent for the Hessian: older files keep their hash)
            ev["curvature_operator"] = job.curvature.operator
    dr = {k: v for k, v in as_dict(job.directions).items() if k not in ("target", "store")}  # (store: not the numbers)
    for k, default in (("kind", "random"), ("checkpoints", None), ("file", None), ("batches", 4), ("center", "final"),
                       ("params", None), ("repeats", 1), ("align", None), ("points", None),
                       ("curve", None)):
        if dr.get(k) == default:  # (absent at their defaults: older jobs keep their hash)
            dr.pop(k)
    if job.directions.kind == "target":
        dr.pop("kind", None)  # the same job as one that names only a target
    ident = {
        "model": {k: v for k, v in as_dict(job.model).items() if k != "checkpoint"},
        "data": {k: v for k, v in as_dict(job.data).items() if k not in ("root", "download")},
        "directions": dr,
        # (absent when not adaptive: the hash of jobs written before it existed is unchanged)
        "grid": {k: v for k, v in as_dict(job.grid).items() if k != "adaptive" or v is not None},
        "eval": ev,
    }
    if inputs is not None:
        ident["files"] = inputs
    blob = json.dumps(ident, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()


# ----------------------------------------------------------------------------- what it reads

def file(path: str) -> str:
    """sha256 of a file's bytes; of a folder (a HuggingFace checkpoint), of each file's path in
    it and its bytes, in sorted order."""
    h = hashlib.sha256()
    if os.path.isdir(path):
        for d, _, fs in sorted(os.walk(path)):
            for name in sorted(fs):
                h.update(os.path.relpath(os.path.join(d, name), path).encode() + b"\0")
                h.update(bytes.fromhex(file(os.path.join(d, name))))
        return h.hexdigest()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def theta_source(job_: Job) -> Optional[str]:
    """Where θ* is read from: model.checkpoint, else a local hf: folder that holds weights;
    None for a seeded initialization (or a hub name). Its content is the job's "checkpoint"."""
    if job_.model.checkpoint:
        return job_.model.checkpoint
    if job_.model.name.startswith("hf:"):
        from ..workloads.hf import has_weights
        path = job_.model.name.split(":", 1)[1]
        if os.path.isdir(path) and has_weights(path):
            return path
    return None


def data_files(cfg, splits) -> str:
    """A hash of the files a job reads its examples from: the same `data.root` holding other
    images must not resume a file computed on the first ones. CIFAR-10: the content of each
    batch file read (180 MB in all, under a second). ImageFolder: every image's path and size,
    and the content of up to 64 of them spread over the folder. Local text files (hf:csv, ...):
    their content. Bundled digits and python: factories: "" (a factory's data is its author's
    to version)."""
    h = hashlib.sha256()
    if cfg.name == "cifar10":
        folder = os.path.join(cfg.root, "cifar-10-batches-py")
        names = sorted({n for sp in splits
                        for n in ([f"data_batch_{i}" for i in range(1, 6)] if sp == "train" else ["test_batch"])})
        for name in names:
            path = os.path.join(folder, name)
            h.update(name.encode())
            if os.path.exists(path):
                h.update(bytes.fromhex(file(path)))
        return h.hexdigest()
    if cfg.name == "imagefolder":
        files = []
        for sp in splits:
            names = ("train",) if sp == "train" else ("val", "test")
            top = next((os.path.join(cfg.root, n) for n in names if os.path.isdir(os.path.join(cfg.root, n))), None)
            if top is None:
                continue
            for d, _, fs in os.walk(top):
                files += [os.path.join(d, f) for f in fs]
        files.sort()
        for path in files:
            h.update(f"{os.path.relpath(path, cfg.root)}\0{os.path.getsize(path)}\n".encode())
        for path in files[::max(1, len(files) // 64)]:
            with open(path, "rb") as f:
                h.update(f.read())
        return h.hexdigest()
    if cfg.name.startswith("hf:") and cfg.root and os.path.isdir(cfg.root):  # local text files
        for d, _, fs in sorted(os.walk(cfg.root)):
            for name in sorted(fs):
                with open(os.path.join(d, name), "rb") as f:
                    h.update(name.encode() + f.read())
        return h.hexdigest()
    return ""


def inputs(job_: Job, task_=None) -> dict:
    """The content of what a job file's run reads, one entry per input kind: checkpoint, data
    files, and the task when it has code of the user's (python: losses and metrics; absent for
    the built-in ones, so files made before keep their hash). What the directions' kind reads
    (a target, a trajectory, another file's directions, a plane's models) is the kind's to say:
    directions.kinds.inputs(job), beside these."""
    out = {}
    source = theta_source(job_)
    if source:
        out["checkpoint"] = file(source)
    # eval.bn: recompute reads the train split for its statistics, whichever splits are evaluated
    data = data_files(job_.data, tuple(dict.fromkeys(job_.splits + (("train",) if job_.eval.bn == "recompute" else ()))))
    if data:
        out["data"] = data
    if task_ is not None and task_.has_user_code:
        out["task"] = task(task_)
    return out


# ----------------------------------------------------------------------------- objects from Python

def tensors(obj) -> str:
    """sha256 of a state dict's tensors, or of a data set's (a TensorSet, a DictSet, a
    BatchList): the API resumes a file only with the same weights and the same data."""
    h = hashlib.sha256()
    if isinstance(obj, dict):
        items = sorted(obj.items())
    elif hasattr(obj, "batches_"):  # BatchList: the caller's batches, in order
        items = [(str(i), t) for i, b in enumerate(obj.batches_) for t in (b.values() if isinstance(b, dict) else b)]
    elif hasattr(obj, "tensors"):  # DictSet
        items = sorted(obj.tensors.items())
    else:  # TensorSet
        items = [("x", obj.x), ("y", obj.y)]
    for name, t in items:
        h.update(str(name).encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def task(t) -> str:
    """The loss and metrics: built-in ones by name, the user's callables by their code
    (`code`), so that editing a loss in a notebook makes a different job."""
    parts = {"loss": t.loss_name, "metrics": sorted(t.metric_names), "derived": sorted(t.derived),
             "curvature": bool(t.curvature)}
    if t.curvature and t.operator != "hessian":
        parts["operator"] = t.operator
    if t.user_loss is not None:
        parts["loss_code"] = code(t.user_loss)
    parts["metrics_code"] = {n: code(f) for n, f in sorted(t.user_metrics.items())}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


# ----------------------------------------------------------------------------- code

PLAIN = (int, float, complex, str, bytes, bool, type(None))


def code(fn) -> str:
    """sha256 of what a callable computes, as far as Python can tell: its bytecode, constants
    and names, its defaults and closure values, recursively through nested functions, the
    functions and plain constants of its own module that it names (a helper or a TEMPERATURE
    edited in a notebook), functools.partial's arguments, and a callable object's class code
    and plain attributes. Functions of other modules (torch, numpy) count by their qualified
    name. A value it cannot fingerprint (an open file in a closure, say) makes the hash new on
    every call: such a callable never resumes a file, rather than resuming it wrongly."""
    h = hashlib.sha256()
    _feed(h, fn, set(), 0)
    return h.hexdigest()


def _feed(h, obj, seen: set, depth: int) -> None:
    import functools

    import numpy as np
    if depth > 12:
        h.update(b"<deep>")
        return
    if isinstance(obj, PLAIN):
        h.update(repr(obj).encode())
        return
    if isinstance(obj, (tuple, list, frozenset, set)):
        h.update(type(obj).__name__.encode())
        items = sorted(obj, key=repr) if isinstance(obj, (set, frozenset)) else obj
        for x in items:
            _feed(h, x, seen, depth + 1)
        return
    if isinstance(obj, dict):
        for k in sorted(obj, key=repr):
            h.update(repr(k).encode())
            _feed(h, obj[k], seen, depth + 1)
        return
    if isinstance(obj, torch.Tensor):
        h.update(tensors({"t": obj}).encode())
        return
    if isinstance(obj, np.ndarray):
        h.update(str(obj.dtype).encode() + str(obj.shape).encode() + np.ascontiguousarray(obj).tobytes())
        return
    if id(obj) in seen:  # recursion (a function naming itself)
        h.update(b"<seen>")
        return
    seen.add(id(obj))
    if isinstance(obj, types.CodeType):
        h.update(obj.co_code)
        h.update(repr(obj.co_names).encode() + repr(obj.co_varnames).encode())
        for c in obj.co_consts:
            _feed(h, c, seen, depth + 1)
        return
    if isinstance(obj, functools.partial):
        _feed(h, (obj.func, obj.args, obj.keywords), seen, depth + 1)
        return
    if isinstance(obj, types.MethodType):
        _feed(h, (obj.__func__, obj.__self__), seen, depth + 1)
        return
    if isinstance(obj, types.FunctionType):
        h.update(f"{obj.__module__}.{obj.__qualname__}".encode())
        _feed(h, obj.__code__, seen, depth + 1)
        _feed(h, (obj.__defaults__, obj.__kwdefaults__), seen, depth + 1)
        for cell in obj.__closure__ or ():
            try:
                _feed(h, cell.cell_contents, seen, depth + 1)
            except ValueError:  # an empty cell
                h.update(b"<empty>")
        g = obj.__globals__
        for name in _names(obj.__code__):
            v = g.get(name)
            if isinstance(v, PLAIN) or (isinstance(v, (types.FunctionType, type)) and
                                        getattr(v, "__module__", None) == obj.__module__):
                h.update(name.encode())
                _feed(h, v, seen, depth + 1)
        return
    if isinstance(obj, (types.BuiltinFunctionType, types.ModuleType)) or (
            isinstance(obj, type) and obj.__module__.split(".")[0] in ("torch", "numpy", "builtins")):
        h.update(f"{getattr(obj, '__module__', '')}.{getattr(obj, '__qualname__', getattr(obj, '__name__', ''))}"
                 .encode())
        return
    if isinstance(obj, type):
        h.update(f"{obj.__module__}.{obj.__qualname__}".encode())
        for k, v in sorted(vars(obj).items()):
            if isinstance(v, (types.FunctionType, staticmethod, classmethod)) or isinstance(v, PLAIN):
                h.update(k.encode())
                _feed(h, getattr(v, "__func__", v), seen, depth + 1)
        return
    if isinstance(obj, torch.nn.Module):  # a loss module: its class and its state
        _feed(h, (type(obj), {k: v for k, v in vars(obj).items() if not k.startswith("_")}, obj.state_dict()),
              seen, depth + 1)
        return
    if callable(obj) and hasattr(obj, "__dict__"):  # a callable object: its class and attributes
        _feed(h, (type(obj), vars(obj)), seen, depth + 1)
        return
    if getattr(type(obj), "__module__", "").split(".")[0] in ("torch", "numpy"):
        h.update(repr(obj).encode())  # a dtype, a device
        return
    h.update(secrets.token_bytes(16))  # cannot tell: a new job every time


def _names(co: types.CodeType):
    """Global names a code object and its nested code objects use."""
    yield from co.co_names
    for c in co.co_consts:
        if isinstance(c, types.CodeType):
            yield from _names(c)
