"""The GPU run: the `gpu`-marked tests, then every fast path (fp32/bf16, channels-last, compile)
of the MLP, the skip CNN and MobileNetV2 at 32 and 224 against its ceiling and the naive loop,
the vmapped MLP, `batch_size: auto` and peak memory, a curvature cell against a loss cell, the
BERT-style text row, and the 51x51 projection; JSON + Markdown.

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
             "text": {"n": 2048, "batch_sizes": [128, 256, 512, 1024], "rounds": 3}},
    "cpu": {"curvature": {"images": 64, "batch": 32, "curvature_batches": 1, "rounds": 1},
            "text": {"n": 32, "batch_sizes": [16, 32], "rounds": 1}},
}


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
    p = rep.get("projection_51x51_mobilenet224_5000img")
    if p:
        lines.append(f"\n51x51 MobileNetV2 at 224x224 on 5,000 images, at {p['img_s']:,.0f} img/s: "
                     f"{p['one_card_s'] / 3600:.2f} h on one card, {p['eight_cards_s'] / 60:.1f} min on 8")
    if rep["skipped"]:
        lines.append("\nNot measured (time budget or error): " + "; ".join(map(str, rep["skipped"])))
    return "\n".join(lines) + "\n"
