"""What a new user met (issue 25): stale results after editing a loss, a tokenizer that did not
fit, a study deaf to SIGTERM, a notebook whose plots never showed, and the small things."""

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
from conftest import ROOT, env, run, write_job

import lldist


def blobs(n=60):
    g = torch.Generator().manual_seed(0)
    y = torch.arange(n) % 3
    return 3 * torch.eye(3, 5)[y] + torch.randn(n, 5, generator=g), y


def model():
    torch.manual_seed(0)
    return torch.nn.Linear(5, 3)


# ----------------------------------------------------------------------------- silently stale

TEMPERATURE = 1.0


def scaled_loss(out, batch):
    return F.cross_entropy(out / TEMPERATURE, batch[1], reduction="none")


def test_an_edited_loss_is_another_job(tmp_path):
    """The API used to know a loss by its name: editing it (or a constant it reads) and calling
    again with the same out= returned the old numbers. Now the code is part of the identity."""
    global TEMPERATURE
    x, y = blobs()
    out = str(tmp_path / "s.h5")
    kw = dict(x=(-1, 1, 3), y=None, out=out, progress_every=0)
    first = lldist.landscape(model(), (x, y), loss=scaled_loss, **kw).loss.copy()
    again = lldist.landscape(model(), (x, y), loss=scaled_loss, **kw)  # unchanged: resumes, nothing to do
    np.testing.assert_array_equal(again.loss, first)
    TEMPERATURE = 2.0
    try:
        with pytest.raises(ValueError, match="different job"):
            lldist.landscape(model(), (x, y), loss=scaled_loss, **kw)
        new = lldist.landscape(model(), (x, y), loss=scaled_loss, resume=False, **kw).loss
        assert not np.allclose(new, first)
    finally:
        TEMPERATURE = 1.0
    # a lambda edited in a notebook cell: another code object
    with pytest.raises(ValueError, match="different job"):
        lldist.landscape(model(), (x, y), loss=lambda o, b: F.mse_loss(o, F.one_hot(b[1], 3).float(),
                                                                           reduction="none").mean(1), **kw)


def test_the_identity_of_code():
    from lldist.inputs import identity

    def make(k):
        return lambda o, b: o * k
    assert identity.code(make(1)) == identity.code(make(1))
    assert identity.code(make(1)) != identity.code(make(2))  # closure values count
    assert identity.code(scaled_loss) == identity.code(scaled_loss)
    f1 = lambda o, b: o + 1  # noqa: E731
    f2 = lambda o, b: o + 2  # noqa: E731
    assert identity.code(f1) != identity.code(f2)  # constants count
    assert identity.code(torch.nn.CrossEntropyLoss(label_smoothing=0.1)) != \
        identity.code(torch.nn.CrossEntropyLoss(label_smoothing=0.2))

    class Opaque:
        def __call__(self, o, b):
            return o
    holder = open(os.devnull)
    try:
        g = lambda o, b: holder and o  # noqa: E731 - an open file in the closure: cannot tell
        assert identity.code(g) != identity.code(g)  # never resumes rather than resumes wrongly
    finally:
        holder.close()


def test_a_python_loss_of_a_job_file_is_identified_by_its_code(workdir):
    """The same holds for python: references in job files: another body, another job."""
    with open("myloss.py", "w") as f:
        f.write("import torch.nn.functional as F\ndef loss(out, batch):\n"
                "    return F.cross_entropy(out, batch[1], reduction='none')\n")
    job = write_job(workdir / "job.yaml", train=None, model={"name": "mlp", "checkpoint": None, "args": {"hidden": [8]}},
                    grid={"x": [-1, 1, 3], "y": None}, eval={"loss": "python:myloss:loss", "batch_size": 50})
    run(["lldist.surface", job], workdir, PYTHONPATH=str(workdir))
    with open("myloss.py", "w") as f:
        f.write("import torch.nn.functional as F\ndef loss(out, batch):\n"
                "    return 2 * F.cross_entropy(out, batch[1], reduction='none')\n")
    p = run(["lldist.surface", job], workdir, check=False, PYTHONPATH=str(workdir))
    assert p.returncode == 2 and "different job" in p.stderr


def test_a_landscape_without_accuracy_says_what_it_has():
    x, y = blobs()
    ls = lldist.landscape(model(), (x, y), x=(-1, 1, 3), y=None, progress_every=0,
                          loss=lambda o, b: F.cross_entropy(o, b[1], reduction="none"))
    with pytest.raises(AttributeError, match=r"no 'acc': its quantities are loss, loss_se \(a loss= of your own"):
        ls.acc
    assert "test/loss" in repr(ls)


