"""A plane through three trained models (issue 23, part 1): the three points evaluate exactly
those models (their own files' weights, not theta + alpha delta arithmetic), the grid's
coordinates put them where the file says, and the plots label them."""

import h5py
import numpy as np
import pytest
import torch
from conftest import model_and_data, run, write_job

from lldist.evaluation.evaluator import evaluate_plain


def three_models(workdir):
    """Three MLPs of the job's architecture, initialised from three seeds (the points need not
    be trained for the plane's arithmetic to be checked), saved in lldist's checkpoint format."""
    from lldist.config import ModelConfig
    from lldist.workloads.models import build_model, save_checkpoint
    job = write_job(workdir / "job.yaml", grid={"x": [-0.5, 1.5, 9], "y": [-0.5, 1.5, 9]})
    for seed, name in ((0, "a.pt"), (1, "b.pt"), (2, "c.pt")):
        save_checkpoint(build_model(ModelConfig(name="mlp", args={"hidden": [16]}, seed=seed), (1, 8, 8), 10), name,
                        {"seed": seed})
    return job


def test_the_three_points_are_the_three_models_and_the_grid_holds_them(workdir):
    job = three_models(workdir)
    args = ["--set", "directions.kind=plane", "--set", "directions.points=[a.pt, b.pt, c.pt]",
            "--set", "model.checkpoint=null", "--set", "train=null"]
    p = run(["lldist.surface", job, *args], workdir)
    assert "three points evaluated" in p.stdout
    with h5py.File("out.h5", "r") as f:
        coords = f["points/coords"][()]
        labels = [x.decode() for x in f["points/labels"][()]]
        loss, acc = f["points/test/loss"][()], f["points/test/acc"][()]
        grid_loss, x, y = f["test/loss"][()], f["x"][()], f["y"][()]
        assert f["points/done"][()].all() and f["directions"].attrs["kind"] == "plane"
    assert labels == ["a.pt", "b.pt", "c.pt"] and coords[0].tolist() == [0, 0] and coords[1].tolist() == [1, 0]
    assert coords[2][1] == 1.0
    for k, name in enumerate(labels):
        model, data = model_and_data(job, name)
        state = {n: v for n, v in torch.load(name, weights_only=False)["state_dict"].items()}
        ref_loss, ref_acc = evaluate_plain(model, state, data, batch_size=50)
        assert loss[k] == pytest.approx(ref_loss, rel=1e-6) and acc[k] == ref_acc
    # the grid's own cells: (0, 0) is a, and (1, 0) is b up to float32 arithmetic
    ix0, iy0 = int(np.argmin(abs(x))), int(np.argmin(abs(y)))
    assert grid_loss[iy0, ix0] == loss[0]
    ix1 = int(np.argmin(abs(x - 1)))
    assert grid_loss[iy0, ix1] == pytest.approx(loss[1], rel=1e-4)
    run(["lldist.plot", "out.h5"], workdir)
    from lldist.analysis import figures
    s = figures.read_surface("out.h5")
    fig = figures.figure_2d(s, "test", "loss", "contour", figures.PlotOptions())
    texts = [t.get_text() for t in fig.axes[0].texts]
    assert {"a.pt", "b.pt", "c.pt"} <= set(texts)


def test_a_plane_that_cannot_be_is_refused_in_one_line(workdir):
    job = three_models(workdir)
    base = ["--set", "directions.kind=plane", "--set", "model.checkpoint=null", "--set", "train=null"]
    for bad, says in ((["--set", "directions.points=[a.pt, b.pt]"], "a list of three checkpoints"),
                      (["--set", "directions.points=[a.pt, b.pt, nope.pt]"], "nope.pt does not exist"),
                      (["--set", "directions.points=[a.pt, a.pt, c.pt]"], "the same weights"),
                      (["--set", "directions.points=[a.pt, b.pt, c.pt]", "--set", "grid.y=null"], "a 2D grid")):
        p = run(["lldist.surface", job, *base, *bad], workdir, check=False)
        assert p.returncode == 2 and says in p.stderr and len(p.stderr.strip().splitlines()) == 1, p.stderr
