"""Mode-connecting curves (issue 23, part 2): `python -m lldist.connect a.pt b.pt job.yaml` trains
a Bezier curve's bend between two digits MLPs recorded from a plain loop (lldist.Recorder), and
its files hold: the ends bit for bit the two models, a maximum loss along the curve well below
the straight line's, barriers equal to numpy's on the stored values, a plane that draws the
curve through the three control points; killed and resumed, the same numbers bit for bit."""

import os
import shutil
import signal
import subprocess
import sys

import h5py
import numpy as np
import pytest
import torch
from conftest import env, kill_tree, model_and_data, run, write_job

from lldist.config import DataConfig, EvalConfig, ModelConfig
from lldist.evaluation.curves import point
from lldist.directions.record import Directions
from lldist.evaluation.evaluator import Evaluator, evaluate_plain
from lldist.workloads.data import load_split
from lldist.workloads.models import build_model

MLP = {"name": "mlp", "args": {"hidden": [32]}}


def recorded_mlps(workdir, seeds=(0, 1), epochs=6):
    """Two digits MLPs trained from different seeds by a plain loop, recorded by lldist.Recorder
    (its final checkpoint is what connect reads)."""
    from lldist import Recorder
    data = load_split(DataConfig(name="digits"), "train")
    x, y = data.normalize(data.x), data.y
    paths = []
    for s in seeds:
        model = build_model(ModelConfig(name="mlp", args=MLP["args"], seed=s), (1, 8, 8), 10)
        opt = torch.optim.Adam(model.parameters(), lr=0.005)
        g = torch.Generator().manual_seed(s)
        rec = Recorder(str(workdir / f"m{s}.pt"), every=20)
        for _ in range(epochs):
            order = torch.randperm(len(y), generator=g)
            for i in range(0, len(y), 64):
                idx = order[i:i + 64]
                loss = torch.nn.functional.cross_entropy(model(x[idx]), y[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
                rec.step(model, loss=loss.item())
        rec.finish(model)
        paths.append(str(workdir / f"m{s}.pt"))
    return paths


def connect_job(workdir, **connect):
    return write_job(workdir / "job.yaml", model={**MLP, "checkpoint": None}, train=None,
                     data={"name": "digits"}, eval={"split": "both", "batch_size": 256},
                     connect={"train": {"optimizer": "adam", "lr": 0.005, "batch_size": 64, "epochs": 6},
                              "points": 11, "plane": 7, **connect})


def values(path):
    with h5py.File(path, "r") as f:
        return {k: f[k][()] for k in ("train/loss", "train/acc", "test/loss", "test/acc", "done")}, f["x"][()]


@pytest.mark.slow
def test_the_bezier_curve_between_two_recorded_mlps_beats_the_line(workdir):
    a, b = recorded_mlps(workdir)
    job = connect_job(workdir)
    p = run(["lldist.connect", a, b, job, "--out", "ab"], workdir)
    assert "bend trained" in p.stdout
    curve, t = values("ab/curve.h5")
    line, t_line = values("ab/line.h5")
    assert curve["done"].all() and line["done"].all() and t.tolist() == t_line.tolist() == np.linspace(0, 1, 11).tolist()
    # the ends are the two models: the same numbers as the straight line's ends, bit for bit,
    # and those of a plain loop over each checkpoint
    for q in ("train/loss", "train/acc", "test/loss", "test/acc"):
        assert curve[q][0] == line[q][0] and curve[q][-1] == line[q][-1]
    for k, path in ((0, a), (-1, b)):
        model, test = model_and_data(job, path)  # the job's own test split (its data.subset)
        state = torch.load(path, weights_only=True)["state_dict"]
        ref_loss, ref_acc = evaluate_plain(model, state, test, batch_size=256)
        assert curve["test/loss"][k] == pytest.approx(ref_loss, rel=1e-6) and curve["test/acc"][k] == ref_acc
    # the trained curve's worst training loss is far below the line's (measured on this VM:
    # 0.41 against 0.003 for a 64-wide MLP; the test's 32-wide one asks for a factor 3)
    assert curve["train/loss"].max() < line["train/loss"].max() / 3, (curve["train/loss"], line["train/loss"])
    # the barrier connect printed and stored is numpy's on the stored curve
    from lldist.analysis.metrics import from_file
    for path, v in (("ab/curve.h5", curve), ("ab/line.h5", line)):
        loss = v["train/loss"]
        rise = loss - ((1 - t) * loss[0] + t * loss[-1])
        m = from_file(path, split="train")
        assert m["barrier_loss"] == pytest.approx(rise.max(), rel=1e-12, abs=1e-15)
        assert m["barrier_loss_alpha"] == t[int(np.argmax(rise))]
    # the plane through a, b and the bend: the three models evaluated, the curve drawn through them
    with h5py.File("ab/plane.h5", "r") as f:
        assert f["points/done"][()].all() and f["directions"].attrs["curve"] == "bezier"
        coords = f["points/coords"][()]
    from lldist.analysis import figures
    s = figures.read_surface("ab/plane.h5")
    cp = s.curve_path
    assert cp[0].tolist() == [0, 0] and cp[-1].tolist() == [1, 0]
    assert cp[50] == pytest.approx([0.5 * coords[2][0] + 0.25, 0.5])  # t = 1/2: c1 = 1/2, c2 = 1/4
    fig = figures.figure_2d(s, "train", "loss", "contour", figures.PlotOptions())
    assert "bezier curve" in [ln.get_label() for ln in fig.axes[0].lines]
    info = run(["lldist.info", "ab/plane.h5"], workdir).stdout
    assert "bezier curve (a, b, bend)" in info and "bend.pt" in info and f"at ({coords[2][0]:.4g}, 1)" in info
    # a second run reuses the bend and computes nothing
    q = run(["lldist.connect", a, b, job, "--out", "ab"], workdir)
    assert "reused" in q.stdout and "11 to compute" not in q.stdout


def test_the_curve_is_exact_at_its_ends_and_the_evaluator_moves_along_it():
    torch.manual_seed(0)
    model = build_model(ModelConfig(name="mlp", args={"hidden": [8]}, seed=0), (1, 8, 8), 10)
    a = {n: v.detach().clone() for n, v in model.state_dict().items()}
    b = {n: torch.randn_like(v) for n, v in a.items()}
    bend = {n: torch.randn_like(v) for n, v in a.items()}
    data = load_split(DataConfig(name="digits", subset=100), "test")
    for kind in ("bezier", "polychain"):
        dirs = Directions(x={n: b[n] - a[n] for n in a}, target=b, bend=bend)
        ev = Evaluator(model, a, dirs, {"test": data}, EvalConfig(batch_size=50), device="cpu", curve=kind)
        for t, want in ((0.0, a), (1.0, b), (0.3, point(kind, 0.3, a, bend, b))):
            ev.set_weights(t)
            live = dict(ev.eager.state_dict())
            assert all(torch.equal(live[n], want[n]) for n in a), (kind, t)
        ref = evaluate_plain(model, point(kind, 0.7, a, bend, b), data, batch_size=50)
        got = ev.evaluate(0.7)[0]
        assert got[0] == pytest.approx(ref[0], rel=1e-6) and got[1] == ref[1]


def test_recomputed_batchnorm_statistics_are_torchs_update_bn():
    """eval.bn: recompute against torch.optim.swa_utils.update_bn, an independent implementation
    of the same cumulative average, on a CNN with BatchNorm at a point of a curve."""
    from torch.optim.swa_utils import update_bn
    cfg = ModelConfig(name="cnn", args={"width": 4, "stages": 1, "blocks": 1, "batchnorm": True}, seed=0)
    dc = DataConfig(name="digits", subset=200)
    train, test = load_split(dc, "train"), load_split(dc, "test")
    model = build_model(cfg, (1, 8, 8), 10)
    a = {n: v.detach().clone() for n, v in model.state_dict().items() if v.is_floating_point()}
    torch.manual_seed(1)
    b = {n: v + 0.1 * torch.randn_like(v) for n, v in a.items()}
    bend = {n: v + 0.1 * torch.randn_like(v) for n, v in a.items()}
    dirs = Directions(x={n: b[n] - a[n] for n in a}, target=b, bend=bend)
    ev = Evaluator(model, a, dirs, {"test": test}, EvalConfig(batch_size=50, bn="recompute"), device="cpu",
                   curve="bezier", bn_data=train)
    got = ev.evaluate(0.4)[0]
    ref_model = build_model(cfg, (1, 8, 8), 10)
    ref_model.load_state_dict(point("bezier", 0.4, a, bend, b), strict=False)
    x = train.normalize(train.x)
    update_bn([x[i:i + 50] for i in range(0, len(x), 50)], ref_model)
    ref_model.eval()
    with torch.no_grad():
        logits = ref_model(test.normalize(test.x))
    ref_loss = torch.nn.functional.cross_entropy(logits, test.y).item()
    assert got[0] == pytest.approx(ref_loss, rel=1e-5)
    # and it matters: the interpolated running statistics give another loss
    plain = Evaluator(build_model(cfg, (1, 8, 8), 10), a, dirs, {"test": test}, EvalConfig(batch_size=50),
                      device="cpu", curve="bezier").evaluate(0.4)[0]
    assert abs(plain[0] - got[0]) > 1e-3


@pytest.mark.slow
def test_bad_curves_are_refused_in_one_line(workdir):
    a, b = (str(workdir / n) for n in ("a.pt", "b.pt"))
    from lldist.workloads.models import save_checkpoint
    for s, p in ((0, a), (1, b)):
        save_checkpoint(build_model(ModelConfig(name="mlp", args=MLP["args"], seed=s), (1, 8, 8), 10), p, {})
    job = connect_job(workdir)
    for args, says in (([a, "nope.pt", job], "nope.pt does not exist"),
                       ([a, b, job, "--set", "connect.curve=spline"], "connect.curve"),
                       ([a, b, job, "--set", "connect.points=2"], "at least 3"),
                       ([a, b, job, "--set", "connect.align=activations"], "connect.align")):
        p = run(["lldist.connect", *args], workdir, check=False)
        assert p.returncode == 2 and says in p.stderr and len(p.stderr.strip().splitlines()) == 1, p.stderr
    surface = write_job(workdir / "s.yaml", model={**MLP, "checkpoint": None}, train=None)
    for sets, says in ((["directions.kind=curve", "directions.points=[a.pt, b.pt]"], "three checkpoints"),
                       (["directions.kind=curve", f"directions.points=[{a}, {b}, {a}]"], "a 1D grid"),
                       (["directions.curve=bezier"], "for kind: curve"),
                       (["eval.bn=recompute", "eval.batch_size=auto"], "must be a number")):
        args = [x for s in sets for x in ("--set", s)]
        p = run(["lldist.surface", surface, *args], workdir, check=False)
        assert p.returncode == 2 and says in p.stderr and len(p.stderr.strip().splitlines()) == 1, p.stderr
    # a bend trained for other ends is not reused silently
    os.makedirs("ab", exist_ok=True)
    torch.save({"state_dict": build_model(ModelConfig(**MLP), (1, 8, 8), 10).state_dict(), "meta": {"curve": "bezier"}},
               "ab/bend.pt")
    p = run(["lldist.connect", a, b, job, "--out", "ab"], workdir, check=False)
    assert p.returncode == 2 and "other ends or settings" in p.stderr


@pytest.mark.slow
def test_connect_killed_while_evaluating_resumes_bitwise(workdir):
    a, b = recorded_mlps(workdir, epochs=2)
    job = connect_job(workdir, plane=41)  # on all of digits, ~6 s of cells on this VM: the kill lands in the plane
    run(["lldist.connect", a, b, job, "--out", "whole", "--set", "data.subset=null", "--set", "eval.chunk_size=8"], workdir)
    cmd = [sys.executable, "-m", "lldist.connect", a, b, job, "--out", "killed", "--set", "data.subset=null",
           "--set", "eval.chunk_size=8", "--progress-every", "0.001"]
    p = subprocess.Popen(cmd, cwd=workdir, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    in_plane, killed = False, False
    for line in p.stdout:
        in_plane = in_plane or "connect: plane" in line
        if in_plane and line.startswith("cells ") and int(line.split()[1].split("/")[0]) >= 300:
            kill_tree(p.pid, signal.SIGKILL)
            killed = True
            break
    p.wait()
    assert killed, "the run finished before it could be killed"
    with h5py.File("killed/plane.h5", "r") as f:
        done = int(f["done"][()].sum())
    assert 300 <= done < 41 * 41
    q = run(cmd[2:-2], workdir)
    assert "reused" in q.stdout and f"{41 * 41 - done} to compute" in q.stdout
    for name in ("curve.h5", "line.h5", "plane.h5"):
        got, _ = values(f"killed/{name}")
        want, _ = values(f"whole/{name}")
        for k in got:
            np.testing.assert_array_equal(got[k], want[k], err_msg=f"{name} {k}")
    b1 = torch.load("killed/bend.pt", weights_only=True)["state_dict"]
    b2 = torch.load("whole/bend.pt", weights_only=True)["state_dict"]
    assert all(torch.equal(b1[k], b2[k]) for k in b1)


@pytest.mark.slow
def test_connect_over_three_ranks_is_the_single_process_run_and_alignment_lowers_the_line(workdir):
    from conftest import mpiexec
    a, b = recorded_mlps(workdir)
    job = connect_job(workdir, align="weights")
    run([mpiexec(), "-n", "3", sys.executable, "-m", "lldist.connect", a, b, job, "--out", "mpi"], workdir)
    # a b_aligned.pt left in the folder by another b (here: a itself) is not taken for this b's
    os.makedirs("one")
    shutil.copy(a, "one/b_aligned.pt")
    p = run(["lldist.connect", a, b, job, "--out", "one"], workdir)
    assert "line_aligned" in p.stdout
    for name in ("curve.h5", "line.h5", "line_aligned.h5", "plane.h5"):
        got, _ = values(f"mpi/{name}")
        want, _ = values(f"one/{name}")
        for k in got:
            np.testing.assert_array_equal(got[k], want[k], err_msg=f"{name} {k}")
    line, _ = values("one/line.h5")
    aligned_line, _ = values("one/line_aligned.h5")  # its end computes b's function
    assert aligned_line["train/loss"][-1] == pytest.approx(line["train/loss"][-1], rel=1e-5)
    assert aligned_line["train/acc"][-1] == line["train/acc"][-1]
    from lldist.analysis.metrics import from_file
    raw, aligned = from_file("one/line.h5", "train"), from_file("one/line_aligned.h5", "train")
    assert aligned["barrier_loss"] < raw["barrier_loss"] / 2, (raw["barrier_loss"], aligned["barrier_loss"])
