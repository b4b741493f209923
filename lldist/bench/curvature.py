"""Curvature: a cell with eval.curvature against a loss-and-accuracy cell, and a curvature map
over ranks.

    python -m lldist.bench curvature [--models mlp cnn_skip] [--ranks 1 2] [--map-cells 5]
"""

from __future__ import annotations

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
    ap.add_argument("--models", nargs="+", default=["mlp", "cnn_skip"], choices=list(MODELS),
                    help="models of the cell comparison")
    ap.add_argument("--images", type=int, default=2000, help="images per loss cell")
    ap.add_argument("--batch", type=int, default=250, help="batch size of both cells")
    ap.add_argument("--curvature-batches", type=int, default=2, help="batches the Hessian is taken on")
    ap.add_argument("--ranks", type=positive_int, nargs="*", default=[1, 2],
                    help="also a curvature map under mpiexec at these rank counts (none: skip)")
    ap.add_argument("--map-cells", type=int, default=5, help="the map's cells per axis")
    ap.add_argument("--rounds", type=positive_int, default=3, help="alternated rounds of a loss cell and a curvature cell")
    ap.add_argument("--load", type=int, default=0, metavar="K", help="K processes spinning on the CPU beside it")


def run(args) -> tuple:
    rows = curvature_rows(args) + (curvature_scaling(args) if args.ranks else [])
    return rows, curvature_markdown(rows)


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


def curvature_markdown(rows: list) -> str:
    maps = [r for r in rows if r.get("kind") == "curvature_map"]
    rows = [r for r in rows if r.get("kind") != "curvature_map"]
    md = curvature_cost_markdown(rows)
    if maps:
        md += (f"\nA curvature map of {maps[0]['cells']} cells (quickstart CNN, 1 x 120 test images a cell) over "
               "ranks:\n\n" + scaling_markdown(maps))
    return md


def curvature_cost_markdown(rows: list) -> str:
    head = ("| model | parameters | load | images per cell | loss cell s | curvature cell s | ratio (range) | "
            "HVPs per cell | Hessian taken on |\n|---|---|---|---|---|---|---|---|---|\n")
    return head + "".join(f"| {r['model']} | {r['parameters']:,} | {r.get('load', 0)} | {r['images_per_cell']} | "
                          f"{r['loss_cell_s']:.3f} | {r['curvature_cell_s']:.2f} | {r['ratio_rounds']['median']:.0f}x "
                          f"({r['ratio_rounds']['min']:.0f}-{r['ratio_rounds']['max']:.0f}) | "
                          f"{r['hessian_vector_products']} | {r['curvature_batches']} x {r['batch_size']} images |\n"
                          for r in rows)
