"""Curvature: a cell with eval.curvature against a loss-and-accuracy cell, a curvature map
over ranks, and the Hessian at θ* with its products spread over ranks.

    python -m lldist.bench curvature [--models mlp cnn_skip] [--ranks 1 2] [--map-cells 5] [--optimum-ranks 1 2 4]
    python -m lldist.bench curvature --models --ranks --optimum-ranks --products-job jobs/llm_gpt2.yaml
"""

from __future__ import annotations

import os

import numpy as np
import torch

from ..errors import positive_int
from .common import (
    MODELS,
    Busy,
    make_case,
    quote,
    rank_sweep,
    rounds_of,
    scaling_markdown,
    spread,
)


def add_arguments(ap) -> None:
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=("cpu", "cuda"),
                    help="where the cells run (default: cuda when torch sees a GPU)")
    ap.add_argument("--models", nargs="*", default=["mlp", "cnn_skip"], choices=list(MODELS),
                    help="models of the cell comparison (none: skip it)")
    ap.add_argument("--images", type=int, default=2000, help="images per loss cell")
    ap.add_argument("--batch", type=int, default=250, help="batch size of both cells")
    ap.add_argument("--curvature-batches", type=int, default=2, help="batches the Hessian is taken on")
    ap.add_argument("--ranks", type=positive_int, nargs="*", default=[1, 2],
                    help="also a curvature map under mpiexec at these rank counts (none: skip)")
    ap.add_argument("--map-cells", type=int, default=5, help="the map's cells per axis")
    ap.add_argument("--optimum-ranks", type=positive_int, nargs="*", default=[1, 2, 4],
                    help="python -m lldist.hessian under mpiexec at these rank counts (none: skip)")
    ap.add_argument("--optimum-batches", type=positive_int, default=8,
                    help="batches of 180 digits training images the Hessian at θ* is taken on (8: all 1,437)")
    ap.add_argument("--products-job", nargs="*", default=[], metavar="JOB",
                    help="also the cost of a product of each operator (hessian, ggn, fisher) against a gradient, "
                         "on these jobs' models at θ* and their first --products-batches batches")
    ap.add_argument("--products-batches", type=positive_int, default=1, help="batches of the products' comparison")
    ap.add_argument("--rounds", type=positive_int, default=3, help="alternated rounds of a loss cell and a curvature cell")
    ap.add_argument("--load", type=int, default=0, metavar="K", help="K processes spinning on the CPU beside it")


def run(args) -> tuple:
    rows = curvature_rows(args) + (curvature_scaling(args) if args.ranks else []) + \
        (optimum_scaling(args) if args.optimum_ranks else []) + \
        [r for job in args.products_job for r in product_costs(job, args.products_batches, args.rounds)]
    return rows, curvature_markdown(rows)


def product_costs(path: str, nbatches: int, rounds: int) -> list:
    """One product of each operator against one gradient of the same mean loss, same batches,
    timed in alternation over `rounds` rounds (medians): what a Hessian, GGN or Fisher product
    costs in gradients, the unit a reader knows."""
    import time

    from ..config import load_job
    from ..evaluation.curvature import Curvature, first_batches
    from ..inputs.loading import Source
    from ..runs.train import ensure_checkpoint
    job = load_job(path)
    ensure_checkpoint(job)
    src = Source()
    loaded = src.load(job)
    data = next(iter(loaded.splits.values()))
    batches = first_batches(data, job.eval.batch_size, nbatches)
    task = src.make_task(job)
    curv = {op: Curvature(loaded.model, batches, task, operator=op) for op in ("hessian", "ggn", "fisher")}
    c0 = curv["hessian"]
    v = torch.randn(c0.n, generator=torch.Generator().manual_seed(0))

    def gradient():
        with c0.guard():  # the same attention path as the products
            for b in c0.mine:
                s, w = c0._sum_and_weight(c0.point, b)
                torch.autograd.grad(s / w, list(c0.point.values()))
    work = {"gradient": gradient, **{op: (lambda c=c: c.hvp(v)) for op, c in curv.items()}}
    times = {k: [] for k in work}
    for fn in work.values():
        fn()  # warm-up
    for _ in range(rounds):
        for k, fn in work.items():
            t = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t)
    med = {k: float(np.median(t)) for k, t in times.items()}
    rows = [{"kind": "products", "job": job.name, "parameters": c0.n, "batches": len(batches),
             "batch_size": job.eval.batch_size, "operator": k, "seconds": med[k], "gradients": med[k] / med["gradient"],
             "rounds": rounds, "attention": c0.guard.note or ""} for k in work]
    print(f"{job.name} ({c0.n:,} parameters, {len(batches)} x {job.eval.batch_size}): gradient "
          f"{med['gradient']:.3f} s; " + ", ".join(f"{k} {med[k]:.3f} s ({med[k] / med['gradient']:.2f} gradients)"
                                                 for k in curv), flush=True)
    return rows


