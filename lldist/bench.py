"""Benchmarks, measured in one run and printed as ratios.

    python -m lldist.bench [--device cpu|cuda] [--models mlp cnn ...] [--precision fp32 bf16]
                           [--compile] [--json PATH] [--markdown PATH]
    python -m lldist.bench scaling [--ranks 1 2 4 8] [--cost 0.05] [--cells 320] [--chunk 2]

Throughput (default): per model and precision, on the same synthetic data and device,
  * ceiling: a pure forward pass over preloaded, normalized images at the best batch size
    (eager, and compiled with --compile: the better of the two is the ceiling);
  * lldist: the landscape evaluator (weights updated in place, data on the device), cells/s
    and images/s, and its ratio to the ceiling;
  * naive: the classic per-cell loop (DataLoader with per-sample ToTensor/Normalize,
    load_state_dict per cell), and lldist's speedup over it.
The ceiling and lldist are timed in alternation (median of 5 rounds), so machine drift
affects both alike.
Scaling: the MPI protocol alone, with a synthetic model of fixed cost per cell (it sleeps),
run under mpiexec at 1, 2, 4, 8 ranks: speedup, parallel efficiency, coordinator cost.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch
from torch import nn
import torch.nn.functional as F

from .errors import UserError, run_cli


# ----------------------------------------------------------------------------- helpers

def tune_malloc() -> None:
    """glibc returns big blocks to the OS after every forward pass and faults them back in the
    next; raising the mmap and trim thresholds keeps them (can double CPU throughput)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-1, 1 << 30)  # M_TRIM_THRESHOLD
        libc.mallopt(-3, 1 << 30)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass


def sync(device):
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, device, repeat=3, min_time=0.3):
    """Median seconds of fn() over `repeat` runs, each long enough to time."""
    fn()
    sync(device)
    times = []
    for _ in range(repeat):
        n, t0 = 0, time.perf_counter()
        while True:
            fn()
            n += 1
            sync(device)
            dt = time.perf_counter() - t0
            if dt >= min_time or n >= 50:
                break
        times.append(dt / n)
    return float(np.median(times))


# ----------------------------------------------------------------------------- throughput

MODELS = {
    # name: (lldist model name, model args, input shape)
    "mlp": ("mlp", {"hidden": [512, 256]}, (3, 32, 32)),
    "cnn": ("cnn", {"width": 16}, (3, 32, 32)),
    "cnn_skip": ("cnn_skip", {"width": 16}, (3, 32, 32)),
    "mobilenet_v2_32": ("mobilenet_v2", {}, (3, 32, 32)),
    "mobilenet_v2_224": ("mobilenet_v2", {}, (3, 224, 224)),
}


def sizes(name: str, device: str) -> int:
    if device == "cpu":
        return {"mobilenet_v2_224": 32, "mobilenet_v2_32": 500}.get(name, 2000)
    return 4096 if name.endswith("224") else 10000


def make_case(name: str, n: int, seed: int = 0):
    from .config import DirectionsConfig, ModelConfig
    from .data import CIFAR_MEAN, CIFAR_STD, TensorSet
    from .directions import make_directions, model_state
    from .models import build_model
    mname, margs, shape = MODELS[name]
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (n, *shape), generator=g, dtype=torch.uint8)
    y = torch.randint(0, 10, (n,), generator=g)
    data = TensorSet(x, y, 10, 1 / 255, CIFAR_MEAN, CIFAR_STD)
    model = build_model(ModelConfig(name=mname, args=margs), shape, 10)
    theta, kinds = model_state(model)
    dirs = make_directions(theta, kinds, DirectionsConfig(seed=1), 2)
    return model, theta, dirs, data


def forward_pass(model, data, device, precision, channels_last, compile_, bs):
    """A function doing one pure forward pass over preloaded, normalized data at batch `bs`."""
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    m = model.to(device, memory_format=fmt).eval()
    if compile_:
        m = torch.compile(m)
    x = data.normalize(data.x.to(device))
    if x.dim() == 4:
        x = x.contiguous(memory_format=fmt)
    dev = torch.device(device).type

    @torch.inference_mode()
    def run():
        with torch.autocast(dev, dtype=torch.bfloat16, enabled=precision == "bf16"):
            for i in range(0, len(x), bs):
                m(x[i:i + bs])
    return run


