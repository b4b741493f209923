"""Landscape metrics of finished surfaces: the literature's words ("wide basin", "more convex",
"less chaotic") as numbers, one row per file (definitions: docs/METRICS.md).

    python -m lldist.metrics runs/study/*/surface.h5 [--split test] [--store]

Computed by lldist/analysis/metrics.py from each file's loss array on its grid; `--store` also
writes them into each file under /metrics/<split>, after every file was read (a bad file leaves
all of them unchanged).
"""

from __future__ import annotations

import sys

from .errors import ArgumentParser, run_cli


def main(argv=None) -> int:
    from .analysis.metrics import of_file, table
    ap = ArgumentParser(prog="python -m lldist.metrics", doc=__doc__)
    ap.add_argument("files", nargs="+", help="complete lldist surface files (.h5)")
    ap.add_argument("--split", help="train or test (default: the file's first split)")
    ap.add_argument("--store", action="store_true", help="also write /metrics/<split> into each file "
                    "(after every file was read: a bad file leaves all of them unchanged)")
    args = ap.parse_args(argv)
    computed = [of_file(p, args.split) for p in args.files]  # all checked before any is written
    if args.store:
        from .store import write_metrics
        for p, (m, conv) in zip(args.files, computed):
            write_metrics(p, m["split"], m, conv)
    print(table([m for m, _ in computed], args.files))
    return 0


def cli() -> None:
    sys.exit(run_cli(main))


if __name__ == "__main__":
    cli()
