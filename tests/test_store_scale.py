"""The writer at scale: group commits, what a kill between commits loses, memory on big grids."""

import os
import subprocess
import sys

import h5py
import numpy as np
from conftest import env

from lldist.bench.coordinator import new_file
from lldist import store
from lldist.store import writer  # its module globals, for monkeypatch
from lldist.transport.runner import ChunkResult


def values_for(cells):
    """Distinct, checkable values: (n, 1 split, 2 quantities)."""
    c = np.asarray(cells, dtype=float)
    return np.stack([c * 0.5 + 1, -c], axis=1)[:, None, :]


def result(cells):
    """A chunk's record as a rank makes it (rank 1 on host h, cpu, from t=0 to t=1)."""
    return ChunkResult(0, np.asarray(cells), values_for(cells), 1, "h", "cpu", 0.0, 1.0)


def test_commits_come_every_k_chunks_and_make_the_cells_done(tmp_path, monkeypatch):
    monkeypatch.setattr(writer, "COMMIT_CHUNKS", 3)
    monkeypatch.setattr(writer, "COMMIT_S", 3600.0)
    path = str(tmp_path / "s.h5")
    sf = new_file(path, 9)
    chunks = [np.arange(i, i + 5) for i in range(0, 40, 5)]  # 8 chunks, across rows
    got = [sf.write_chunk(result(c)) for c in chunks]
    assert got == [0, 0, 15, 0, 0, 15, 0, 0]
    f = sf.f  # the file as HDF5 holds it: chunks not committed are not in it at all
    done = f["done"][()].reshape(-1)
    assert done[:30].all() and not done[30:].any() and int(f["nchunks"][()]) == 6
    loss = f["test/loss"][()].reshape(-1)
    np.testing.assert_array_equal(loss[:30], values_for(range(30))[:, 0, 0])
    assert np.isnan(loss[30:]).all()
    sf.finish()
    with store.SurfaceReader(path) as r:
        records, cells = r.chunk_log()
        assert r.done().reshape(-1)[:40].all() and len(records) == 8
        assert cells.tolist() == list(range(40)) and records["ncells"].tolist() == [5] * 8
        np.testing.assert_array_equal(r.f["test/acc"][()].reshape(-1)[:40], values_for(range(40))[:, 0, 1])
        np.testing.assert_array_equal(r.f["cell_chunk"][()].reshape(-1)[:40], np.repeat(np.arange(8), 5))


KILLED = """
import os, sys, numpy as np
sys.path.insert(0, {tests!r})
from lldist.bench.coordinator import new_file
from lldist import store
from lldist.store import writer  # its module globals, for monkeypatch
from test_store_scale import result
writer.COMMIT_S = 3600.0
sf = new_file({path!r}, 7)
order = np.random.default_rng(0).permutation(49)
for i in range(0, 35, 7):  # five chunks of scattered cells
    sf.write_chunk(result(order[i:i + 7]))
    if i == 14:
        sf.commit()
os._exit(9)  # killed: nothing after the commit of the first three chunks reaches the file
"""


def test_a_kill_between_commits_loses_only_the_uncommitted_chunks(tmp_path):
    path = str(tmp_path / "k.h5")
    p = subprocess.run([sys.executable, "-c", KILLED.format(tests=os.path.dirname(__file__), path=path)],
                       env=env(), capture_output=True, text=True)
    assert p.returncode == 9, p.stderr
    order = np.random.default_rng(0).permutation(49)
    with store.SurfaceReader(path) as r:
        done = r.done().reshape(-1)
        assert sorted(np.flatnonzero(done).tolist()) == sorted(order[:21].tolist())
        np.testing.assert_array_equal(r.f["test/loss"][()].reshape(-1)[done], values_for(np.flatnonzero(done))[:, 0, 0])
        records, cells = r.chunk_log()
        assert len(records) == 3 and sorted(cells.tolist()) == sorted(order[:21].tolist())
    # the next run finishes the grid from there
    sf = store.SurfaceWriter(path)
    rest = np.flatnonzero(~done)
    sf.write_chunk(ChunkResult(0, rest, values_for(rest), 2, "h", "cpu", 0.0, 1.0))
    sf.finish()
    with store.SurfaceReader(path) as r:
        assert r.done().all() and bool(r.attr("complete"))
        np.testing.assert_array_equal(r.f["test/loss"][()].reshape(-1), values_for(range(49))[:, 0, 0])


MEMORY = """
import resource, sys
import torch  # as rank 0 has it
from lldist.bench.coordinator import new_file
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
sf = new_file(sys.argv[1], 2001)
sf.finish()
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024)
"""


def test_a_large_grid_is_created_without_arrays_in_memory(tmp_path):
    """4 million cells: 32 MB a quantity and 140 MB of log records if made as arrays."""
    path = str(tmp_path / "big.h5")
    p = subprocess.run([sys.executable, "-c", MEMORY, path], env=env(), capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    grown_mib = float(p.stdout.split()[-1])
    assert grown_mib < 20, grown_mib  # the done mask is 4 MB; nothing grid-sized beyond it
    with h5py.File(path, "r") as f:
        assert f["test/loss"].shape == (2001, 2001) and np.isnan(f["test/loss"][1000, 990:1000]).all()
        assert f["chunks"].shape == (4096 + 2001 * 2001 // 16,) and f["cell_chunk"][5, 5] == -1
        assert not f["done"][()].any()
