"""lldist from Python, start to end: train two small models, compute their landscapes, plot
and compare them. Runs as a script (the tests execute it) or cell by cell in a notebook.

    python docs/walkthrough.py [OUT_DIR]          # about a minute on 2 CPU cores

The question is the field's usual one: does a smaller training batch end in a flatter place?
Two copies of one MLP are trained on scikit-learn's bundled digits with Adam, batch 16 and
batch 512, the same number of epochs; each gets a 21x21 filter-normalized landscape.
"""

import os
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import lldist  # noqa: E402
from lldist.config import DataConfig  # noqa: E402
from lldist.cells.levels import labelled, round_levels  # noqa: E402
from lldist.workloads.data import load_split  # noqa: E402
from lldist.analysis.metrics import compute  # noqa: E402

out = sys.argv[1] if len(sys.argv) > 1 else "runs/walkthrough"
os.makedirs(out, exist_ok=True)
torch.set_num_threads(1)

# --- data: (x, y) tensors are all lldist needs (a DataLoader or dict batches work too)
train, test = load_split(DataConfig(), "train"), load_split(DataConfig(), "test")
x_train, y_train = train.normalize(train.x), train.y
x_test, y_test = test.normalize(test.x), test.y


def mlp():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10))


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


# --- two landscapes: the same call for any nn.Module and data
landscapes = {}
for batch in (16, 512):
    model = fit(mlp(), batch)
    landscapes[batch] = lldist.landscape(model, (x_test, y_test), x=(-1, 1, 21), y=(-1, 1, 21),
                                         out=os.path.join(out, f"batch{batch}.h5"), batch_size=360)
    ls = landscapes[batch]
    print(f"batch {batch}: test loss at theta* {ls.loss[10, 10]:.4f}, accuracy {ls.acc[10, 10]:.3f}")

# --- plot: ls.plot() gives the command line's contour figure
fig = landscapes[16].plot()
fig.savefig(os.path.join(out, "walkthrough_contours.png"), dpi=100, bbox_inches="tight")
plt.close(fig)

# --- compare: one colour scale, the same levels; and the landscape metrics
lo = min(np.nanmin(ls.loss) for ls in landscapes.values())
hi = max(np.nanmax(ls.loss) for ls in landscapes.values())
levels = round_levels(lo, hi, 25, geometric=True)  # round values (0.1, 0.15, 0.2, ...), as lldist.plot's
lo, hi = levels[0], levels[-1]
fig, axes = plt.subplots(1, 2, figsize=(9, 4), sharey=True)
for ax, (batch, ls) in zip(axes, landscapes.items()):
    cs = ax.contourf(ls.x, ls.y, ls.loss, levels=levels, norm=matplotlib.colors.LogNorm(lo, hi))
    ax.plot([0], [0], "r+")
    m, _ = compute(ls.loss, ls.acc, ls.x, ls.y)
    ax.set_title(f"batch {batch}: rise within r=0.5 {m['mean_rise_r0.5']:.3f}, roughness {m['roughness']:.3f}",
                 fontsize=8)
    ax.set_xlabel("alpha")
axes[0].set_ylabel("beta")
bar = fig.colorbar(cs, ax=axes.ravel().tolist(), label="test loss")
ticks = labelled(levels, geometric=True)  # ticks at 1, 2, 5 x 10^k, written plainly
bar.set_ticks(ticks, labels=[f"{t:g}" for t in ticks])
bar.minorticks_off()
fig.savefig(os.path.join(out, "walkthrough_compare.png"), dpi=100, bbox_inches="tight")
plt.close(fig)

# --- reading a file back needs no model and no data
again = lldist.open(os.path.join(out, "batch512.h5"))
assert np.array_equal(again.loss, landscapes[512].loss)
print(f"compared {len(landscapes)} landscapes: {out}/walkthrough_compare.png")
