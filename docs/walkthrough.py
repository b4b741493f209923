"""lldist from Python, start to end, on its public face only: train two small models, compute
their landscapes, the Hessian at each minimum and the sharpness measures, and compare them.
Runs as a script (the tests execute it) or cell by cell in a notebook (docs/notebook.ipynb is
the same in Jupyter's form).

    python docs/walkthrough.py [OUT_DIR]          # about a minute on 2 CPU cores

The question is the field's usual one: does a smaller training batch end in a flatter place?
Two copies of one MLP are trained on scikit-learn's bundled digits with Adam, batch 16 and
batch 512, the same number of epochs; each gets a 21x21 filter-normalized landscape, the top
Hessian eigenvalues of its train loss and its sharpness measures.
"""

import os
import sys

import matplotlib.pyplot as plt
import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.colors import LogNorm
from sklearn.datasets import load_digits

import lldist

out = sys.argv[1] if len(sys.argv) > 1 else "runs/walkthrough"
os.makedirs(out, exist_ok=True)
torch.set_num_threads(1)

# --- data: (x, y) tensors are all lldist needs (a DataLoader or dict batches work too)
digits = load_digits()
x = torch.tensor(digits.data, dtype=torch.float32)
x = (x - x[:1437].mean(0)) / (x[:1437].std(0) + 1e-6)  # standardized by the train split's statistics
y = torch.tensor(digits.target)
x_train, y_train, x_test, y_test = x[:1437], y[:1437], x[1437:], y[1437:]


def mlp():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10))


def fit(model, batch, epochs=15):
    opt = torch.optim.Adam(model.parameters(), lr=5e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(epochs):
        order = torch.randperm(len(x_train), generator=g)
        for i in range(0, len(order), batch):
            idx = order[i:i + batch]
            loss = F.cross_entropy(model(x_train[idx]), y_train[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval()


# --- per model: a landscape, the Hessian at θ* and the sharpness measures, each one call
landscapes, hessians, sharpness = {}, {}, {}
for batch in (16, 512):
    model = fit(mlp(), batch)
    ls = landscapes[batch] = lldist.landscape(model, (x_test, y_test), x=(-1, 1, 21), y=(-1, 1, 21),
                                              out=os.path.join(out, f"batch{batch}.h5"), batch_size=360)
    hessians[batch] = lldist.curvature(model, (x_train, y_train), top=3, trace_samples=16, out=ls.path.replace(
        ".h5", "_at_theta.h5"))
    sharpness[batch] = lldist.sharpness_measures(model, (x_train, y_train), examples=512, draws=8)
    print(f"batch {batch}: test loss at theta* {ls.loss[10, 10]:.4f}, accuracy {ls.acc[10, 10]:.3f}, "
          f"Hessian lambda_max {hessians[batch].lambda_max:.3g}, worst-case l2 sharpness {sharpness[batch].worst_2:.3g}")

# --- plot: ls.plot() gives the command line's contour figure
fig = landscapes[16].plot()
fig.savefig(os.path.join(out, "walkthrough_contours.png"), dpi=100, bbox_inches="tight")
plt.close(fig)

# --- compare: one colour scale, the same levels; the landscape's own metrics in the titles
lo = min(np.nanmin(ls.loss) for ls in landscapes.values())
hi = max(np.nanmax(ls.loss) for ls in landscapes.values())
levels = np.geomspace(lo, hi, 25)
fig, axes = plt.subplots(1, 2, figsize=(9, 4), sharey=True)
for ax, (batch, ls) in zip(axes, landscapes.items()):
    cs = ax.contourf(ls.x, ls.y, ls.loss, levels=levels, norm=LogNorm(lo, hi))
    ax.plot([0], [0], "r+")
    m = ls.metrics()
    ax.set_title(f"batch {batch}: rise within r=0.5 {m['mean_rise_r0.5']:.3f}, "
                 f"λmax {hessians[batch].lambda_max:.3g}", fontsize=8)
    ax.set_xlabel("α")
axes[0].set_ylabel("β")
bar = fig.colorbar(cs, ax=axes.ravel().tolist(), label="test loss")
ticks = [t for t in (0.1, 0.2, 0.5, 1, 2, 5, 10, 20, 50) if lo <= t <= hi]
bar.set_ticks(ticks, labels=[f"{t:g}" for t in ticks])
bar.minorticks_off()
fig.savefig(os.path.join(out, "walkthrough_compare.png"), dpi=100, bbox_inches="tight")
plt.close(fig)

# --- reading a file back needs no model and no data
again = lldist.open(os.path.join(out, "batch512.h5"))
assert np.array_equal(again.loss, landscapes[512].loss)
print(f"compared {len(landscapes)} landscapes: {out}/walkthrough_compare.png")
