"""The linear-interpolation barrier (issue 23, part 3): lldist.metrics on a 1D path between two
independently trained models equals a plain numpy computation on the stored curve."""

import h5py
import numpy as np
import pytest
from conftest import run, write_job

from lldist.analysis import metrics


@pytest.mark.slow
def test_the_barrier_of_an_interpolation_is_numpys_on_the_stored_curve(workdir):
    job = write_job(workdir / "job.yaml", grid={"x": [-0.25, 1.25, 13], "y": None})
    run(["lldist.train", job], workdir)
    run(["lldist.train", job, "--set", "train.seed=1", "--set", "model.checkpoint=other.pt"], workdir)
    run(["lldist.surface", job, "--set", "directions.target=other.pt"], workdir)
    with h5py.File("out.h5", "r") as f:
        x, loss, acc, se = (f[k][()] for k in ("x", "test/loss", "test/acc", "test/loss_se"))
    inside = (x >= 0) & (x <= 1 + 1e-12)
    a, v = x[inside], loss[inside]
    line = (1 - a) * v[0] + a * v[-1]  # x holds 0 and 1: the end models themselves
    i = np.argmax(v - line)
    m = metrics.from_file("out.h5")
    assert m["barrier_loss"] == pytest.approx(v[i] - line[i], rel=1e-12)
    assert m["barrier_loss_alpha"] == pytest.approx(a[i])
    assert m["barrier_loss"] > 0  # two seeds of a small MLP: not linearly connected at no cost
    e = 1 - acc[inside]
    j = np.argmax(e - ((1 - a) * e[0] + a * e[-1]))
    assert m["barrier_error"] == pytest.approx(e[j] - ((1 - a[j]) * e[0] + a[j] * e[-1]), abs=1e-12)
    s = se[inside]
    assert m["barrier_loss_se"] == pytest.approx(np.sqrt(s[i] ** 2 + ((1 - a[i]) * s[0]) ** 2 + (a[i] * s[-1]) ** 2))
    assert "| out.h5 |" in metrics.table([m], ["out.h5"]) and "barrier_loss" in metrics.table([m], ["out.h5"])


def test_the_barrier_reads_the_ends_where_the_grid_misses_them():
    alpha = np.linspace(-0.1, 1.1, 7)  # no cell at 0 or 1
    value = 1 + 4 * alpha * (1 - alpha)  # ends 1 and 1, peak 2 at 0.5
    b = metrics.barrier(alpha, value)
    assert b["alpha"] == pytest.approx(0.5) and b["height"] == pytest.approx(1.0, abs=0.05)
    assert np.isnan(metrics.barrier([0.0], [1.0])["height"])
