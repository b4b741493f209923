"""lldist from Python (lldist.landscape, lldist.open): the same numbers as the command line,
any loss and batch layout against a plain loop, MPI, and arguments checked where they enter."""

import math
import os
import sys

import h5py
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import ROOT, model_and_data, mpiexec, run, write_job

from lldist.directions.kinds import as_tensors
import lldist
from lldist.config import DataConfig
from lldist.store import SurfaceReader
from lldist.workloads.data import load_split


def digits(n=120):
    ts = load_split(DataConfig(subset=n), "test")
    return ts.normalize(ts.x), ts.y


def at(model, theta, dirs, a, b):
    """The plain way to put a model at theta + a dx + b dy."""
    state = {k: theta[k] + a * dirs.x[k] + (b * dirs.y[k] if dirs.y is not None else 0) for k in theta}
    model.load_state_dict(state, strict=False)
    return model.eval()


def file_dirs(path):
    with SurfaceReader(path) as sf:
        return as_tensors(sf.read_directions())


@pytest.mark.slow
def test_api_equals_cli_bit_for_bit(workdir):
    job = write_job(workdir / "job.yaml")
    run(["lldist.train", job], workdir)
    run(["lldist.surface", job], workdir)
    model, data = model_and_data(job, "model.pt")
    ls = lldist.landscape(model, (data.normalize(data.x), data.y), x=(-1.0, 1.0, 7), y=(-0.5, 0.5, 5),
                          directions={"seed": 3, "norm": "filter", "ignore": "biasbn"}, batch_size=50, threads=1,
                          out="api.h5")
    with h5py.File("out.h5", "r") as f:
        np.testing.assert_array_equal(ls.loss, f["test/loss"][()])
        np.testing.assert_array_equal(ls["test/acc"], f["test/acc"][()])
        np.testing.assert_array_equal(ls.x, f["x"][()])
    assert ls.done.all() and ls.quantities == ["loss", "acc", "loss_se"]
    assert lldist.open("api.h5").loss.shape == (5, 7)


