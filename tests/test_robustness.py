"""Defects found by trying lldist as a hostile user would (issue 9): failures on any rank end
every rank, signals during training, results never lost or mixed, numbers that were subtly
wrong, and defaults that surprised."""

import os
import signal
import subprocess
import sys
import time

import h5py
import numpy as np
import pytest
import torch
from conftest import env, mpiexec, run, write_job

from lldist.transport import runner
from lldist.config import DirectionsConfig, EvalConfig, ModelConfig, load_job
from lldist.directions.random import make_directions
from lldist.directions.state import cosine, model_state
from lldist.evaluation.evaluator import Evaluator, evaluate_plain
from lldist.workloads.models import build_model


def mpirun(n, job, workdir, *extra, timeout=120, **envs):
    return run([mpiexec(), "-n", str(n), sys.executable, "-m", "lldist.surface", job, *extra],
               workdir, check=False, timeout=timeout, **envs)


# ----------------------------------------------------------------------------- failures end every rank

@pytest.mark.parametrize("ranks", [1, 3])
def test_rank0_bug_in_setup_ends_every_rank(workdir, ranks):
    """A model factory that raises on rank 0 during set-up: before, the other ranks waited
    forever; now every rank ends within seconds, naming rank, host and phase."""
    job = write_job(workdir / "job.yaml", train=None,
                    model={"name": "python:userfactories:raising", "checkpoint": None, "args": {"on_rank": 0}})
    t0 = time.time()
    p = mpirun(ranks, job, workdir, timeout=60)
    assert p.returncode == 1, p.stderr
    assert time.time() - t0 < 45
    first = [ln for ln in p.stderr.splitlines() if ln.startswith("lldist: error:")]
    assert len(first) == 1 and "rank 0 on" in first[0] and "prepare" in first[0] and "factory bug" in first[0]
    assert not os.path.exists("out.h5")


def test_worker_bug_in_build_names_its_rank(workdir):
    job = write_job(workdir / "job.yaml", train=None,
                    model={"name": "python:userfactories:raising", "checkpoint": None, "args": {"on_rank": 2}})
    p = mpirun(3, job, workdir, timeout=60)
    assert p.returncode == 1, p.stderr
    first = [ln for ln in p.stderr.splitlines() if ln.startswith("lldist: error:")]
    assert len(first) == 1 and "rank 2 on" in first[0] and "build" in first[0] and "factory bug on rank 2" in first[0]
    with h5py.File("out.h5", "r") as f:  # the file was made by rank 0, and nothing is done
        assert not f["done"][()].any()


@pytest.mark.parametrize("ranks", [1, 3])
def test_bad_input_under_mpi_is_one_line(workdir, ranks):
    with open("job.yaml", "wb") as f:
        f.write(b"name: caf\xe9\n")  # Latin-1, not UTF-8
    p = mpirun(ranks, "job.yaml", workdir, timeout=60)
    assert p.returncode == 2 and "not UTF-8" in p.stderr and "Traceback" not in p.stderr
    job = write_job(workdir / "j2.yaml", model={"name": "mlp", "checkpoint": "model.pt", "args": {"hidden": [-1]}})
    p = mpirun(ranks, job, workdir, timeout=60)
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr
    assert [ln for ln in p.stderr.splitlines() if ln.strip()] == \
        ["lldist: error: model mlp: model.args.hidden must be a list of positive integers, got [-1]"]


