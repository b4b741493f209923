"""The GPU run: the `gpu`-marked tests, then every fast path (fp32/bf16, channels-last, compile)
of the MLP, the skip CNN and MobileNetV2 at 32 and 224 against its ceiling and the naive loop,
the vmapped MLP, `batch_size: auto` and peak memory, a curvature cell against a loss cell, the
BERT-style text row, the GPT-2 job's model in fp32 and bf16 and in a shard group of 1 (FSDP2's
cost alone), and the 51x51 projection; JSON + Markdown.

    PYTHONPATH=. python -m lldist.bench gpu [--out DIR] [--budget 400] [--skip-tests]

Runs on the device image as it is (nothing installed). Compilation and CUDA-graph capture are
warm-up calls outside the clock; the GPU is synchronised before every reading of it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import numpy as np
import torch

from ..errors import UserError
from .common import evaluator, interleaved, make_case
from .throughput import ceiling, naive_loop


def add_arguments(ap) -> None:
    ap.add_argument("--out", default="bench_gpu", help="folder for bench_gpu.json, bench_gpu.md, gpu_tests.log")
    ap.add_argument("--budget", type=float, default=400.0, help="seconds for everything (tests included)")
    ap.add_argument("--skip-tests", action="store_true", help="measure only")


def run(args) -> tuple:
    rep = gpu_report(args)
    return rep["rows"], gpu_markdown(rep)


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
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
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
    gpu_extras(rep, "cuda", t_end)
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


EXTRAS = {  # the sizes of the extra rows on a GPU; the CPU test of this code runs them small
    "cuda": {"curvature": {"images": 8192, "batch": 1024, "curvature_batches": 2, "rounds": 3},
             "text": {"n": 2048, "batch_sizes": [128, 256, 512, 1024], "rounds": 3},
             "gpt2": {"config": "gpt2_small", "n": 256, "seq": 128, "batch": 32, "cells": 3}},
    "cpu": {"curvature": {"images": 64, "batch": 32, "curvature_batches": 1, "rounds": 1},
            "text": {"n": 32, "batch_sizes": [16, 32], "rounds": 1},
            "gpt2": {"config": "tiny_gpt", "n": 16, "seq": 32, "batch": 8, "cells": 2}},
}
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def gpt2_rows(device: str, config: str, n: int, seq: int, batch: int, cells: int) -> dict:
    """The GPT-2 job's model (jobs/models/<config>, seeded) under the language-model loss on
    random token ids: one rank's cells/s in fp32 and in bf16 and the loss's difference between
    them; then the fp32 cells again in a shard group of 1 (FSDP2 over a world of one: the cost of
    the sharding machinery alone), its numbers against the unsharded rank's, and the device
    memory each holds."""
    import copy

    from ..config import DirectionsConfig, EvalConfig, ModelConfig
    from ..directions.random import make_directions
    from ..directions.state import model_state
    from ..evaluation.evaluator import Evaluator
    from ..evaluation.groups import GroupSpec, init_process_group
    from ..evaluation.tasks import Task
    from ..workloads.data import DictSet
    from ..workloads.models import build_model
    model = build_model(ModelConfig(f"hf:{ROOT}/jobs/models/{config}", seed=0), (), 0).eval()
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(0)
    data = DictSet({"input_ids": torch.randint(0, vocab, (n, seq), generator=g),
                    "attention_mask": torch.ones(n, seq, dtype=torch.int64)}, 0)
    theta, kinds = model_state(model)
    dirs = make_directions(theta, kinds, DirectionsConfig(seed=1), 2)
    coords = [(0.05 * i, -0.05 * i) for i in range(1, cells + 1)]
    cuda = device.startswith("cuda")

    def rate(ev):
        ev.evaluate_cells(coords[:1])  # warm-up, outside the clock
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t = time.perf_counter()
        out = ev.evaluate_cells(coords)
        if cuda:
            torch.cuda.synchronize()
        mib = torch.cuda.max_memory_allocated() / 2 ** 20 if cuda else float("nan")
        return cells / (time.perf_counter() - t), out, mib
    row = {"model": config, "sequences": n, "seq": seq, "batch": batch, "cells": cells}
    results = {}
    for precision in ("fp32", "bf16"):
        ev = Evaluator(copy.deepcopy(model), theta, dirs, {"test": data}, EvalConfig(batch_size=batch, precision=precision),
                       device=device, task=Task("lm"))
        results[precision] = rate(ev)
        del ev
    row.update(fp32_cells_s=results["fp32"][0], bf16_cells_s=results["bf16"][0],
               bf16_vs_fp32=results["bf16"][0] / results["fp32"][0], fp32_peak_mib=results["fp32"][2],
               bf16_peak_mib=results["bf16"][2],
               bf16_loss_rel_diff=float(np.max(np.abs(results["bf16"][1][..., 0] - results["fp32"][1][..., 0])
                                               / np.abs(results["fp32"][1][..., 0]))))
    import torch.distributed as dist
    spec = GroupSpec(0, 1, "shard")
    init_process_group(spec, lambda obj: obj, device)
    try:
        ev = Evaluator(copy.deepcopy(model), theta, dirs, {"test": data}, EvalConfig(batch_size=batch), device=device,
                       task=Task("lm"), group=spec)
        r, out, mib = rate(ev)
    finally:
        dist.destroy_process_group()
    row.update(shard1_cells_s=r, shard1_vs_unsharded=r / results["fp32"][0], shard1_peak_mib=mib,
               shard1_equal=bool(np.array_equal(out, results["fp32"][1])),
               shard1_max_rel_diff=float(np.nanmax(np.abs(out - results["fp32"][1]) /
                                                   np.maximum(np.abs(results["fp32"][1]), 1e-30))))
    return row


def gpu_extras(rep: dict, device: str, t_end: float) -> None:
    """The rows the CPU benchmark has and the GPU run must repeat: a curvature cell against a
    loss cell (bench curvature's rows, fp32 eager: double backward does not compile) and the
    BERT-style text row (bench's bert_128). Each is skipped past the time budget, and an error in
    one is recorded, not raised (it is a result)."""
    import argparse
    from .curvature import curvature_rows
    from .throughput import text_row
    sizes = EXTRAS[device]
    if time.perf_counter() < t_end:
        try:
            c = sizes["curvature"]
            rep["curvature"] = curvature_rows(argparse.Namespace(device=device, models=["mlp", "cnn_skip"], load=0, **c))
        except Exception as e:
            rep["skipped"].append(["curvature", f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"])
    if time.perf_counter() < t_end:
        try:
            t = sizes["text"]
            rep["text"] = text_row(device, t["n"], t["batch_sizes"], rounds=t["rounds"])
        except Exception as e:  # transformers missing, or out of memory
            rep["skipped"].append(["bert_128", f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"])
    if time.perf_counter() < t_end:
        try:
            rep["gpt2"] = gpt2_rows(device, **sizes["gpt2"])
        except Exception as e:
            rep["skipped"].append(["gpt2", f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"])


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
    if rep.get("curvature"):
        from .curvature import curvature_cost_markdown
        lines.append("\nA curvature cell (lambda_max and lambda_min by Lanczos) against a loss cell, fp32 eager:\n\n"
                     + curvature_cost_markdown(rep["curvature"]))
    t = rep.get("text")
    if t:
        lines.append(f"\nBERT-style classifier (2 layers, width 128, sequence 128, {t['images']} sequences a cell, fp32, "
                     f"batch {t['batch']}): ceiling {t['ceiling_img_s']:,.0f} seq/s, lldist {t['lldist_img_s']:,.0f} "
                     f"seq/s ({t['vs_ceiling']:.2f} of it), naive loop {t['naive_cells_s']:.3f} cells/s "
                     f"({t['speedup_vs_naive']:.2f}x)")
    g = rep.get("gpt2")
    if g:
        lines.append(f"\nThe GPT-2 job's model ({g['model']}, seeded; {g['sequences']} sequences of {g['seq']} tokens a "
                     f"cell, batch {g['batch']}, loss lm): fp32 {g['fp32_cells_s']:.3f} cells/s, bf16 "
                     f"{g['bf16_cells_s']:.3f} ({g['bf16_vs_fp32']:.2f}x; loss within {g['bf16_loss_rel_diff']:.1e} "
                     f"of fp32's), peak {g['fp32_peak_mib']:.0f} / {g['bf16_peak_mib']:.0f} MiB. A shard group of 1 "
                     f"(FSDP2 over one rank): {g['shard1_cells_s']:.3f} cells/s, {g['shard1_vs_unsharded']:.2f}x the "
                     f"unsharded rank, numbers {'equal bit for bit' if g['shard1_equal'] else 'within ' + format(g['shard1_max_rel_diff'], '.1e')}, "
                     f"peak {g['shard1_peak_mib']:.0f} MiB")
    p = rep.get("projection_51x51_mobilenet224_5000img")
    if p:
        lines.append(f"\n51x51 MobileNetV2 at 224x224 on 5,000 images, at {p['img_s']:,.0f} img/s: "
                     f"{p['one_card_s'] / 3600:.2f} h on one card, {p['eight_cards_s'] / 60:.1f} min on 8")
    if rep["skipped"]:
        lines.append("\nNot measured (time budget or error): " + "; ".join(map(str, rep["skipped"])))
    return "\n".join(lines) + "\n"
