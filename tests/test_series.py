"""python -m lldist.series (issue 34): every measure at every checkpoint of a run recorded by
lldist.Recorder, with real MPI ranks, real HDF5 files and real SIGKILLs; λmax against
lldist.hessian's own computation at the checkpoint and against the exact Hessian."""

import json
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
from conftest import Flat, env, mpiexec, run, write_job

import lldist
from lldist.config import DataConfig, ModelConfig, load_job
from lldist.workloads.data import load_split
from lldist.workloads.models import build_model

HIDDEN = [6]


def record(folder="mine", hidden=HIDDEN, steps=30, every=5, lr=0.5, momentum=0.0):
    """Full-batch gradient descent on 120 digits, recorded every `every` steps with its optimizer."""
    ts = load_split(DataConfig(subset=120), "train")
    x, y = ts.normalize(ts.x), ts.y
    torch.manual_seed(0)
    model = build_model(ModelConfig(name="mlp", args={"hidden": hidden}), (1, 8, 8), 10)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    rec = lldist.Recorder(f"{folder}/model.pt", every=every)
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        rec.step(model, optimizer=opt)
    rec.finish(model)
    return f"{folder}/model_trajectory.json"


def series_job(workdir, checkpoints, **series):
    return write_job(workdir / "job.yaml", train=None, model={"name": "mlp", "checkpoint": None, "args": {"hidden": HIDDEN}},
                     data={"name": "digits", "subset": 120}, eval={"batch_size": 40, "split": "both", "threads": 1},
                     curvature={"split": "train", "batches": 3, "top": 1, "trace_samples": 4, "tol": 1e-8},
                     series={"checkpoints": checkpoints, **series})


def arrays(path):
    with h5py.File(path, "r") as f:
        out = {k: f[k][()] for k in ("step", "lr", "threshold", "done")}
        out.update({f"values/{k}": f["values"][k][()] for k in f["values"]})
    return out


def same_file(a, b):
    x, y = arrays(a), arrays(b)
    assert x.keys() == y.keys()
    for k in x:
        np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def test_a_series_holds_lldist_hessians_lambda_max_at_each_checkpoint_and_the_exact_one(workdir):
    """Each checkpoint's λmax, its jackknife error and its trace are runs/hessian.compute's on
    that checkpoint, bit for bit (the command's own function, with the job's curvature:
    settings), and λmax is the exact float64 Hessian's top eigenvalue on the same three batches;
    the gradient's norm and the distances are numpy's; the thresholds are 2/η."""
    import dataclasses

    from lldist.runs.hessian import compute
    from lldist.workloads.models import read_checkpoint
    record()
    job = series_job(workdir, "mine")  # a Recorder's folder: its index
    p = run(["lldist.series", job, "--out", "s.h5", "--progress-every", "0"], workdir)
    assert "6 checkpoints (steps 5..30)" in p.stdout, p.stdout
    s = lldist.open("s.h5")
    assert s.complete and list(s.steps) == [5, 10, 15, 20, 25, 30]
    with h5py.File(workdir / "s.h5", "r") as f:  # the default measures: all but the sharpness
        assert sorted(f["values"]) == ["curvature", "gradient", "loss", "weights"]
    np.testing.assert_array_equal(s.thresholds, 2 / 0.5)
    assert s.subset["batches"] == 3 and s.subset["split"] == "train"
    j = load_job(str(job))
    files = [f"mine/model_step{k}.pt" for k in s.steps]
    torch.set_num_threads(1)  # eval.threads: the float32 sums' order
    for i, f in enumerate(files):
        at = dataclasses.replace(j, model=dataclasses.replace(j.model, checkpoint=f))
        res = compute(at, None, lambda m: None)
        assert s.column("lambda_max")[i] == res["lambda_max"] and s.column("trace")[i] == res["trace"]
        assert s.column("lambda_max_se")[i] == res["lambda_max_se"]
    # the exact Hessian of the last checkpoint, float64, on the curvature's three batches of 40
    H, grad, names = exact(j, files[-1])
    assert s.column("lambda_max")[-1] == pytest.approx(np.linalg.eigvalsh(H)[-1], rel=1e-4)
    assert s.column("grad_norm")[-1] == pytest.approx(float(np.linalg.norm(grad)), rel=1e-5)
    assert np.isnan(s.column("preconditioned_lambda_max")).all()  # (gradient descent: no second moments)
    w = [torch.cat([read_checkpoint(f)[0][n].double().reshape(-1) for n in names]).numpy() for f in files]
    np.testing.assert_allclose(s.column("distance_first"), [np.linalg.norm(v - w[0]) for v in w], rtol=1e-12)
    np.testing.assert_allclose(s.column("distance_last"), [np.linalg.norm(v - w[-1]) for v in w], rtol=1e-12)
    a, b = w[2] - w[1], w[3] - w[2]
    assert s.column("update_cosine")[2] == pytest.approx(a @ b / np.linalg.norm(a) / np.linalg.norm(b), rel=1e-12)
    assert np.isnan(s.column("update_cosine")[[0, -1]]).all()
    p = run(["lldist.plot", "s.h5", "--out", "figs"], workdir)
    assert (workdir / "figs" / "s_sharpness.png").exists() and (workdir / "figs" / "s_train_loss.png").exists()


