"""docs/CONNECT.md's "Your own training loop": a model and loop of the user's own (nothing of
lldist in them but two Recorder calls), recorded every 25 steps, then the PCA plane of its
trajectory computed from Python and drawn with the path training took; `python -m lldist.info`
prints how well the plane holds each checkpoint.

    python tools/recorder_example.py          # runs/recorder_example/, docs/connect/recorder_pca.png
"""

import os
import shutil

import matplotlib

matplotlib.use("Agg")
import torch  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402
from torch import nn  # noqa: E402

import lldist  # noqa: E402

OUT = "runs/recorder_example"


class Net(nn.Module):  # the user's model
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))

    def forward(self, x):
        return self.body(x)


def main() -> None:
    shutil.rmtree(OUT, ignore_errors=True)
    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x, dtype=torch.float32) / 16.0
    y = torch.tensor(y)
    g = torch.Generator().manual_seed(0)
    perm = torch.randperm(len(y), generator=g)
    train, test = perm[:1400], perm[1400:]
    torch.manual_seed(0)
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    rec = lldist.Recorder(f"{OUT}/model.pt", every=25)  # <- lldist, 1 of 2
    for epoch in range(8):
        order = train[torch.randperm(len(train), generator=g)]
        for i in range(0, len(order), 64):
            idx = order[i:i + 64]
            loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            rec.step(model, loss=loss.item(), epoch=epoch)  # <- lldist, 2 of 2
    rec.finish(model)
    print(f"recorded {len(rec.saved)} checkpoints and {OUT}/model.pt")

    ls = lldist.landscape(model, (x[test], y[test]), x=(-9.0, 1.5, 43), y=(-2.0, 2.0, 33), batch_size=400,
                          directions={"kind": "pca", "checkpoints": f"{OUT}/model_step*.pt"},
                          out=f"{OUT}/pca.h5", progress_every=0)
    fig = ls.plot()
    os.makedirs("docs/connect", exist_ok=True)
    fig.savefig("docs/connect/recorder_pca.png", dpi=80, bbox_inches="tight")
    print("wrote docs/connect/recorder_pca.png")


if __name__ == "__main__":
    main()
