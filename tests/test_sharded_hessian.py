"""The Hessian of a model sharded over a rank group (issue 33): `python -m lldist.hessian` in a
shard group of real MPI ranks, real torch.distributed groups (their collectives over MPI:
evaluation/collectives.py) and real FSDP2, its products central differences of the sharded
gradient and its Lanczos vectors sharded; against the exact Hessian (torch's double backward on
the whole float64 model) and one process."""

import json
import signal
import subprocess
import sys

import h5py
import numpy as np
import pytest
import torch
from conftest import Flat, env, kill_tree, mpiexec, run, write_job

from lldist.config import load_job
from lldist.evaluation.curvature import first_batches

FLAGS = ["--top", "3", "--trace-samples", "6", "--batches", "3", "--tol", "1e-10"]


def stored(path, split="test"):
    with h5py.File(path, "r") as f:
        g = f["curvature"][split]
        return dict(g.attrs), {k: g[k][()] for k in g if isinstance(g[k], h5py.Dataset)}


def sharded_command(job, k, *extra):
    return [mpiexec(), "-n", str(k), sys.executable, "-m", "lldist.hessian", job, *FLAGS, *extra,
            "--set", f"eval.group_size={k}", "--set", "eval.group_mode=shard"]


def sharded(workdir, job, k, *extra, check=True):
    return run(sharded_command(job, k, *extra), workdir, check=check, timeout=600)


def exact(job_path, batches=3, samples=6, blocks=None):
    """The exact Hessian of the job's mean loss on its first batches, the whole model in
    float64 (torch.autograd.functional.hessian of a flat vector): its eigenvalues, the
    trace estimates of the same Rademacher vectors, each block's top eigenvalue and trace
    estimate, and λmax without each batch."""
    job = load_job(job_path)
    f = Flat(job)
    names, sizes, theta = f.names, f.sizes, f.theta
    chosen = first_batches(f.loaded.splits["test"], job.eval.batch_size, batches, torch.float64)

    def hessian(bs):
        return torch.autograd.functional.hessian(lambda flat: f.loss(flat, bs), theta).numpy()
    H = hessian(chosen)
    g = torch.Generator().manual_seed(0)
    zs = [(torch.randint(0, 2, (len(theta),), generator=g) * 2 - 1).double().numpy() for _ in range(samples)]
    offsets = dict(zip(names, np.cumsum([0] + sizes[:-1])))
    size = dict(zip(names, sizes))
    out = {"eigenvalues": np.linalg.eigvalsh(H), "traces": [z @ H @ z for z in zs], "blocks": {},
           "jackknife": [np.linalg.eigvalsh(hessian(chosen[:b] + chosen[b + 1:]))[-1] for b in range(len(chosen))]}
    for b, ps in (blocks or {}).items():
        idx = np.concatenate([np.arange(offsets[n], offsets[n] + size[n]) for n in ps])
        out["blocks"][b] = (np.linalg.eigvalsh(H[np.ix_(idx, idx)])[-1], [z[idx] @ (H @ z)[idx] for z in zs])
    return out


def equals_the_exact_layers(got, job_path, rtol):
    """A stored Hessian of mlp_job's model with curvature.blocks=layers (FLAGS) against the
    exact matrix: the top eigenvalues, λmin (to rtol × the largest |eigenvalue|), the trace of
    the same Rademacher vectors, the jackknife and each layer's top eigenvalue and trace."""
    ex = exact(job_path, blocks={"net.1": ["net.1.weight", "net.1.bias"], "net.3": ["net.3.weight", "net.3.bias"]})
    scale = np.abs(ex["eigenvalues"]).max()
    np.testing.assert_allclose(json.loads(got["top_eigenvalues"]), ex["eigenvalues"][::-1][:3], rtol=rtol)
    np.testing.assert_allclose(got["lambda_min"], ex["eigenvalues"][0], atol=rtol * scale)
    np.testing.assert_allclose(got["trace"], np.mean(ex["traces"]), rtol=rtol)
    np.testing.assert_allclose(json.loads(got["lambda_max_jackknife"]), ex["jackknife"], rtol=rtol)
    for row in json.loads(got["blocks"]):
        top, traces = ex["blocks"][row["block"]]
        np.testing.assert_allclose(row["lambda_max"], top, rtol=rtol, err_msg=row["block"])
        np.testing.assert_allclose(row["trace"], np.mean(traces), rtol=rtol, err_msg=row["block"])


def mlp_job(workdir, hidden=(16,)):
    return write_job(workdir / "job.yaml", model={"name": "mlp", "checkpoint": "model.pt", "args": {"hidden": list(hidden)}},
                     data={"name": "digits", "subset": 400}, grid={"x": [-1, 1, 3], "y": None},
                     eval={"batch_size": 20, "threads": 1})


