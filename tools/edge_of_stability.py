"""docs/SERIES.md's edge of stability: full-batch gradient descent on 1,000 shipped digits under the
squared loss on one-hot targets (Cohen et al.'s MSE setting: with cross-entropy the digits are
fitted within a hundred steps and λmax only decays), an MLP and a small CNN without BatchNorm
at three learning rates each, and one Adam run, each recorded by
lldist.Recorder every few steps with its optimizer, then `python -m lldist.series` over the
checkpoints (λmax on the whole training set, with its jackknife over the four batches) and the
figures.

    python tools/edge_of_stability.py [--ranks 2]     # runs/eos/, docs/series/*.png, docs/series/eos.json
    python tools/edge_of_stability.py --only cnn_lr1  # one run again (its row replaced)
    python tools/edge_of_stability.py --cost          # a 100-checkpoint λmax series on 1 and 4 ranks

Per run it reports the step where λmax first reaches 0.9 × 2/η, the median of λmax / (2/η)
after it, the loss increases after it (a non-monotone descent), and the last λmax / (2/η);
for Adam the same of λmax(P⁻¹H) against 38/η. Wall time at the end.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import lldist  # noqa: E402
from lldist.config import DataConfig, ModelConfig  # noqa: E402
from lldist.workloads.data import load_split  # noqa: E402
from lldist.workloads.models import build_model  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "runs", "eos")
DOCS = os.path.join(ROOT, "docs", "series")
N = 1000  # training examples: the full batch
MLP = {"hidden": [64]}
# no BatchNorm: trained in train mode it would use batch statistics, and the Hessian is taken
# in eval mode (docs/SERIES.md); 28,266 parameters
CNN = {"width": 16, "stages": 2, "batchnorm": False}
# (name, model, its args, optimizer, learning rate, steps, record every)
RUNS = [("mlp_lr0.5", "mlp", MLP, "sgd", 0.5, 1500, 25),
        ("mlp_lr1", "mlp", MLP, "sgd", 1.0, 1500, 25),
        ("mlp_lr2", "mlp", MLP, "sgd", 2.0, 1500, 25),
        ("mlp_adam", "mlp", MLP, "adam", 0.001, 800, 20),
        ("cnn_lr0.5", "cnn", CNN, "sgd", 0.5, 1500, 50),
        ("cnn_lr1", "cnn", CNN, "sgd", 1.0, 1500, 50),
        ("cnn_lr2", "cnn", CNN, "sgd", 2.0, 1500, 50)]


def digits_onehot(split="train", n=N, num_classes=10):
    """The job's data (`python:tools.edge_of_stability:digits_onehot`): the first n digits of the
    split, normalized as lldist's digits are, with one-hot float targets for the squared loss."""
    ts = load_split(DataConfig(), split)
    x, y = ts.normalize(ts.x)[:n], ts.y[:n]
    return x, F.one_hot(y, num_classes).float()


def job_text(name, model, args, folder):
    return (f"name: {name}\noutput: {folder}/surface.h5\nmodel: {{name: {model}, args: {json.dumps(args)}}}\n"
            f"data: {{name: 'python:tools.edge_of_stability:digits_onehot', args: {{n: {N}, num_classes: 10}}}}\n"
            "eval: {batch_size: 250, split: train, loss: mse, threads: 1}\n"
            "curvature: {split: train, batches: 4, top: 1, smallest: false, trace_samples: 0, tol: 1.0e-3}\n"
            f"series: {{checkpoints: {folder}/model_trajectory.json, measures: [curvature, loss]}}\n")


def mse(out, t):
    return (out - t).pow(2).mean(1).mean()  # lldist's `mse`: each example's mean over outputs, then the mean


