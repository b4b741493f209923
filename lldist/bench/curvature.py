"""Curvature: a cell with eval.curvature against a loss-and-accuracy cell, and a curvature map
over ranks.

    python -m lldist.bench curvature [--models mlp cnn_skip] [--ranks 1 2] [--map-cells 5]
"""

from __future__ import annotations

import torch

from ..errors import positive_int
from .common import MODELS, make_case, rank_sweep, scaling_markdown, timed


def add_arguments(ap) -> None:
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=("cpu", "cuda"))
    ap.add_argument("--models", nargs="+", default=["mlp", "cnn_skip"], choices=list(MODELS))
    ap.add_argument("--images", type=int, default=2000, help="images per loss cell")
    ap.add_argument("--batch", type=int, default=250, help="batch size of both cells")
    ap.add_argument("--curvature-batches", type=int, default=2, help="batches the Hessian is taken on")
    ap.add_argument("--ranks", type=positive_int, nargs="*", default=[1, 2],
                    help="also a curvature map under mpiexec at these rank counts (none: skip)")
    ap.add_argument("--map-cells", type=int, default=5, help="the map's cells per axis")


def run(args) -> tuple:
    rows = curvature_rows(args) + (curvature_scaling(args) if args.ranks else [])
    return rows, curvature_markdown(rows)


def curvature_rows(args) -> list:
    """The cost of a cell with eval.curvature (lambda_max, lambda_min by Lanczos on
    `curvature_batches` batches) against a loss-and-accuracy cell, same model, data and device."""
    from ..config import EvalConfig
    from ..evaluation.evaluator import Evaluator
    from ..evaluation.tasks import Task
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
