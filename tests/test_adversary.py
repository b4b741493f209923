"""What the second adversarial try found (issue 19), each case as it was reported: the numbers
that were silently wrong, the errors that escaped as the wrong thing, and the files and inputs
that were not checked. GPT-2's normalization axis and centred PCA are tested beside their
kin (test_text.py, test_curvature.py)."""

import errno
import glob
import os
import signal
import subprocess
import sys
import time

import h5py
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import env, mpiexec, run, write_job

import lldist
from lldist import surface
from lldist.errors import run_cli

# ----------------------------------------------------------------------------- helpers


def fails(capsys, main, argv, expect):
    """One line on stderr naming the problem, exit status 2, no traceback."""
    code = run_cli(main, argv)
    err = capsys.readouterr().err
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("lldist: error:"), err
    assert expect in lines[0], lines[0]
    return lines[0]


def blobs(n=96, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 3
    return 3 * torch.eye(3, 6)[y] + torch.randn(n, 6, generator=g), y


def tiny():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))


def quick(model, data, **kw):
    kw.setdefault("x", (-1, 1, 3))
    kw.setdefault("y", None)
    kw.setdefault("threads", 1)  # (no thread timing: a model that raises after n forwards counts the cells' own)
    return lldist.landscape(model, data, progress_every=0, **kw)


# ----------------------------------------------------------------------------- wrong numbers

def test_a_loss_that_averages_per_batch_is_refused_naming_loss():
    """With batches of 40, 40 and 16 a per-batch mean gives 1.16529 where the mean is 1.19214."""
    x, y = blobs()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=40)
    for loss in (lambda o, b: F.cross_entropy(o, b[1]), lambda o, b: F.cross_entropy(o, b[1], reduction="sum")):
        with pytest.raises(ValueError, match=r"^loss: returned a tensor of shape \(\)"):
            quick(tiny(), loader, loss=loss)
    with pytest.raises(ValueError, match=r"metrics\['top'\]: returned"):
        quick(tiny(), loader, metrics={"top": lambda o, b: (o.argmax(1) == b[1]).float().mean()})
    # per example: accepted, and the mean over the uneven batches is the plain one
    ls = quick(tiny(), loader, loss=lambda o, b: F.cross_entropy(o, b[1], reduction="none"), x=(0, 0, 1))
    m = tiny()
    assert ls.loss[0] == pytest.approx(float(F.cross_entropy(m(x), y).detach()), rel=1e-6)


def my_hinge(outputs, batch):
    return F.multi_margin_loss(outputs, batch[1], reduction="none")


def test_the_file_records_the_callables_own_names():
    x, y = blobs()
    ls = quick(tiny(), (x, y), loss=my_hinge, metrics={"top2": lambda o, b: (o.topk(2, 1).indices == b[1][:, None])
                                                       .any(1).float()})
    with h5py.File(ls.path, "r") as f:
        text = f.attrs["job_yaml"]
    assert "loss: object:test_adversary.my_hinge" in text and "cross_entropy" not in text
    assert "top2: object:test_adversary.test_the_file_records_the_callables_own_names.<locals>.<lambda>" in text


def test_non_finite_inputs_are_refused(workdir, capsys):
    x, y = blobs()
    x[5, 2], x[7, 0] = float("nan"), float("inf")
    with pytest.raises(ValueError, match="data: the inputs hold 2 NaN or infinite values"):
        quick(tiny(), (x, y))
    # a job file's own data factory: one line, exit 2, before any file
    job = write_job(workdir / "job.yaml", train=None, model={"name": "python:userfactories:tiny_model", "checkpoint": None, "args": {}},
                    data={"name": "python:userfactories:with_nan", "subset": None})
    fails(capsys, surface.main, [job], "inputs hold 1 NaN or infinite values")
    assert not os.path.exists("out.h5")


# ----------------------------------------------------------------------------- errors as the right thing