# ----------------------------------------------------------------------------- signals and long steps

@pytest.mark.slow
def test_sigterm_during_the_studys_hessian_ends_within_seconds_and_resumes(workdir):
    study = {"name": "s", "out": "study",
             "base": {"data": {"name": "digits", "subset": 100}, "train": {"epochs": 1, "seed": 0, "batch_size": 64},
                      "model": {"name": "cnn", "args": {"width": 8, "stages": 2}},
                      "grid": {"x": [-1, 1, 3], "y": None}, "eval": {"split": "test", "batch_size": 50}},
             "variants": [{"label": "a"}],
             # a Hessian long enough to be interrupted: thousands of Hutchinson samples
             "curvature": {"split": "train", "batches": 2, "top": 1, "trace_samples": 5000}}
    import yaml
    with open("s.yaml", "w") as f:
        yaml.safe_dump(study, f)
    p = subprocess.Popen([sys.executable, "-m", "lldist.study", "s.yaml"], cwd=workdir, env=env(),
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in p.stdout:
        if "Hessian at theta* of a" in line:
            break
    time.sleep(1.0)
    t0 = time.time()
    p.send_signal(signal.SIGTERM)
    rest = p.communicate(timeout=60)[0]
    assert p.returncode == 143, rest
    assert time.time() - t0 < 10
    assert "stopped by signal 15 during the Hessian at theta* of a" in rest
    with h5py.File("study/a/surface.h5", "r") as f:  # the surface is whole; the Hessian simply is not there
        assert f["done"][()].all() and "curvature" not in f
    study["curvature"]["trace_samples"] = 4
    with open("s.yaml", "w") as f:
        yaml.safe_dump(study, f)
    run(["lldist.study", "s.yaml"], workdir)
    with h5py.File("study/a/surface.h5", "r") as f:
        assert "curvature" in f


# ----------------------------------------------------------------------------- notebooks

def test_import_lldist_leaves_the_matplotlib_backend_alone(workdir):
    x, y = blobs()
    lldist.landscape(model(), (x, y), x=(-1, 1, 3), y=(-1, 1, 3), out=str(workdir / "s.h5"), progress_every=0)
    code = ("import matplotlib; matplotlib.use('svg'); import lldist; ls = lldist.open('s.h5'); fig = ls.plot(); "
            "import matplotlib.pyplot as plt; assert matplotlib.get_backend() == 'svg', matplotlib.get_backend(); "
            "assert plt.gcf() is fig; print('ok')")
    assert run([sys.executable, "-c", code], workdir).stdout.strip() == "ok"


def test_a_notebook_without_ipywidgets_gets_the_text_bar_quietly(monkeypatch):
    import io
    import warnings

    from lldist.transport import progress
    monkeypatch.setitem(sys.modules, "ipykernel", object())
    monkeypatch.setitem(sys.modules, "ipywidgets", None)  # not importable
    import importlib.util
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "ipywidgets" else real(n, *a))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # tqdm.auto's "IProgress not found" would fail here
        p = progress.Progress(10, 0, every=1.0, stream=io.StringIO(), tty=True)
        p.update(10)
        p.close()
    assert type(p.bar).__module__ == "tqdm.std"


# ----------------------------------------------------------------------------- small things

def test_torchvision_num_classes_agreeing_with_the_data(workdir, capsys):
    from lldist import surface
    from lldist.errors import run_cli
    base = dict(train=None, grid={"x": [-1, 1, 2], "y": None}, eval={"batch_size": 32},
                data={"name": "python:lldist.workloads.synthetic:random_images", "subset": None})
    job = write_job(workdir / "job.yaml", model={"name": "torchvision:squeezenet1_1", "checkpoint": None,
                                                 "args": {"num_classes": 10}}, **base)
    assert run_cli(surface.main, [job]) == 0
    job = write_job(workdir / "job.yaml", output="o2.h5", model={"name": "torchvision:squeezenet1_1", "checkpoint": None,
                                                                 "args": {"num_classes": 5}}, **base)
    assert run_cli(surface.main, [job]) == 2
    assert "model.args.num_classes is 5 but the data has 10 classes" in capsys.readouterr().err


