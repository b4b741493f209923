"""Run under mpiexec by test_curvature_scale: products of a seeded model's Hessian (or GGN,
Fisher) over the ranks, rank 0 saving them with the vectors they were taken with.

    mpiexec -n 3 python tests/spread_products.py out.npz [hessian|ggn|fisher]
"""

import sys

import numpy as np
import torch
from torch import nn

from lldist.evaluation.curvature import Curvature, serve
from lldist.evaluation.tasks import Task
from lldist.transport import runner


def model_and_batches():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))
    x, y = torch.randn(70, 6), torch.randint(0, 3, (70,))
    return m, [(x[i:i + 10], y[i:i + 10]) for i in range(0, 70, 10)]  # 7 batches: uneven shares


def main():
    out, operator = sys.argv[1], sys.argv[2]
    ctx = runner.launch()
    spread = runner.Spread(ctx) if ctx.size > 1 else None
    m, batches = model_and_batches()
    c = Curvature(m, batches, Task(), operator=operator, spread=spread)
    if ctx.rank != 0:
        serve(spread, {"all": c})
        return
    vs = np.random.default_rng(0).standard_normal((3, c.n))
    hv = np.stack([c.matvec(v) for v in vs])
    top = c.eigs(2, "LA", tol=1e-8)[0]
    tr = c.trace(16)
    if spread is not None:
        spread.end()
    np.savez(out, vs=vs, hv=hv, top=top, trace=np.array(tr))


if __name__ == "__main__":
    main()
