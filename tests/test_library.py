"""The library face beyond the landscape (issue 36): lldist.curvature and
lldist.sharpness_measures against an exact Hessian, a plain loop and the commands' own numbers,
the caller's model given back after Ctrl-C, a file that resumes, arguments refused by name,
names that no command module can replace, ls.metrics(), MPI, and a notebook that runs it all
on a user's own module."""

import copy
import inspect
import os
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import ROOT, env, model_and_data, mpiexec, run, write_job

import lldist
from lldist.store import SurfaceReader


class Small(torch.nn.Module):
    """A user's own module: not one lldist knows."""

    def __init__(self):
        super().__init__()
        self.a = torch.nn.Linear(5, 4)
        self.b = torch.nn.Linear(4, 3)

    def forward(self, x):
        return self.b(torch.tanh(self.a(x)))


def small(seed=0, n=96):
    torch.manual_seed(seed)
    x = torch.randn(n, 5)
    return Small(), (x, (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long())


def exact_hessian(model, x, y) -> torch.Tensor:
    """The Hessian of the mean cross-entropy in all parameters, in float64, by autograd."""
    from torch.func import functional_call
    named = [(n, p.detach().double()) for n, p in model.named_parameters()]
    flat = torch.cat([p.reshape(-1) for _, p in named])

    def f(v):
        ps, i = {}, 0
        for n, p in named:
            ps[n] = v[i:i + p.numel()].view(p.shape)
            i += p.numel()
        return F.cross_entropy(functional_call(model.double(), ps, (x.double(),)), y)
    h = torch.autograd.functional.hessian(f, flat)
    model.float()
    return h


def state_of(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def same_state(a, b) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_curvature_is_the_exact_hessians_and_the_model_comes_back():
    model, (x, y) = small()
    model.train()
    before = state_of(model)
    h = lldist.curvature(model, (x, y), top=3, batches=2, batch_size=48, trace_samples=400, density=True,
                         density_runs=2, density_steps=20)
    ev = torch.linalg.eigvalsh(exact_hessian(model, x, y)).numpy()
    np.testing.assert_allclose(h.top_eigenvalues, ev[::-1][:3], rtol=1e-4)
    assert h.lambda_max == h.top_eigenvalues[0]
    np.testing.assert_allclose(h.lambda_min, ev[0], rtol=1e-4)
    tr = float(np.sum(ev))
    assert abs(h.trace - tr) < 4 * h.trace_stderr, (h.trace, h.trace_stderr, tr)
    assert h.density_nodes.shape == (2, 20) and np.isclose(h.density_weights.sum(axis=1), 1).all()
    assert h.num_parameters == sum(p.numel() for p in model.parameters()) and h.split == "train"
    np.testing.assert_allclose(h.loss, F.cross_entropy(model(x), y).item(), rtol=1e-6)
    assert same_state(before, model.state_dict()) and model.training
    assert h.plot(dpi=50).get_dpi() == 50  # the density


def test_the_calls_are_the_functions_whatever_command_module_is_imported():
    """A package attribute named like a command module would be replaced by the module once
    anything imports it: the face's names are not theirs."""
    import lldist.hessian  # noqa: F401
    import lldist.sharpness  # noqa: F401
    for name in ("landscape", "curvature", "sharpness_measures", "open"):
        f = getattr(lldist, name)
        assert inspect.isfunction(f), (name, f)
        assert name in dir(lldist) and f.__doc__
    assert "operator" in inspect.signature(lldist.curvature).parameters
    assert "x" in inspect.signature(lldist.landscape).parameters


def test_ctrl_c_inside_gives_the_model_back_exactly():
    model, (x, y) = small()
    model.train()
    before = state_of(model)
    calls = [0]

    def loss(outputs, batch):  # Ctrl-C in the middle of the products
        calls[0] += 1
        if calls[0] > 12:
            raise KeyboardInterrupt
        return F.cross_entropy(outputs, batch[1], reduction="none")
    for call in (lldist.curvature, lldist.sharpness_measures):
        calls[0] = 0
        with pytest.raises(KeyboardInterrupt):
            call(model, (x, y), loss=loss, **({"top": 2} if call is lldist.curvature else
                                              {"examples": 96, "m": 16, "draws": 4}))
        assert calls[0] > 12 and same_state(before, model.state_dict()) and model.training


def test_out_keeps_the_result_and_a_rerun_reads_it(workdir):
    model, (x, y) = small()
    calls = [0]  # forward passes, counted by a hook (which no identity sees)
    model.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    kw = dict(top=2, batches=2, batch_size=48, trace_samples=4, out="h.h5", threads=1)  # (no thread timing)
    first = lldist.curvature(model, (x, y), **kw)
    assert calls[0] > 0
    calls[0] = 0
    again = lldist.curvature(model, (x, y), **kw)
    # one call: the loss tried on two examples before the file is opened; no product, no cell
    assert calls[0] == 1 and again.lambda_max == first.lambda_max and again.trace == first.trace
    with SurfaceReader("h.h5") as sf:
        assert sf.curvature()["train"]["lambda_max"] == first.lambda_max
    more = lldist.curvature(model, (x, y), **{**kw, "top": 3})  # more asked: computed again
    assert calls[0] > 1 and len(more.top_eigenvalues) == 3
    other, _ = small(seed=1)  # another model's numbers never go into this file
    with pytest.raises(ValueError, match="out="):
        lldist.curvature(other, (x, y), **kw)
    s = lldist.sharpness_measures(model, (x, y), examples=96, m=16, draws=4, restarts=2, steps=3, out="h.h5")
    assert lldist.open("h.h5").sharpness["train"]["worst_2"] == s.worst_2


def test_arguments_are_refused_by_name():
    model, data = small()
    for kw, kind, words in (({"top": 0}, ValueError, "'top'"), ({"tops": 1}, TypeError, "'tops'"),
                            ({"split": "val"}, ValueError, "split"), ({"operator": "gauss"}, ValueError, "operator"),
                            ({"out": 3}, TypeError, "out"), ({"blocks": "rows"}, ValueError, "blocks")):
        with pytest.raises(kind, match=words):
            lldist.curvature(model, data, **kw)
    with pytest.raises(TypeError, match="model"):
        lldist.curvature("model.pt", data)
    with pytest.raises(ValueError, match="'rho_2'"):
        lldist.sharpness_measures(model, data, rho_2=-1)
    with pytest.raises(ValueError, match="'m'"):
        lldist.sharpness_measures(model, data, m=4096)


def test_sharpness_measures_at_theta_star_against_a_plain_loop():
    model, (x, y) = small()
    before = state_of(model)
    kw = dict(examples=64, m=16, draws=8, restarts=2, steps=5, batch_size=32)
    s = lldist.sharpness_measures(model, (x, y), **kw)
    np.testing.assert_allclose(s.loss, F.cross_entropy(model(x[:64]), y[:64]).item(), rtol=1e-6)
    assert s.examples == 64 and s.worst_2 >= s.average_2 - 3 * s.average_2_se
    assert s.worst_2 > 0 and s.worst_inf > 0 and s.pac_bayes_flatness == pytest.approx(1 / s.pac_bayes_sigma ** 2)
    assert same_state(before, model.state_dict())
    again = lldist.sharpness_measures(model, (x, y), **kw)  # seeded: the same numbers
    assert again.stored == {**s.stored, "seconds": again.stored["seconds"]}


@pytest.mark.slow
def test_the_calls_equal_the_commands(workdir):
    """lldist.curvature and sharpness_measures on the job's model and data give the numbers
    python -m lldist.hessian and lldist.sharpness store."""
    job = write_job(workdir / "job.yaml", sharpness={"examples": 60, "m": 20, "draws": 4, "restarts": 2, "steps": 3})
    run(["lldist.train", job], workdir)
    run(["lldist.surface", job], workdir)
    flags = ["--top", "2", "--batches", "2", "--trace-samples", "4", "--split", "test"]
    run(["lldist.hessian", job, *flags], workdir)
    run(["lldist.sharpness", job, "--set", "sharpness.split=test"], workdir)
    model, data = model_and_data(job, "model.pt")
    xy = (data.normalize(data.x), data.y)
    h = lldist.curvature(model, xy, split="test", top=2, batches=2, trace_samples=4, batch_size=50, threads=1)
    s = lldist.sharpness_measures(model, xy, split="test", examples=60, m=20, draws=4, restarts=2, steps=3,
                                  batch_size=50, threads=1)
    ls = lldist.open("out.h5")
    c = ls.curvature["test"]
    assert list(h.top_eigenvalues) == list(c["top_eigenvalues"]) and h.trace == c["trace"]
    assert h.lambda_min == c["lambda_min"] and h.lambda_max_se == c["lambda_max_se"]
    stored = ls.sharpness["test"]
    for k in ("worst_2", "worst_inf", "average_2", "sam", "pac_bayes_sigma"):
        assert getattr(s, k) == stored[k], k
    m = ls.metrics()  # and the landscape's measures, the metrics command's
    j = ls.x.size // 2, ls.y.size // 2
    assert m["centre_loss"] == pytest.approx(float(ls.loss[j[1], j[0]])) and m["hessian_lambda_max"] == h.lambda_max
    assert m["sharp_worst_l2"] == s.worst_2
    with pytest.raises(ValueError, match="split"):
        ls.metrics(split="train")


@pytest.mark.slow
def test_the_calls_over_mpi_ranks_equal_one_process(workdir):
    script = workdir / "script.py"
    script.write_text(f"""
import sys, json
sys.path.insert(0, {os.path.join(ROOT, 'tests')!r})
import lldist
from test_library import small
model, data = small()
h = lldist.curvature(model, data, top=2, batches=4, batch_size=24, trace_samples=8)
s = lldist.sharpness_measures(model, data, examples=96, m=16, draws=6, restarts=3, steps=3, batch_size=24)
if h is not None:
    json.dump({{"top": list(h.top_eigenvalues), "trace": h.trace, "worst": s.worst_2, "avg": s.average_2,
               "sam": s.sam}}, open(sys.argv[1], "w"))
""")
    run([sys.executable, str(script), "one.json"], workdir)
    run([mpiexec(), "-n", "2", sys.executable, str(script), "two.json"], workdir)
    import json
    one, two = json.load(open("one.json")), json.load(open("two.json"))
    np.testing.assert_allclose(two["top"], one["top"], rtol=1e-6)
    assert two["trace"] == pytest.approx(one["trace"], rel=1e-6)
    for k in ("worst", "avg", "sam"):  # the same draws in index order on any number of ranks
        assert two[k] == pytest.approx(one[k], rel=1e-6), k


@pytest.mark.slow
def test_the_notebook_runs_on_a_users_own_module(workdir, monkeypatch):
    """docs/notebook.ipynb, executed as Jupyter would: a landscape, the Hessian, the sharpness
    measures, the metrics and a curve between two minima of a module defined in the notebook."""
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    nb = nbformat.read(os.path.join(ROOT, "docs", "notebook.ipynb"), as_version=4)
    for k, v in env().items():  # the kernel imports this tree's lldist
        monkeypatch.setenv(k, v)
    nbclient.NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(workdir)}}
                            ).execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    text = "".join(o.get("text", "") + str(o.get("data", {}).get("text/plain", "")) for o in outputs)
    assert "<Curvature hessian" in text and "<Sharpness" in text and "centre_loss" in text and "<Connection" in text
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    # ls.plot() and h.plot() as a cell's last line: one figure each, not two
    per_cell = [sum("image/png" in o.get("data", {}) for o in c.get("outputs", [])) for c in nb.cells
                if c.cell_type == "code" and c.source.strip().splitlines()[-1].endswith(".plot()")]
    assert images and per_cell and all(n == 1 for n in per_cell), per_cell