class Raising(torch.nn.Module):
    def __init__(self, exc, after):
        super().__init__()
        self.fc, self.exc, self.after, self.calls = torch.nn.Linear(6, 3), exc, after, 0

    def forward(self, x):
        self.calls += 1
        if self.calls > self.after:
            raise self.exc
        return self.fc(x)


def test_the_api_raises_the_users_own_exception_and_restores_theta():
    x, y = blobs()
    boom = ZeroDivisionError("inside my forward")
    model = Raising(boom, after=2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ZeroDivisionError) as info:
        quick(model, (x, y), batch_size=32, x=(-1, 1, 5))
    assert info.value is boom and any("failed in chunk" in n for n in info.value.__notes__)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])

    def loss(o, b):
        raise KeyError("my loss")
    with pytest.raises(KeyError, match="my loss"):
        quick(tiny(), (x, y), loss=loss)
    # Ctrl-C in the middle: a KeyboardInterrupt, not SystemExit, theta* back
    model = Raising(KeyboardInterrupt(), after=3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(KeyboardInterrupt):
        quick(model, (x, y), batch_size=32, x=(-1, 1, 5))
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])


def test_bad_data_and_outputs_are_value_errors_naming_the_argument():
    x, y = blobs()
    with pytest.raises(ValueError, match="^data: x and y hold no examples"):
        quick(tiny(), (x[:0], y[:0]))
    with pytest.raises(ValueError, match="dict batches need a 'labels'"):
        quick(tiny(), [{"input": x[:10]}])
    two_classes = torch.nn.Linear(6, 2)  # labels go to 2
    with pytest.raises(ValueError, match="^loss cross_entropy: cannot take the model's output"):
        quick(two_classes, (x, y))


def test_a_target_of_another_shape_names_target():
    x, y = blobs()
    other = torch.nn.Sequential(torch.nn.Linear(6, 9), torch.nn.Tanh(), torch.nn.Linear(9, 3))
    with pytest.raises(ValueError, match=r"^target: '0.weight' has shape \(9, 6\), the model's \(8, 6\)"):
        quick(tiny(), (x, y), target=other)


def test_open_refuses_bad_files_as_value_errors(tmp_path):
    assert issubclass(lldist.UserError, ValueError)
    p = tmp_path / "fmt.h5"
    with h5py.File(p, "w") as f:
        f.attrs["format"] = "lldist.surface"
    with pytest.raises(ValueError, match="lacks splits, format_version, done, x, directions"):
        lldist.open(str(p))
    with h5py.File(tmp_path / "other.h5", "w") as f:
        f["a"] = 1
    with pytest.raises(lldist.UserError, match="not an lldist surface"):
        lldist.open(str(tmp_path / "other.h5"))


def test_api_refusals_speak_python(tmp_path):
    x, y = blobs()
    out = str(tmp_path / "s.h5")
    quick(tiny(), (x, y), out=out)
    with pytest.raises(ValueError, match="pass another out= for a new file, or resume=False") as info:
        quick(tiny(), (x, y), out=out, x=(-2, 2, 3))
    assert "--out" not in str(info.value)


def test_pca_directions_from_the_api(tmp_path):
    """directions={"kind": "pca", "checkpoints": ...} with a model object: the checkpoints are
    loaded into copies of the caller's model."""
    x, y = blobs()
    model = tiny()
    opt = torch.optim.SGD(model.parameters(), lr=0.2)
    for epoch in range(4):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        torch.save(model.state_dict(), tmp_path / f"m_epoch{epoch}.pt")
    ls = quick(model, (x, y), y=(-1, 1, 3), directions={"kind": "pca", "checkpoints": str(tmp_path / "m_epoch*.pt")})
    assert ls.trajectory.shape == (4, 2) and np.isfinite(ls.loss).all()


# ----------------------------------------------------------------------------- the command line

