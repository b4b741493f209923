"""Landscape metrics of finished surfaces: the literature's words ("wide basin", "more convex",
"less chaotic") as numbers, one row per file (definitions: docs/METRICS.md).

    python -m lldist.metrics runs/study/*/surface.h5 [--split test] [--store] [--wide]

Computed by lldist/analysis/metrics.py from each file's loss array on its grid, for every split
it holds (or --split's), printed one metric a line and one column per file (`--wide`: a
Markdown table, one row per file, as a study's report has it); `--store` also writes them into
each file under /metrics/<split>, after every file was read (a bad file leaves all of them
unchanged).
"""

from __future__ import annotations

import sys

from .errors import ArgumentParser, run_cli


def main(argv=None) -> int:
    from .analysis.metrics import of_file, table, transposed
    ap = ArgumentParser(prog="python -m lldist.metrics", doc=__doc__)
    ap.add_argument("files", nargs="+", help="complete lldist surface files (.h5)")
    ap.add_argument("--split", help="train or test (default: every split of each file, a row each)")
    ap.add_argument("--store", action="store_true", help="also write /metrics/<split> into each file "
                    "(after every file was read: a bad file leaves all of them unchanged)")
    ap.add_argument("--wide", action="store_true", help="a Markdown table, one row per file and one column per "
                    "metric (default: one line per metric, a column per file, for a terminal)")
    args = ap.parse_args(argv)
    rows = []  # (file, metrics, convexity map): all computed, so all checked, before any is written
    for p in args.files:
        for split in [args.split] if args.split else splits_of(p):
            m, conv = of_file(p, split)
            rows.append((p, m, conv))
    if args.store:
        from .store import write_metrics
        for p, m, conv in rows:
            write_metrics(p, m["split"], m, conv)
    several = len(rows) > len(args.files)  # (then each row says its split)
    names = [f"{p} ({m['split']})" if several else p for p, m, _ in rows]
    print((table if args.wide else transposed)([m for _, m, _ in rows], names))
    return 0


def splits_of(path: str) -> list:
    from .store import SurfaceReader
    with SurfaceReader(path) as sf:
        return list(sf.splits)


def cli() -> None:
    sys.exit(run_cli(main))


if __name__ == "__main__":
    cli()