def _cpu_seconds(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _rank_pids(launcher_pid, ranks):
    """pid of each MPI rank below the launcher, from the rank in its environment."""
    from lldist.bench.procs import mpi_ranks
    return mpi_ranks(launcher_pid)


@pytest.mark.slow
def test_waiting_ranks_do_not_spin(workdir):
    """While rank 0 prepares (trains, builds), the other ranks sleep instead of polling at
    100% CPU: measured from /proc over 1.5 s of rank 0's 4 s set-up."""
    job = write_job(workdir / "job.yaml", train=None,
                    model={"name": "python:userfactories:slow_on_rank0", "checkpoint": None, "args": {"seconds": 4}})
    cmd = [mpiexec(), "-n", "3", sys.executable, "-m", "lldist.surface", job]
    p = subprocess.Popen(cmd, cwd=workdir, env=env(), stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    try:
        for line in p.stderr:
            if "slow factory: sleeping" in line:
                break
        deadline = time.time() + 3.0  # rank 0 sleeps 4 s: the workers are up and waiting by then
        while set(pids := _rank_pids(p.pid, 3)) != {0, 1, 2} and time.time() < deadline:
            time.sleep(0.1)
        assert set(pids) == {0, 1, 2}
        time.sleep(0.3)  # past their imports
        before = {r: _cpu_seconds(pids[r]) for r in (1, 2)}
        time.sleep(1.5)
        used = {r: _cpu_seconds(pids[r]) - before[r] for r in (1, 2)}
    finally:
        rest = p.communicate(timeout=120)[1]
    assert p.returncode == 0, rest
    assert max(used.values()) < 0.3, used  # a spinning rank would use ~1.5 s


# ----------------------------------------------------------------------------- signals

def test_sigterm_while_training_stops_within_seconds(workdir):
    job = write_job(workdir / "job.yaml", model={"name": "cnn", "checkpoint": "model.pt", "args": {"width": 8}},
                    data={"name": "digits"}, train={"epochs": 200, "lr": 0.005, "batch_size": 32})
    p = subprocess.Popen([sys.executable, "-m", "lldist.surface", job], cwd=workdir, env=env(),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in p.stdout:
        if "epoch   1/200" in line:
            break
    t0 = time.time()
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 143, err
    assert time.time() - t0 < 10
    assert "stopped by signal 15 while training" in err and "Traceback" not in err
    assert os.path.exists("model_epoch1.pt") and not os.path.exists("model.pt")
    assert not os.path.exists("out.h5")


# ----------------------------------------------------------------------------- results never lost, never mixed

@pytest.mark.slow
def test_overwrite_keeps_the_old_file_until_the_new_one_exists(workdir):
    job = write_job(workdir / "job.yaml", grid={"x": [-1.0, 1.0, 3], "y": None})
    run(["lldist.surface", job], workdir)
    with open("out.h5", "rb") as f:
        before = f.read()
    # a target that does not fit the model: the new run fails while making its directions
    torch.save(build_model(ModelConfig(name="cnn"), (1, 8, 8), 10).state_dict(), "cnn.pt")
    p = run(["lldist.surface", job, "--overwrite", "--set", "directions.target=cnn.pt"], workdir, check=False)
    assert p.returncode == 2 and "does not fit model" in p.stderr
    with open("out.h5", "rb") as f:
        assert f.read() == before
    # never replace what is not a surface: the job's own checkpoint or job file as --out
    for victim in ("model.pt", "job.yaml"):
        with open(victim, "rb") as f:
            content = f.read()
        p = run(["lldist.surface", job, "--out", victim, "--overwrite"], workdir, check=False)
        assert p.returncode == 2 and "refusing to replace a file that is not an lldist surface" in p.stderr
        with open(victim, "rb") as f:
            assert f.read() == content


@pytest.mark.slow
def test_two_runs_on_one_new_output_exactly_one_runs(workdir):
    job = write_job(workdir / "job.yaml", train=None,
                    model={"name": "python:lldist.workloads.synthetic:fixed_cost", "checkpoint": None, "args": {"seconds": 0.05}},
                    grid={"x": [-1.0, 1.0, 30], "y": None})
    cmd = [sys.executable, "-m", "lldist.surface", job]
    procs = [subprocess.Popen(cmd, cwd=workdir, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    codes = sorted(p.returncode for p in procs)
    assert codes == [0, 2], outs
    refused = outs[[p.returncode for p in procs].index(2)][1]
    assert "being written by another run" in refused and refused.count("\n") == 1
    with h5py.File("out.h5", "r") as f:
        assert f["done"][()].all() and int(f["nchunks"][()]) > 0
    assert not os.path.exists("out.h5.lock")


def test_other_images_in_the_same_root_are_another_job(workdir):
    from test_data import write_folder
    write_folder("imgs", "val")
    job = write_job(workdir / "job.yaml", train=None, model={"name": "mlp", "checkpoint": None, "args": {"hidden": [8]}},
                    data={"name": "imagefolder", "root": "imgs", "resize": 10, "crop": 8},
                    grid={"x": [-1.0, 1.0, 3], "y": None})
    run(["lldist.surface", job], workdir)
    import shutil
    shutil.rmtree("imgs")
    write_folder("imgs", "val", classes=("ant", "bee", "cow"))  # other images, same root
    p = run(["lldist.surface", job], workdir, check=False)
    assert p.returncode == 2 and "different job" in p.stderr


@pytest.mark.slow
def test_batch_size_is_part_of_the_identity_under_batch_statistics(workdir):
    cnn = {"name": "cnn", "checkpoint": "model.pt", "args": {"width": 4, "stages": 2}}
    job = write_job(workdir / "job.yaml", model=cnn, grid={"x": [-1.0, 1.0, 3], "y": None},
                    eval={"bn": "batch", "batch_size": 16})
    run(["lldist.surface", job], workdir)
    p = run(["lldist.surface", job, "--set", "eval.batch_size=64"], workdir, check=False)
    assert p.returncode == 2 and "different job" in p.stderr
    # without batch statistics the batch size changes only round-off: the same job
    job2 = write_job(workdir / "j2.yaml", model=cnn, output="o2.h5", grid={"x": [-1.0, 1.0, 3], "y": None},
                     eval={"batch_size": 16})
    run(["lldist.surface", job2], workdir)
    assert " 0 to compute" in run(["lldist.surface", job2, "--set", "eval.batch_size=64"], workdir).stdout


@pytest.mark.slow
def test_files_of_the_old_direction_stream_are_not_resumed(workdir):
    job = write_job(workdir / "job.yaml", grid={"x": [-1.0, 1.0, 3], "y": None})
    run(["lldist.surface", job], workdir)
    from lldist.store import FORMAT_VERSION
    with h5py.File("out.h5", "r+") as f:
        f["done"][1:] = False
    for old, why in ((1, "stream of their own"), (2, "work log")):
        with h5py.File("out.h5", "r+") as f:
            f.attrs["format_version"] = old
        p = run(["lldist.surface", job], workdir, check=False)
        assert p.returncode == 2 and f"format version {old}" in p.stderr and why in p.stderr
        assert "--overwrite" in p.stderr
    run(["lldist.plot", "out.h5"], workdir)  # still readable
    run(["lldist.surface", job, "--overwrite"], workdir)
    with h5py.File("out.h5", "r") as f:
        assert f.attrs["format_version"] == FORMAT_VERSION and f["done"][()].all()


def test_refused_run_leaves_the_file_untouched(workdir):
    job = write_job(workdir / "job.yaml", grid={"x": [-1.0, 1.0, 3], "y": None})
    run(["lldist.surface", job], workdir)
    os.utime("out.h5", (1000, 1000))
    p = run(["lldist.surface", job, "--set", "directions.seed=9"], workdir, check=False)
    assert p.returncode == 2
    assert os.path.getmtime("out.h5") == 1000


def test_refused_output_is_reported_before_training(workdir):
    with open("notes.h5", "w") as f:
        f.write("my notes")
    job = write_job(workdir / "job.yaml", output="notes.h5", train={"epochs": 50})
    t0 = time.time()
    p = run(["lldist.surface", job], workdir, check=False)
    assert p.returncode == 2 and "not an lldist surface" in p.stderr
    assert "training it first" not in p.stdout and not os.path.exists("model.pt")
    assert time.time() - t0 < 30


# ----------------------------------------------------------------------------- numbers

def test_directions_are_independent_of_the_initial_weights():
    """Model init and directions both default to seed 0; the directions' own stream keeps
    them uncorrelated (the old shared stream gave a cosine of about -0.35)."""
    for name, shape in (("mlp", (1, 8, 8)), ("cnn", (1, 8, 8))):
        model = build_model(ModelConfig(name=name, seed=0), shape, 10)
        theta, kinds = model_state(model)
        dirs = make_directions(theta, kinds, DirectionsConfig(seed=0, norm="none"), 2)
        for n in theta:
            if kinds[n] == "weight" and theta[n].numel() >= 500:
                c = cosine({n: theta[n]}, {n: dirs.x[n]})
                assert abs(c) < 0.1, (name, n, c)


def test_interpolation_lands_on_both_checkpoints_exactly():
    data_shape = (1, 8, 8)
    a = build_model(ModelConfig(name="cnn", seed=1, args={"width": 4}), data_shape, 10)
    b = build_model(ModelConfig(name="cnn", seed=2, args={"width": 4}), data_shape, 10)
    with torch.no_grad():  # give the BatchNorm statistics values to move too
        for m, s in ((a, 1.0), (b, 3.0)):
            for buf_name, buf in m.named_buffers():
                if buf.is_floating_point():
                    buf.copy_(torch.rand(buf.shape) * s)
    theta, kinds = model_state(a)
    theta_b = model_state(b)[0]
    dirs = make_directions(theta, kinds, DirectionsConfig(seed=0), 2, theta_b)
    from lldist.config import DataConfig
    from lldist.workloads.data import load_split
    data = load_split(DataConfig(subset=50), "test")
    ev = Evaluator(a, theta, dirs, {"test": data}, EvalConfig(batch_size=25), device="cpu")
    live = ev.eager.state_dict()
    for alpha, want in ((0.0, theta), (1.0, theta_b)):
        ev.set_weights(alpha, 0.0)
        for n in theta:
            assert torch.equal(live[n], want[n]), (alpha, n)
    # and the loss at alpha = 1 is the plain loop's at theta'
    ref = evaluate_plain(build_model(ModelConfig(name="cnn", seed=2, args={"width": 4}), data_shape, 10),
                         b.state_dict(), data, batch_size=25)
    got = ev.evaluate_cells([(1.0, 0.0)])[0, 0]
    np.testing.assert_allclose(got[0], ref[0], rtol=1e-6)
    assert got[1] == ref[1]
    # the vmapped path lands on theta' as well
    ev.cells_per_pass = 2
    np.testing.assert_allclose(ev.evaluate_cells([(1.0, 0.0), (0.0, 0.0)])[0, 0, 0], ref[0], rtol=1e-6)


# ----------------------------------------------------------------------------- defaults

def test_threads_follow_omp_then_the_cpu_mask():
    assert runner.cpu_share([{0, 1, 2, 3}] * 2, {0, 1, 2, 3}) == 2  # two unbound ranks share four CPUs
    assert runner.cpu_share([{0, 1}, {2, 3}], {2, 3}) == 2  # bound ranks use their own
    assert runner.cpu_share([{0}] * 3, {0}) == 1  # never zero


@pytest.mark.slow
def test_threads_in_a_run(workdir):
    import shutil
    taskset = shutil.which("taskset")
    if not taskset or len(os.sched_getaffinity(0)) < 2:
        pytest.skip("needs taskset and two CPUs")
    job = write_job(workdir / "job.yaml", grid={"x": [-1.0, 1.0, 2], "y": None}, eval={"threads": None})
    one = run([taskset, "-c", "0", sys.executable, "-m", "lldist.surface", job, "--out", "a.h5"], workdir,
              OMP_NUM_THREADS="")
    assert "1 thread(s) on rank 0" in one.stdout  # the mask, not os.cpu_count()
    n = len(os.sched_getaffinity(0))
    allowed = run(["lldist.surface", job, "--out", "b.h5"], workdir, OMP_NUM_THREADS="")
    # every allowed CPU, unless other processes keep some busy this moment (runs/threads.py); then
    # timed against one thread on the run's cells, which may keep one
    assert f"{n} CPU thread(s): this rank's share of {n} CPU(s)" in allowed.stdout or \
        "busy with other processes" in allowed.stdout
    omp = run([taskset, "-c", "0", sys.executable, "-m", "lldist.surface", job, "--out", "c.h5"], workdir,
              OMP_NUM_THREADS="3")
    assert "3 thread(s) on rank 0" in omp.stdout  # the user's setting wins


def test_the_default_threads_leave_busy_cpus_to_their_processes(monkeypatch):
    """Beside processes that keep every CPU busy, the default takes one thread (two threads of
    one process waiting on each other while a third holds the core ran 2.7-6.8x slower); a
    number the user gives wins, and the log says which and why."""
    from lldist.bench.common import Busy
    from lldist.runs.threads import choose
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    n = len(os.sched_getaffinity(0))
    with Busy(n + 1):
        got, why = choose(0, n)
        assert (got, choose(3, n)) == (1, (3, "eval.threads")) and "busy with other processes" in why, why
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert choose(0, n) == (2, "OMP_NUM_THREADS")


def test_a_resume_takes_the_thread_count_its_file_was_begun_with(workdir, monkeypatch, capsys):
    """The automatic count follows the load, so a resume could differ from the first run: it
    takes the file's (a cell's last float bits may depend on it), and says so."""
    import lldist
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))
    data = (torch.randn(40, 6), torch.randint(0, 3, (40,)))
    first = lldist.landscape(model, data, x=(-1, 1, 3), y=(-1, 1, 3), out="t.h5", progress_every=0)
    with h5py.File("t.h5", "r+") as f:
        assert f.attrs["eval_threads"] >= 1
        f.attrs.modify("eval_threads", 3)  # as if the first run had chosen 3
        f["done"][0, 0] = False
    capsys.readouterr()
    again = lldist.landscape(model, data, x=(-1, 1, 3), y=(-1, 1, 3), out="t.h5", progress_every=0)
    assert "3 CPU thread(s), as this file's first run chose" in capsys.readouterr().out
    assert np.array_equal(again.loss, first.loss) and h5py.File("t.h5", "r").attrs["eval_threads"] == 3


def test_metrics_write_only_when_asked_and_only_after_every_file_is_good(workdir):
    job = write_job(workdir / "job.yaml", grid={"x": [-1.0, 1.0, 5], "y": [-1.0, 1.0, 5]})
    run(["lldist.surface", job], workdir)
    run(["lldist.surface", job, "--out", "partial.h5"], workdir)
    with h5py.File("partial.h5", "r+") as f:
        f["done"][0, 0] = False
    os.utime("out.h5", (1000, 1000))
    run(["lldist.metrics", "out.h5"], workdir)
    assert os.path.getmtime("out.h5") == 1000  # printing is the default
    p = run(["lldist.metrics", "out.h5", "partial.h5", "--store"], workdir, check=False)
    assert p.returncode == 2 and "not complete" in p.stderr
    assert os.path.getmtime("out.h5") == 1000  # the good file was not written either
    run(["lldist.metrics", "out.h5", "--store"], workdir)
    with h5py.File("out.h5", "r") as f:
        assert "roughness" in f["metrics/test"].attrs


def test_yaml_numbers_and_duplicate_keys(workdir):
    with open("job.yaml", "w") as f:
        f.write("model: {name: mlp, checkpoint: m.pt}\ntrain: {lr: 5e-4, weight_decay: 1E-5}\n")
    job = load_job("job.yaml")
    assert job.train.lr == 5e-4 and job.train.weight_decay == 1e-5
    with open("dup.yaml", "w") as f:
        f.write("grid:\n  x: [-1, 1, 5]\n  y: [-1, 1, 5]\ngrid:\n  x: [-1, 1, 3]\n")
    p = run(["lldist.surface", "dup.yaml"], workdir, check=False)
    assert p.returncode == 2 and "duplicate key 'grid'" in p.stderr and "line 4" in p.stderr
