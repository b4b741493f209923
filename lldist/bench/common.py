"""What every benchmark shares: timing on a drifting machine, the models and their synthetic
data, and running a job under mpiexec at several rank counts.

    t = timed(fn, device)                   # median seconds of fn(), warm-up and syncs outside the clock
    med = interleaved({"a": f, "b": g}, dev) # the same, A B A B ... over rounds
    model, theta, dirs, data = make_case("cnn_skip", 2000)
    rows = rank_sweep(job_dict, [1, 2, 4])   # python -m lldist.surface under mpiexec -n R
"""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch

from ..errors import UserError


def tune_malloc() -> None:
    """glibc returns big blocks to the OS after every forward pass and faults them back in the
    next; raising the mmap and trim thresholds keeps them (can double CPU throughput)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-1, 1 << 30)  # M_TRIM_THRESHOLD
        libc.mallopt(-3, 1 << 30)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass


def sync(device):
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, device, repeat=3, min_time=0.3, warmup=1):
    """Median seconds of fn() over `repeat` runs, each long enough to time. The warm-up calls
    (compilation, CUDA-graph capture, cudnn autotuning) are outside the clock, and the GPU
    is synchronised before every reading of it."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeat):
        n, t0 = 0, time.perf_counter()
        while True:
            fn()
            n += 1
            sync(device)
            dt = time.perf_counter() - t0
            if dt >= min_time or n >= 50:
                break
        times.append(dt / n)
    return float(np.median(times))


def rounds_of(fns: dict, device, rounds: int = 5, warmup: int = 3, min_time: dict = None) -> dict:
    """Seconds per call of each function in each round, the functions timed in alternation
    within a round (A B C, A B C, ...): a ratio taken within a round sees one machine state,
    so drifting load (frequency, neighbours) moves numerator and denominator alike.
    `min_time`: per function, the least time a reading takes (default 0.2 s: short calls
    are repeated; a call longer than that is timed once)."""
    for f in fns.values():
        for _ in range(warmup):  # compile, CUDA-graph capture (reduce-overhead records on call 2-3)
            f()
    sync(device)
    times = {k: [] for k in fns}
    for _ in range(rounds):
        for k, f in fns.items():
            times[k].append(timed(f, device, repeat=1, min_time=(min_time or {}).get(k, 0.2), warmup=0))
    return times


def interleaved(fns: dict, device, rounds: int = 5) -> dict:
    """Median seconds per call of each function over alternated rounds (see rounds_of)."""
    return {k: float(np.median(v)) for k, v in rounds_of(fns, device, rounds).items()}


def spread(values) -> dict:
    """The median of per-round values and their range: what a reader should quote."""
    v = np.asarray(values, dtype=float)
    return {"median": float(np.median(v)), "min": float(v.min()), "max": float(v.max()), "rounds": len(v)}


def quote(s: dict) -> str:
    """"1.21 (0.98-1.40)": the median and, in brackets, the range over the rounds."""
    return f"{s['median']:.2f} ({s['min']:.2f}-{s['max']:.2f})"


class Busy:
    """`with Busy(k):` k processes spinning on the CPU beside the measurement: a shared
    workstation or an oversubscribed node, made on purpose (`--load k` of the benchmarks)."""

    def __init__(self, k: int):
        self.k, self.procs = k, []

    def __enter__(self):
        self.procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(self.k)]
        time.sleep(0.5 if self.k else 0)  # the scheduler has them running before the first reading
        return self

    def __exit__(self, *exc):
        for p in self.procs:
            p.kill()
        for p in self.procs:
            p.wait()


MODELS = {
    # name: (lldist model name, model args, input shape)
    "mlp": ("mlp", {"hidden": [512, 256]}, (3, 32, 32)),
    "cnn": ("cnn", {"width": 16}, (3, 32, 32)),
    "cnn_skip": ("cnn_skip", {"width": 16}, (3, 32, 32)),
    "mobilenet_v2_32": ("mobilenet_v2", {}, (3, 32, 32)),
    "mobilenet_v2_224": ("mobilenet_v2", {}, (3, 224, 224)),
}