def curvature_rows(args) -> list:
    """The cost of a cell with eval.curvature (lambda_max, lambda_min by Lanczos on
    `curvature_batches` batches) against a loss-and-accuracy cell, same model, data and device,
    timed in alternation: in each round the loss cell (repeated for at least 0.2 s), then one
    curvature cell. The ratio of each round, its median and range are reported (the short loss
    cell slows far more under load than the long one: timed apart, the ratio swung 93-447x)."""
    from ..config import EvalConfig
    from ..evaluation.evaluator import Evaluator
    from ..evaluation.tasks import Task
    rows = []
    with Busy(args.load):
        for name in args.models:
            n = args.images
            model, theta, dirs, data = make_case(name, n)
            base = EvalConfig(batch_size=args.batch, curvature_batches=args.curvature_batches)
            plain = Evaluator(model, theta, dirs, {"test": data}, base, device=args.device)
            cm, ct, cd, cdata = make_case(name, n)
            curv = Evaluator(cm, ct, cd, {"test": cdata}, base, device=args.device, task=Task(curvature=True))
            curv.evaluate(0.1, -0.2)  # the batches are set up once per split
            c = next(iter(curv._curvature.values()))
            before = c.matvecs
            t = rounds_of({"loss": lambda: plain.evaluate(0.1, -0.2), "curvature": lambda: curv.evaluate(0.1, -0.2)},
                          plain.device, args.rounds, warmup=0, min_time={"curvature": 0.0})
            products = (c.matvecs - before) // args.rounds
            ratio = spread([cv / ls for cv, ls in zip(t["curvature"], t["loss"])])
            row = {"model": name, "images_per_cell": n, "curvature_batches": args.curvature_batches,
                   "batch_size": args.batch, "loss_cell_s": float(np.median(t["loss"])),
                   "curvature_cell_s": float(np.median(t["curvature"])), "ratio": ratio["median"],
                   "ratio_rounds": ratio, "hessian_vector_products": products, "load": args.load,
                   "parameters": sum(p.numel() for p in model.parameters())}
            rows.append(row)
            print(f"{name}: loss cell {row['loss_cell_s']:.3f} s, curvature cell {row['curvature_cell_s']:.2f} s, ratio "
                  f"{quote(ratio)}x over {args.rounds} rounds ({products} Hessian-vector products on "
                  f"{args.curvature_batches} x {args.batch} images, load {args.load})", flush=True)
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


