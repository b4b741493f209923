"""A model that no rank holds whole (eval.group_mode: shard): built with its parameters on the
meta device, sharded by FSDP2, and each rank reading only its own rows of θ* from the
checkpoint. Rank 0 prepares the file from the shapes alone.

    ckpt = Checkpoint.open("runs/llm/model.safetensors")   # a file (.safetensors, .pt) or a HuggingFace folder
    ckpt.shape("lm_head.weight"); ckpt.read("fc.weight", slice(0, 128))   # the shape; those rows only
    loaded = shapes(job)                       # Loaded: θ*'s parameters as meta tensors (rank 0's prepare)
    loaded = by_rows(job, group, device)       # Loaded: the sharded model holding this rank's rows
    why = whole_because(job, source)           # None, or why this job's model is built whole on each rank

Formats read by rows: a safetensors file (a tensor's rows are one byte range: only it is read); a
HuggingFace folder with model.safetensors or sharded safetensors and their index; a torch file
(lldist's {"state_dict", "meta"} or a plain state dict) in torch's zip format, memory-mapped, so
that only the pages of the rows read are touched. A torch file of the old non-zip format cannot
be mapped: it is read whole, with a note (models.read_checkpoint).

What a rank holds: its rows of each parameter, the buffers whole (they are small: statistics,
rotary caches), and for a moment one parameter whole where a direction's norm spans rows (a
transposed Conv1D weight, directions.norm: layer). Parameters are made on the meta device by
registering them there as they are made (buffers stay real: a rotary cache or position ids
computed in __init__ keep their values); a model whose __init__ needs its parameters' values
cannot be built so and is built whole, with a note naming it.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import nn

from ..config import Job
from ..directions.state import model_state
from ..errors import UserError
from ..evaluation.evaluator import AUTOCAST
from ..evaluation.groups import GroupSpec, held_rows, local, shard_model
from .identity import theta_source
from .loading import Loaded, load_splits
from ..workloads.models import build_model, is_safetensors, lldist_meta, read_checkpoint, tied

INDEX = "model.safetensors.index.json"


# ----------------------------------------------------------------------------- the checkpoint

DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}


class _Safetensors:
    """One safetensors file, read by byte ranges: its header says where each tensor's bytes
    are, and rows of dim 0 are one contiguous range, read straight into a new tensor (no
    mapping of the file, so no page of it counts in this rank's memory)."""

    def __init__(self, path: str):
        self.path = path
        try:
            st = os.stat(path)
            self.stamp = (st.st_size, st.st_mtime_ns)  # what a later read checks it still is
            with open(path, "rb") as f:
                n = int.from_bytes(f.read(8), "little")
                header = json.loads(f.read(n))
            self.metadata = header.pop("__metadata__", None) or {}
            self.entries = {k: (DTYPES[v["dtype"]], tuple(v["shape"]), 8 + n + int(v["data_offsets"][0]))
                            for k, v in header.items()}
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise UserError(f"checkpoint {path} cannot be read as safetensors ({type(e).__name__}: "
                            f"{' '.join(str(e).split())[:200]})")

    def keys(self) -> list:
        return list(self.entries)

    def shape(self, key: str) -> tuple:
        return self.entries[key][1]

    def unchanged(self) -> bool:
        try:
            st = os.stat(self.path)
        except OSError:
            return False
        return (st.st_size, st.st_mtime_ns) == self.stamp

    def _range(self, key: str, rows: Optional[slice]) -> tuple:
        """(dtype, shape, byte offset) of `key`'s rows `rows` of dim 0 (all of it: None)."""
        dtype, shape, offset = self.entries[key]
        if rows is not None and shape:
            start, stop, _ = rows.indices(shape[0])
            row = math.prod(shape[1:]) * dtype.itemsize
            offset, shape = offset + start * row, (max(0, stop - start),) + shape[1:]
        return dtype, shape, offset

    def _fill(self, key: str, offset: int, out: torch.Tensor) -> None:
        view = out.detach().view(-1).view(torch.uint8).numpy() if out.numel() else None
        if view is not None:
            with open(self.path, "rb") as f:
                f.seek(offset)
                if f.readinto(view) != view.size:
                    raise UserError(f"checkpoint {self.path} is truncated: {key} is cut short")

    def read(self, key: str, rows: Optional[slice]) -> torch.Tensor:
        dtype, shape, offset = self._range(key, rows)
        out = torch.empty(shape, dtype=dtype)
        self._fill(key, offset, out)
        return out

    def read_into(self, key: str, rows: Optional[slice], out: torch.Tensor) -> None:
        """The same values written into `out`: straight from the file where `out` is a
        contiguous host tensor of the entry's dtype and shape (no new memory to fault in),
        else through a read and a copy (a GPU's rows, a cast)."""
        dtype, shape, offset = self._range(key, rows)
        if out.device.type == "cpu" and out.dtype == dtype and tuple(out.shape) == tuple(shape) \
                and out.is_contiguous():
            self._fill(key, offset, out)
        else:
            out.copy_(self.read(key, rows))


class _Mapped:
    """A torch file's state dict, memory-mapped."""

    def __init__(self, path: str, state: dict):
        self.path, self.state = path, state

    def keys(self) -> list:
        return list(self.state)

    def shape(self, key: str) -> tuple:
        return tuple(self.state[key].shape)

    def read(self, key: str, rows: Optional[slice]) -> torch.Tensor:
        t = self.state[key]
        return (t if rows is None or not t.dim() else t[rows]).clone()


@dataclass
class Checkpoint:
    """A checkpoint's entries, each readable whole or by rows of dim 0, from whichever file of
    it holds the entry."""
    path: str
    files: dict  # entry -> _Safetensors | _Mapped
    meta: dict = field(default_factory=dict)

    @classmethod
    def open(cls, path: str) -> "Checkpoint":
        if os.path.isdir(path):
            return cls._folder(path)
        if is_safetensors(path):
            f = _Safetensors(path)
            return cls(path, {k: f for k in f.keys()}, lldist_meta(f.metadata))
        state, meta = read_checkpoint(path, mmap=True)
        f = _Mapped(path, state)
        return cls(path, {k: f for k in f.keys()}, meta)

    @classmethod
    def _folder(cls, path: str) -> "Checkpoint":
        index = os.path.join(path, INDEX)
        if os.path.exists(index):
            try:
                with open(index) as fh:
                    weight_map = json.load(fh)["weight_map"]
            except (OSError, ValueError, KeyError, TypeError) as e:
                raise UserError(f"checkpoint {path}: {INDEX} cannot be read ({type(e).__name__}: {e})")
            shards = {}
            for shard in sorted(set(weight_map.values())):
                file = os.path.join(path, shard)
                if not os.path.exists(file):
                    raise UserError(f"checkpoint {path}: {INDEX} names shard {shard}, which is not in the folder")
                shards[shard] = _Safetensors(file)
            return cls(path, {k: shards[s] for k, s in weight_map.items()}, {"checkpoint_folder": os.path.abspath(path)})
        for name in ("model.safetensors", "pytorch_model.bin"):
            file = os.path.join(path, name)
            if os.path.exists(file):
                ck = cls.open(file)
                ck.path, ck.meta = path, {"checkpoint_folder": os.path.abspath(path)}
                return ck
        raise UserError(f"checkpoint {path}: no model.safetensors, {INDEX} or pytorch_model.bin in the folder")

    def shape(self, key: str) -> tuple:
        return self.files[key].shape(key)

    def read(self, key: str, rows: Optional[slice] = None) -> torch.Tensor:
        """The entry `key`, or its rows `rows` of dim 0 (only those bytes read)."""
        return self.files[key].read(key, rows)


# ----------------------------------------------------------------------------- building on meta

@contextlib.contextmanager
def parameters_on_meta():
    """Parameters registered inside are meta tensors: a shape and a dtype, no memory (the one a
    layer's __init__ allocates, untouched, is freed at once). Buffers stay as they are made."""
    register = nn.Module.register_parameter

    def on_meta(module, name, param):
        if param is not None and param.device.type != "meta":
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        register(module, name, param)
    nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


class Unbuildable(Exception):
    """The model cannot be built with its parameters on the meta device: built whole instead."""


def skeleton(job: Job, first) -> nn.Module:
    """The job's model with its parameters on the meta device (weights are not loaded)."""
    try:
        with parameters_on_meta():
            return build_model(job.model, first.in_shape, first.num_classes, weights=False)
    except UserError:
        raise
    except Exception as e:  # an __init__ that reads its parameters' values (meta tensors have none)
        raise Unbuildable(f"model {job.model.name} cannot be built on the meta device ({type(e).__name__}: "
                          f"{' '.join(str(e).split())[:160]})")


@dataclass
class Rows:
    """θ*'s values where a Loaded holds only its parameters' shapes (meta tensors): read from
    the checkpoint, whole or by rows (a rank's own rows are read again rather than taken from
    its model, which FSDP may hold gathered after a forward)."""
    checkpoint: Checkpoint
    keys: dict  # state entry -> the checkpoint's key for it

    def read(self, name: str, rows: Optional[slice] = None) -> torch.Tensor:
        return self.checkpoint.read(self.keys[name], rows)

    def rereader(self, name: str, rows: Optional[slice]):
        """A function that overwrites a tensor with θ*'s rows `rows` of `name` read again from
        the checkpoint, for a rank that does not keep them (evaluation.Evaluator: a quarter of
        a sharded rank's rows, for one read of them a cell); None where the entry is not in a
        safetensors file (a mapped torch file's pages would count in the rank's memory as the
        copy does). The file must not change while the run reads it: each read checks its size
        and modification time against those it had when opened."""
        f = self.checkpoint.files.get(self.keys.get(name))
        if not isinstance(f, _Safetensors):
            return None
        key = self.keys[name]

        def fill(out: torch.Tensor) -> None:
            if not f.unchanged():
                raise UserError(f"checkpoint {f.path} changed while the run read θ* from it; run again "
                                "(the cells computed before are kept)")
            f.read_into(key, rows, out)
        return fill


def _keys(model: nn.Module, ckpt: Checkpoint, job: Job) -> dict:
    """Each persistent state entry's key in the checkpoint (a tied twin once), every shape
    checked: the entry's own name, its twin's, or the name without the model's base prefix
    (HuggingFace's base models save without it)."""
    twins = tied(model)
    aliases = {}
    for name, twin in twins.items():
        aliases.setdefault(twin, []).append(name)
    prefix = getattr(model, "base_model_prefix", "") or ""
    out = {}
    for name, w in model.state_dict(keep_vars=True).items():
        if name in twins:
            continue
        names = [name] + aliases.get(name, []) + ([name[len(prefix) + 1:]] if prefix and name.startswith(prefix + ".")
                                                   else [])
        key = next((k for k in names if k in ckpt.files), None)
        if key is None:
            raise UserError(f"checkpoint {ckpt.path} does not fit model {job.model.name}: it has no entry {name}")
        if tuple(ckpt.shape(key)) != tuple(w.shape):
            raise UserError(f"checkpoint {ckpt.path} does not fit model {job.model.name}: {name} is "
                            f"{tuple(ckpt.shape(key))} there, {tuple(w.shape)} in the model")
        out[name] = key
    # entries the model does not have: refused, as a whole load refuses them (a HuggingFace
    # folder's are left, as from_pretrained leaves them)
    extra = sorted(set(ckpt.files) - set(out.values()) - set(twins))
    if extra and not os.path.isdir(ckpt.path):
        raise UserError(f"checkpoint {ckpt.path} does not fit model {job.model.name}: it has an entry {extra[0]} "
                        "the model does not")
    return out


def shapes(job: Job) -> Loaded:
    """What rank 0 prepares a file from: the model with its parameters as meta tensors and its
    buffers read from the checkpoint; θ*'s parameters are shapes, read through `Loaded.rows`."""
    splits = load_splits(job)
    model = skeleton(job, next(iter(splits.values())))
    ckpt = Checkpoint.open(theta_source(job))
    keys = _keys(model, ckpt, job)
    with torch.no_grad():
        for name, b in model.named_buffers():  # small and real: the checkpoint's, as a whole load gives
            if name in keys:
                b.copy_(ckpt.read(keys[name]))
    theta, kinds = model_state(model)
    return Loaded(model, theta, kinds, splits, ckpt.meta, rows=Rows(ckpt, keys))


def by_rows(job: Job, group: GroupSpec, device: str, dtype: Optional[torch.dtype] = None) -> Loaded:
    """The model sharded over the group, each rank allocating and reading only its own rows of
    every parameter (collective: every rank of the group calls it). `dtype`: its floating-point
    parameters and buffers in it (a sharded Hessian's float64), the checkpoint's values cast."""
    loaded = shapes(job)
    model, keys, ckpt = loaded.model, loaded.rows.keys, loaded.rows.checkpoint
    if dtype is not None:
        model.to(dtype)
    buffers = dict(model.named_buffers())  # to_empty replaces them: these keep the values
    model.eval()
    shard_model(model, group, device, AUTOCAST[job.eval.precision])  # bf16: gathered in it
    model.to_empty(device=device)  # this rank's rows of each parameter, and the buffers, allocated
    with torch.no_grad():
        for name, b in buffers.items():
            model.get_buffer(name).copy_(b)
        for name, p in model.named_parameters():
            part = local(p)
            part.copy_(ckpt.read(keys[name], held_rows(name, part, p.shape[0], group) if p.dim() else None))
    return loaded


def for_group(job: Job, source, group: GroupSpec, device: str, say, dtype: Optional[torch.dtype] = None) -> Loaded:
    """A computation at θ* in a shard group (the sharpness, the Hessian): the model sharded over
    the group, built on the meta device and read by rows where the job's model can be, else
    loaded whole by `source` and sharded, `say` telling which (collective). `dtype`: as by_rows."""
    why = model_whole_because(job, source)
    if why is None:
        try:
            loaded = by_rows(job, group, device, dtype)
        except Unbuildable as e:
            why = str(e)
        else:
            made = f" in {str(dtype).removeprefix('torch.')}" if dtype is not None else ""  # "in float64"
            say(f"model {job.model.name}: built on the meta device{made}, each rank of the group reading its rows "
                f"of {theta_source(job)}")
            return loaded
    say(f"note: model {job.model.name} is built whole on every rank before it is sharded: {why}")
    loaded = source.load(job)
    model = loaded.model.to(dtype) if dtype is not None else loaded.model
    loaded.model = shard_model(model.eval(), group, device)
    return loaded


def whole_because(job: Job, source) -> Optional[str]:
    """Why this job's model is built whole on every rank rather than by rows, or None. By rows
    needs a sharded group, the job file's model, a checkpoint to read rows from, and random
    directions (the caller checks they are kept as their recipe: tensors would travel whole
    to every rank)."""
    if job.eval.group_size < 2 or job.eval.group_mode != "shard":
        return "not a sharded group"
    why = model_whole_because(job, source)
    if why is None and (job.directions.kind != "random" or job.directions.target):
        why = f"directions.kind {job.directions.kind} is made whole (only random directions are made by rows)"
    return why


def model_whole_because(job: Job, source) -> Optional[str]:
    """Why this job's model itself cannot be read by rows (a model given from Python, no
    checkpoint, a PEFT adapter), or None: what python -m lldist.sharpness asks, which has no
    directions."""
    if getattr(source, "loader", None) is not None or job.model.name.startswith("object:"):
        return "the model is given from Python"
    if theta_source(job) is None:
        return "it has no checkpoint to read rows from (its seeded initialization is made whole)"
    if job.model.name.startswith("hf:"):
        from ..workloads import hf
        if hf.adapter_base(job.model.name.split(":", 1)[1]) is not None:
            return "a PEFT adapter is loaded onto its base model whole"
    return None
