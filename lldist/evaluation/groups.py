"""A group of ranks that evaluates each cell together (eval.group_size, eval.group_mode). No
MPI, no HDF5: the runner hands a group over (its rank, size, and a broadcast), this module makes
its torch.distributed process group, and the evaluator uses it.

    g = GroupSpec(rank=1, size=2, mode="shard")
    init_process_group(g, bcast, device)       # every rank of the group, together
    model = shard_model(model, g, device)      # FSDP2: parameters as Shard(0) DTensors
    rows = shard_rows(n, g.size, g.rank)       # the dim-0 rows this rank holds

Two modes:
  * data: every rank holds the whole model and evaluates its share of the batches (batch i on
    rank i % size); the float32 per-batch sums meet in an all-reduce into their batch slots
    (one rank fills each slot, the others add zeros: exact), and the float64 sum over batches
    runs in batch order as on one rank: the numbers are one rank's, bit for bit.
  * shard: the model's parameters, theta* and both directions are split by rows over the group
    with FSDP2 (fully_shard on a device mesh: NCCL on GPUs; on CPUs MPI through collectives.py
    under the runner, else gloo); each rank sets its own
    rows of the weights in place and runs its share of the batches as in data mode, FSDP
    gathering each block's parameters for its forward (a rank with a batch fewer repeats one,
    discarded: the gathers are collective). Per rank, parameters and directions take about
    1/size; the group's compute per cell is one model's, split size ways.
Across groups, cells are spread by the coordinator, so a group need only be as large as the
model needs (shard within a node; the groups are the parallelism across nodes).
"""

from __future__ import annotations

import math
import socket
from datetime import timedelta
from typing import NamedTuple, Optional

import torch
from torch import nn

from . import collectives
from .tasks import model_inputs

MODES = ("data", "shard")
SETUP_TIMEOUT_S = 120  # a group whose rank never joins fails within this, not after torch's 30 min


class GroupSpec(NamedTuple):
    rank: int
    size: int
    mode: str  # data | shard


def shard_rows(n: int, size: int, rank: int) -> slice:
    """The rows of a dim-0 split as torch.chunk (and so FSDP2's Shard(0)) makes it: ceil(n/size)
    rows a rank, fewer or none on the last ranks (FSDP2 pads them internally)."""
    step = math.ceil(n / size) if n else 0
    return slice(min(n, rank * step), min(n, (rank + 1) * step))


def held_rows(name: str, part: torch.Tensor, n: int, g: GroupSpec) -> slice:
    """This rank's rows of a sharded entry of n rows, checked against `part`, the local rows
    FSDP holds for it here: were they to differ, every cell would move the wrong rows."""
    rows = shard_rows(n, g.size, g.rank)
    if part.shape[0] != rows.stop - rows.start:
        raise RuntimeError(f"{name}: FSDP holds {part.shape[0]} rows here, lldist expected "
                           f"{rows.stop - rows.start} ({rows})")
    return rows


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def init_process_group(g: GroupSpec, bcast, device: str, link=None) -> None:
    """The group's own torch.distributed world: the leader picks an address and a port and
    broadcasts them (`bcast`: the runner's MPI broadcast within the group); every rank joins.
    Its collectives: NCCL on GPUs; on CPUs over `link` when given (runner.Group.collective_link:
    MPI, through evaluation/collectives.py), else gloo."""
    import torch.distributed as dist
    if dist.is_initialized():
        dist.destroy_process_group()
    address = bcast((socket.gethostname(), _free_port()) if g.rank == 0 else None)
    host, port = address
    try:
        host = socket.gethostbyname(host)
    except OSError:
        host = "127.0.0.1"
    if str(device).startswith("cuda"):
        backend = "nccl"
    else:
        backend = collectives.register(link) if link is not None else "gloo"
    dist.init_process_group(backend, init_method=f"tcp://{host}:{port}", rank=g.rank, world_size=g.size,
                            timeout=timedelta(seconds=SETUP_TIMEOUT_S))


def blocks(model: nn.Module) -> list:
    """The modules sharded on their own before the root (each gathered for its own forward):
    HuggingFace's blocks where the model names them (_no_split_modules: GPT2Block, BertLayer),
    else every direct child that holds parameters. A module holding a parameter that is also
    used outside it (an output layer tied to its embedding) is left to the root's unit: FSDP2
    shards a parameter once, for the unit that owns it, so both users must be in that unit."""
    names = set(getattr(model, "_no_split_modules", None) or ())
    found = [m for m in model.modules() if type(m).__name__ in names] if names else []
    if not found:
        found = [m for m in model.children() if any(True for _ in m.parameters())]
    uses = _uses(model)
    return [m for m in found if all(uses[id(p)] == n for p, n in _counted(m))]


def _counted(module: nn.Module) -> list:
    """Each parameter of a module with the number of places it appears in it."""
    count, first = {}, {}
    for _, p in module.named_parameters(remove_duplicate=False):
        count[id(p)] = count.get(id(p), 0) + 1
        first.setdefault(id(p), p)
    return [(first[i], n) for i, n in count.items()]


