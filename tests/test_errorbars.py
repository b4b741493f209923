"""Error bars (issue 22): every cell's standard error over examples against numpy on a plain
loop's per-example losses, the accuracy's Wilson interval against its definition, and the
bands the 1D plot draws."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import run, write_job

from lldist.directions.kinds import as_tensors
import lldist
from lldist.config import DataConfig
from lldist.store import SurfaceReader
from lldist.analysis.uncertainty import interval, wilson, z_value
from lldist.workloads.data import load_split


def digits(n=150):
    ts = load_split(DataConfig(subset=n), "test")
    return ts.normalize(ts.x), ts.y


def net():
    torch.manual_seed(4)
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 16), torch.nn.Tanh(), torch.nn.Linear(16, 10))


def plain_losses(model, theta, dirs, a, b, x, y):
    """Per-example cross-entropy at theta + a dx + b dy, one example at a time."""
    state = {k: theta[k] + a * dirs.x[k] + (b * dirs.y[k] if dirs.y is not None else 0) for k in theta}
    model.load_state_dict(state, strict=False)
    with torch.no_grad():
        return np.array([float(F.cross_entropy(model(x[i:i + 1]), y[i:i + 1])) for i in range(len(y))])


@pytest.mark.parametrize("cells_per_pass", [1, 4])  # the plain path and the vmapped one
def test_each_cells_standard_error_equals_numpys_on_a_plain_loop(workdir, cells_per_pass):
    x, y = digits()
    ls = lldist.landscape(net(), (x, y), x=(-1, 1, 5), y=(-1, 1, 2), batch_size=40, cells_per_pass=cells_per_pass,
                          out="se.h5", progress_every=0)
    with SurfaceReader("se.h5") as sf:
        dirs = as_tensors(sf.read_directions())
    ref = net()
    theta = {k: v.clone() for k, v in ref.state_dict().items()}
    for iy, b in enumerate(ls.y):
        for ix, a in enumerate(ls.x):
            each = plain_losses(ref, theta, dirs, a, b, x, y)
            assert math.isclose(ls.loss[iy, ix], each.mean(), rel_tol=1e-5)
            assert math.isclose(ls.loss_se[iy, ix], each.std(ddof=1) / math.sqrt(len(each)), rel_tol=1e-4)
    lo, hi = ls.interval("test/loss", level=0.9)
    np.testing.assert_allclose(hi - lo, 2 * 1.6448536 * ls.loss_se, rtol=1e-6)
    np.testing.assert_allclose(ls.stderr("acc"), np.sqrt(ls.acc * (1 - ls.acc) / len(y)))


def test_a_custom_losss_standard_error_follows_its_weights():
    """A loss given with weights (v, w) per example: the mean is Σv/Σw and its standard
    error the ratio estimator's, here against numpy on the same values."""
    x, y = digits(90)
    wts = (torch.arange(90) % 3 + 1).float()
    batches = [(x[i:i + 32], y[i:i + 32], wts[i:i + 32]) for i in range(0, 90, 32)]

    def weighted(out, batch):
        return batch[2] * F.cross_entropy(out, batch[1], reduction="none"), batch[2]
    model = net()
    ls = lldist.landscape(model, batches, x=(0, 0, 1), y=None, loss=weighted, progress_every=0)
    with torch.no_grad():
        v = (wts * F.cross_entropy(model(x), y, reduction="none")).numpy().astype(float)
    w = wts.numpy().astype(float)
    m = v.sum() / w.sum()
    assert math.isclose(ls.loss[0], m, rel_tol=1e-5)
    se = math.sqrt(90 / 89 * np.sum((v - m * w) ** 2)) / w.sum()
    assert math.isclose(ls.loss_se[0], se, rel_tol=1e-4)


@pytest.mark.parametrize("p,n", [(0.0, 20), (0.1, 50), (0.5, 7), (0.93, 360), (1.0, 12)])
def test_wilsons_interval_is_where_the_score_test_does_not_reject(p, n):
    """Wilson's interval by its definition: the proportions p0 with |p - p0| <= z sqrt(p0(1-p0)/n),
    found on a dense grid, not by the closed form."""
    lo, hi = wilson(p, n, 0.95)
    z = z_value(0.95)
    p0 = np.linspace(0, 1, 2_000_001)
    inside = p0[np.abs(p - p0) <= z * np.sqrt(p0 * (1 - p0) / n)]
    assert abs(lo - inside.min()) < 2e-6 and abs(hi - inside.max()) < 2e-6
    assert 0 <= lo <= p <= hi <= 1


def test_interval_and_levels_are_checked():
    assert math.isclose(z_value(0.95), 1.959964, rel_tol=1e-6)
    lo, hi = interval([1.0, np.nan], [0.1, 0.1], 0.95)
    assert math.isclose(lo[0], 1 - 0.1959964, rel_tol=1e-6) and np.isnan(hi[1])
    for bad in (0, 1, 1.5):
        with pytest.raises(ValueError, match="level"):
            z_value(bad)


def test_the_1d_plot_draws_the_bands_and_the_file_says_what_loss_se_is(workdir):
    job = write_job(workdir / "job.yaml", grid={"x": [-1.0, 1.0, 5], "y": None})
    run(["lldist.surface", job], workdir)
    with SurfaceReader("out.h5") as sf:
        assert sf.quantities == ["loss", "acc", "loss_se"]
        assert "standard error" in sf.f["test/loss_se"].attrs["long_name"]
        s = sf.read_all()
    from lldist.analysis import figures
    from lldist.analysis.figures import PlotOptions
    fig = figures.figure_1d(figures.drawable(s), PlotOptions())
    ax, ax2 = fig.axes
    band = ax.collections[0].get_paths()[0].vertices  # loss ± 1.96 se
    loss, se = s.values[("test", "loss")], s.values[("test", "loss_se")]
    assert np.isclose(band[:, 1].max(), np.max(loss + z_value(0.95) * se))
    acc_band = ax2.collections[0].get_paths()[0].vertices
    lo, hi = wilson(s.values[("test", "acc")], s.eval_samples["test"], 0.95)
    assert np.isclose(acc_band[:, 1].max(), 100 * hi.max()) and np.isclose(acc_band[:, 1].min(), 100 * lo.min())
