"""Benchmarks, measured in one run and printed as ratios.

    python -m lldist.bench [--device cpu|cuda] [--models mlp cnn ...] [--precision fp32 bf16]
                           [--compile] [--json PATH] [--markdown PATH]
    python -m lldist.bench scaling [--ranks 1 2 4 8] [--cost 0.05] [--cells 320] [--chunk 2]
    python -m lldist.bench coordinator [--grids 51 501 1001] [--ranks 8 64]   # see transport/coordbench.py
    python -m lldist.bench curvature [--models mlp cnn_skip] [--ranks 1 2]   # a curvature cell against a
                                                                # loss cell, and a curvature map over ranks
    PYTHONPATH=. python -m lldist.bench gpu [--out DIR] [--budget 400]   # on a CUDA machine

Throughput (default): per model and precision, on the same synthetic data and device,
  * ceiling: a pure forward pass over preloaded, normalized images at the best batch size
    (eager, and compiled with --compile: the better of the two is the ceiling);
  * lldist: the landscape evaluator (weights updated in place, data on the device), cells/s
    and images/s, and its ratio to the ceiling;
  * naive: the classic per-cell loop (DataLoader with per-sample ToTensor/Normalize,
    load_state_dict per cell), and lldist's speedup over it.
The ceiling and lldist are timed in alternation (median of 5 rounds), so machine drift
affects both alike.
GPU: the `gpu`-marked tests, then every fast path (fp32/bf16, channels-last, compile) of the
MLP, the skip CNN and MobileNetV2 at 32 and 224 against its ceiling and the naive loop, the
vmapped MLP, `batch_size: auto` and peak memory, and the 51x51 projection; JSON + Markdown.
Scaling: the MPI protocol alone, with a synthetic model of fixed cost per cell (it sleeps),
run under mpiexec at 1, 2, 4, 8 ranks: speedup, parallel efficiency, coordinator cost.
"""

from __future__ import annotations

import argparse
import ctypes
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch
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


def timed(fn, device, repeat=3, min_time=0.3, warmup=1):
    """Median seconds of fn() over `repeat` runs, each long enough to time. The warm-up calls
    (compilation, CUDA-graph capture, cudnn autotuning) are outside the clock, and the GPU
    is synchronised before every reading of it."""
    for _ in range(warmup):
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
    from .directions import make_directions, model_state
    from .workloads.data import CIFAR_MEAN, CIFAR_STD, TensorSet
    from .workloads.models import build_model
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
        for _ in range(3):  # compile, CUDA-graph capture (reduce-overhead records on call 2-3)
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
    from .config import EvalConfig
    from .evaluation.evaluator import Evaluator
    model, theta, dirs, data = make_case(name, n)
    cfg = EvalConfig(batch_size=batch, precision=precision, channels_last=channels_last,
                     compile=compile_, cells_per_pass=cells_per_pass)
    return Evaluator(model, theta, dirs, {"test": data}, cfg, device=device)


def curvature_rows(args) -> list:
    """The cost of a cell with eval.curvature (lambda_max, lambda_min by Lanczos on
    `curvature_batches` batches) against a loss-and-accuracy cell, same model, data and device."""
    from .config import EvalConfig
    from .evaluation.evaluator import Evaluator
    from .evaluation.tasks import Task
    rows = []
    for name in args.models:
        n = args.images
        model, theta, dirs, data = make_case(name, n)
        base = EvalConfig(batch_size=args.batch, curvature_batches=args.curvature_batches)
        plain = Evaluator(model, theta, dirs, {"test": data}, base, device=args.device)
        t_plain = timed(lambda: plain.evaluate(0.1, -0.2), plain.device, repeat=3)
        model, theta, dirs, data = make_case(name, n)
        curv = Evaluator(model, theta, dirs, {"test": data}, base, device=args.device, task=Task(curvature=True))
        curv.evaluate(0.1, -0.2)  # the batches are set up once per split
        c = next(iter(curv._curvature.values()))
        before = c.matvecs
        t_curv = timed(lambda: curv.evaluate(0.1, -0.2), curv.device, repeat=1, min_time=0.0, warmup=0)
        products = c.matvecs - before
        row = {"model": name, "images_per_cell": n, "curvature_batches": args.curvature_batches,
               "batch_size": args.batch, "loss_cell_s": t_plain, "curvature_cell_s": t_curv,
               "ratio": t_curv / t_plain, "hessian_vector_products": products,
               "parameters": sum(p.numel() for p in model.parameters())}
        rows.append(row)
        print(f"{name}: loss cell {t_plain:.3f} s, curvature cell {t_curv:.2f} s ({row['ratio']:.0f}x; "
              f"{products} Hessian-vector products on {args.curvature_batches} x {args.batch} images)", flush=True)
    return rows