def sizes(name: str, device: str) -> int:
    if device == "cpu":
        return {"mobilenet_v2_224": 32, "mobilenet_v2_32": 500}.get(name, 2000)
    return 4096 if name.endswith("224") else 10000


def make_case(name: str, n: int, seed: int = 0):
    from ..config import DirectionsConfig, ModelConfig
    from ..directions.random import make_directions
    from ..directions.state import model_state
    from ..workloads.data import CIFAR_MEAN, CIFAR_STD, TensorSet
    from ..workloads.models import build_model
    mname, margs, shape = MODELS[name]
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (n, *shape), generator=g, dtype=torch.uint8)
    y = torch.randint(0, 10, (n,), generator=g)
    data = TensorSet(x, y, 10, 1 / 255, CIFAR_MEAN, CIFAR_STD)
    model = build_model(ModelConfig(name=mname, args=margs), shape, 10)
    theta, kinds = model_state(model)
    dirs = make_directions(theta, kinds, DirectionsConfig(seed=1), 2)
    return model, theta, dirs, data


def evaluator(name, n, device, precision, channels_last, compile_, batch, cells_per_pass):
    from ..config import EvalConfig
    from ..evaluation.evaluator import Evaluator
    model, theta, dirs, data = make_case(name, n)
    cfg = EvalConfig(batch_size=batch, precision=precision, channels_last=channels_last,
                     compile=compile_, cells_per_pass=cells_per_pass)
    return Evaluator(model, theta, dirs, {"test": data}, cfg, device=device)


def find_mpiexec() -> str:
    here = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    found = here if os.path.exists(here) else shutil.which("mpiexec") or shutil.which("mpirun")
    if not found:
        raise UserError("no mpiexec next to the interpreter or on PATH (pip install mpi4py mpich)")
    return found


def run_time(path: str) -> tuple:
    """(seconds from the first chunk's start to the last one's end, coordinator ms per worker
    message), as the file records them."""
    from ..store import SurfaceReader
    with SurfaceReader(path) as sf:
        records, _ = sf.chunk_log()
        ms = sf.attr("coordinator_ms_per_message", 0.0)
    return float(records["t_end"].max() - records["t_start"].min()), float(ms)


def rank_sweep(job: dict, ranks: list, label: str = "") -> list:
    """Run one job under `mpiexec -n R` for each R, each into a fresh file: rows of ranks,
    seconds (first chunk's start to last chunk's end, as the file records them), speedup and
    parallel efficiency against the first R, and the coordinator's ms per worker message."""
    import yaml
    mpiexec = find_mpiexec()
    rows, base = [], None
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "job.yaml")
        with open(path, "w") as f:
            yaml.safe_dump(job, f)
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
        if os.getuid() == 0:
            env.update(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
        for n in ranks:
            out = os.path.join(tmp, f"s{n}.h5")
            cmd = [mpiexec, "-n", str(n), sys.executable, "-m", "lldist.surface", path, "--out", out]
            p = subprocess.run(cmd, cwd=tmp, env=env, capture_output=True, text=True, timeout=1800)
            if p.returncode != 0:
                raise RuntimeError(f"{' '.join(cmd)} failed:\n{p.stderr[-2000:]}")
            secs, ms = run_time(out)
            base = base or secs
            row = {"ranks": n, "seconds": secs, "speedup": base / secs, "efficiency": base * ranks[0] / (n * secs),
                   "coordinator_ms_per_message": ms}
            rows.append(row)
            print(f"{label}{n:3d} ranks: {secs:7.2f}s  speedup {row['speedup']:5.2f}  efficiency "
                  f"{row['efficiency']:.3f}  coordinator {ms:.2f} ms/message", flush=True)
    return rows


def scaling_markdown(rows: list) -> str:
    head = "| ranks | seconds | speedup | parallel efficiency | coordinator ms/message |\n|---|---|---|---|---|\n"
    return head + "".join(f"| {r['ranks']} | {r['seconds']:.2f} | {r['speedup']:.2f} | {r['efficiency']:.3f} | "
                          f"{r['coordinator_ms_per_message']:.2f} |\n" for r in rows)
