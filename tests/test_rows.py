"""Models loaded by rows (inputs/rows.py): a shard group builds its model on the meta device and
each rank reads only its own rows of θ*, from every checkpoint format, with real MPI ranks,
real torch.distributed groups (their collectives over MPI: evaluation/collectives.py) and real
FSDP2; against one process that loads it whole."""

import os
import signal
import sys

import h5py
import pytest
import torch
from conftest import ROOT, cells_at_least, done_after_kill, kill_tree, mpiexec, run, surface_until, write_job
from test_groups import compare, mpirun

from lldist.config import ModelConfig
from lldist.workloads.models import build_model, save_checkpoint

MODELS = os.path.join(ROOT, "jobs", "models")
TEXT = {"name": "hf:csv", "root": os.path.join(ROOT, "jobs", "data", "pydoc_topics"),
        "args": {"max_length": 24, "label": None}, "subset": 30}
SHARD = ("--set", "eval.group_mode=shard", "--set", "directions.store=recipe")


def seeded_folder(config, out, shard_size="60KB", seed=0):
    """A seeded hf: model written to sharded safetensors by the shipped script."""
    run([sys.executable, os.path.join(ROOT, "tools", "seeded_model.py"), os.path.join(MODELS, config), str(out),
         "--seed", str(seed), "--shard-size", shard_size], ROOT)
    return str(out)


def checkpoint(model_cfg, shape, classes, path, seed=1):
    """A checkpoint of the model at a seeded state other than its initialization."""
    model = build_model(ModelConfig(**model_cfg), shape, classes)
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
        for name, b in model.named_buffers():  # running statistics that are not the initial ones
            if b.is_floating_point():
                b.copy_(torch.rand_like(b) + 0.5)
    save_checkpoint(model, path, {"source": "test"})


def by_rows_equals_one_process(workdir, job, k, **envs):
    run(["lldist.surface", job, "--out", "one.h5"], workdir, **envs)
    p = mpirun(k, job, workdir, "--out", "rows.h5", "--set", f"eval.group_size={k}", *SHARD, **envs)
    assert "built on the meta device" in p.stdout and "built whole" not in p.stdout, p.stdout
    compare("one.h5", "rows.h5", exact=True)  # bit for bit on these models
    return p


def test_an_mlp_from_a_mapped_torch_file_by_rows_equals_one_process(workdir):
    """lldist's own .pt (torch's zip format, memory-mapped), 3 ranks: uneven rows."""
    job = write_job(workdir / "job.yaml", model={"name": "mlp", "checkpoint": "model.pt", "args": {"hidden": [32, 16]}},
                    grid={"x": [-1, 1, 4], "y": [-1, 1, 3]}, eval={"batch_size": 40, "chunk_size": 2, "threads": 1})
    by_rows_equals_one_process(workdir, job, 3)
    # today's shard group, built whole (directions kept as tensors travel whole), gives the same
    p = mpirun(3, job, workdir, "--out", "whole.h5", "--set", "eval.group_size=3", "--set", "eval.group_mode=shard",
               "--set", "directions.store=tensors")
    assert "built whole on every rank before it is sharded: its directions are kept as tensors" in p.stdout
    compare("rows.h5", "whole.h5", exact=True)


@pytest.mark.slow
def test_a_skip_cnn_with_batchnorm_from_safetensors_by_rows_equals_one_process(workdir):
    """A safetensors file; BatchNorm's running statistics (buffers) come from it whole."""
    model = {"name": "cnn_skip", "checkpoint": "model.safetensors", "args": {"width": 8, "stages": 2}}
    checkpoint(model, (1, 8, 8), 10, "model.safetensors")
    job = write_job(workdir / "job.yaml", model=model, train=None, grid={"x": [-1, 1, 3], "y": [-1, 1, 2]},
                    eval={"batch_size": 40, "chunk_size": 1, "threads": 1})
    by_rows_equals_one_process(workdir, job, 2)