def optimum_scaling(args) -> list:
    """python -m lldist.hessian (top 2 eigenvalues, the smallest, 16 Hutchinson samples) on the
    quickstart's CNN at its untrained θ*, `optimum_batches` batches of 180 digits training images,
    under mpiexec at each rank count (one thread a rank): each product's batches split over the
    ranks (transport.runner.Spread). Seconds per product from the file's own record, and how
    far each run's eigenvalues and trace are from the first's."""
    import subprocess
    import sys
    import tempfile

    import yaml

    from ..store import SurfaceReader
    from .common import find_mpiexec
    nb = args.optimum_batches
    job = {"name": "optimum_scaling", "output": "s.h5",
           "model": {"name": "cnn", "args": {"width": 8, "stages": 2, "blocks": 1, "batchnorm": True}},
           "data": {"name": "digits"}, "grid": {"x": [0.0, 0.0, 1]},
           "eval": {"split": "train", "batch_size": 180, "threads": 1}}
    mpiexec, rows, first = find_mpiexec(), [], None
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    if os.getuid() == 0:
        env.update(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "job.yaml")
        with open(path, "w") as f:
            yaml.safe_dump(job, f)
        subprocess.run([sys.executable, "-m", "lldist.surface", path], cwd=tmp, env=env, check=True,
                       capture_output=True)
        for n in args.optimum_ranks:
            cmd = [mpiexec, "-n", str(n), sys.executable, "-m", "lldist.hessian", path, "--top", "2", "--batches",
                   str(nb), "--trace-samples", "16", "--no-jackknife"]
            p = subprocess.run(cmd, cwd=tmp, env=env, capture_output=True, text=True, timeout=1800)
            if p.returncode != 0:
                raise RuntimeError(f"{' '.join(cmd)} failed:\n{p.stderr[-2000:]}")
            with SurfaceReader(os.path.join(tmp, "s.h5")) as f:
                a = f.curvature()["train"]
            per = a["seconds"] / a["hessian_vector_products"]
            first = first or (per, a)
            row = {"kind": "optimum", "ranks": n, "parameters": int(a["num_parameters"]), "batches": nb,
                   "products": int(a["hessian_vector_products"]), "seconds": float(a["seconds"]),
                   "seconds_per_product": per, "speedup": first[0] / per,
                   "lambda_max": float(a["lambda_max"]), "trace": float(a["trace"]),
                   "max_rel_difference": max(abs(a[k] - first[1][k]) / abs(first[1][k])
                                             for k in ("lambda_max", "lambda_min", "trace"))}
            rows.append(row)
            print(f"Hessian at theta*: {n} ranks: {per * 1000:.1f} ms a product ({row['products']} products), speedup "
                  f"{row['speedup']:.2f}, eigenvalues and trace within {row['max_rel_difference']:.1e} of "
                  f"{args.optimum_ranks[0]} rank(s)", flush=True)
    return rows


def curvature_markdown(rows: list) -> str:
    maps = [r for r in rows if r.get("kind") == "curvature_map"]
    optimum = [r for r in rows if r.get("kind") == "optimum"]
    products = [r for r in rows if r.get("kind") == "products"]
    rows = [r for r in rows if r.get("kind") not in ("curvature_map", "optimum", "products")]
    md = curvature_cost_markdown(rows) if rows else ""
    if maps:
        md += (f"\nA curvature map of {maps[0]['cells']} cells (quickstart CNN, 1 x 120 test images a cell) over "
               "ranks:\n\n" + scaling_markdown(maps))
    if optimum:
        o = optimum[0]
        md += (f"\nThe Hessian at θ* (python -m lldist.hessian, quickstart CNN, {o['parameters']:,} parameters, "
               f"{o['batches']} x 180 training images), each product's batches over the ranks:\n\n"
               "| ranks | products | seconds | ms a product | speedup | largest relative difference to the first |\n"
               "|---|---|---|---|---|---|\n"
               + "".join(f"| {r['ranks']} | {r['products']} | {r['seconds']:.1f} | {1000 * r['seconds_per_product']:.1f} "
                         f"| {r['speedup']:.2f} | {r['max_rel_difference']:.1e} |\n" for r in optimum))
    if products:
        md += ("\nOne product of each operator against one gradient of the same mean loss (medians of "
               f"{products[0]['rounds']} alternated rounds):\n\n"
               "| job | parameters | batches | operator | seconds | in gradients |\n|---|---|---|---|---|---|\n"
               + "".join(f"| {r['job']} | {r['parameters']:,} | {r['batches']} x {r['batch_size']} | {r['operator']} | "
                         f"{r['seconds']:.3f} | {r['gradients']:.2f} |\n" for r in products))
    return md


def curvature_cost_markdown(rows: list) -> str:
    head = ("| model | parameters | load | images per cell | loss cell s | curvature cell s | ratio (range) | "
            "HVPs per cell | Hessian taken on |\n|---|---|---|---|---|---|---|---|---|\n")
    return head + "".join(f"| {r['model']} | {r['parameters']:,} | {r.get('load', 0)} | {r['images_per_cell']} | "
                          f"{r['loss_cell_s']:.3f} | {r['curvature_cell_s']:.2f} | {r['ratio_rounds']['median']:.0f}x "
                          f"({r['ratio_rounds']['min']:.0f}-{r['ratio_rounds']['max']:.0f}) | "
                          f"{r['hessian_vector_products']} | {r['curvature_batches']} x {r['batch_size']} images |\n"
                          for r in rows)
