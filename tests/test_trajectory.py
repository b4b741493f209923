"""Trajectories you can trust (issue 23, part 5): for a PCA plane, each checkpoint's share of
its displacement in the plane and the loss at the checkpoint against the loss at its projection,
checked against numpy and a plain loop; info prints them, the plot marks the poorly held."""

import json

import h5py
import numpy as np
import pytest
import torch
from conftest import model_and_data, run, write_job

from lldist.directions.kinds import as_tensors
from lldist.evaluation.evaluator import evaluate_plain
from lldist.store import SurfaceReader


@pytest.mark.slow
def test_each_checkpoints_share_in_the_plane_and_its_projected_loss(workdir):
    job = write_job(workdir / "job.yaml", train={"epochs": 5, "lr": 0.01, "batch_size": 32, "seed": 0},
                    directions={"kind": "pca"}, grid={"x": [-1.0, 1.0, 5], "y": [-1.0, 1.0, 5]})
    run(["lldist.train", job], workdir)
    p = run(["lldist.surface", job], workdir)
    assert "of each checkpoint's displacement" in p.stdout
    with h5py.File("out.h5", "r") as f:
        t = f["trajectory"]
        coords, a = t[()], dict(t.attrs)
    names = json.loads(a["checkpoints"])
    captured, at, proj = (json.loads(a[k]) for k in ("captured", "loss_checkpoint", "loss_projected"))
    assert len(captured) == len(names) == 5 and a["split"] == "test"
    with SurfaceReader("out.h5") as sf:
        dirs = as_tensors(sf.read_directions())
    model, data = model_and_data(job, "model.pt")
    theta = {k: v.clone() for k, v in model.state_dict().items() if v.is_floating_point()}
    moving = [n for n in theta if dirs.x[n].any() or dirs.y[n].any()]
    for i, name in enumerate(names):
        state = torch.load(workdir / name, weights_only=False)
        state = state.get("state_dict", state)
        d2 = sum(float((state[n].double() - theta[n].double()).pow(2).sum()) for n in moving)
        # (the last epoch's checkpoint is theta* itself: nothing to hold, counted as held)
        assert captured[i] == pytest.approx((coords[i] ** 2).sum() / d2 if d2 > 0 else 1.0, rel=1e-6)
        assert at[i] == pytest.approx(evaluate_plain(model, state, data, batch_size=50)[0], rel=1e-5)
        projected = {n: theta[n] + float(coords[i, 0]) * dirs.x[n] + float(coords[i, 1]) * dirs.y[n] for n in theta}
        assert proj[i] == pytest.approx(evaluate_plain(model, projected, data, batch_size=50)[0], rel=1e-5)
    assert all(0 <= c <= 1 + 1e-9 for c in captured)
    out = run(["lldist.info", "out.h5"], workdir).stdout
    assert "trajectory on the plane (test loss" in out and names[0][:28] in out
    run(["lldist.plot", "out.h5"], workdir)
    assert (workdir / "out_test_trajectory.png").exists()


def test_the_plot_marks_checkpoints_the_plane_holds_poorly():
    from lldist.analysis import figures
    x = np.linspace(-1, 1, 5)
    from lldist.store import Surface
    s = Surface(path="", name="t", x=x, y=x, done=np.ones((5, 5), bool), splits=["test"], quantities=["loss"],
                values={("test", "loss"): 1 + np.add.outer(x ** 2, x ** 2)},
                trajectory=np.array([[0.5, 0.5], [0.2, 0.1], [0.0, 0.0]]),
                trajectory_fit={"captured": [0.9, 0.3, 1.0], "threshold": 0.5}, explained_variance_ratio=[0.6, 0.3])
    fig = figures.figure_trajectory(figures.drawable(s), "test", figures.PlotOptions())
    marked = [ln for ln in fig.axes[0].get_lines() if "under 50%" in ln.get_label()]
    assert len(marked) == 1 and list(marked[0].get_xdata()) == [0.2]


@pytest.mark.slow
def test_a_pca_job_without_a_grid_covers_its_trajectory(workdir):
    """A pca job's default grid was [-1, 1] while its trajectory spanned [-7, 2]: without a grid
    (or with grid.x: auto) the grid covers the trajectory and θ*, with a margin, and a rerun
    resumes the same file."""
    import yaml
    job = write_job(workdir / "job.yaml", train={"epochs": 5, "lr": 0.01, "batch_size": 32, "seed": 0},
                    directions={"kind": "pca"})
    raw = yaml.safe_load(open(job))
    del raw["grid"]
    yaml.safe_dump(raw, open(job, "w"))
    run(["lldist.train", job], workdir)
    p = run(["lldist.surface", job], workdir)
    assert "grid.x: auto covers the trajectory" in p.stdout and "grid.y: auto covers" in p.stdout
    with h5py.File("out.h5", "r") as f:
        x, y, coords = f["x"][()], f["y"][()], f["trajectory"][()]
    for axis, c in ((x, coords[:, 0]), (y, coords[:, 1])):
        lo, hi = min(0.0, c.min()), max(0.0, c.max())
        assert axis.size == 31 and axis[0] < lo and axis[-1] > hi
        assert axis[-1] - axis[0] == pytest.approx(1.4 * (hi - lo), rel=1e-4)  # a fifth beyond each side
    again = run(["lldist.surface", job], workdir)
    assert "0 to compute" in again.stdout
    bad = run(["lldist.surface", job, "--set", "directions.kind=random", "--set", "grid.x=auto"], workdir, check=False)
    assert bad.returncode == 2 and "grid.x: auto" in bad.stderr and "pca" in bad.stderr


def test_the_trajectory_is_numbered_by_what_its_checkpoints_count():
    from lldist.analysis.figures import checkpoint_numbers
    assert checkpoint_numbers(["m_epoch1.pt", "m_epoch3.pt"], 2) == (["1", "3"], "epochs")
    assert checkpoint_numbers(["m_step50.pt", "m_step100.pt"], 2) == (["50", "100"], "steps")
    assert checkpoint_numbers(["a.pt", "b.pt"], 2) == (["1", "2"], "checkpoints in training order")