def ceiling(model, data, device, precision, channels_last, compile_, batch_sizes):
    """Best images/s of a pure forward pass over the batch sizes; (rate, batch)."""
    best = (0.0, batch_sizes[0])
    for bs in batch_sizes:
        if bs > len(data):
            break
        try:
            t = timed(forward_pass(model, data, device, precision, channels_last, compile_, bs), device)
        except torch.OutOfMemoryError:
            break
        if len(data) / t > best[0]:
            best = (len(data) / t, bs)
    return best


def interleaved(fns: dict, device, rounds: int = 5) -> dict:
    """Median seconds per call of each function, timed in alternation (A B A B ...), so that a
    drifting machine (frequency, neighbours) affects all of them alike."""
    for f in fns.values():
        f()
    sync(device)
    times = {k: [] for k in fns}
    for _ in range(rounds):
        for k, f in fns.items():
            times[k].append(timed(f, device, repeat=1, min_time=0.2))
    return {k: float(np.median(v)) for k, v in times.items()}


def naive_loop(model, theta, dirs, data, device, cells=2, batch_size=128, workers=0):
    """The classic evaluation: DataLoader with per-sample transforms, load_state_dict per cell."""
    from torchvision import transforms as T
    tf = T.Compose([T.ToTensor(), T.Normalize(data.mean, data.std)])
    hwc = data.x.permute(0, 2, 3, 1).numpy()  # images as the classic dataset holds them

    class DS(torch.utils.data.Dataset):
        def __len__(self):
            return len(hwc)

        def __getitem__(self, i):
            return tf(hwc[i]), int(data.y[i])

    loader = torch.utils.data.DataLoader(DS(), batch_size=batch_size, num_workers=workers)
    model = model.to(device).eval()

    def one_cell(a=0.1, b=-0.2):
        state = {k: theta[k] + a * dirs["x"][k] + b * dirs["y"][k] for k in theta}
        model.load_state_dict(state, strict=False)
        total, correct = 0.0, 0
        with torch.no_grad():
            for xb, yb in loader:
                xb, yb = xb.to(device), yb.to(device)
                out = model(xb)
                total += F.cross_entropy(out, yb, reduction="sum").item()
                correct += (out.argmax(1) == yb).sum().item()
        return total, correct
    one_cell()  # warm-up
    t0 = time.perf_counter()
    for _ in range(cells):
        one_cell()
    return cells / (time.perf_counter() - t0)


def evaluator(name, n, device, precision, channels_last, compile_, batch, cells_per_pass):
    from .evaluate import EvalOptions, Evaluator
    model, theta, dirs, data = make_case(name, n)
    opts = EvalOptions(device=device, batch_size=batch, precision=precision, channels_last=channels_last,
                       compile=compile_, cells_per_pass=cells_per_pass)
    return Evaluator(model, theta, dirs, {"test": data}, opts)