def curvature_scaling(args) -> list:
    """A real curvature map (eval.curvature on the quickstart's CNN, untrained weights, one
    batch of the digits test split per cell) through mpiexec at each rank count: the Hessian's
    cells spread over ranks like any other. One thread a rank: on this bench's cores each rank
    owns one, as each owns a GPU on a cluster."""
    n = args.map_cells
    job = {"name": "curvature_scaling", "output": "s.h5",
           "model": {"name": "cnn", "args": {"width": 8, "stages": 2, "blocks": 1, "batchnorm": True}},
           "data": {"name": "digits"},
           "grid": {"x": [-1.0, 1.0, n], "y": [-1.0, 1.0, n]},
           "eval": {"split": "test", "batch_size": 120, "chunk_size": 1, "threads": 1,
                    "curvature": True, "curvature_batches": 1}}
    rows = rank_sweep(job, args.ranks, "curvature map: ")
    for r in rows:
        r.update(kind="curvature_map", cells=n * n)
    return rows


def curvature_markdown(rows: list) -> str:
    maps = [r for r in rows if r.get("kind") == "curvature_map"]
    rows = [r for r in rows if r.get("kind") != "curvature_map"]
    md = curvature_cost_markdown(rows)
    if maps:
        md += (f"\nA curvature map of {maps[0]['cells']} cells (quickstart CNN, 1 x 120 test images a cell) over "
               "ranks:\n\n" + scaling_markdown(maps))
    return md


def curvature_cost_markdown(rows: list) -> str:
    head = ("| model | parameters | images per cell | loss cell s | curvature cell s | ratio | HVPs per cell | "
            "Hessian taken on |\n|---|---|---|---|---|---|---|---|\n")
    return head + "".join(f"| {r['model']} | {r['parameters']:,} | {r['images_per_cell']} | {r['loss_cell_s']:.3f} | "
                          f"{r['curvature_cell_s']:.2f} | {r['ratio']:.0f}x | {r['hessian_vector_products']} | "
                          f"{r['curvature_batches']} x {r['batch_size']} images |\n" for r in rows)


def text_case(n: int, seq: int = 128, seed: int = 0):
    """A small BERT-style classifier (2 layers, width 128) on random token ids of length `seq`:
    (model, theta, dirs, data as a DictSet with labels)."""
    import transformers

    from .config import DirectionsConfig
    from .directions import make_directions, model_state
    from .workloads.data import DictSet
    torch.manual_seed(seed)
    cfg = transformers.BertConfig(vocab_size=2000, hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=256, max_position_embeddings=seq, num_labels=2)
    model = transformers.AutoModelForSequenceClassification.from_config(cfg)
    g = torch.Generator().manual_seed(seed)
    data = DictSet({"input_ids": torch.randint(4, 2000, (n, seq), generator=g),
                    "attention_mask": torch.ones(n, seq, dtype=torch.int64),
                    "labels": torch.randint(0, 2, (n,), generator=g)}, 2)
    theta, kinds = model_state(model)
    return model, theta, make_directions(theta, kinds, DirectionsConfig(seed=1), 2), data


