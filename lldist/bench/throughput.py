"""Throughput: lldist's landscape against the pure forward-pass ceiling and a naive loop.

    python -m lldist.bench [--device cpu|cuda] [--models mlp cnn ...] [--precision fp32 bf16]
                           [--compile] [--channels-last] [--json PATH] [--markdown PATH]

Per model and precision, on the same synthetic data and device:
  * ceiling: a pure forward pass over preloaded, normalized images at the best batch size
    (eager, and compiled with --compile: the better of the two is the ceiling);
  * lldist: the landscape evaluator (weights updated in place, data on the device), cells/s
    and images/s, and its ratio to the ceiling;
  * naive: the classic per-cell loop (DataLoader with per-sample ToTensor/Normalize,
    load_state_dict per cell), and lldist's speedup over it.
The ceiling and lldist are timed in alternation (median of 5 rounds), so machine drift
affects both alike.
"""

from __future__ import annotations

import importlib.util
import os
import time

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import UserError, positive_int
from .common import (
    MODELS,
    Busy,
    evaluator,
    make_case,
    quote,
    rounds_of,
    sizes,
    spread,
    timed,
)


def add_arguments(ap) -> None:
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=("cpu", "cuda"),
                    help="where everything runs (default: cuda when torch sees a GPU)")
    text = ["bert_128"] if importlib.util.find_spec("transformers") else []  # with lldist[hf]
    ap.add_argument("--models", nargs="+", default=list(MODELS) + text, choices=list(MODELS) + ["bert_128"],
                    help="the models measured (bert_128 with lldist[hf])")
    ap.add_argument("--precision", nargs="+", default=None, choices=("fp32", "bf16"),
                    help="default: fp32 on a CPU, fp32 and bf16 on a GPU")
    ap.add_argument("--compile", action="store_true", help="also measure torch.compile")
    ap.add_argument("--channels-last", action="store_true", help="channels-last memory format for the CNNs")
    ap.add_argument("--images", type=int, help="images per cell (default: by model and device)")
    ap.add_argument("--rounds", type=positive_int, default=5,
                    help="alternated rounds (ceiling, lldist, naive loop in each); ratios are their median and range")
    ap.add_argument("--load", type=int, default=0, metavar="K",
                    help="K processes spinning on the CPU beside the measurement (a shared or oversubscribed machine)")
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)), help="torch CPU threads")


def run(args) -> tuple:
    torch.set_num_threads(args.threads)
    args.precision = args.precision or (["fp32"] if args.device == "cpu" else ["fp32", "bf16"])
    rows = throughput(args)
    return rows, markdown(rows)


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


def naive_loop(model, theta, dirs, data, device, cells=2, batch_size=128, workers=0):
    """Cells/s of the classic evaluation, timed alone (the GPU run; throughput alternates it)."""
    one_cell = naive_cell(model, theta, dirs, data, device, batch_size, workers)
    one_cell()  # warm-up
    t0 = time.perf_counter()
    for _ in range(cells):
        one_cell()
    return cells / (time.perf_counter() - t0)


def naive_cell(model, theta, dirs, data, device, batch_size=128, workers=0):
    """One cell of the classic evaluation, as a function: DataLoader with per-sample transforms,
    load_state_dict per cell."""
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
        state = {k: theta[k] + a * dirs.x[k] + b * dirs.y[k] for k in theta}
        model.load_state_dict(state, strict=False)
        total, correct = 0.0, 0
        with torch.no_grad():
            for xb, yb in loader:
                xb, yb = xb.to(device), yb.to(device)
                out = model(xb)
                total += F.cross_entropy(out, yb, reduction="sum").item()
                correct += (out.argmax(1) == yb).sum().item()
        return total, correct
    return one_cell


def text_case(n: int, seq: int = 128, seed: int = 0):
    """A small BERT-style classifier (2 layers, width 128) on random token ids of length `seq`:
    (model, theta, dirs, data as a DictSet with labels)."""
    import transformers

    from ..config import DirectionsConfig
    from ..directions.random import make_directions
    from ..directions.state import model_state
    from ..workloads.data import DictSet
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


def text_row(device: str, n: int, batch_sizes: list, rounds: int = 5) -> dict:
    """The text-model row: lldist on a BERT-style classifier at sequence length 128 against a
    pure forward over the same batches (the ceiling) and a naive per-cell loop (a DataLoader
    collating dict examples, load_state_dict per cell)."""
    from ..config import EvalConfig
    from ..evaluation.evaluator import Evaluator
    from ..evaluation.tasks import Task
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
    examples = [{k: v[i] for k, v in data.tensors.items()} for i in range(n)]
    loader = torch.utils.data.DataLoader(examples, batch_size=32)

    def one_cell(a=0.1, b=-0.2):
        model.load_state_dict({k: theta[k] + a * dirs.x[k] + b * dirs.y[k] for k in theta}, strict=False)
        with torch.no_grad():
            for batch in loader:
                batch = {k: v.to(device) for k, v in batch.items()}
                out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
                F.cross_entropy(out, batch["labels"], reduction="sum").item()
    # the evaluator and the naive loop share the model: each sets every weight before a cell
    t = rounds_of({"ceiling": forward(bs), "lldist": lambda: ev.evaluate_cells([(0.1, -0.2)]), "naive": one_cell},
                  device, rounds, warmup=1)
    med = {k: float(np.median(v)) for k, v in t.items()}
    rate = 1 / med["lldist"]
    vs_ceiling = [c / ll for c, ll in zip(t["ceiling"], t["lldist"])]
    vs_naive = [nv / ll for nv, ll in zip(t["naive"], t["lldist"])]
    return {"model": "bert_128", "precision": "fp32", "device": device, "images": n, "batch": bs,
            "ceiling_img_s": n / med["ceiling"], "ceiling_eager_img_s": rates[bs], "ceiling_compiled_img_s": 0.0,
            "compiled": False, "cells_per_pass": 1, "lldist_cells_s": rate, "lldist_img_s": rate * n,
            "one_cell_at_a_time_cells_s": rate, "naive_cells_s": 1 / med["naive"],
            "vs_ceiling": spread(vs_ceiling)["median"], "speedup_vs_naive": spread(vs_naive)["median"],
            "vs_ceiling_rounds": spread(vs_ceiling), "vs_naive_rounds": spread(vs_naive)}