@pytest.mark.slow
@pytest.mark.parametrize("config,loss", [("tiny_bert", "cross_entropy"), ("tiny_gpt", "lm"), ("tiny_llama", "lm")])
def test_transformers_from_sharded_safetensors_by_rows_equal_one_process(workdir, config, loss):
    """HuggingFace folders with sharded safetensors and their index, written by the shipped
    script: BERT, GPT-2 with its output layer tied to its embedding, Llama with its rotary cache
    (a non-persistent buffer computed in __init__)."""
    folder = seeded_folder(config, workdir / "model")
    assert os.path.exists(os.path.join(folder, "model.safetensors.index.json"))
    data = dict(TEXT, args={"max_length": 24, **({"label": None} if loss == "lm" else {})})
    job = write_job(workdir / "job.yaml", model={"name": f"hf:{folder}", "checkpoint": None}, data=data, train=None,
                    grid={"x": [-1, 1, 3], "y": [-1, 1, 2]},
                    eval={"batch_size": 7, "chunk_size": 1, "threads": 1, "loss": loss})
    by_rows_equals_one_process(workdir, job, 3, HF_HUB_OFFLINE=1)


READER = r"""
import gc
import sys
from mpi4py import MPI
from lldist.config import load_job
from lldist.evaluation.groups import GroupSpec, init_process_group
from lldist.inputs import rows


def io_read():  # bytes this process has read by read(2) and its kin
    return next(int(ln.split()[1]) for ln in open("/proc/self/io") if ln.startswith("rchar"))


def mapped_kib(path):  # the resident pages of this process's mappings of the file
    kib, current = 0, False
    for line in open("/proc/self/smaps"):
        head = line.split()
        if head and "-" in head[0] and all(c in "0123456789abcdef-" for c in head[0]):
            current = line.rstrip().endswith(path)
        elif current and line.startswith("Rss:"):
            kib += int(line.split()[1])
    return kib


comm = MPI.COMM_WORLD
spec = GroupSpec(comm.rank, comm.size, "shard")
init_process_group(spec, lambda v: comm.bcast(v, root=0), "cpu")
job = load_job(sys.argv[1])
rows.by_rows(job, spec, "cpu")  # once first: the imports FSDP makes read 29 MB of Python files
gc.collect()  # (and that model's mapping of the file goes)
before = io_read()
loaded = rows.by_rows(job, spec, "cpu")
print("read", comm.rank, (io_read() - before) / 1024, mapped_kib(sys.argv[2]), flush=True)
"""


@pytest.mark.parametrize("fmt", ["safetensors", "pt"])
def test_each_rank_reads_only_its_rows(workdir, fmt):
    """Measured on each rank of a group of 2 once its rows are in its model: the bytes it read
    from a safetensors file (/proc/self/io: a tensor's rows are one read of their byte range),
    or the pages of a memory-mapped torch file it touched (its mappings' resident set, from
    /proc/self/smaps). The model is two 2048-wide layers (17 MB of weights): a rank that read it
    whole would show all of it, one that reads its rows about half."""
    path = os.path.abspath(f"model.{fmt}")
    model = {"name": "mlp", "checkpoint": path, "args": {"hidden": [2048, 2048]}}
    checkpoint(model, (1, 8, 8), 10, path)
    job = write_job(workdir / "job.yaml", model=model, train=None)
    with open("reader.py", "w") as f:
        f.write(READER)
    p = run([mpiexec(), "-n", "2", sys.executable, "reader.py", job, path], workdir)
    seen = {int(r): (float(a), float(b)) for r, a, b in (ln.split()[1:4] for ln in p.stdout.splitlines()
                                                         if ln.startswith("read "))}
    size = os.path.getsize(path) / 1024
    assert set(seen) == {0, 1}, p.stdout
    for r, (read, mapped) in seen.items():
        kib = read if fmt == "safetensors" else mapped
        # (a mapping's pages come in by the kernel's fault-around, 64 KiB at a time: a little more)
        top = 0.6 if fmt == "safetensors" else 0.7
        assert 0.4 * size < kib < top * size, f"rank {r}: {kib:.0f} KiB of a {size:.0f} KiB checkpoint ({p.stdout})"
        if fmt == "safetensors":
            assert mapped == 0  # read, not mapped: no page of the file counts in the rank's memory