def test_ctrl_c_on_the_command_line_is_one_line_and_130(workdir):
    job = write_job(workdir / "job.yaml", train=None, grid={"x": [-1, 1, 200], "y": None},
                    model={"name": "python:lldist.workloads.synthetic:fixed_cost", "checkpoint": None,
                           "args": {"seconds": 0.02}})
    # SIGINT's default restored in the child: a test run started in the background (`pytest &`)
    # ignores SIGINT, the child would inherit that, and Python then installs no Ctrl-C handler
    p = subprocess.Popen([sys.executable, "-m", "lldist.surface", job, "--progress-every", "0.1"], cwd=workdir,
                         env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    _wait_for_cells(p)
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 130, err
    assert "Traceback" not in err and err.strip().splitlines()[-1] == \
        "lldist: interrupted; what is finished is kept: run the same command to resume"  # (it said nothing of that)
    with h5py.File(workdir / "out.h5", "r") as f:
        assert 0 < f["done"][()].sum() < 200  # what was finished is kept


def _wait_for_cells(p, timeout=60):
    t0 = time.time()
    while time.time() - t0 < timeout:
        line = p.stderr.readline()
        if line.startswith("cells ") and not line.startswith("cells 0/"):
            return
    raise AssertionError("no progress line")


@pytest.mark.slow
def test_ctrl_c_under_mpiexec_is_one_line_and_130(workdir):
    job = write_job(workdir / "job.yaml", train=None, grid={"x": [-1, 1, 300], "y": None},
                    model={"name": "python:lldist.workloads.synthetic:fixed_cost", "checkpoint": None,
                           "args": {"seconds": 0.02}})
    p = subprocess.Popen([mpiexec(), "-n", "2", sys.executable, "-m", "lldist.surface", job, "--progress-every", "0.1"],
                         cwd=workdir, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         start_new_session=True)
    _wait_for_cells(p)
    os.killpg(p.pid, signal.SIGINT)  # what a terminal's Ctrl-C does: the whole foreground group
    _, err = p.communicate(timeout=60)
    assert p.returncode == 130, err
    assert "Traceback" not in err, err
    assert [ln for ln in err.splitlines() if "interrupted" in ln] == \
        ["lldist: interrupted: finished cells are saved; run the same command to resume"]


def test_the_lock_needs_no_free_space(workdir, monkeypatch):
    """A half-done surface resumes on a full disk: the lock is the flock, the owner's line is
    written only if it fits (it used to raise ENOSPC and leave an empty lock)."""
    from lldist.store import output as store
    job = write_job(workdir / "job.yaml", train=None, model={"name": "python:userfactories:tiny_model",
                                                             "checkpoint": None, "args": {}},
                    data={"name": "python:userfactories:blobs", "subset": None})
    run(["lldist.surface", job], workdir)
    with h5py.File("out.h5", "r+") as f:  # cut it short: the last cells not done
        d = f["done"][()]
        d[-1] = False
        f["done"][()] = d
    real_write = os.write

    def full(fd, data):
        if os.readlink(f"/proc/self/fd/{fd}").endswith(".lock"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(fd, data)
    monkeypatch.setattr(store.os, "write", full)
    assert run_cli(surface.main, [job]) == 0
    with h5py.File("out.h5", "r") as f:
        assert f["done"][()].all()
    assert not os.path.exists("out.h5.lock")


@pytest.mark.slow
def test_hessian_stores_only_into_a_surface_of_its_job(workdir, capsys):
    job = write_job(workdir / "job.yaml", grid={"x": [-1, 1, 3], "y": None},
                    model={"name": "mlp", "checkpoint": "model.pt", "args": {"hidden": [4]}})  # 310 parameters
    run(["lldist.surface", job], workdir)
    with h5py.File("foreign.h5", "w") as f:
        f["a"] = 1
    other = write_job(workdir / "other.yaml", output="other.h5", model={"name": "mlp", "checkpoint": "m2.pt",
                                                                        "args": {"hidden": [16]}},
                      train={"epochs": 1, "seed": 5}, grid={"x": [-1, 1, 3], "y": None})
    run(["lldist.surface", other], workdir)
    from lldist import hessian
    t0 = time.time()
    fails(capsys, hessian.main, [job, "--out", "foreign.h5", "--top", "1"], "not an lldist surface")
    fails(capsys, hessian.main, [job, "--out", "other.h5", "--top", "1"], "surface of another model or checkpoint")
    fails(capsys, hessian.main, [job, "--out", "nothere.h5", "--top", "1"], "--out nothere.h5 does not exist")
    fails(capsys, hessian.main, [job, "--top", "100000"], "at most 1000 eigenvalues")
    fails(capsys, hessian.main, [job, "--top", "999"], "parameters, so at most")
    assert time.time() - t0 < 20  # refused before the work
    with h5py.File("foreign.h5", "r") as f:
        assert list(f) == ["a"]
    assert run_cli(hessian.main, [job, "--top", "1", "--trace-samples", "2", "--batches", "1"]) == 0
    assert "stored in out.h5 under /curvature/test" in capsys.readouterr().out


def test_hf_data_arguments_are_checked_before_any_file(workdir, capsys):
    pytest.importorskip("transformers")
    import shutil
    root = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "jobs")
    os.makedirs("d")
    with open("d/train.csv", "w") as f:
        f.write("text,label,word\n" + "".join(f"a b c {i},{i % 2},w\n" for i in range(20)))
    with open("d/test.csv", "w") as f:
        f.write("text,label,word\n" + "".join(f"c b a {i},{-1 if i == 3 else i % 2},w\n" for i in range(10)))
    base = {"train": None, "model": {"name": f"hf:{root}/models/tiny_bert", "checkpoint": None},
            "eval": {"batch_size": 8}, "grid": {"x": [-1, 1, 3], "y": None}}
    cases = [({"label": "nolabel"}, "no label column 'nolabel'"),
             ({}, "holds -1 (hidden labels"),
             ({"label": "word"}, "holds str values such as 'w'"),
             ({"max_length": 0}, "max_length must be a whole number of tokens >= 2, got 0"),
             ({"max_length": -5}, "got -5"),
             ({"max_length": "word"}, "got 'word'")]
    for args, expect in cases:
        job = write_job(workdir / "job.yaml", data={"name": "hf:csv", "root": "d", "args": args}, **base)
        fails(capsys, surface.main, [job], expect)
        assert not os.path.exists("out.h5")
    # model errors name the model, not the tokenizer
    shutil.copytree(f"{root}/models/tiny_bert", "cut")
    with open("cut/config.json", "r+") as f:
        text = f.read()
        f.seek(0)
        f.truncate()
        f.write(text[:len(text) // 2])
    for name in ("hf:cut", "hf:nothere"):  # (a hub name offline: in a process of its own, hub offline)
        job = write_job(workdir / "job.yaml", data={"name": "hf:csv", "root": "d", "args": {"label": None}},
                        **{**base, "model": {"name": name, "checkpoint": None}})
        p = run(["lldist.surface", job], workdir, check=False, HF_HUB_OFFLINE=1)
        lines = p.stderr.strip().splitlines()
        assert p.returncode == 2 and len(lines) == 1 and f"model {name}: cannot read its config" in lines[0], p.stderr
        assert "tokenizer" not in lines[0]


def test_hf_errors_come_without_the_datasets_progress_bars(workdir):
    pytest.importorskip("datasets")
    os.makedirs("d")
    with open("d/train.csv", "w") as f:
        f.write("text,label\n" + "".join(f"x {i},{i % 2}\n" for i in range(10)))
    with open("d/test.csv", "w") as f:
        f.write("text,label\n" + "".join(f"x {i},{i % 2}\n" for i in range(10)))
    root = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "jobs")
    job = write_job(workdir / "job.yaml", train=None, model={"name": f"hf:{root}/models/tiny_bert", "checkpoint": None},
                    data={"name": "hf:csv", "root": "d", "args": {"text": "nottext"}})
    p = run(["lldist.surface", job], workdir, check=False)
    assert p.returncode == 2
    assert p.stderr.strip().splitlines() == [ln for ln in p.stderr.strip().splitlines() if ln.startswith("lldist:")]


def test_study_labels_must_be_plain_names(workdir, capsys):
    from lldist import study
    for label, expect in (("../../escaped", "is not a plain name"), (".hidden", "is not a plain name")):
        with open("s.yaml", "w") as f:
            f.write(f"name: s\nout: o\nbase: {{}}\nvariants: [{{label: '{label}'}}]\n")
        fails(capsys, study.main, ["s.yaml"], expect)
    assert not os.path.exists("escaped") and not os.path.exists("../escaped")
    for key in ("name", "out"):
        with open("s.yaml", "w") as f:
            f.write(f"{key}: 5\nbase: {{}}\n")
        fails(capsys, study.main, ["s.yaml"], f"'{key}' must be a non-empty string, got 5")


def test_metrics_take_a_finished_adaptive_surface(workdir):
    job = write_job(workdir / "job.yaml", train=None, grid={"x": [-1, 1, 41], "y": [-1, 1, 41], "adaptive": {}},
                    model={"name": "python:lldist.workloads.synthetic:fixed_cost", "checkpoint": None,
                           "args": {"seconds": 0.0}})
    run(["lldist.surface", job], workdir)
    with h5py.File("out.h5", "r") as f:
        assert not f["done"][()].all() and f.attrs["complete"]
    p = run(["lldist.metrics", "out.h5"], workdir)
    assert "centre_loss" in p.stdout


LEFTOVERS = [
    # (what, job overrides, command, extra argv, expected fragment)
    ("checkpoint meta is a tensor", None, "surface", [], None),
    ("train into a folder", {"model": {"name": "mlp", "checkpoint": "afolder", "args": {"hidden": [16]}}},
     "train", [], "afolder is a folder; training writes a file"),
    ("python: loss that is not callable", {"eval": {"loss": "python:os:sep"}}, "surface", [],
     "has no callable 'sep'"),
]


def test_first_round_leftovers(workdir, capsys):
    from lldist import bench, plot, train
    os.makedirs("afolder")
    # a checkpoint whose meta is a tensor loads; the meta is kept as a list
    from lldist.config import ModelConfig
    from lldist.workloads.models import build_model
    model = build_model(ModelConfig(name="mlp", args={"hidden": [16]}), (1, 8, 8), 10)
    torch.save({"state_dict": model.state_dict(), "meta": torch.arange(3.0)}, "ck.pt")
    job = write_job(workdir / "job.yaml", train=None, model={"name": "mlp", "checkpoint": "ck.pt",
                                                             "args": {"hidden": [16]}})
    assert run_cli(surface.main, [job, "--set", "grid.x=[-1,1,3]", "--set", "grid.y=null"]) == 0
    assert lldist.open("out.h5") is not None
    capsys.readouterr()
    # a pickled object: the message names the class and is not cut mid-sentence
    torch.save({"state_dict": model.state_dict(), "meta": {"obj": Raising(KeyError(), 0)}}, "obj.pt")
    line = fails(capsys, surface.main, [job, "--set", "model.checkpoint=obj.pt", "--out", "o2.h5"],
                 "holds a Python object (test_adversary.Raising)")
    assert line.endswith("as metadata")
    for what, overrides, command, extra, expect in LEFTOVERS[1:]:
        j = write_job(workdir / "j.yaml", **overrides)
        fails(capsys, {"surface": surface.main, "train": train.main}[command], [j, *extra], expect)
    # an HDF5 file with only the format attribute: one line from every reader
    with h5py.File("fmt.h5", "w") as f:
        f.attrs["format"] = "lldist.surface"
    from lldist import metrics
    from lldist import info
    for main in (plot.main, info.main, metrics.main):
        fails(capsys, main, ["fmt.h5"], "lacks splits")
    fails(capsys, bench.main, ["scaling", "--ranks", "0"], "argument --ranks: 0 must be at least 1")
    open("afile", "w").close()
    fails(capsys, plot.main, ["out.h5", "out.h5", "--compare", "--out", "afile"], "--out afile is a file")
    os.makedirs("ro")
    os.chmod("ro", 0o555)
    if os.access("ro", os.W_OK):  # root writes anywhere: a read-only disk then, by hand
        import matplotlib.figure
        real = matplotlib.figure.Figure.savefig

        def readonly(self, path, *a, **k):
            raise OSError(errno.EROFS, "Read-only file system")
        matplotlib.figure.Figure.savefig = readonly
        try:
            fails(capsys, plot.main, ["out.h5", "--out", "ro"], "Read-only file system")
        finally:
            matplotlib.figure.Figure.savefig = real
    else:
        fails(capsys, plot.main, ["out.h5", "--out", "ro"], "Permission denied")


def test_the_adaptive_progress_line_counts_what_the_schedule_has_queued():
    import io

    from lldist.transport.progress import Progress
    buf = io.StringIO()
    p = Progress(10201, 0, every=1e-9, stream=buf, tty=False, queued=lambda: 120)
    p.update(50)
    line = buf.getvalue().strip()
    assert line.startswith("cells 50 of at most 10201 (adaptive; 120 queued, more may follow)") and "ETA at least" in line
    silent = io.StringIO()
    q = Progress(10, 0, every=0, stream=silent, tty=False)
    q.update(10)
    assert silent.getvalue() == ""  # progress_every=0: no lines at all


def test_readme_says_job_files_are_code():
    readme = open(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")).read()
    assert "a job or study file is code" in readme.lower()


def test_a_job_text_that_names_a_callable_from_python_is_refused(workdir, capsys):
    job = write_job(workdir / "job.yaml", eval={"loss": "object:__main__.my_loss"})
    fails(capsys, surface.main, [job], "given as object: are callables from Python")


def test_docs_tables_name_the_command_that_made_them():
    """Every Markdown table of measurements in docs/ (one holding a decimal number) is preceded,
    within the lines above it, by the command that made it (a `python -m lldist...` or
    `tools/` line), or, for a generated report, its opening lines say what made the whole file
    ("Made by `python -m lldist.study ...`"). Reference tables (the file format, the
    normalization rule) hold none."""
    import re
    root = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs")
    for path in glob.glob(os.path.join(root, "**", "*.md"), recursive=True):
        lines = open(path).read().splitlines()
        if any(t.startswith("Made by `") and "python -m lldist" in t for t in lines[:5]):
            continue
        for i, ln in enumerate(lines):
            if ln.startswith("|") and (i == 0 or not lines[i - 1].startswith("|")):
                table = "\n".join(lines[i:i + next((k for k, t in enumerate(lines[i:]) if not t.startswith("|")),
                                                     len(lines) - i)])
                if not re.search(r"\d\.\d", table):
                    continue
                above = "\n".join(lines[max(0, i - 25):i])
                assert "python -m lldist" in above or "tools/" in above or "lldist." in above, \
                    f"{os.path.relpath(path, root)}:{i + 1}: a table without the command that made it"


def test_a_flow_mapping_without_spaces_after_colons_is_refused(workdir, capsys):
    """`--set model.args={width:8}` is valid YAML for the key "width:8" with no value: a model
    would fail on it with an unexpected keyword far from the cause (docs' own script did)."""
    job = write_job(workdir / "job.yaml")
    fails(capsys, surface.main, [job, "--set", "model.args={width:8,stages:2}"],
          "'width:8' is read as a key without a value; write a space after each colon")
    fails(capsys, surface.main, [job, "--set", "eval.metrics={a:{b:1,c:2}}"], "'b:1' is read as a key")
    assert not os.path.exists(workdir / "out.h5")
    from lldist.config import apply_override
    raw = {}
    apply_override(raw, "model.args={hidden: [8], width: 4}", "job.yaml")  # the spaced form is taken
    assert raw == {"model": {"args": {"hidden": [8], "width": 4}}}
