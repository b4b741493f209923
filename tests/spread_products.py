"""Run under mpiexec by test_curvature_scale: products of a seeded model's Hessian (or GGN,
Fisher) over a data group of every rank, each vector split over them (evaluation/data_rows.py),
rank 0 saving the products (gathered whole for the comparison) with the vectors they were taken
with, and the top eigenvalues and the trace from Lanczos on the split vectors.

    mpiexec -n 3 python tests/spread_products.py out.npz [hessian|ggn|fisher] [SCATTER]

SCATTER: entries a reduce-scatter sums at once (data_rows.SCATTER), small to cut it in slices.
"""

import sys

import numpy as np
import torch
from torch import nn

from lldist.evaluation.data_rows import DataRows
from lldist.evaluation.groups import GroupSpec, init_process_group
from lldist.evaluation.tasks import Task
from lldist.transport import runner


def model_and_batches():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))
    x, y = torch.randn(70, 6), torch.randint(0, 3, (70,))
    return m, [(x[i:i + 10], y[i:i + 10]) for i in range(0, 70, 10)]  # 7 batches: uneven shares


def main():
    out, operator = sys.argv[1], sys.argv[2]
    if len(sys.argv) > 3:
        from lldist.evaluation import data_rows
        data_rows.SCATTER = int(sys.argv[3])
    ctx = runner.launch()
    if ctx.size > 1:
        world = runner.Spread(ctx).group(ctx.size)
        init_process_group(GroupSpec(world.rank, world.size, "data"), world.bcast, "cpu", world.collective_link("cpu"))
    m, batches = model_and_batches()
    op = DataRows(m, batches, Task(), ctx.rank, ctx.size, operator=operator)
    assert ctx.size == 1 or op.entries_held() <= -(-op.n // ctx.size) < op.n  # no rank holds a whole vector
    vs = np.random.default_rng(0).standard_normal((3, op.n))
    hv = []
    for v in vs:
        flat = torch.from_numpy(v)
        parts, at = {}, 0
        for n, s in op.shapes.items():  # the whole vector, parameter by parameter, cut into this rank's parts
            k = int(np.prod(s))
            parts[n] = op._rows(n, flat[at:at + k].view(s))
            at += k
        mine = torch.cat([t.reshape(-1) for t in op.hvp(parts).values()])
        if ctx.size > 1:
            import torch.distributed as dist
            pieces = [None] * ctx.size
            dist.all_gather_object(pieces, mine)
            mine = torch.cat(pieces)
        hv.append(mine.numpy())
    top, _, _, _ = op.extremes(2, tol=1e-8, smallest=False)
    tr = op.trace(16)[0]
    if ctx.rank == 0:
        np.savez(out, vs=vs, hv=np.stack(hv), top=np.array(top), trace=np.array(tr))


if __name__ == "__main__":
    main()
