"""Rank groups (eval.group_size, eval.group_mode): real MPI ranks, real torch.distributed groups
(their collectives over MPI: evaluation/collectives.py), real FSDP2 sharding, against one
process. `data` groups give one rank's numbers bit for bit (each batch's sum is made by one rank, the float64 sum over batches runs in batch order); `shard`
groups, whose ranks split the batches the same way, within 1e-6 (FSDP gathers the same weights;
here they agree bit for bit too)."""

import os
import signal
import sys
import time

import h5py
import numpy as np
import pytest
from conftest import ROOT, cells_at_least, done_after_kill, kill_tree, mpiexec, run, surface_until, write_job

JOBS = os.path.join(ROOT, "jobs")


def mpirun(n, job, workdir, *extra, check=True, **envs):
    return run([mpiexec(), "-n", str(n), sys.executable, "-m", "lldist.surface", job, *extra, "--progress-every", "0"],
               workdir, check=check, timeout=600, **envs)


def values(path):
    with h5py.File(path, "r") as f:
        sp = [k for k in ("test", "train") if k in f][0]
        out = {q: f[f"{sp}/{q}"][()] for q in f[sp]}
        rec = f["chunks"][: f["nchunks"][()]]
        return out, sorted(set(rec["rank"].tolist())), bool(f["done"][()].all())


def compare(one, other, exact: bool):
    a, _, _ = values(one)
    b, ranks, done = values(other)
    assert done and a.keys() == b.keys()
    for q in a:
        if exact or q == "acc":  # accuracy counts are exact in both modes
            np.testing.assert_array_equal(a[q], b[q], err_msg=q)
        else:
            np.testing.assert_allclose(b[q], a[q], rtol=1e-6, atol=0, err_msg=q)
    return ranks


def mlp_job(workdir, **kw):
    # batch 40: 9 batches of the 360 test digits, which 2 and 4 do not divide, so a sharded
    # group's ranks run unequal shares and the one with fewer repeats a forward (the gathers)
    return write_job(workdir / "job.yaml", model={"name": "mlp", "checkpoint": "model.pt", "args": {"hidden": [32, 16]}},
                     grid={"x": [-1, 1, 5], "y": [-1, 1, 4]}, eval={"batch_size": 40, "chunk_size": 2, "threads": 1}, **kw)


@pytest.mark.parametrize("mode", ["data", "shard"])
@pytest.mark.slow
def test_two_groups_of_two_equal_one_process(workdir, mode):
    job = mlp_job(workdir)
    run(["lldist.surface", job, "--out", "one.h5"], workdir)
    p = mpirun(4, job, workdir, "--out", "g.h5", "--set", "eval.group_size=2", "--set", f"eval.group_mode={mode}")
    assert all(f"rank {r}/4 on" in p.stdout for r in range(4))
    assert f"2 groups of 2 ranks ({mode}): ranks 0-1, 2-3" in p.stdout and "spans nodes" not in p.stdout
    ranks = compare("one.h5", "g.h5", exact=True)  # bit for bit on this model, both modes
    assert ranks == [0, 2]  # the leaders: rank 0 leads group 0, rank 2 group 1


def test_a_world_that_is_not_a_multiple_of_the_group_is_refused(workdir):
    job = mlp_job(workdir)
    p = mpirun(3, job, workdir, "--set", "eval.group_size=2", check=False)
    assert p.returncode == 2 and "launch a multiple of 2" in p.stderr and "Traceback" not in p.stderr
    assert not os.path.exists("out.h5")