@pytest.mark.parametrize("k", [2, pytest.param(3, marks=pytest.mark.slow)])
def test_a_shard_groups_hessian_equals_the_exact_matrix_and_one_process(workdir, k):
    """An MLP (uneven rows at k = 3): the top eigenvalues, the smallest, the trace with the same
    Rademacher vectors, each layer's top eigenvalue and trace, and the jackknife, against the
    exact matrix to 1e-7 relative (the products' error is about 1e-9: evaluation/sharded.py),
    and one process's float32 Hessian to 1e-5."""
    job = mlp_job(workdir)
    run(["lldist.surface", job, "--progress-every", "0"], workdir)
    run(["lldist.hessian", job, *FLAGS, "--set", "curvature.blocks=layers"], workdir)
    one, _ = stored(workdir / "out.h5")
    p = sharded(workdir, job, k, "--set", "curvature.blocks=layers")
    assert "built on the meta device in float64" in p.stdout and f"one shard group of {k}" in p.stdout, p.stdout
    got, _ = stored(workdir / "out.h5")
    assert (got["group_size"], got["group_mode"], got["ranks"]) == (k, "shard", k)
    assert got["lanczos_converged"] and got["num_parameters"] == one["num_parameters"] == 64 * 16 + 16 + 16 * 10 + 10
    equals_the_exact_layers(got, workdir / "job.yaml", 1e-7)
    np.testing.assert_allclose(json.loads(got["top_eigenvalues"]), json.loads(one["top_eigenvalues"]), rtol=1e-5)
    np.testing.assert_allclose(got["trace"], one["trace"], rtol=1e-5)
    assert got["loss"] == pytest.approx(one["loss"], rel=1e-6)


