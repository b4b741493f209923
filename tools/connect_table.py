"""docs/CONNECT.md's table: for each pair of digits models (tools/connect_docs.sh), the barrier
of every path between them, from the files' own metrics (lldist.metrics: the barrier and its
standard error over examples).

    python tools/connect_table.py runs/connect_digits > docs/connect/table.md
"""

import os
import sys

from lldist.analysis.metrics import from_file
from lldist.store import SurfaceReader

PATHS = (("straight line", "{m}/line.h5"), ("line after weight matching", "{m}_aligned/line_aligned.h5"),
         ("Bezier curve", "{m}/curve.h5"), ("Bezier curve, to the aligned b", "{m}_aligned/curve.h5"))


def row(path: str, split: str) -> tuple:
    m = from_file(path, split=split)
    with SurfaceReader(path) as sf:
        s = sf.read_all()
    loss = s.values[(split, "loss")]
    acc = s.values[(split, "acc")]
    return (f"{m['barrier_loss']:.4f} ± {m.get('barrier_loss_se', float('nan')):.4f}", f"{m['barrier_loss_alpha']:.2f}",
            f"{100 * m['barrier_error']:.2f}", f"{loss.max():.4f}", f"{100 * (1 - acc.min()):.2f}",
            f"{loss[0]:.4f} / {loss[-1]:.4f}")


def main(root: str) -> None:
    print(f"Made by `python tools/connect_table.py {root}` from the files of `bash tools/connect_docs.sh`.\n")
    for model in ("mlp", "cnn_skip", "cnn_skip32"):
        for split in ("train", "test"):
            print(f"**{model}, {split} split** (21 points from t = 0 to 1; ± one standard error over examples; "
                  f"`python tools/connect_table.py {root}`)\n")
            print("| path | loss barrier | at t | error barrier (points) | max loss | max error (%) | loss at a / b |")
            print("|---|---|---|---|---|---|---|")
            for name, pattern in PATHS:
                p = os.path.join(root, pattern.format(m=model))
                if os.path.exists(p):
                    print(f"| {name} | " + " | ".join(row(p, split)) + " |")
            print()


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "runs/connect_digits")
