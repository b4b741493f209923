"""A CPU group's torch collectives over MPI (evaluation/collectives.py on the runner's MpiLink):
real ranks under mpiexec, checked against numpy and against the unsharded model. The group
runs on three ranks so that rows split unevenly and a sum has an order."""

import re
import subprocess
import sys

from conftest import ROOT, env, mpiexec

SCRIPT = r'''
import copy, sys, traceback
import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from mpi4py import MPI
from lldist.transport.runner import MpiLink
from lldist.evaluation.groups import GroupSpec, init_process_group, shard_model, sum_gradients, local, shard_rows

world = MpiLink(MPI.COMM_WORLD)
r, k = world.rank, world.size
torch.set_num_threads(1)


def values(rank, n, dtype=torch.float32):
    g = torch.Generator().manual_seed(100 + rank)
    return torch.randn(n, generator=g, dtype=torch.float64).to(dtype)


def in_order(ts):
    acc = ts[0].clone()
    for t in ts[1:]:
        acc += t
    return acc


def check():
    spec = GroupSpec(r, k, "shard")
    init_process_group(spec, lambda obj: world.bcast(obj, 0), "cpu", world.dup())
    assert dist.get_backend() == "lldist_mpi", dist.get_backend()

    # all-gather, out of place and in place (FSDP2's way: the input is this rank's slice)
    out = torch.empty(k * 5)
    dist.all_gather_into_tensor(out, values(r, 5))
    assert torch.equal(out, torch.cat([values(q, 5) for q in range(k)]))
    buf = torch.zeros(k * 7, dtype=torch.bfloat16)
    buf[r * 7:(r + 1) * 7] = values(r, 7, torch.bfloat16)
    dist.all_gather_into_tensor(buf, buf[r * 7:(r + 1) * 7])
    assert torch.equal(buf, torch.cat([values(q, 7, torch.bfloat16) for q in range(k)]))

    # sums: the ranks' values added left to right, the same bits on every rank
    t = values(r, 1000)
    dist.all_reduce(t)
    assert torch.equal(t, in_order([values(q, 1000) for q in range(k)]))
    gathered = [torch.empty_like(t) for _ in range(k)]
    dist.all_gather(gathered, t)
    assert all(torch.equal(g, t) for g in gathered)
    counts = torch.tensor([r, 10 * r], dtype=torch.int64)
    dist.all_reduce(counts)
    assert counts.tolist() == [sum(range(k)), 10 * sum(range(k))]
    try:
        dist.all_reduce(torch.ones(2), op=dist.ReduceOp.MAX)
        raise AssertionError("MAX was not refused")
    except RuntimeError as e:
        assert "sums only" in str(e), e
    piece = torch.empty(4)
    dist.reduce_scatter_tensor(piece, values(r, 4 * k))
    assert torch.equal(piece, in_order([values(q, 4 * k)[4 * r:4 * (r + 1)] for q in range(k)]))
    b = values(r, 3) if r == 1 else torch.zeros(3)
    dist.broadcast(b, src=1)
    assert torch.equal(b, values(1, 3))
    dist.barrier()

    # FSDP2 over it: the forward is the unsharded model's, bit for bit; the gradient of the
    # summed losses of every rank's batch is the unsharded per-batch gradients added in rank
    # order, bit for bit (rows of 10: 4, 4, 2 on three ranks)
    torch.manual_seed(0)
    whole = nn.Sequential(nn.Linear(6, 10), nn.Tanh(), nn.Linear(10, 10), nn.Tanh(), nn.Linear(10, 3))
    sharded = shard_model(copy.deepcopy(whole), spec, "cpu")
    xs = [values(q, 8 * 6).view(8, 6) for q in range(k)]
    with torch.no_grad():
        assert torch.equal(sharded(xs[r]), whole(xs[r]))
    sum_gradients(sharded)
    sharded(xs[r]).square().sum().backward()
    grads = []
    for q in range(k):
        whole.zero_grad()
        whole(xs[q]).square().sum().backward()
        grads.append(whole[2].weight.grad.clone())
    rows = shard_rows(10, k, r)
    assert torch.equal(local(sharded[2].weight.grad), in_order(grads)[rows])
    dist.destroy_process_group()


try:
    check()
except BaseException:
    traceback.print_exc()
    sys.stdout.flush()
    MPI.COMM_WORLD.Abort(1)
print(f"rank {r} ok", flush=True)
'''


def test_mpi_collectives_match_numpy_and_the_unsharded_model(tmp_path):
    script = tmp_path / "collectives.py"
    script.write_text(SCRIPT)
    p = subprocess.run([mpiexec(), "-n", "3", sys.executable, str(script)], cwd=ROOT, env=env(),
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert sorted(re.findall(r"rank (\d) ok", p.stdout)) == ["0", "1", "2"]  # (ranks' lines may interleave)