def _uses(model: nn.Module) -> dict:
    return {id(p): n for p, n in _counted(model)}


def shard_model(model: nn.Module, g: GroupSpec, device: str, gathered: Optional[torch.dtype] = None) -> nn.Module:
    """FSDP2 over the group: each block, then the root; parameters become Shard(0) DTensors
    whose local rows a rank updates in place (torch.distributed.fsdp.fully_shard). `gathered`:
    the dtype each block's parameters are gathered and run in (FSDP2's mixed precision: the rows
    stay in their own dtype, so θ* + αδ is made in it; eval.precision: bf16), else their own."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    mesh = init_device_mesh(torch.device(device).type, (g.size,))
    policy = MixedPrecisionPolicy(param_dtype=gathered, reduce_dtype=torch.float32) if gathered else MixedPrecisionPolicy()
    for block in blocks(model):
        fully_shard(block, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    return model


def sharded_modules(model: nn.Module) -> list:
    """The modules fully_shard made FSDP modules (none for a model that is not sharded)."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # a torch without FSDP2 cannot have made any
        return []
    return [m for m in model.modules() if isinstance(m, FSDPModule)]


def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's part of a parameter: the local rows of a DTensor, or the tensor itself."""
    return t.to_local() if hasattr(t, "to_local") else t


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    import torch.distributed as dist
    dist.all_reduce(t)
    return t


def sum_gradients(model: nn.Module) -> None:
    """A sharded model's gradient as the sum of the members' (FSDP2 averages them by default):
    a plain SUM (gloo has no PREMUL_SUM), divided by nothing, as one rank sums its batches."""
    for m in sharded_modules(model):
        m.set_force_sum_reduction_for_comms(True)
        m.set_gradient_divide_factor(1.0)


def write_point(model: nn.Module, names: list, point: dict) -> None:
    """A point into the model's parameters, in place: a sharded model's, this rank's rows."""
    for m in sharded_modules(model):  # FSDP2 leaves the root gathered after a forward without
        m.reshard()                   # backward: shard it again, so the parameters are the rows
    live = dict(model.named_parameters())
    with torch.no_grad():
        for n in names:
            local(live[n]).copy_(point[n])


def group_pass(model: nn.Module, names: list, batches: list, task, g: GroupSpec, grad: bool,
               terms=None) -> tuple:
    """(Σ sums / Σ weights, {name: this rank's part of the mean's gradient} or None) of the
    weights the model holds, over fixed batches, with every member of the group (collective),
    of the task's loss (tasks.Task: its summed loss and weight per batch). Member r runs batches r, r + size,
    ...; a member with a batch fewer repeats one and discards it (a shard group's gathers and
    reduce-scatters are collective). The batch sums meet in their slots, each filled by one
    member and zeros elsewhere, so the all-reduce is exact and the sum over batches runs in
    batch order, as one rank runs it: the value is one rank's bit for bit. The gradient of a
    sharded model is FSDP2's reduce-scatter (call sum_gradients once first); of a `data` group's
    whole model, an all-reduce of the members'.

    `terms(batch) -> (summed loss, weight, objective)`: what one batch runs, its objective the
    scalar whose gradient is summed (default: the summed loss itself; a curvature product's
    J^T u: sharded.py). It runs the same collective forwards for the discarded repeat."""
    def plain(b):
        args, kwargs = model_inputs(b)
        s, n = task.loss_terms(model(*args, **kwargs), b)
        return s, n, s
    terms = terms or plain
    fsdp = sharded_modules(model)
    live = dict(model.named_parameters())
    device = live[names[0]].device
    if grad:
        for p in live.values():
            p.grad = None
    slots = torch.zeros(len(batches), 2, dtype=torch.float64, device=device)
    ran = 0
    for i, b in enumerate(batches):
        if i % g.size != g.rank:
            continue
        s, n, objective = terms(b)
        if grad:
            objective.backward()
        slots[i, 0], slots[i, 1] = float(s.detach()), float(n)
        ran += 1
    for _ in range(-(-len(batches) // g.size) - ran):
        _, _, objective = terms(batches[0])
        if grad:
            (objective * 0).backward()  # its share of the reduce-scatter: zeros
    all_reduce_sum(slots)
    v = w = 0.0
    for s, n in slots.tolist():  # in batch order, as one rank sums them
        v, w = v + s, w + n
    if not grad:
        return v / w, None
    grads = {}
    for n in names:
        p = live[n]
        gr = local(p.grad) if p.grad is not None else torch.zeros_like(local(p))
        if not fsdp:  # data mode: each member's gradient of its batches, summed
            gr = all_reduce_sum(gr.contiguous())
        grads[n] = gr / w
    for p in live.values():  # (the others' too: a block's gradient leaves none behind)
        p.grad = None
    return v / w, grads