def train(name, model_name, args, kind, lr, steps, every, folder):
    x, y = digits_onehot()
    torch.manual_seed(0)
    model = build_model(ModelConfig(name=model_name, args=args), (1, 8, 8), 10)
    opt = torch.optim.SGD(model.parameters(), lr=lr) if kind == "sgd" else torch.optim.Adam(model.parameters(), lr=lr)
    rec = lldist.Recorder(f"{folder}/model.pt", every=every, second_moments=kind == "adam")
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = mse(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        rec.step(model, optimizer=opt, loss=loss.item())
    rec.finish(model)
    return np.array(losses)


def summary(s, adam):
    lam = s.column("preconditioned_lambda_max" if adam else "lambda_max")
    ratio = lam / s.thresholds
    hit = np.flatnonzero(ratio >= 0.9)
    first = int(s.steps[hit[0]]) if len(hit) else None
    after = ratio[hit[0]:] if len(hit) else np.array([])
    loss = s.column("train/loss")
    rises = int((np.diff(loss[hit[0]:]) > 0).sum()) if len(hit) else 0
    return {"first_step_at_0.9": first, "median_ratio_after": float(np.median(after)) if len(after) else None,
            "band_after": [float(after.min()), float(after.max())] if len(after) else None,
            "loss_rises_after": rises, "last_ratio": float(ratio[-1]), "max_ratio_before": float(ratio[:hit[0]].max())
            if len(hit) and hit[0] > 0 else None}


def cost(ranks_list=(1, 4)) -> dict:
    """The cost of a 100-checkpoint λmax series: η = 0.5 recorded every 15 steps for 1,500 steps,
    then `lldist.series` with the curvature alone on each rank count (wall time of the command,
    interpreter start-up included), into docs/series/cost.json."""
    folder = os.path.join(OUT, "cost")
    shutil.rmtree(folder, ignore_errors=True)
    train("cost", "mlp", MLP, "sgd", 0.5, 1500, 15, folder)
    job = os.path.join(folder, "job.yaml")
    with open(job, "w") as f:
        f.write(job_text("cost", "mlp", MLP, folder).replace("measures: [curvature, loss]", "measures: [curvature]"))
    mpiexec = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    out = {"date": time.strftime("%Y-%m-%d"), "checkpoints": 100, "seconds": {}}
    files = []
    for n in ranks_list:
        path = os.path.join(folder, f"series_{n}.h5")
        t = time.perf_counter()
        subprocess.run([mpiexec, "-n", str(n), sys.executable, "-m", "lldist.series", job, "--out", path,
                        "--progress-every", "0"], check=True, env=dict(os.environ, OMP_NUM_THREADS="1"), cwd=ROOT,
                       stdout=subprocess.DEVNULL)
        out["seconds"][n] = round(time.perf_counter() - t, 1)
        files.append(lldist.open(path))
    out["same_numbers"] = all(np.array_equal(f.column("lambda_max"), files[0].column("lambda_max")) for f in files)
    with open(os.path.join(DOCS, "cost.json"), "w") as f:
        json.dump(out, f, indent=1)
    print(json.dumps(out), flush=True)
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--cost", action="store_true", help="only the 100-checkpoint series on 1 and 4 ranks")
    ap.add_argument("--only", nargs="+", choices=[r[0] for r in RUNS], metavar="RUN",
                    help="run only these (their rows replace those in docs/series/eos.json; the figure of "
                         "all runs is redrawn from runs/eos)")
    args = ap.parse_args()
    if args.cost:
        cost()
        return
    t0 = time.perf_counter()
    if not args.only:
        shutil.rmtree(OUT, ignore_errors=True)
    os.makedirs(OUT, exist_ok=True)
    os.makedirs(DOCS, exist_ok=True)
    mpiexec = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    rows, series = [], {}
    for name, model, margs, kind, lr, steps, every in RUNS:
        folder = os.path.join(OUT, name)
        if args.only and name not in args.only:
            if os.path.exists(os.path.join(folder, "series.h5")):
                series[name] = lldist.open(os.path.join(folder, "series.h5"))
            continue
        shutil.rmtree(folder, ignore_errors=True)
        t = time.perf_counter()
        train(name, model, margs, kind, lr, steps, every, folder)
        t_train = time.perf_counter() - t
        job = os.path.join(folder, "job.yaml")
        with open(job, "w") as f:
            f.write(job_text(name, model, margs, folder))
        t = time.perf_counter()
        env = dict(os.environ, OMP_NUM_THREADS="1")
        subprocess.run([mpiexec, "-n", str(args.ranks), sys.executable, "-m", "lldist.series", job, "--out",
                        os.path.join(folder, "series.h5"), "--progress-every", "0"], check=True, env=env, cwd=ROOT)
        t_series = time.perf_counter() - t
        s = lldist.open(os.path.join(folder, "series.h5"))
        series[name] = s
        row = {"run": name, "model": model, "optimizer": kind, "lr": lr, "steps": steps, "checkpoints": len(s.steps),
               "threshold": float(s.thresholds[0]), "train_s": round(t_train, 1), "series_s": round(t_series, 1),
               **summary(s, kind == "adam")}
        rows.append(row)
        print(json.dumps(row), flush=True)
        from lldist.analysis.series_figures import sharpness_figure
        fig = sharpness_figure(s)
        fig.savefig(os.path.join(DOCS, f"eos_{name}.png"), dpi=110)
        plt.close(fig)
    # the SGD runs of each model together, λmax / (2/η) against step
    models = [m for m in ("mlp", "cnn") if any(n.startswith(m) for n in series)]
    fig, axes = plt.subplots(1, len(models), figsize=(6 * len(models), 3.6), squeeze=False)
    for ax, model in zip(axes[0], models):  # (λmax · η/2: each run against its own edge)
        for name, s in series.items():
            if name.startswith(model) and "adam" not in name:
                ax.plot(s.steps, s.column("lambda_max") * s.lrs / 2, marker=".", label=name.split("_")[1])
        ax.axhline(1.0, ls="--", color="k", lw=1)
        ax.set_title(f"{model}: λmax · η/2 (1 = the edge)", fontsize=10)
        ax.set_xlabel("step")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(DOCS, "eos_ratio.png"), dpi=110)
    wall = time.perf_counter() - t0
    record = {"date": time.strftime("%Y-%m-%d"), "ranks": args.ranks, "wall_s": round(wall), "rows": rows}
    if args.only:  # the other runs' rows as they were, this one's wall time apart
        with open(os.path.join(DOCS, "eos.json")) as f:
            old = json.load(f)
        mine = {r["run"] for r in rows}
        order = [r[0] for r in RUNS]
        record = {**old, "rows": sorted([r for r in old["rows"] if r["run"] not in mine] + rows,
                                        key=lambda r: order.index(r["run"])),
                  "only": {"runs": sorted(mine), "date": record["date"], "wall_s": record["wall_s"]}}
    with open(os.path.join(DOCS, "eos.json"), "w") as f:
        json.dump(record, f, indent=1)
    print(f"wall {wall:.0f} s", flush=True)


if __name__ == "__main__":
    main()