def _minimum(seed, x, y):
    torch.manual_seed(seed)
    m = torch.nn.Sequential(torch.nn.Linear(5, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))
    opt = torch.optim.Adam(m.parameters(), lr=1e-2)
    for _ in range(150):
        opt.zero_grad()
        F.cross_entropy(m(x), y).backward()
        opt.step()
    return m


def test_connect_minima_trains_a_curve_whose_points_are_the_bezier_of_its_files(workdir):
    torch.manual_seed(0)
    x = torch.randn(240, 5)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()
    a, b = _minimum(1, x, y), _minimum(2, x, y)
    before = state_of(a), state_of(b)
    c = lldist.connect_minima(a, b, (x, y), train=(x, y), split="train", epochs=15, lr=1e-2, batch_size=40,
                              points=5, plane=0, out="ab", threads=1, progress_every=0)
    assert same_state(before[0], a.state_dict()) and same_state(before[1], b.state_dict())
    assert c.plane is None and list(c.t) == [0, 0.25, 0.5, 0.75, 1]
    bend = torch.load("ab/bend.pt", weights_only=True)["state_dict"]
    mid = {k: 0.25 * a.state_dict()[k] + 0.5 * bend[k] + 0.25 * b.state_dict()[k] for k in bend}
    probe = copy.deepcopy(a)
    probe.load_state_dict(mid)
    with torch.no_grad():  # a plain evaluation of the quadratic Bezier curve at t = 0.5, and of the ends
        want = [F.cross_entropy(m(x), y).item() for m in (a, probe, b)]
    np.testing.assert_allclose(c.curve.loss[[0, 2, 4]], want, rtol=1e-5)
    assert c.line.loss[0] == c.curve.loss[0] and c.line.loss[-1] == c.curve.loss[-1]
    assert c.barrier("curve")["barrier_loss"] < c.barrier("line")["barrier_loss"]  # the bend was trained
    stamp = os.path.getmtime("ab/bend.pt")
    again = lldist.connect_minima(a, b, (x, y), train=(x, y), split="train", epochs=15, lr=1e-2, batch_size=40,
                                  points=5, plane=0, out="ab", threads=1, progress_every=0)
    assert os.path.getmtime("ab/bend.pt") == stamp and np.array_equal(again.curve.loss, c.curve.loss)
    with pytest.raises(ValueError, match="same weights"):
        lldist.connect_minima(a, copy.deepcopy(a), (x, y), train=(x, y))
    with pytest.raises(TypeError, match="train"):
        lldist.connect_minima(a, b, (x, y), train=[(x, y)])
    # the bend's training settings are checked as a job file's train: section (they went unchecked:
    # epochs=0 saved an untrained bend, lr=-1 met Adam's own words)
    with pytest.raises(ValueError, match="'lr' must be positive"):
        lldist.connect_minima(a, b, (x, y), train=(x, y), lr=-1.0, out="bad")
    with pytest.raises(ValueError, match="epochs"):
        lldist.connect_minima(a, b, (x, y), train=(x, y), epochs=0, out="bad")
    bn = [torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 3)) for _ in "ab"]
    with pytest.raises(ValueError, match="BatchNorm"):
        lldist.connect_minima(*bn, (x, y), train=(x, y))