def bad(workdir, job, *extra):
    p = mpirun(2, job, workdir, "--set", "eval.group_size=2", *SHARD, *extra, check=False, HF_HUB_OFFLINE=1)
    lines = [ln for ln in p.stderr.splitlines() if ln.startswith("lldist: error")]
    assert p.returncode == 2 and len(lines) == 1 and "Traceback" not in p.stderr, p.stderr
    assert not os.path.exists("out.h5")
    return lines[0]


def test_bad_checkpoints_are_refused_in_one_line_and_nothing_is_written(workdir):
    from safetensors.torch import load_file, save_file
    model = {"name": "mlp", "checkpoint": "model.safetensors", "args": {"hidden": [32]}}
    checkpoint(model, (1, 8, 8), 10, "model.safetensors")
    state = load_file("model.safetensors")
    save_file({k: v for k, v in state.items() if k != "net.1.weight"}, "missing.safetensors")
    save_file({**state, "net.1.weight": state["net.1.weight"][:, :7].contiguous()}, "shape.safetensors")
    save_file({**state, "net.9.weight": state["net.1.weight"].clone()}, "extra.safetensors")
    checkpoint({"name": "cnn", "args": {"width": 4, "stages": 1}}, (1, 8, 8), 10, "cnn.safetensors")
    job = write_job(workdir / "job.yaml", model=model, train=None)
    assert "missing.safetensors does not fit model mlp: it has no entry net.1.weight" in \
        bad(workdir, job, "--set", "model.checkpoint=missing.safetensors")
    assert "shape.safetensors does not fit model mlp: net.1.weight is (32, 7) there, (32, 64) in the model" in \
        bad(workdir, job, "--set", "model.checkpoint=shape.safetensors")
    assert "extra.safetensors does not fit model mlp: it has an entry net.9.weight the model does not" in \
        bad(workdir, job, "--set", "model.checkpoint=extra.safetensors")
    assert "cnn.safetensors does not fit model mlp: it has no entry" in \
        bad(workdir, job, "--set", "model.checkpoint=cnn.safetensors")
    folder = seeded_folder("tiny_gpt", workdir / "gpt")
    index = os.path.join(folder, "model.safetensors.index.json")
    shard = sorted(f for f in os.listdir(folder) if f.endswith(".safetensors"))[1]
    os.remove(os.path.join(folder, shard))
    text = write_job(workdir / "text.yaml", model={"name": f"hf:{folder}", "checkpoint": None}, data=TEXT, train=None,
                     eval={"batch_size": 7, "threads": 1, "loss": "lm"})
    assert f"model.safetensors.index.json names shard {shard}, which is not in the folder" in bad(workdir, text)
    assert os.path.exists(index)


@pytest.mark.slow
def test_killed_while_loading_or_computing_resumes_to_the_same_file(workdir):
    """SIGKILL of one member mid-run, and of the whole job while its shards load: the same
    command then completes to the file of an unbroken run."""
    model = {"name": "python:userfactories:paced", "checkpoint": "model.safetensors",
             "args": {"kind": "mlp", "hidden": [16], "seconds": 0.05}}
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    checkpoint(model, (1, 8, 8), 10, "model.safetensors")
    job = write_job(workdir / "job.yaml", train=None, model=model, grid={"x": [-1, 1, 60], "y": None},
                    directions={"store": "recipe"},
                    eval={"batch_size": 60, "chunk_size": 2, "threads": 1, "group_size": 2, "group_mode": "shard"})
    run(["lldist.surface", job, "--out", "whole.h5", "--set", "eval.group_size=1"], workdir)
    # "loading": once rank 0 has made the directions of the new file, which the group then
    # builds its model and reads its rows for
    ready = {"loading": lambda line: "directions kept as their recipe" in line, "computing": cells_at_least(8)}
    for moment in ("loading", "computing"):
        out = f"{moment}.h5"
        p = surface_until(2, job, out, workdir, ready[moment])
        if moment == "loading":
            kill_tree(p.pid, signal.SIGKILL)
        else:
            from test_groups import _rank_pid
            os.kill(_rank_pid(p.pid, 1), signal.SIGKILL)
        p.wait(timeout=60)
        if moment == "computing":
            assert 0 < done_after_kill(out) < 60
        mpirun(2, job, workdir, "--out", out)
        compare("whole.h5", out, exact=True)
        with h5py.File(out, "r") as f:
            assert f["directions"].attrs["store"] == "recipe"