def test_a_series_sharpness_is_lldist_sharpness_at_each_checkpoint(workdir):
    """series.measures: [sharpness] gives, at each checkpoint, runs/sharpness.compute's measures
    there (the command's own function, the job's sharpness: settings), bit for bit."""
    import dataclasses

    from lldist.runs.sharpness import compute
    from lldist.runs.series import SHARPNESS_COLUMNS
    record(steps=10, every=5)
    small = {"examples": 80, "steps": 3, "restarts": 2, "draws": 4, "m": 20, "pac_tol": 0.2}
    job = write_job(workdir / "job.yaml", train=None, model={"name": "mlp", "checkpoint": None, "args": {"hidden": HIDDEN}},
                    data={"name": "digits", "subset": 120}, eval={"batch_size": 40, "split": "train", "threads": 1},
                    sharpness=small, series={"checkpoints": "mine", "measures": ["sharpness", "weights"]})
    run(["lldist.series", job, "--out", "s.h5", "--progress-every", "0"], workdir)
    s = lldist.open("s.h5")
    assert s.complete and list(s.steps) == [5, 10]
    j = load_job(str(job))
    torch.set_num_threads(1)
    for i, step in enumerate(s.steps):
        at = dataclasses.replace(j, model=dataclasses.replace(j.model, checkpoint=f"mine/model_step{step}.pt"))
        res = compute(at, None, lambda m: None)
        for c in SHARPNESS_COLUMNS:
            assert s.column(c)[i] == res[c] or (np.isnan(s.column(c)[i]) and np.isnan(res[c])), (c, i)
    assert s.column("worst_2")[1] > 0 and s.column("sam_se")[1] >= 0
    run(["lldist.plot", "s.h5", "--out", "figs"], workdir)  # a figure a measure, its errors drawn
    assert (workdir / "figs" / "s_worst_2.png").exists() and (workdir / "figs" / "s_sam.png").exists()


def exact(job, file):
    """(the exact float64 Hessian of the mean train loss on the curvature's first three batches
    of 40 at checkpoint `file`, its gradient, the parameter names)."""
    from lldist.evaluation.curvature import first_batches
    f = Flat(job, file)
    names, theta = f.names, f.theta
    batches = first_batches(f.loaded.splits["train"], 40, 3, torch.float64)

    def loss(flat):
        return f.loss(flat, batches)
    flat = theta.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(loss(flat), flat)
    return torch.autograd.functional.hessian(loss, theta).numpy(), grad.numpy(), names


@pytest.mark.slow
def test_adams_preconditioned_sharpness_is_the_exact_one_against_38_over_eta(workdir):
    """A run recorded with Adam's second moments: λmax(P⁻¹H) at each checkpoint equals the top
    eigenvalue of P^-1/2 H P^-1/2 with the exact Hessian and P from the stored moments (1e-4),
    and the threshold is (2 + 2β₁)/((1 − β₁)η): 38/η."""
    from lldist.analysis.stability import Optimizer, preconditioner
    ts = load_split(DataConfig(subset=120), "train")
    x, y = ts.normalize(ts.x), ts.y
    torch.manual_seed(0)
    model = build_model(ModelConfig(name="mlp", args={"hidden": HIDDEN}), (1, 8, 8), 10)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    rec = lldist.Recorder("adam/model.pt", every=10, second_moments=True)
    for _ in range(20):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        rec.step(model, optimizer=opt)
    job = series_job(workdir, "adam/model_trajectory.json", measures=["curvature"])
    run(["lldist.series", job, "--out", "a.h5", "--progress-every", "0"], workdir)
    s = lldist.open("a.h5")
    np.testing.assert_allclose(s.thresholds, 38 / 0.01)
    for i, step in enumerate(s.steps):
        H, _, names = exact(load_job(str(job)), f"adam/model_step{step}.pt")
        m = torch.load(f"adam/model_step{step}_moments.pt")
        p = torch.cat([preconditioner(m["exp_avg_sq"][n].double().reshape(-1), Optimizer("adam", 0.01), int(m["step"]))
                       for n in names]).numpy()
        want = np.linalg.eigvalsh(H / np.sqrt(p)[:, None] / np.sqrt(p)[None, :])[-1]
        assert s.column("preconditioned_lambda_max")[i] == pytest.approx(want, rel=1e-4)