def throughput(args) -> list:
    device = args.device
    if device == "cuda":
        if not torch.cuda.is_available():
            raise UserError("--device cuda, but torch sees no CUDA device")
        torch.backends.cudnn.benchmark = True
    batch_sizes = [32, 64, 128, 256, 512] if device == "cpu" else [256, 512, 1024, 2048, 5000, 10000]
    rows = []
    for name in args.models:
        n = args.images or sizes(name, device)
        for precision in args.precision:
            cl = args.channels_last and MODELS[name][2][1] > 1
            model, theta, dirs, data = make_case(name, n)
            eager = ceiling(model, data, device, precision, cl, False, batch_sizes)
            comp = ceiling(model, data, device, precision, cl, True, batch_sizes) if args.compile else (0.0, 0)
            bs = max(eager, comp)[1]
            use_compile = comp[0] > eager[0]
            model, theta, dirs, data = make_case(name, n)
            fwd = forward_pass(model, data, device, precision, cl, use_compile, bs)
            ev = evaluator(name, n, device, precision, cl, use_compile, bs, "auto")
            group = ev.cells_per_pass
            coords = [tuple(c) for c in np.random.RandomState(0).uniform(-1, 1, size=(group, 2))]
            fns = {"ceiling": fwd, "lldist": lambda ev=ev, coords=coords: ev.evaluate_cells(coords)}
            if group > 1:  # the one-cell-at-a-time rate, for the vmap speedup
                ev1 = evaluator(name, n, device, precision, cl, use_compile, bs, 1)
                fns["one"] = lambda ev1=ev1, c=coords[:1]: ev1.evaluate_cells(c)
            med = interleaved(fns, device)
            ceil_rate, rate = n / med["ceiling"], group / med["lldist"]
            rate1 = 1 / med["one"] if group > 1 else rate
            model, theta, dirs, data = make_case(name, n)
            naive = naive_loop(model, theta, dirs, data, device, cells=args.naive_cells,
                               workers=0 if device == "cpu" else 2)
            row = {"model": name, "precision": precision, "device": device, "images": n, "batch": bs,
                   "ceiling_img_s": ceil_rate, "ceiling_eager_img_s": eager[0], "ceiling_compiled_img_s": comp[0],
                   "compiled": use_compile, "cells_per_pass": ev.cells_per_pass,
                   "lldist_cells_s": rate, "lldist_img_s": rate * n, "one_cell_at_a_time_cells_s": rate1,
                   "vs_ceiling": rate * n / ceil_rate, "naive_cells_s": naive, "speedup_vs_naive": rate / naive}
            rows.append(row)
            print(f"{name:18s} {precision:5s} ceiling {ceil_rate:12,.0f} img/s  lldist {rate:9.2f} cells/s "
                  f"({row['vs_ceiling']:.2f} of ceiling, {ev.cells_per_pass} cells/pass)  naive {naive:8.2f} cells/s "
                  f"-> {row['speedup_vs_naive']:.2f}x", flush=True)
    return rows


def markdown(rows: list) -> str:
    head = ("| model | precision | images/cell | ceiling img/s | lldist cells/s | lldist img/s | vs ceiling "
            "| cells/pass | naive cells/s | speedup vs naive |\n|---|---|---|---|---|---|---|---|---|---|\n")
    body = "".join(
        f"| {r['model']} | {r['precision']}{' (compiled)' if r['compiled'] else ''} | {r['images']} | "
        f"{r['ceiling_img_s']:,.0f} | {r['lldist_cells_s']:.2f} | {r['lldist_img_s']:,.0f} | "
        f"{r['vs_ceiling']:.2f} | {r['cells_per_pass']} | {r['naive_cells_s']:.2f} | {r['speedup_vs_naive']:.2f}x |\n"
        for r in rows)
    return head + body


# ----------------------------------------------------------------------------- scaling

class FixedCost(nn.Module):
    """A model whose forward sleeps `seconds`: the cost per cell is fixed and uses no CPU, so a
    2-core machine can host 8 ranks and the protocol, not the arithmetic, is measured."""

    def __init__(self, seconds: float = 0.05):
        super().__init__()
        self.fc = nn.Linear(64, 10)
        self.seconds = seconds

    def forward(self, x):
        time.sleep(self.seconds)
        return self.fc(x.flatten(1))


def fixed_cost(seconds: float = 0.05) -> nn.Module:
    return FixedCost(seconds)


def find_mpiexec() -> str:
    here = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    found = here if os.path.exists(here) else shutil.which("mpiexec") or shutil.which("mpirun")
    if not found:
        raise UserError("no mpiexec next to the interpreter or on PATH (pip install mpi4py mpich)")
    return found