@pytest.mark.slow
def test_a_folders_weights_are_the_jobs_identity(workdir):
    """θ* read from an hf: folder's weights (no model.checkpoint) is in the job's identity,
    streamed from its files: other weights in the folder are another job, not a resume."""
    folder = seeded_folder("tiny_gpt", workdir / "model")
    job = write_job(workdir / "job.yaml", model={"name": f"hf:{folder}", "checkpoint": None}, data=TEXT, train=None,
                    grid={"x": [-1, 1, 3], "y": None}, eval={"batch_size": 7, "threads": 1, "loss": "lm"})
    run(["lldist.surface", job], workdir, HF_HUB_OFFLINE=1)
    seeded_folder("tiny_gpt", workdir / "model", seed=1)
    p = run(["lldist.surface", job], workdir, check=False, HF_HUB_OFFLINE=1)
    assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1 and "checkpoint" in p.stderr, p.stderr


def test_a_model_whose_init_needs_values_is_built_whole_with_a_note(workdir):
    job = write_job(workdir / "job.yaml", model={"name": "python:userfactories:valued", "checkpoint": "model.pt", "args": {}},
                    grid={"x": [-1, 1, 3], "y": [-1, 1, 2]}, directions={"seed": 3, "store": "recipe"})
    run(["lldist.surface", job, "--out", "one.h5"], workdir)
    p = mpirun(2, job, workdir, "--out", "g.h5", "--set", "eval.group_size=2", "--set", "eval.group_mode=shard")
    assert "note: model python:userfactories:valued is built whole on every rank before it is sharded: " \
        "model python:userfactories:valued cannot be built on the meta device" in p.stdout, p.stdout
    compare("one.h5", "g.h5", exact=True)


@pytest.mark.slow
def test_training_writes_safetensors_that_a_shard_group_reads_by_rows(workdir):
    """A job whose checkpoint is named .safetensors: lldist.train writes it (and its epochs) as
    safetensors, a pca job finds the epochs, and a shard group reads its rows."""
    job = write_job(workdir / "job.yaml", model={"name": "mlp", "checkpoint": "model.safetensors",
                                                 "args": {"hidden": [32, 16]}},
                    train={"epochs": 4, "lr": 0.01, "batch_size": 64, "seed": 0},
                    grid={"x": [-1, 1, 3], "y": [-1, 1, 2]}, directions={"seed": 3, "store": "recipe"})
    run(["lldist.train", job], workdir)
    from lldist.workloads.models import is_safetensors
    assert is_safetensors("model.safetensors") and is_safetensors("model_epoch1.safetensors")
    by_rows_equals_one_process(workdir, job, 2)
    run(["lldist.surface", job, "--out", "pca.h5", "--set", "directions.kind=pca", "--set", "directions.store=auto"],
        workdir)


def test_theta_read_again_is_refused_once_the_checkpoint_changes(workdir):
    """A shard rank reads θ*'s rows again at every cell (inputs/rows.Rows.rereader): the same
    bytes as its first read, and a checkpoint rewritten mid-run is refused in words rather than
    read as another θ*."""
    import torch
    from safetensors.torch import save_file

    from lldist.errors import UserError
    from lldist.inputs.rows import Checkpoint, Rows
    w = torch.randn(10, 3)
    save_file({"w": w}, "m.safetensors")
    fill = Rows(Checkpoint.open("m.safetensors"), {"w": "w"}).rereader("w", slice(4, 7))
    out = torch.empty(3, 3)
    fill(out)
    assert torch.equal(out, w[4:7])
    st = os.stat("m.safetensors")
    os.utime("m.safetensors", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    with pytest.raises(UserError, match="changed while the run read"):
        fill(out)