@pytest.mark.slow
def test_three_ranks_give_one_process_file_and_a_killed_run_resumes_to_it(workdir):
    """Units handed out dynamically over 3 ranks write the file one process writes, bit for
    bit; SIGKILLs at two moments of a run, each followed by the same command, end in it too."""
    job = series_job(workdir, record(steps=40))
    run(["lldist.series", job, "--out", "one.h5", "--progress-every", "0"], workdir)
    run([mpiexec(), "-n", "3", sys.executable, "-m", "lldist.series", job, "--out", "three.h5",
         "--progress-every", "0"], workdir, timeout=600)
    same_file(workdir / "one.h5", workdir / "three.h5")
    partial = []
    k = workdir / "k.h5"
    for delay in (0.2, 1.0):
        before = os.path.getmtime(k) if os.path.exists(k) else None
        p = subprocess.Popen([mpiexec(), "-n", "2", sys.executable, "-m", "lldist.series", job, "--out", "k.h5",
                              "--progress-every", "0"], cwd=workdir, env=env(), start_new_session=True,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        # kill `delay` after this run first wrote the file (not a fixed time after launch: on a
        # loaded machine the ranks' start-up alone took longer than the old 5 s, and no kill landed)
        t0 = time.time()
        while p.poll() is None and time.time() - t0 < 300 and \
                (not os.path.exists(k) or os.path.getmtime(k) == before):
            time.sleep(0.02)
        time.sleep(delay)
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()
        for _ in range(100):  # the ranks' own deaths follow the launcher's by a moment (their HDF5 lock)
            try:
                if os.path.exists(workdir / "k.h5"):
                    with h5py.File(workdir / "k.h5", "r") as f:
                        partial.append(int(f["done"][()].sum()))
                break
            except BlockingIOError:
                time.sleep(0.1)
    run(["lldist.series", job, "--out", "k.h5", "--progress-every", "0"], workdir)
    same_file(workdir / "one.h5", workdir / "k.h5")
    assert partial, "no kill landed after the file was made"


def test_bad_series_input_is_one_line_and_status_2(workdir):
    rec = record()
    record("other", hidden=[9], steps=10)
    cases = [({"checkpoints": "nothing_step*.pt"}, "no file matches"),
             ({"checkpoints": ["mine/model_step10.pt", "mine/model_step5.pt"]}, "out of training order"),
             ({"checkpoints": ["mine/model.pt"]}, "has no step in its name"),
             ({"checkpoints": ["mine/model_step5.pt", "other/model_step10.pt"]}, "is not this job's model"),
             ({"checkpoints": rec, "measures": ["loss", "flatness"]}, "key 'series.measures' is 'flatness'"),
             ({"checkpoints": None}, "series.checkpoints is not given")]
    for series, says in cases:  # from Python: the UserError (a ValueError) itself
        with pytest.raises(ValueError, match=says):
            lldist.series(str(series_job(workdir, **series)), out=str(workdir / "bad.h5"))
        assert not os.path.exists(workdir / "bad.h5")
    for series, says in cases[1:2] + cases[4:5]:  # the command line: one line, status 2
        p = run(["lldist.series", series_job(workdir, **series), "--out", "bad.h5"], workdir, check=False)
        assert p.returncode == 2 and says in p.stderr and len(p.stderr.strip().splitlines()) == 1, (series, p.stderr)
    job = series_job(workdir, rec)
    got = lldist.series(str(job), out=str(workdir / "py.h5"), overrides=("series.measures=[weights]",))
    assert got.complete and got.measures == ["weights"] and len(got.column("distance_first")) == 6
    run(["lldist.series", job, "--out", "s.h5", "--set", "series.measures=[weights]"], workdir)
    p = run(["lldist.series", job, "--out", "s.h5"], workdir, check=False)  # another series' file: kept
    assert p.returncode == 2 and "holds another series" in p.stderr, p.stderr
    assert json.loads(h5py.File(workdir / "s.h5", "r").attrs["measures"]) == ["weights"]