class DictModel(torch.nn.Module):
    """Called HuggingFace style: model(pixels=..., extra=...) -> an object with .logits."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 12), torch.nn.Tanh(),
                                       torch.nn.Linear(12, 10))

    def forward(self, pixels, scale):
        class Out:
            pass
        o = Out()
        o.logits = self.net(pixels) * scale[:, None]
        return o


def test_custom_loss_and_dict_batches_match_a_plain_loop(workdir):
    x, y = digits(90)
    batches = [{"pixels": x[i:i + 40], "scale": torch.full((len(x[i:i + 40]),), 1.5), "labels": y[i:i + 40]}
               for i in range(0, 90, 40)]  # ragged: 40, 40, 10

    def smooth_ce(out, batch):
        return F.cross_entropy(out, batch["labels"], reduction="none", label_smoothing=0.1)

    def margin(out, batch):
        top = out.topk(2, dim=1).values
        return top[:, 0] - top[:, 1]
    model = DictModel()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ls = lldist.landscape(model, batches, x=(-1, 1, 4), y=(-1, 1, 3), loss=smooth_ce, metrics={"margin": margin},
                          out="d.h5")
    assert ls.quantities == ["loss", "margin", "loss_se"]
    for k, v in model.state_dict().items():  # the caller's model is back at theta*
        assert torch.equal(v, before[k])
    dirs, ref = file_dirs("d.h5"), DictModel()
    theta = {k: v.clone() for k, v in ref.state_dict().items()}
    for iy, b in enumerate(ls.y):
        for ix, a in enumerate(ls.x):
            m = at(ref, theta, dirs, a, b)
            with torch.no_grad():
                outs = [m(pixels=bt["pixels"], scale=bt["scale"]).logits for bt in batches]
            loss = sum(float(smooth_ce(o, bt).sum()) for o, bt in zip(outs, batches)) / 90
            mar = sum(float(margin(o, bt).sum()) for o, bt in zip(outs, batches)) / 90
            assert math.isclose(ls.loss[iy, ix], loss, rel_tol=1e-5)
            assert math.isclose(ls.margin[iy, ix], mar, rel_tol=1e-5)


class TinyLM(torch.nn.Module):
    """A causal language model in miniature: embedding, a causal mixing layer, logits."""

    def __init__(self, vocab=11, width=8):
        super().__init__()
        torch.manual_seed(2)
        self.emb = torch.nn.Embedding(vocab, width)
        self.mix = torch.nn.Linear(width, width)
        self.norm = torch.nn.LayerNorm(width)
        self.head = torch.nn.Linear(width, vocab)

    def forward(self, input_ids, attention_mask=None):
        h = self.emb(input_ids)  # (B, T, W)
        h = torch.cumsum(h, dim=1) / torch.arange(1, h.shape[1] + 1).view(1, -1, 1)  # causal mean
        return (self.head(self.norm(torch.tanh(self.mix(h)))),)  # a tuple, as some models return


def test_language_model_loss_and_perplexity_match_a_plain_loop(workdir):
    g = torch.Generator().manual_seed(0)
    batches = []
    for lengths in ([7, 4, 6], [3, 7]):  # padded to 7 with a mask
        ids = torch.randint(0, 11, (len(lengths), 7), generator=g)
        mask = torch.tensor([[1] * n + [0] * (7 - n) for n in lengths])
        batches.append({"input_ids": ids, "attention_mask": mask})
    ls = lldist.landscape(TinyLM(), batches, x=(-1, 1, 3), y=(-0.5, 0.5, 2), loss="lm", out="lm.h5")
    assert ls.quantities == ["loss", "acc", "perplexity", "loss_se"]
    dirs, ref = file_dirs("lm.h5"), TinyLM()
    theta = {k: v.clone() for k, v in ref.state_dict().items()}
    for iy, b in enumerate(ls.y):
        for ix, a in enumerate(ls.x):
            m = at(ref, theta, dirs, a, b)
            tot, hit, count, seqs = 0.0, 0, 0, []
            with torch.no_grad():
                for bt in batches:
                    logits = m(bt["input_ids"])[0]
                    for i in range(len(bt["input_ids"])):
                        v = w = 0
                        for t in range(1, int(bt["attention_mask"][i].sum())):  # each real next token
                            v += float(F.cross_entropy(logits[i, t - 1], bt["input_ids"][i, t]))
                            hit += int(logits[i, t - 1].argmax() == bt["input_ids"][i, t])
                            w += 1
                        tot, count = tot + v, count + w
                        seqs.append((v, w))
            assert math.isclose(ls.loss[iy, ix], tot / count, rel_tol=1e-5)
            # the standard error over sequences (the sampling unit) of the ratio Σv/Σw, in numpy
            v, w = np.array(seqs).T
            se = np.sqrt(len(v) / (len(v) - 1) * np.sum((v - tot / count * w) ** 2)) / w.sum()
            assert math.isclose(ls.loss_se[iy, ix], se, rel_tol=1e-4)
            assert ls.acc[iy, ix] == hit / count
            assert math.isclose(ls.perplexity[iy, ix], math.exp(tot / count), rel_tol=1e-5)


def test_regression_with_mse(workdir):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 3, generator=g)
    y = x @ torch.tensor([1.0, -2.0, 0.5]) + 0.1 * torch.randn(64, generator=g)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 1), torch.nn.Flatten(0))
    ls = lldist.landscape(model, (x, y), x=(-2, 2, 5), y=None, loss="mse", batch_size=20, out="r.h5",
                          directions={"ignore": "none"})
    assert ls.quantities == ["loss", "loss_se"] and ls.y is None
    dirs = file_dirs("r.h5")
    theta = {k: v.clone() for k, v in model.state_dict().items()}
    for ix, a in enumerate(ls.x):
        with torch.no_grad():
            want = float(((at(model, theta, dirs, a, 0)(x) - y) ** 2).mean())
        assert math.isclose(ls.loss[ix], want, rel_tol=1e-5)
    lldist.open("r.h5").plot()  # a 1D curve of the loss alone


SCRIPT = '''
import sys, torch, lldist
from lldist.config import DataConfig
from lldist.workloads.data import load_split
ts = load_split(DataConfig(subset=100), "test")
torch.manual_seed(0)
class Paced(torch.nn.Sequential):  # 20 ms a batch: the run outlasts every rank's start-up, so all take part
    def forward(self, x):
        import time
        time.sleep(0.02)
        return super().forward(x)
model = Paced(torch.nn.Flatten(), torch.nn.Linear(64, 16), torch.nn.ReLU(), torch.nn.Linear(16, 10))
ls = lldist.landscape(model, (ts.normalize(ts.x), ts.y), x=(-1, 1, 6), y=(-1, 1, 5), out=sys.argv[1],
                      batch_size=50, chunk_size=2, threads=1)
import os
with open(sys.argv[1] + "." + os.environ.get("PMI_RANK", "0") + ".ret", "w") as f:  # one file per rank
    f.write("landscape" if ls is not None else "None")
'''


@pytest.mark.slow
def test_a_script_under_mpi_equals_one_process(workdir):
    with open("script.py", "w") as f:
        f.write(SCRIPT)
    run([sys.executable, "script.py", "one.h5"], workdir)
    assert open("one.h5.0.ret").read() == "landscape"
    run([mpiexec(), "-n", "3", sys.executable, "script.py", "three.h5"], workdir)
    assert [open(f"three.h5.{r}.ret").read() for r in range(3)] == ["landscape", "None", "None"]
    with h5py.File("one.h5", "r") as a, h5py.File("three.h5", "r") as b:
        np.testing.assert_array_equal(a["test/loss"][()], b["test/loss"][()])
        np.testing.assert_array_equal(a["test/acc"][()], b["test/acc"][()])
        ranks = set(b["chunks"][: b["nchunks"][()]]["rank"].tolist())
    assert ranks == {0, 1, 2}
    # the same call again resumes: nothing left to compute
    assert " 0 to compute" in run([sys.executable, "script.py", "one.h5"], workdir).stdout


def test_open_an_incomplete_file(workdir):
    x, y = digits(60)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10))
    lldist.landscape(model, (x, y), x=(-1, 1, 4), y=(-1, 1, 3), out="p.h5")
    with h5py.File("p.h5", "r+") as f:
        f["done"][1, 2] = False
    ls = lldist.open("p.h5")
    assert np.isnan(ls.loss[1, 2]) and np.isfinite(ls.loss[0]).all() and ls.fraction_done == 11 / 12
    assert "11/12 cells done" in repr(ls)
    with pytest.raises(KeyError, match="train/loss"):
        ls["train/loss"]


@pytest.mark.parametrize("call,error,names", [
    (lambda d: lldist.landscape("not a model", d), TypeError, "model"),
    (lambda d: lldist.landscape(torch.nn.Linear(64, 10), 42), TypeError, "data"),
    (lambda d: lldist.landscape(torch.nn.Linear(64, 10), d, x=(1, 2)), ValueError, "x must be (min, max, num)"),
    (lambda d: lldist.landscape(torch.nn.Linear(64, 10), d, y=(-1, 1, 0)), ValueError, "y: num"),
    (lambda d: lldist.landscape(torch.nn.Linear(64, 10), d, bach_size=3), TypeError, "'bach_size'"),
    (lambda d: lldist.landscape(torch.nn.Linear(64, 10), d, precision="fp8"), ValueError, "'precision'"),
    (lambda d: lldist.landscape(torch.nn.Linear(64, 10), d, loss="hinge"), ValueError, "loss 'hinge'"),
    (lambda d: lldist.landscape(torch.nn.Linear(64, 10), d, metrics=[len]), TypeError, "metrics"),
    (lambda d: lldist.landscape(torch.nn.Linear(64, 10), d, split="val"), ValueError, "split"),
    (lambda d: lldist.landscape(torch.nn.Linear(64, 10), d, directions={"sead": 1}), ValueError, "'sead'"),
    (lambda d: lldist.landscape(torch.nn.Linear(64, 10), d, x=(-1, float("inf"), 3)), ValueError, "finite"),
], ids=["model", "data", "x", "y", "kwarg", "precision", "loss", "metrics", "split", "directions", "inf"])
def test_bad_arguments_name_themselves(workdir, call, error, names):
    x, y = digits(20)
    with pytest.raises(error, match=names.replace("(", r"\(").replace(")", r"\)")):
        call((x.flatten(1), y))
    assert not os.listdir(workdir)  # nothing was written


def test_job_file_loss_and_metrics(workdir):
    job = write_job(workdir / "job.yaml", train=None,
                    model={"name": "python:userfactories:tiny_model", "checkpoint": None, "args": {}},
                    data={"name": "python:userfactories:blobs"},
                    eval={"loss": "python:userfactories:hinge", "metrics": {"top2": "python:userfactories:top2"}},
                    grid={"x": [-1, 1, 3], "y": None})
    run(["lldist.surface", job], workdir)
    with h5py.File("out.h5", "r") as f:
        assert [k for k in f["test"]] == ["loss", "loss_se", "top2"]  # a loss of one's own brings no accuracy
        assert f["test/loss"].attrs["long_name"] == "mean loss (userfactories.hinge) on the test split"
        top2 = f["test/top2"][()]
        assert ((top2 >= 0) & (top2 <= 1)).all() and (f["test/loss"][()] > 0).all()
    p = run(["lldist.surface", job, "--set", "eval.metrics=null"], workdir, check=False)
    assert p.returncode == 2 and "different job" in p.stderr
    run(["lldist.plot", "out.h5"], workdir)


@pytest.mark.slow
def test_the_walkthrough_runs(workdir):
    p = run([sys.executable, os.path.join(ROOT, "docs", "walkthrough.py"), str(workdir)], workdir, timeout=600)
    assert "compared 2 landscapes" in p.stdout
    for name in ("walkthrough_contours.png", "walkthrough_compare.png"):
        assert os.path.getsize(workdir / name) > 10000