def test_a_data_groups_hessian_splits_every_vector_and_equals_the_exact_matrix(workdir):
    """Three ranks, no shard group (the MLP's 1,210 parameters split 404, 404, 402): each rank
    holds the whole float32 model, takes exact products over its share of the batches and holds
    a third of every Lanczos vector (stored: vector_entries_per_rank), so no rank holds the basis
    and rank 0's memory is a worker's. The eigenvalues, λmin, the trace of the same Rademacher
    vectors, the blocks and the jackknife against the exact float64 matrix to float32's accuracy,
    and one process's (ARPACK on whole vectors) to 1e-5."""
    job = mlp_job(workdir)
    run(["lldist.surface", job, "--progress-every", "0"], workdir)
    run(["lldist.hessian", job, *FLAGS, "--set", "curvature.blocks=layers"], workdir)
    one, _ = stored(workdir / "out.h5")
    p = run([mpiexec(), "-n", "3", sys.executable, "-m", "lldist.hessian", job, *FLAGS, "--set",
             "curvature.blocks=layers"], workdir)
    assert "each vector split over them" in p.stdout and "per rank: peak resident" in p.stdout, p.stdout
    got, _ = stored(workdir / "out.h5")
    n = 64 * 16 + 16 + 16 * 10 + 10
    assert (got["group_mode"], got["ranks"], got["num_parameters"]) == ("data", 3, n)
    assert got["vector_entries_per_rank"] == -(-n // 3) and got["lanczos_converged"]
    peak = json.loads(got["rank_peak_mib"])
    assert len(peak) == 3 and max(peak) < 1.3 * min(peak)
    equals_the_exact_layers(got, workdir / "job.yaml", 1e-5)
    np.testing.assert_allclose(json.loads(got["top_eigenvalues"]), json.loads(one["top_eigenvalues"]), rtol=1e-5)
    np.testing.assert_allclose(got["trace"], one["trace"], rtol=1e-6)
    assert got["loss"] == one["loss"]  # the batches' sums in batch order, as one process adds them


@pytest.mark.slow
def test_a_shard_groups_density_matches_the_exact_spectrum(workdir):
    """Stochastic Lanczos quadrature on sharded vectors: with as many steps as it takes to
    exhaust a small model's Krylov space, its nodes are the exact eigenvalues and its weights
    the squared projections of the start vector: the density's mean and second moment are the
    exact (1/n) tr(H) and (1/n) tr(H²) up to the start vectors' spread."""
    job = mlp_job(workdir, hidden=(4,))
    run(["lldist.surface", job, "--progress-every", "0"], workdir)
    sharded(workdir, job, 2, "--density", "--density-runs", "2", "--density-steps", "400", "--no-jackknife",
            "--trace-samples", "0")
    _, data = stored(workdir / "out.h5")
    ex = exact(workdir / "job.yaml", samples=0)["eigenvalues"]
    nodes, weights = data["density_nodes"], data["density_weights"]
    np.testing.assert_allclose(weights.sum(1), 1.0, rtol=1e-9)
    used = nodes[weights > 1e-12]
    # every node sits on an exact eigenvalue (Lanczos on an exhausted Krylov space)
    assert np.abs(used[:, None] - ex[None, :]).min(1).max() < 1e-6 * np.abs(ex).max()


def exact_outer(job_path, operator, batches=3, samples=6):
    """The exact GGN (Σ_b J_bᵀ H_out,b J_b / Σ weights, J the logits' Jacobian, H_out the summed
    loss's Hessian in the logits) or empirical Fisher (Σ_i w_i g_i g_iᵀ / Σ w_i, g_i each
    example's own mean-loss gradient) of the job's first batches, from whole Jacobians of the
    float64 model (torch.autograd.functional): its eigenvalues and the trace estimates of the
    same Rademacher vectors as the sharded run's."""
    job = load_job(job_path)
    f = Flat(job)
    task, theta = f.task, f.theta
    F = torch.autograd.functional
    M, W = np.zeros((len(theta), len(theta))), 0.0
    for b in first_batches(f.loaded.splits["test"], job.eval.batch_size, batches, torch.float64):
        def logits(flat):
            return f.outputs(flat, b[0])
        if operator == "ggn":
            out = logits(theta).detach()
            J = F.jacobian(logits, theta).reshape(out.numel(), -1).numpy()
            H = F.hessian(lambda o: task.loss_terms(o.view(out.shape), b)[0], out.reshape(-1)).numpy()
            M += J.T @ H @ J
            W += float(task.loss_terms(out, b)[1])
        else:
            vals, wts = task.loss_examples(logits(theta), b)
            G = F.jacobian(lambda flat: (lambda v, w: v / w)(*task.loss_examples(logits(flat), b)), theta).numpy()
            w = wts.detach().numpy()
            M += (G * w[:, None]).T @ G
            W += float(w.sum())
    M /= W
    g = torch.Generator().manual_seed(0)
    zs = [(torch.randint(0, 2, (len(theta),), generator=g) * 2 - 1).double().numpy() for _ in range(samples)]
    return np.linalg.eigvalsh(M), [z @ M @ z for z in zs]


@pytest.mark.parametrize("operator", ["ggn", pytest.param("fisher", marks=pytest.mark.slow)])
def test_a_shard_groups_ggn_and_fisher_equal_the_exact_matrices(workdir, operator):
    """G v and F v through FSDP2 (a central difference of forwards, then a sharded backward):
    the top eigenvalues, the smallest and the trace against the exact matrices to 1e-7, and
    one process's float32 forward-mode operator to 1e-5."""
    job = mlp_job(workdir)
    run(["lldist.surface", job, "--progress-every", "0"], workdir)
    # (one process's smallest eigenvalue, of ARPACK in float32 amid a rank-deficient bulk at 0,
    # would not converge: the exact one is the check)
    run(["lldist.hessian", job, *FLAGS, "--no-jackknife", "--no-smallest", "--tol", "1e-8",
         "--set", f"curvature.operator={operator}"], workdir)
    one, _ = stored(workdir / "out.h5", f"test_{operator}")
    # (tol 1e-8: a rank-deficient matrix's λmin = 0 sits at the products' noise, about 1e-9)
    sharded(workdir, job, 2, "--no-jackknife", "--tol", "1e-8", "--set", f"curvature.operator={operator}")
    got, _ = stored(workdir / "out.h5", f"test_{operator}")
    assert (got["operator"], got["group_mode"], got["lanczos_converged"]) == (operator, "shard", True)
    vals, traces = exact_outer(workdir / "job.yaml", operator)
    scale = np.abs(vals).max()
    np.testing.assert_allclose(json.loads(got["top_eigenvalues"]), vals[::-1][:3], rtol=1e-7)
    np.testing.assert_allclose(got["lambda_min"], vals[0], atol=1e-7 * scale)
    np.testing.assert_allclose(got["trace"], np.mean(traces), rtol=1e-7)
    np.testing.assert_allclose(json.loads(got["top_eigenvalues"]), json.loads(one["top_eigenvalues"]), rtol=1e-5)
    np.testing.assert_allclose(got["trace"], one["trace"], rtol=1e-5)


def test_a_lanczos_basis_beyond_its_memory_goes_to_disk_with_the_same_numbers(workdir):
    """curvature.basis_memory of 20 kB keeps 4 of a rank's 4.8 kB vectors in memory, the rest in
    a temporary file: the eigenvalues, the trace and the density are the in-memory run's, bit for
    bit, and the file is gone afterwards."""
    import os
    job = mlp_job(workdir)
    run(["lldist.surface", job, "--progress-every", "0"], workdir)
    extra = ("--no-jackknife", "--density", "--density-runs", "1", "--density-steps", "30")
    sharded(workdir, job, 2, *extra)
    mem, mem_data = stored(workdir / "out.h5")
    tmp = workdir / "tmp"
    tmp.mkdir()
    p = run([mpiexec(), "-n", "2", sys.executable, "-m", "lldist.hessian", job, *FLAGS, *extra, "--basis-memory",
             "20000", "--set", "eval.group_size=2", "--set", "eval.group_mode=shard"], workdir, timeout=600,
            TMPDIR=tmp)
    assert "Lanczos basis: 4 vectors of 0.00484 MB a rank in memory" in p.stdout and str(tmp) in p.stdout, p.stdout
    disk, disk_data = stored(workdir / "out.h5")
    for key in ("top_eigenvalues", "lambda_min", "trace", "lanczos_steps"):
        assert disk[key] == mem[key], key
    for key in ("density_nodes", "density_weights"):
        np.testing.assert_array_equal(disk_data[key], mem_data[key])
    assert not [f for f in os.listdir(tmp) if f.startswith("lldist")]  # (torch leaves its own folder there)


def test_a_shard_groups_hessian_refuses_what_it_cannot_take_in_one_line(workdir):
    job = mlp_job(workdir)
    for extra, ranks, says in (([], 1, "the sharded Hessian runs in one group"),):
        p = run([mpiexec(), "-n", str(ranks), sys.executable, "-m", "lldist.hessian", job, *FLAGS, *extra,
                 "--set", "eval.group_size=2", "--set", "eval.group_mode=shard"], workdir, check=False)
        assert p.returncode == 2 and says in p.stderr and len(p.stderr.strip().splitlines()) == 1, p.stderr


@pytest.mark.slow
def test_a_tied_gpt2s_hessian_in_a_shard_group_equals_one_process(workdir):
    """GPT-2 with its output layer tied to its embedding, from sharded safetensors read by rows,
    in a shard group of 3, on the language-model loss: against one process's (float32)."""
    from test_rows import TEXT, seeded_folder
    folder = seeded_folder("tiny_gpt", workdir / "model")
    job = write_job(workdir / "job.yaml", model={"name": f"hf:{folder}", "checkpoint": None}, train=None,
                    data=dict(TEXT, args={"max_length": 24, "label": None}), grid={"x": [-1, 1, 3], "y": None},
                    eval={"batch_size": 7, "threads": 1, "loss": "lm"})
    env = {"HF_HUB_OFFLINE": 1}
    run(["lldist.surface", job, "--progress-every", "0"], workdir, **env)
    run(["lldist.hessian", job, *FLAGS, "--tol", "1e-6", "--no-jackknife"], workdir, **env)
    one, _ = stored(workdir / "out.h5")
    p = run([mpiexec(), "-n", "3", sys.executable, "-m", "lldist.hessian", job, *FLAGS, "--tol", "1e-6",
             "--no-jackknife", "--set", "eval.group_size=3", "--set", "eval.group_mode=shard"], workdir, timeout=600,
            **env)
    assert "built on the meta device in float64" in p.stdout, p.stdout
    got, _ = stored(workdir / "out.h5")
    np.testing.assert_allclose(json.loads(got["top_eigenvalues"]), json.loads(one["top_eigenvalues"]), rtol=1e-4)
    np.testing.assert_allclose(got["trace"], one["trace"], rtol=1e-4)


@pytest.mark.slow
def test_a_shard_groups_hessian_killed_mid_lanczos_gives_the_same_numbers_when_run_again(workdir):
    """SIGKILL as the group starts Lanczos (its line naming the group), then the same
    command: it starts again from scratch (seeded start vectors and Rademacher draws) and stores
    what an uninterrupted run stores, bit for bit; the killed run stored nothing."""
    job = mlp_job(workdir)
    run(["lldist.surface", job, "--progress-every", "0"], workdir)
    sharded(workdir, job, 2)
    whole, _ = stored(workdir / "out.h5")
    with h5py.File(workdir / "out.h5", "a") as f:
        del f["curvature"]
    p = subprocess.Popen(sharded_command(job, 2), cwd=workdir, env=env(), stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True)
    seen = []
    for line in p.stdout:
        seen.append(line)
        if "in one shard group of 2" in line:
            break
    kill_tree(p.pid, signal.SIGKILL)
    p.wait(timeout=30)
    assert any("in one shard group of 2" in line for line in seen), "".join(seen)
    with h5py.File(workdir / "out.h5", "r") as f:
        assert "curvature" not in f
    sharded(workdir, job, 2)
    again, _ = stored(workdir / "out.h5")
    assert again.keys() == whole.keys()
    for key in whole.keys() - {"seconds", "created"}:
        assert np.array_equal(again[key], whole[key]), key