def scaling(args) -> list:
    import yaml
    mpiexec = find_mpiexec()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        job = {"name": "scaling", "output": "s.h5",
               "model": {"name": "python:lldist.bench:fixed_cost", "args": {"seconds": args.cost}},
               "data": {"name": "digits", "subset": 64},
               "grid": {"x": [-1.0, 1.0, args.cells]},
               "eval": {"batch_size": 64, "chunk_size": args.chunk, "threads": 1}}
        path = os.path.join(tmp, "job.yaml")
        with open(path, "w") as f:
            yaml.safe_dump(job, f)
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
        if os.getuid() == 0:
            env.update(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
        base = None
        for n in args.ranks:
            out = os.path.join(tmp, f"s{n}.h5")
            cmd = [mpiexec, "-n", str(n), sys.executable, "-m", "lldist.surface", path, "--out", out]
            p = subprocess.run(cmd, cwd=tmp, env=env, capture_output=True, text=True, timeout=1800)
            if p.returncode != 0:
                raise RuntimeError(f"{' '.join(cmd)} failed:\n{p.stderr[-2000:]}")
            secs = float(re.search(r"done: \d+ cells in ([\d.]+)s", p.stdout).group(1))
            m = re.search(r"coordinator: (\d+) worker messages, ([\d.]+) ms", p.stdout)
            ms = float(m.group(2)) if m else 0.0
            base = base or secs
            ideal = args.cells * args.cost
            row = {"ranks": n, "cells": args.cells, "cost_s": args.cost, "chunk": args.chunk, "seconds": secs,
                   "speedup": base / secs, "efficiency": base / (n * secs), "ideal_one_rank_s": ideal,
                   "coordinator_ms_per_message": ms}
            rows.append(row)
            print(f"{n:3d} ranks: {secs:7.2f}s  speedup {row['speedup']:5.2f}  efficiency {row['efficiency']:.3f}  "
                  f"coordinator {ms:.2f} ms/message", flush=True)
    return rows


def scaling_markdown(rows: list) -> str:
    head = "| ranks | seconds | speedup | parallel efficiency | coordinator ms/message |\n|---|---|---|---|---|\n"
    return head + "".join(f"| {r['ranks']} | {r['seconds']:.2f} | {r['speedup']:.2f} | {r['efficiency']:.3f} | "
                          f"{r['coordinator_ms_per_message']:.2f} |\n" for r in rows)


# ----------------------------------------------------------------------------- CLI

def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    mode = "scaling" if argv[:1] == ["scaling"] else "throughput"
    if mode == "scaling":
        argv = argv[1:]
    ap = argparse.ArgumentParser(prog=f"python -m lldist.bench{' scaling' if mode == 'scaling' else ''}",
                                 description=__doc__.split("\n")[0])
    ap.add_argument("--json", help="write the rows as JSON here")
    ap.add_argument("--markdown", help="write the table as Markdown here")
    if mode == "scaling":
        ap.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4, 8])
        ap.add_argument("--cost", type=float, default=0.05, help="seconds per cell")
        ap.add_argument("--cells", type=int, default=320)
        ap.add_argument("--chunk", type=int, default=2)
    else:
        ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=("cpu", "cuda"))
        ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
        ap.add_argument("--precision", nargs="+", default=None, choices=("fp32", "bf16"))
        ap.add_argument("--compile", action="store_true", help="also measure torch.compile")
        ap.add_argument("--channels-last", action="store_true")
        ap.add_argument("--images", type=int, help="images per cell (default: by model and device)")
        ap.add_argument("--naive-cells", type=int, default=2)
        ap.add_argument("--threads", type=int, default=os.cpu_count())
    args = ap.parse_args(argv)
    tune_malloc()
    if mode == "scaling":
        rows, md = scaling(args), None
        md = scaling_markdown(rows)
    else:
        torch.set_num_threads(args.threads)
        args.precision = args.precision or (["fp32"] if args.device == "cpu" else ["fp32", "bf16"])
        rows = throughput(args)
        md = markdown(rows)
    print()
    print(md)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"mode": mode, "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
                       "rows": rows}, f, indent=1)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(md)
    return 0


def cli() -> None:
    sys.exit(run_cli(main))


if __name__ == "__main__":
    sys.exit(run_cli(main))