CASES = {
    "skip_cnn": dict(model={"name": "cnn_skip", "checkpoint": "model.pt", "args": {"width": 8, "stages": 2}},
                     grid={"x": [-1, 1, 4], "y": [-1, 1, 3]}),
    "bert": dict(model={"name": f"hf:{JOBS}/models/tiny_bert", "checkpoint": None},
                 data={"name": "hf:csv", "root": f"{JOBS}/data/pydoc_topics", "args": {"max_length": 24}, "subset": 64},
                 train=None, grid={"x": [-1, 1, 3], "y": [-1, 1, 2]}),
    "gpt2": dict(model={"name": f"hf:{JOBS}/models/tiny_gpt", "checkpoint": None},
                 data={"name": "hf:csv", "root": f"{JOBS}/data/pydoc_topics",
                       "args": {"max_length": 24, "label": None}, "subset": 64},
                 train=None, grid={"x": [-1, 1, 3], "y": [-1, 1, 2]}, eval_loss="lm"),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_groups_equal_one_process_for_cnns_and_transformers(workdir, case):
    spec = dict(CASES[case])
    loss = spec.pop("eval_loss", "cross_entropy")
    job = write_job(workdir / "job.yaml", eval={"batch_size": 16, "chunk_size": 1, "threads": 1, "loss": loss}, **spec)
    run(["lldist.surface", job, "--out", "one.h5"], workdir, HF_HUB_OFFLINE=1)
    for mode in ("data", "shard"):
        p = mpirun(4, job, workdir, "--out", f"{mode}.h5", "--set", "eval.group_size=2", "--set",
                   f"eval.group_mode={mode}", HF_HUB_OFFLINE=1)
        compare("one.h5", f"{mode}.h5", exact=(mode == "data"))
        if case != "skip_cnn":  # what loading says (the tokenizer it found), rank 0 says once
            assert p.stdout.count("lldist: tokenizer ") == 1, p.stdout


@pytest.mark.slow
@pytest.mark.parametrize("k", [2, 3])
def test_sharded_groups_regenerate_recipe_directions_bit_for_bit(workdir, k):
    """directions.store: recipe: the file keeps the recipe, every rank of a sharded group
    regenerates its rows (3 ranks: uneven rows); the numbers are those of the tensors kept whole
    in one process."""
    job = mlp_job(workdir)
    run(["lldist.surface", job, "--out", "one.h5", "--set", "directions.store=tensors"], workdir)
    mpirun(k, job, workdir, "--out", "r.h5", "--set", "directions.store=recipe", "--set", f"eval.group_size={k}",
           "--set", "eval.group_mode=shard")
    compare("one.h5", "r.h5", exact=True)
    with h5py.File("r.h5", "r") as f:
        assert f["directions"].attrs["store"] == "recipe" and "fc" not in f["directions/x"]
        assert len(f["directions/x"]) == 0 and "checksums" in f["directions/x"].attrs


def test_a_file_keeps_a_recipe_and_gives_the_same_directions(workdir):
    """One process: a file keeping the recipe regenerates exactly the tensors another file keeps."""
    import torch

    from lldist.config import load_job
    from lldist.directions.kinds import materialize
    from lldist.inputs.loading import Source
    from lldist.store import SurfaceReader
    job = mlp_job(workdir)
    run(["lldist.surface", job, "--out", "t.h5", "--set", "directions.store=tensors"], workdir)
    run(["lldist.surface", job, "--out", "r.h5", "--set", "directions.store=recipe"], workdir)
    with SurfaceReader("t.h5") as a, SurfaceReader("r.h5") as b:
        kept, recipe = a.read_directions(), b.read_directions()
        assert a.attr("job_hash") == b.attr("job_hash")  # where directions live is not the job
    assert recipe.recipe is not None and recipe.x is None
    cfg = load_job(job)
    made = materialize(recipe, cfg, Source().load(cfg))
    for axis in ("x", "y"):
        assert all(torch.equal(getattr(made, axis)[n], torch.from_numpy(getattr(kept, axis)[n]))
                   for n in getattr(kept, axis))
    np.testing.assert_array_equal(values("t.h5")[0]["loss"], values("r.h5")[0]["loss"])


@pytest.mark.slow
def test_killing_one_rank_of_a_group_then_resuming_gives_the_same_file(workdir):
    # paced so that the run outlasts the kill: 100 cells of 6 batches of 50 ms, 3 a rank in a
    # group of 2 (both modes split the batches), about 8 s on two groups
    job = write_job(workdir / "job.yaml", train=None, grid={"x": [-1, 1, 100], "y": None},
                    model={"name": "python:userfactories:paced", "checkpoint": None,
                           "args": {"kind": "mlp", "hidden": [16], "seconds": 0.05}},
                    eval={"batch_size": 60, "chunk_size": 2, "threads": 1, "group_size": 2, "group_mode": "shard"})
    run(["lldist.surface", job, "--out", "whole.h5", "--set", "eval.group_size=1"], workdir)
    for victim in ("world", "member"):
        out = f"{victim}.h5"
        p = surface_until(4, job, out, workdir, cells_at_least(8))
        if victim == "world":
            kill_tree(p.pid, signal.SIGKILL)
        else:  # one rank of group 1: the launcher ends the others
            os.kill(_rank_pid(p.pid, 3), signal.SIGKILL)
        p.wait(timeout=60)
        assert 0 < done_after_kill(out) < 100
        mpirun(4, job, workdir, "--out", out)
        compare("whole.h5", out, exact=True)


def _rank_pid(root: int, rank: int) -> int:
    from lldist.bench.procs import mpi_ranks
    pids = mpi_ranks(root)
    assert rank in pids, f"no rank {rank}"
    return pids[rank]


@pytest.mark.slow
def test_a_failure_on_one_rank_of_a_group_ends_every_rank_within_seconds(workdir):
    job = write_job(workdir / "job.yaml", train=None, grid={"x": [-1, 1, 40], "y": None},
                    model={"name": "python:userfactories:faulty", "checkpoint": None, "args": {"after": 6, "pause": 0.01}},
                    data={"name": "digits", "subset": 64},
                    eval={"batch_size": 32, "chunk_size": 2, "threads": 1, "group_size": 2, "group_mode": "shard"})
    for rank in (1, 3):  # a member of rank 0's group, and one of the other group
        t0 = time.time()
        p = mpirun(4, job, workdir, "--out", f"f{rank}.h5", check=False, LLDIST_TEST_FAIL_RANK=rank)
        assert p.returncode == 1 and time.time() - t0 < 45
        errors = [ln for ln in p.stderr.splitlines() if ln.startswith("lldist: error:")]
        assert len(errors) == 1 and f"rank {rank} on" in errors[0] and "injected failure" in errors[0], p.stderr