def test_info_into_a_closed_pipe_is_quiet(workdir):
    x, y = blobs()
    lldist.landscape(model(), (x, y), x=(-1, 1, 3), y=None, out=str(workdir / "s.h5"), progress_every=0)
    p = subprocess.run(f"{sys.executable} -m lldist.info s.h5 | head -1", shell=True, cwd=workdir, env=env(),
                       capture_output=True, text=True)
    assert p.returncode == 0 and "Traceback" not in p.stderr and "BrokenPipe" not in p.stderr, p.stderr


@pytest.mark.parametrize("command", ["surface", "plot", "study", "metrics", "info", "hessian", "train", "bench",
                                     "sharpness"])
def test_help_is_whole(command):
    text = run([f"lldist.{command}", "--help"], ROOT).stdout
    description = text.split("\n\n")[1]
    assert description.rstrip().endswith((".", ")")), description  # a whole sentence, not cut at a line end
    # every argument says what it is for: its help on its line, or on the indented line below
    lines = text.splitlines()
    for i, ln in enumerate(lines):
        if ln.startswith("  ") and not ln.startswith("   ") and ln.strip() and not ln.strip().startswith("-h"):
            has_help = "  " in ln.strip() or (i + 1 < len(lines) and lines[i + 1].startswith(" " * 8))
            assert has_help, f"{command}: {ln.strip()!r} has no help"
    if command == "bench":
        for mode in ("scaling", "coordinator", "curvature", "gpu", "threads"):
            assert mode in text


@pytest.mark.slow
def test_the_gpu_benchmark_extra_rows_run_on_a_cpu():
    """`lldist.bench gpu` is run once, on a borrowed GPU, with no second try: its curvature and
    text rows are the CPU benchmark's functions; run here small on the CPU, they give rows the
    Markdown can print (a curvature cell dearer than a loss cell, text rates > 0). About a
    minute on 2 idle cores."""
    import time

    from lldist.bench.gpu import gpu_extras, gpu_markdown
    rep = {"card": "cpu", "torch": torch.__version__, "cuda": None, "date": "", "tests": {}, "rows": [],
           "naive": {}, "skipped": [], "batch_auto": {}}
    gpu_extras(rep, "cpu", time.perf_counter() + 600)
    assert rep["skipped"] == []
    assert [r["model"] for r in rep["curvature"]] == ["mlp", "cnn_skip"]
    assert all(r["curvature_cell_s"] > r["loss_cell_s"] > 0 and r["hessian_vector_products"] > 2
               for r in rep["curvature"])
    assert rep["text"]["lldist_cells_s"] > 0 and rep["text"]["naive_cells_s"] > 0
    g = rep["gpt2"]  # the GPT-2 job's model, fp32 against bf16, and FSDP2 over one rank against none
    assert g["fp32_cells_s"] > 0 and g["bf16_cells_s"] > 0 and g["bf16_loss_rel_diff"] < 0.05
    assert g["shard1_equal"] and g["shard1_cells_s"] > 0
    md = gpu_markdown(rep)
    assert "| cnn_skip |" in md and "BERT-style classifier" in md and "shard group of 1" in md


# ----------------------------------------------------------------------------- round 3 (issue 36)

def test_the_hessian_takes_a_split_the_landscape_does_not_evaluate(workdir):
    """`python -m lldist.hessian jobs/quickstart.yaml --split train` refused: the job evaluates
    test only. And a result without a trace printed "trace nan +- nan"."""
    job = write_job(workdir / "job.yaml", grid={"x": [-1, 1, 3], "y": None})  # eval.split: test
    run(["lldist.surface", job], workdir)
    p = run(["lldist.hessian", job, "--split", "train", "--top", "1", "--batches", "1", "--trace-samples", "0",
             "--no-smallest"], workdir)
    summary = [ln for ln in p.stdout.splitlines() if "top eigenvalues" in ln][0]
    assert "on train" in summary and "nan" not in summary and "trace" not in summary
    with h5py.File("out.h5", "r") as f:
        assert "train" in f["curvature"] and np.isfinite(f["curvature/train"].attrs["lambda_max"])