def text_row(device: str, n: int, batch_sizes: list, naive_cells: int = 2) -> dict:
    """The text-model row: lldist on a BERT-style classifier at sequence length 128 against a
    pure forward over the same batches (the ceiling) and a naive per-cell loop (a DataLoader
    collating dict examples, load_state_dict per cell)."""
    from .config import EvalConfig
    from .evaluation.evaluator import Evaluator
    from .evaluation.tasks import Task
    model, theta, dirs, data = text_case(n)
    model = model.to(device).eval()
    dev_data = data.to(device)

    def forward(bs):
        @torch.inference_mode()
        def run():
            for b in dev_data.batches(bs):
                model(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
        return run
    rates = {bs: n / timed(forward(bs), device) for bs in batch_sizes if bs <= n}
    bs = max(rates, key=rates.get)
    ev = Evaluator(model, theta, dirs, {"test": data}, EvalConfig(batch_size=bs), device=device, task=Task())
    med = interleaved({"ceiling": forward(bs), "lldist": lambda: ev.evaluate_cells([(0.1, -0.2)])}, device)
    examples = [{k: v[i] for k, v in data.tensors.items()} for i in range(n)]
    loader = torch.utils.data.DataLoader(examples, batch_size=32)

    def one_cell(a=0.1, b=-0.2):
        model.load_state_dict({k: theta[k] + a * dirs["x"][k] + b * dirs["y"][k] for k in theta}, strict=False)
        with torch.no_grad():
            for batch in loader:
                batch = {k: v.to(device) for k, v in batch.items()}
                out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
                F.cross_entropy(out, batch["labels"], reduction="sum").item()
    one_cell()
    t0 = time.perf_counter()
    for _ in range(naive_cells):
        one_cell()
    naive = naive_cells / (time.perf_counter() - t0)
    rate = 1 / med["lldist"]
    return {"model": "bert_128", "precision": "fp32", "device": device, "images": n, "batch": bs,
            "ceiling_img_s": n / med["ceiling"], "ceiling_eager_img_s": rates[bs], "ceiling_compiled_img_s": 0.0,
            "compiled": False, "cells_per_pass": 1, "lldist_cells_s": rate, "lldist_img_s": rate * n,
            "one_cell_at_a_time_cells_s": rate, "vs_ceiling": med["ceiling"] / med["lldist"],
            "naive_cells_s": naive, "speedup_vs_naive": rate / naive}


def throughput(args) -> list:
    device = args.device
    if device == "cuda":
        if not torch.cuda.is_available():
            raise UserError("--device cuda, but torch sees no CUDA device")
        torch.backends.cudnn.benchmark = True
    batch_sizes = [32, 64, 128, 256, 512] if device == "cpu" else [256, 512, 1024, 2048, 5000, 10000]
    rows = []
    for name in args.models:
        if name == "bert_128":
            row = text_row(device, 256 if device == "cpu" else 4096, [16, 32, 64, 128] if device == "cpu"
                           else [128, 256, 512, 1024])
            rows.append(row)
            print(f"{name:18s} fp32  ceiling {row['ceiling_img_s']:12,.0f} seq/s  lldist {row['lldist_cells_s']:9.2f} "
                  f"cells/s ({row['vs_ceiling']:.2f} of ceiling)  naive {row['naive_cells_s']:8.2f} cells/s "
                  f"-> {row['speedup_vs_naive']:.2f}x", flush=True)
            continue
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

def find_mpiexec() -> str:
    here = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    found = here if os.path.exists(here) else shutil.which("mpiexec") or shutil.which("mpirun")
    if not found:
        raise UserError("no mpiexec next to the interpreter or on PATH (pip install mpi4py mpich)")
    return found


def run_time(path: str) -> tuple:
    """(seconds from the first chunk's start to the last one's end, coordinator ms per worker
    message), as the file records them."""
    from .store import SurfaceReader
    with SurfaceReader(path) as sf:
        records, _ = sf.chunk_log()
        ms = sf.attr("coordinator_ms_per_message", 0.0)
    return float(records["t_end"].max() - records["t_start"].min()), float(ms)


def rank_sweep(job: dict, ranks: list, label: str = "") -> list:
    """Run one job under `mpiexec -n R` for each R, each into a fresh file: rows of ranks,
    seconds (first chunk's start to last chunk's end, as the file records them), speedup and
    parallel efficiency against the first R, and the coordinator's ms per worker message."""
    import yaml
    mpiexec = find_mpiexec()
    rows, base = [], None
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "job.yaml")
        with open(path, "w") as f:
            yaml.safe_dump(job, f)
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
        if os.getuid() == 0:
            env.update(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
        for n in ranks:
            out = os.path.join(tmp, f"s{n}.h5")
            cmd = [mpiexec, "-n", str(n), sys.executable, "-m", "lldist.surface", path, "--out", out]
            p = subprocess.run(cmd, cwd=tmp, env=env, capture_output=True, text=True, timeout=1800)
            if p.returncode != 0:
                raise RuntimeError(f"{' '.join(cmd)} failed:\n{p.stderr[-2000:]}")
            secs, ms = run_time(out)
            base = base or secs
            row = {"ranks": n, "seconds": secs, "speedup": base / secs, "efficiency": base * ranks[0] / (n * secs),
                   "coordinator_ms_per_message": ms}
            rows.append(row)
            print(f"{label}{n:3d} ranks: {secs:7.2f}s  speedup {row['speedup']:5.2f}  efficiency "
                  f"{row['efficiency']:.3f}  coordinator {ms:.2f} ms/message", flush=True)
    return rows


def scaling(args) -> list:
    job = {"name": "scaling", "output": "s.h5",
           "model": {"name": "python:lldist.workloads.synthetic:fixed_cost", "args": {"seconds": args.cost}},
           "data": {"name": "digits", "subset": 64},
           "grid": {"x": [-1.0, 1.0, args.cells]},
           "eval": {"batch_size": 64, "chunk_size": args.chunk, "threads": 1}}
    rows = rank_sweep(job, args.ranks)
    for r in rows:
        r.update(cells=args.cells, cost_s=args.cost, chunk=args.chunk, ideal_one_rank_s=args.cells * args.cost)
    return rows


def scaling_markdown(rows: list) -> str:
    head = "| ranks | seconds | speedup | parallel efficiency | coordinator ms/message |\n|---|---|---|---|---|\n"
    return head + "".join(f"| {r['ranks']} | {r['seconds']:.2f} | {r['speedup']:.2f} | {r['efficiency']:.3f} | "
                          f"{r['coordinator_ms_per_message']:.2f} |\n" for r in rows)


# ----------------------------------------------------------------------------- gpu

GPU_MODELS = ("mlp", "cnn_skip", "mobilenet_v2_32", "mobilenet_v2_224")


def gpu_images(name: str) -> int:
    return 2048 if name.endswith("224") else 8192  # multiples of every batch tried: no ragged batch


def gpu_batches(name: str) -> list:
    return [128, 256, 512] if name.endswith("224") else [1024, 2048, 4096, 8192]


def gpu_configs() -> list:
    """(model, precision, channels_last, compile), the ones the targets name first, so that a
    run cut short by its time budget still measures them."""
    first = [("mobilenet_v2_32", "bf16", True, True), ("mobilenet_v2_32", "fp32", False, False),
             ("mlp", "fp32", False, False), ("mobilenet_v2_224", "bf16", True, False),
             ("mobilenet_v2_224", "fp32", False, False)]
    rest = []
    for name in GPU_MODELS:
        conv = name != "mlp"
        for precision in ("fp32", "bf16"):
            for cl, comp in ([(False, False), (True, False), (True, True)] if conv else [(False, False), (False, True)]):
                rest.append((name, precision, cl, comp))
    return first + [c for c in rest if c not in first]


def measure(name: str, precision: str, cl: bool, comp, device: str = "cuda", images: int = None,
            batches: list = None) -> dict:
    """One configuration: the pure forward ceiling and lldist's landscape rate, timed in
    alternation on the same module. Eager: the ceiling is the best batch of a plain eager
    model. Compiled: lldist's own compiled module at the eager best batch serves as the ceiling
    too (one compilation, the same graph), and nothing else is compiled."""
    n = images or gpu_images(name)
    batches = [b for b in (batches or gpu_batches(name)) if b <= n] or [n]
    model, theta, dirs, data = make_case(name, n)
    rate, bs = ceiling(model, data, device, precision, cl, False, batches)
    ev = evaluator(name, n, device, precision, cl, comp, bs, 1)
    x = ev.splits["test"].x
    if cl and x.dim() == 4:
        x = x.contiguous(memory_format=torch.channels_last)

    @torch.inference_mode()
    def pure():
        with ev._precision():
            for i in range(0, n, bs):
                ev.model(x[i:i + bs])
    fns = {"ceiling": pure, "lldist": lambda: ev.evaluate_cells([(0.1, -0.2)])}
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    med = interleaved(fns, device)
    return {"model": name, "precision": precision, "channels_last": cl, "compile": comp or False, "images": n,
            "batch": bs, "ceiling_img_s": n / med["ceiling"], "eager_sweep_img_s": rate,
            "lldist_img_s": n / med["lldist"], "lldist_cells_s": 1 / med["lldist"],
            "vs_ceiling": med["ceiling"] / med["lldist"],
            "peak_gpu_mib": torch.cuda.max_memory_allocated() / 2 ** 20 if device == "cuda" else 0.0}


def run_gpu_tests(out: str) -> dict:
    """tests/test_gpu.py: by pytest where it is installed, else function by function."""
    import importlib.util
    import io
    import traceback
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    path = os.path.join(root, "tests", "test_gpu.py")
    log_path = os.path.join(out, "gpu_tests.log")
    if importlib.util.find_spec("pytest") is not None:
        p = subprocess.run([sys.executable, "-m", "pytest", "-v", "-m", "gpu", path], cwd=root,
                           capture_output=True, text=True, timeout=300)
        with open(log_path, "w") as f:
            f.write(p.stdout + p.stderr)
        tail = (p.stdout.strip().splitlines() or ["?"])[-1]
        return {"runner": "pytest", "returncode": p.returncode, "summary": tail, "log": log_path}
    spec = importlib.util.spec_from_file_location("test_gpu", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    buf, passed, failed = io.StringIO(), 0, 0
    for fname in sorted(k for k in vars(mod) if k.startswith("test_")):
        t0 = time.perf_counter()
        try:
            getattr(mod, fname)()
            passed += 1
            buf.write(f"PASSED {fname} ({time.perf_counter() - t0:.1f}s)\n")
        except Exception:
            failed += 1
            buf.write(f"FAILED {fname} ({time.perf_counter() - t0:.1f}s)\n{traceback.format_exc()}\n")
    buf.write(f"{passed} passed, {failed} failed\n")
    with open(log_path, "w") as f:
        f.write(buf.getvalue())
    return {"runner": "functions (no pytest)", "returncode": int(failed > 0), "summary": f"{passed} passed, {failed} failed",
            "log": log_path}


def gpu_report(args) -> dict:
    """Everything the GPU issue asks for, in one run within `args.budget` seconds."""
    if not torch.cuda.is_available():
        raise UserError("lldist.bench gpu needs a CUDA GPU (torch sees none)")
    torch.backends.cudnn.benchmark = True
    t_end = time.perf_counter() + args.budget
    os.makedirs(args.out, exist_ok=True)
    rep = {"mode": "gpu", "card": torch.cuda.get_device_name(), "torch": torch.__version__,
           "cuda": torch.version.cuda, "date": time.strftime("%Y-%m-%d %H:%M %Z"), "rows": [], "skipped": [],
           "naive": {}, "batch_auto": {}}
    t0 = time.perf_counter()
    rep["tests"] = {} if args.skip_tests else run_gpu_tests(args.out)
    rep["tests"]["seconds"] = time.perf_counter() - t0
    print(f"gpu tests: {rep['tests'].get('summary', 'skipped')}", flush=True)
    for name in GPU_MODELS:  # the reference code's loop, fp32, 2 DataLoader workers
        model, theta, dirs, data = make_case(name, gpu_images(name))
        rep["naive"][name] = naive_loop(model, theta, dirs, data, "cuda", cells=1, workers=2)
        print(f"naive {name}: {rep['naive'][name]:.3f} cells/s", flush=True)
    for cfg in gpu_configs():
        if time.perf_counter() > t_end:
            rep["skipped"].append(cfg)
            continue
        try:
            row = measure(*cfg)
        except Exception as e:  # one configuration failing (memory, a compiler error) is a result too
            rep["skipped"].append(list(cfg) + [f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"])
            continue
        row["speedup_vs_naive"] = row["lldist_cells_s"] / rep["naive"][row["model"]]
        rep["rows"].append(row)
        print(f"{row['model']:17s} {row['precision']} cl={row['channels_last']!s:5} compile={row['compile']!s:5} "
              f"batch {row['batch']:5d}: ceiling {row['ceiling_img_s']:12,.0f} img/s, lldist "
              f"{row['lldist_img_s']:12,.0f} ({row['vs_ceiling']:.2f}), {row['speedup_vs_naive']:.1f}x naive, "
              f"{row['peak_gpu_mib']:.0f} MiB", flush=True)
    # vmapped cells for the MLP: cells/s at 128 per pass against one at a time
    if time.perf_counter() < t_end:
        n = gpu_images("mlp")
        coords = [tuple(c) for c in np.random.RandomState(0).uniform(-1, 1, size=(128, 2))]
        ev128 = evaluator("mlp", n, "cuda", "fp32", False, False, 4096, 128)
        ev1 = evaluator("mlp", n, "cuda", "fp32", False, False, 4096, 1)
        med = interleaved({"g": lambda: ev128.evaluate_cells(coords), "one": lambda: ev1.evaluate_cells(coords[:8])},
                          "cuda")
        rep["vmap_mlp"] = {"cells_s_128": 128 / med["g"], "cells_s_1": 8 / med["one"],
                           "speedup": (128 / med["g"]) / (8 / med["one"])}
        print(f"mlp vmap: {rep['vmap_mlp']['speedup']:.1f}x", flush=True)
    for name in GPU_MODELS:  # what batch_size: auto picks, and the memory it takes
        if time.perf_counter() > t_end:
            break
        torch.cuda.reset_peak_memory_stats()
        ev = evaluator(name, gpu_images(name), "cuda", "fp32", False, False, "auto", 1)
        ev.evaluate_cells([(0.1, 0.1)])
        rep["batch_auto"][name] = {"batch": ev.batch_size, "peak_gpu_mib": torch.cuda.max_memory_allocated() / 2 ** 20}
    best224 = max((r["lldist_img_s"] for r in rep["rows"] if r["model"] == "mobilenet_v2_224"), default=0.0)
    if best224:
        one = 2601 * 5000 / best224
        rep["projection_51x51_mobilenet224_5000img"] = {"img_s": best224, "one_card_s": one, "eight_cards_s": one / 8}
    rep["seconds"] = time.perf_counter() - t0
    with open(os.path.join(args.out, "bench_gpu.json"), "w") as f:
        json.dump(rep, f, indent=1, default=str)
    with open(os.path.join(args.out, "bench_gpu.md"), "w") as f:
        f.write(gpu_markdown(rep))
    print(gpu_markdown(rep), flush=True)
    return rep


def gpu_markdown(rep: dict) -> str:
    lines = [f"# GPU benchmark: {rep['card']}, torch {rep['torch']} (CUDA {rep['cuda']}), {rep['date']}\n",
             f"GPU tests: {rep['tests'].get('summary', 'not run')} ({rep['tests'].get('runner', '')})\n",
             "| model | precision | channels-last | compile | batch | ceiling img/s | lldist img/s | vs ceiling "
             "| vs naive | peak GPU MiB |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rep["rows"]:
        lines.append(f"| {r['model']} | {r['precision']} | {r['channels_last']} | {r['compile']} | {r['batch']} | "
                     f"{r['ceiling_img_s']:,.0f} | {r['lldist_img_s']:,.0f} | {r['vs_ceiling']:.2f} | "
                     f"{r['speedup_vs_naive']:.1f}x | {r['peak_gpu_mib']:.0f} |")
    lines.append("\nNaive per-cell loop (fp32, DataLoader with per-sample transforms, 2 workers), cells/s: " +
                 ", ".join(f"{k} {v:.3f}" for k, v in rep["naive"].items()))
    if "vmap_mlp" in rep:
        v = rep["vmap_mlp"]
        lines.append(f"\nMLP, vmapped cells: {v['cells_s_128']:.0f} cells/s at 128 per pass, {v['cells_s_1']:.0f} one "
                     f"at a time: {v['speedup']:.1f}x")
    if rep["batch_auto"]:
        lines.append("\n`batch_size: auto` (fp32): " + ", ".join(
            f"{k} {v['batch']} ({v['peak_gpu_mib']:.0f} MiB)" for k, v in rep["batch_auto"].items()))
    p = rep.get("projection_51x51_mobilenet224_5000img")
    if p:
        lines.append(f"\n51x51 MobileNetV2 at 224x224 on 5,000 images, at {p['img_s']:,.0f} img/s: "
                     f"{p['one_card_s'] / 3600:.2f} h on one card, {p['eight_cards_s'] / 60:.1f} min on 8")
    if rep["skipped"]:
        lines.append("\nNot measured (time budget or error): " + "; ".join(map(str, rep["skipped"])))
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- CLI

def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    mode = argv[0] if argv[:1] in (["scaling"], ["gpu"], ["coordinator"], ["curvature"]) else "throughput"
    if mode != "throughput":
        argv = argv[1:]
    ap = argparse.ArgumentParser(prog=f"python -m lldist.bench{'' if mode == 'throughput' else ' ' + mode}",
                                 description=__doc__.split("\n")[0])
    if mode == "gpu":
        ap.add_argument("--out", default="bench_gpu", help="folder for bench_gpu.json, bench_gpu.md, gpu_tests.log")
        ap.add_argument("--budget", type=float, default=400.0, help="seconds for everything (tests included)")
        ap.add_argument("--skip-tests", action="store_true")
        args = ap.parse_args(argv)
        tune_malloc()
        gpu_report(args)
        return 0
    ap.add_argument("--json", help="write the rows as JSON here")
    ap.add_argument("--markdown", help="write the table as Markdown here")
    if mode == "curvature":
        ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=("cpu", "cuda"))
        ap.add_argument("--models", nargs="+", default=["mlp", "cnn_skip"], choices=list(MODELS))
        ap.add_argument("--images", type=int, default=2000, help="images per loss cell")
        ap.add_argument("--batch", type=int, default=250)
        ap.add_argument("--curvature-batches", type=int, default=2)
        ap.add_argument("--ranks", type=int, nargs="*", default=[1, 2],
                        help="also a curvature map under mpiexec at these rank counts (none: skip)")
        ap.add_argument("--map-cells", type=int, default=5, help="the map's cells per axis")
    elif mode == "coordinator":
        ap.add_argument("--grids", type=int, nargs="+", default=[51, 501, 1001])
        ap.add_argument("--ranks", type=int, nargs="+", default=[8, 64])
        ap.add_argument("--chunk", type=int, default=32)
        ap.add_argument("--results", type=int, default=3000, help="chunk results per grid")
    elif mode == "scaling":
        ap.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4, 8])
        ap.add_argument("--cost", type=float, default=0.05, help="seconds per cell")
        ap.add_argument("--cells", type=int, default=320)
        ap.add_argument("--chunk", type=int, default=2)
    else:
        ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=("cpu", "cuda"))
        text = ["bert_128"] if importlib.util.find_spec("transformers") else []  # with lldist[hf]
        ap.add_argument("--models", nargs="+", default=list(MODELS) + text, choices=list(MODELS) + ["bert_128"])
        ap.add_argument("--precision", nargs="+", default=None, choices=("fp32", "bf16"))
        ap.add_argument("--compile", action="store_true", help="also measure torch.compile")
        ap.add_argument("--channels-last", action="store_true")
        ap.add_argument("--images", type=int, help="images per cell (default: by model and device)")
        ap.add_argument("--naive-cells", type=int, default=2)
        ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    args = ap.parse_args(argv)
    tune_malloc()
    if mode == "curvature":
        rows = curvature_rows(args) + (curvature_scaling(args) if args.ranks else [])
        md = curvature_markdown(rows)
    elif mode == "coordinator":
        from .transport import coordbench
        rows = coordbench.coordinator(args)
        md = coordbench.markdown(rows)
    elif mode == "scaling":
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