def throughput(args) -> list:
    device = args.device
    if device == "cuda":
        if not torch.cuda.is_available():
            raise UserError("--device cuda, but torch sees no CUDA device")
        torch.backends.cudnn.benchmark = True
    batch_sizes = [32, 64, 128, 256, 512] if device == "cpu" else [256, 512, 1024, 2048, 5000, 10000]
    rows = []
    with Busy(args.load):
        for name in args.models:
            if name == "bert_128":
                row = text_row(device, 256 if device == "cpu" else 4096, [16, 32, 64, 128] if device == "cpu"
                               else [128, 256, 512, 1024], args.rounds)
                rows.append(_report(row, args.load))
                continue
            n = args.images or sizes(name, device)
            for precision in args.precision:
                rows.append(_report(model_row(name, n, precision, device, batch_sizes, args), args.load))
    return rows


def _report(row: dict, load: int) -> dict:
    row["load"] = load
    print(f"{row['model']:18s} {row['precision']:5s} ceiling {row['ceiling_img_s']:12,.0f} img/s  lldist "
          f"{row['lldist_cells_s']:9.2f} cells/s  vs ceiling {quote(row['vs_ceiling_rounds'])}  "
          f"vs naive {quote(row['vs_naive_rounds'])}  ({row['cells_per_pass']} cells/pass, load {load})", flush=True)
    return row


def model_row(name, n, precision, device, batch_sizes, args) -> dict:
    """One model and precision: the ceiling, lldist and the naive loop in each round."""
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
    nm, nt, nd, ndata = make_case(name, n)
    fns = {"ceiling": fwd, "lldist": lambda: ev.evaluate_cells(coords),
           "naive": naive_cell(nm, nt, nd, ndata, device, workers=0 if device == "cpu" else 2)}
    if group > 1:  # the one-cell-at-a-time rate, for the vmap speedup
        ev1 = evaluator(name, n, device, precision, cl, use_compile, bs, 1)
        fns["one"] = lambda: ev1.evaluate_cells(coords[:1])
    t = rounds_of(fns, device, args.rounds, warmup=1)
    med = {k: float(np.median(v)) for k, v in t.items()}
    rate = group / med["lldist"]
    # per round: lldist's images/s over the ceiling's, and its cells/s over the naive loop's
    vs_ceiling = [group * c / ll for c, ll in zip(t["ceiling"], t["lldist"])]
    vs_naive = [group * nv / ll for nv, ll in zip(t["naive"], t["lldist"])]
    return {"model": name, "precision": precision, "device": device, "images": n, "batch": bs,
            "ceiling_img_s": n / med["ceiling"], "ceiling_eager_img_s": eager[0], "ceiling_compiled_img_s": comp[0],
            "compiled": use_compile, "cells_per_pass": group, "lldist_cells_s": rate, "lldist_img_s": rate * n,
            "one_cell_at_a_time_cells_s": 1 / med["one"] if group > 1 else rate,
            "naive_cells_s": 1 / med["naive"], "vs_ceiling": spread(vs_ceiling)["median"],
            "speedup_vs_naive": spread(vs_naive)["median"], "vs_ceiling_rounds": spread(vs_ceiling),
            "vs_naive_rounds": spread(vs_naive)}


def markdown(rows: list) -> str:
    head = ("| model | precision | load | images/cell | ceiling img/s | lldist cells/s | lldist img/s | vs ceiling "
            "| cells/pass | naive cells/s | speedup vs naive |\n|---|---|---|---|---|---|---|---|---|---|---|\n")
    body = "".join(
        f"| {r['model']} | {r['precision']}{' (compiled)' if r['compiled'] else ''} | {r.get('load', 0)} | {r['images']} | "
        f"{r['ceiling_img_s']:,.0f} | {r['lldist_cells_s']:.2f} | {r['lldist_img_s']:,.0f} | "
        f"{quote(r['vs_ceiling_rounds'])} | {r['cells_per_pass']} | {r['naive_cells_s']:.2f} | "
        f"{quote(r['vs_naive_rounds'])}x |\n" for r in rows)
    return head + body + ("\nRatios: the median over the rounds, and in brackets their range; in each round the "
                          "ceiling, lldist and the naive loop are timed one after the other.\n")