def test_small_frictions_get_their_one_line(workdir, capsys):
    """A mistyped checkpoint in hessian was "a surface of another model"; grid.x=[-1,1,1] put
    its one point at alpha = -1 silently; a python: module not found gave no hint."""
    from lldist import hessian, surface
    from lldist.errors import run_cli
    job = write_job(workdir / "job.yaml", grid={"x": [-1, 1, 3], "y": None})
    run(["lldist.surface", job], workdir)
    checks = [(hessian.main, [job, "--set", "model.checkpoint=modle.pt", "--top", "1"], "modle.pt does not exist"),
              (surface.main, [job, "--set", "grid.x=[-1,1,1]"], "one point needs min = max"),
              (surface.main, [job, "--set", "model.name=python:nosuchpkg.models:net", "--set", "train=null",
                              "--set", "model.checkpoint=null", "--out", "new.h5"], "on PYTHONPATH")]
    for main, argv, expect in checks:
        code = run_cli(main, argv)
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and expect in err[0], err


def test_a_rerun_refused_as_another_job_names_what_differs(workdir, capsys):
    """A PCA rerun with a wider grid was refused as "made by a different job", nothing more."""
    from lldist import surface
    from lldist.errors import run_cli
    job = write_job(workdir / "job.yaml", grid={"x": [-1, 1, 3], "y": None})
    run(["lldist.surface", job], workdir)
    code = run_cli(surface.main, [job, "--set", "grid.x=[-2,2,5]"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "grid.x: [-1, 1, 3] -> [-2, 2, 5]" in err[0], err


# ----------------------------------------------------------------------------- round 3: what a terminal and a log say

def test_metrics_print_a_column_per_file_for_a_terminal(workdir):
    job = write_job(workdir / "job.yaml", grid={"x": [-1.0, 1.0, 5], "y": [-1.0, 1.0, 5]})
    run(["lldist.surface", job], workdir)
    run(["lldist.surface", job, "--out", "b.h5", "--set", "directions.seed=4"], workdir)
    out = run(["lldist.metrics", "out.h5", "b.h5"], workdir).stdout
    lines = out.splitlines()
    assert lines[:2] == ["[1] out.h5", "[2] b.h5"]
    row = next(ln for ln in lines if ln.strip().startswith("roughness")).split()
    from lldist.analysis.metrics import of_file
    assert len(row) == 3 and float(row[1]) == pytest.approx(of_file("out.h5")[0]["roughness"], rel=1e-3)
    assert max(len(ln) for ln in lines) < 100  # (the wide table: 21 columns, 400 characters a line)
    assert "| surface |" in run(["lldist.metrics", "out.h5", "--wide"], workdir).stdout


def test_info_shows_the_sharpness_and_the_group(workdir):
    job = write_job(workdir / "job.yaml", grid={"x": [-1.0, 1.0, 3], "y": None},
                    sharpness={"examples": 40, "m": 20, "draws": 2, "restarts": 1, "steps": 2})
    run(["lldist.surface", job, "--set", "eval.group_size=1"], workdir)
    run(["lldist.sharpness", job, "--set", "sharpness.split=test"], workdir)
    out = run(["lldist.info", "out.h5"], workdir).stdout
    stored = lldist.open("out.h5").sharpness["test"]
    assert f"sharpness at theta* (test, 40 examples): worst-case adaptive l2 {stored['worst_2']:.4g}" in out
    with h5py.File("out.h5", "r+") as f:  # a group run's job text (as --set eval.group_size=2 records it)
        f.attrs["job_yaml"] = f.attrs["job_yaml"] + '\n# overrides: {"set": ["eval.group_size=2", ' \
                                                    '"eval.group_mode=shard"]}\n'
    assert "groups of 2 ranks (shard)" in run(["lldist.info", "out.h5"], workdir).stdout


def test_a_wrong_input_shape_says_which_data_met_which_model(workdir):
    m = torch.nn.Linear(10, 3)
    with pytest.raises(RuntimeError) as e:
        lldist.landscape(m, (torch.randn(20, 7), torch.randint(0, 3, (20,))), x=(-1, 1, 3), y=None,
                         progress_every=0)
    notes = " ".join(getattr(e.value, "__notes__", []))
    assert "mat1 and mat2" in str(e.value) and "the model (Linear) failed on the data's first 2 examples" in notes
    assert "(2, 7) float32" in notes


def test_the_sharpness_and_a_long_training_say_how_far_they_are(capsys):
    from lldist.evaluation.sharpness import Sharpness
    x, y = blobs()
    said = []
    s = Sharpness(model(), [(x, y)], log=said.append, every=0.0)
    s.stage = "worst case"
    s.worst(0.1, 2, 3, 0, 0)
    assert said and said[-1].startswith("sharpness: worst case, ") and "passes over the examples" in said[-1]
    from lldist.runs.train import _clock
    assert (_clock(75), _clock(3725)) == ("1m15s", "1h02m")
