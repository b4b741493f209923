"""The layout's rules, read from the code: every import of every module of lldist/, at module
level or inside a function, resolved to the lldist module it names (importing a module runs
its packages' __init__ too, so those count).

The rooms and what each may import (ROOMS below; docs/LAYOUT.md's map says what each holds):

  face        lldist/__init__.py, api/         anything but a command
  commands    surface, plot, train, study, hessian, sharpness, connect, metrics, info, bench
                                               anything but another command
  config      the typed job                    errors (and workloads.factory: a python: callable must import)
  errors, version                              nothing
  runs/       what a command does, every rank  the library rooms, never a command or the face
  inputs/     what a run reads                 config, errors, workloads, evaluation, directions.state
  directions/ every kind of direction          config, errors, evaluation, workloads, inputs, store
  evaluation/ the numerics of a cell           config, errors, workloads, directions.record
  cells/      grid, schedule, levels           config, errors; numpy alone
  analysis/   offline, from files              config, errors, cells, store; no torch, even indirectly
  workloads/  models and data                  config, errors
  store/      the HDF5 file                    config, errors, version, cells, directions.record; no torch
  transport/  the MPI conversation             errors

and which third-party package belongs to whom: h5py to store/, mpi4py to transport/,
transformers to workloads/hf.py (and a Recorder's Trainer callback, the benchmark's BERT), matplotlib to
analysis/ (and the commands that choose its backend). No module imports a cycle.
"""

import ast
import os
import subprocess
import sys

import pytest
from conftest import ROOT, env

PKG = os.path.join(ROOT, "lldist")
COMMANDS = {"lldist.surface", "lldist.plot", "lldist.study", "lldist.hessian", "lldist.train", "lldist.metrics",
            "lldist.info", "lldist.bench", "lldist.sharpness", "lldist.connect", "lldist.series"}
FACE = {"lldist", "lldist.api"}  # and every module under lldist.api (is_face)
LIBRARY = ("lldist.config", "lldist.errors", "lldist.version", "lldist.runs", "lldist.inputs", "lldist.directions",
           "lldist.evaluation", "lldist.cells", "lldist.analysis", "lldist.workloads", "lldist.store",
           "lldist.transport")
# room -> the lldist modules (and what is under them) it may import, besides itself
ROOMS = {
    "lldist.errors": (),
    "lldist.version": (),
    "lldist.config": ("lldist.errors", "lldist.workloads.factory"),
    "lldist.transport": ("lldist.errors",),
    "lldist.cells": ("lldist.config", "lldist.errors"),
    "lldist.workloads": ("lldist.config", "lldist.errors"),
    "lldist.store": ("lldist.config", "lldist.errors", "lldist.version", "lldist.cells", "lldist.directions.record"),
    "lldist.analysis": ("lldist.config", "lldist.errors", "lldist.cells", "lldist.store"),
    "lldist.evaluation": ("lldist.config", "lldist.errors", "lldist.workloads", "lldist.directions.record"),
    "lldist.inputs": ("lldist.config", "lldist.errors", "lldist.workloads", "lldist.evaluation",
                      "lldist.directions.state"),
    "lldist.directions": ("lldist.config", "lldist.errors", "lldist.evaluation", "lldist.workloads", "lldist.inputs",
                          "lldist.store"),
    "lldist.runs": LIBRARY,
}
# third-party packages and the rooms that may import them (directly)
OWNERS = {"h5py": ("lldist.store",), "mpi4py": ("lldist.transport",),
          "transformers": ("lldist.workloads.hf", "lldist.inputs.recorder", "lldist.bench"),
          "matplotlib": ("lldist.analysis", "lldist.plot", "lldist.study", "lldist.bench")}
TOP_LEVEL_AT_MOST = 15  # modules at the top: the commands, the face, config, errors, version


def modules() -> dict:
    """{dotted module name: path} of every .py file under lldist/."""
    out = {}
    for d, _, files in os.walk(PKG):
        for f in files:
            if f.endswith(".py"):
                rel = os.path.relpath(os.path.join(d, f), ROOT)[:-3].replace(os.sep, ".")
                out[rel[:-len(".__init__")] if rel.endswith(".__init__") else rel] = os.path.join(d, f)
    return out


MODULES = modules()


def is_package(name: str) -> bool:
    return MODULES[name].endswith("__init__.py")


def imports(name: str) -> set:
    """Every module `name` imports: lldist modules by their dotted name, others by their top
    package (torch, h5py, mpi4py, ...)."""
    tree = ast.parse(open(MODULES[name]).read())
    base = name if is_package(name) else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                found.add(a.name if a.name.startswith("lldist") else a.name.split(".")[0])
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = base.split(".")
                parent = ".".join(parts[:len(parts) - node.level + 1])
                mod = f"{parent}.{node.module}" if node.module else parent
            else:
                mod = node.module
            if not mod.startswith("lldist"):
                found.add(mod.split(".")[0])
                continue
            for a in node.names:  # `from . import x` names a module when x is one
                sub = f"{mod}.{a.name}"
                found.add(sub if sub in MODULES else mod)
    return {m for m in found if not m.startswith("lldist") or m in MODULES or _owner(m)}


def _owner(m: str) -> bool:
    return any(m.startswith(k + ".") for k in MODULES)


def graph() -> dict:
    return {m: {i for i in imports(m) if i in MODULES} for m in MODULES}


GRAPH = graph()


def under(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def is_face(name: str) -> bool:
    return name == "lldist" or under(name, "lldist.api")


def room(name: str) -> str:
    if is_face(name):
        return "face"
    if any(under(name, c) for c in COMMANDS):
        return "commands"
    return next(r for r in ROOMS if under(name, r))


def parents(name: str) -> list:
    """The packages whose __init__ runs before `name`: lldist.a.b -> lldist, lldist.a."""
    parts = name.split(".")
    return [".".join(parts[:k]) for k in range(1, len(parts))]


def reach(name: str) -> set:
    """Every lldist module importing `name` may run, and every third-party package any of them
    imports: the closure over imports and over the packages each import runs."""
    seen, todo, outside = set(), [name], set()
    while todo:
        m = todo.pop()
        if m in seen:
            continue
        seen.add(m)
        for i in imports(m):
            if i.startswith("lldist"):
                todo += [i] + [p for p in parents(i) if p != "lldist"]
            else:
                outside.add(i)
    return outside


def test_the_reader_sees_the_known_arrows():
    """The test reads imports as they are: a few arrows that must be there (else it reads nothing)."""
    assert "lldist.transport.runner" in GRAPH["lldist.runs.surface"]
    assert "lldist.store.reader" in GRAPH["lldist.store"]
    assert "lldist.analysis.figures" in GRAPH["lldist.api.landscapes"]  # inside Landscape.plot: lazy imports count
    assert "h5py" in imports("lldist.store.reader") and "mpi4py" in imports("lldist.transport.runner")
    assert "torch" in reach("lldist.runs.surface") and "h5py" in reach("lldist.directions.file")
    assert room("lldist.directions.kinds") == "lldist.directions" and room("lldist.hessian") == "commands"


def test_no_cycles():
    state, stack = {}, []

    def visit(m):
        state[m] = "open"
        stack.append(m)
        for n in sorted(GRAPH[m]):
            if state.get(n) == "open":
                cycle = stack[stack.index(n):] + [n]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if n not in state:
                visit(n)
        stack.pop()
        state[m] = "done"
    for m in sorted(GRAPH):
        if m not in state:
            visit(m)


def test_every_module_lives_in_a_room():
    homeless = [m for m in MODULES if not is_face(m) and not any(under(m, c) for c in COMMANDS)
                and not any(under(m, r) for r in ROOMS)]
    assert not homeless, f"modules in no room of ROOMS: {homeless}"


@pytest.mark.parametrize("name", sorted(ROOMS))
def test_each_room_imports_only_what_its_row_allows(name):
    allowed = ROOMS[name]
    for m in MODULES:
        if not under(m, name) or is_face(m):
            continue
        bad = {i for i in imports(m) if i.startswith("lldist") and not under(i, name)
               and not any(under(i, a) for a in allowed)}
        assert not bad, f"{m} ({name}) imports {sorted(bad)}; its room may import {', '.join(allowed) or 'nothing'}"


def test_a_command_never_imports_another_and_no_library_module_imports_one():
    for m in MODULES:
        commands = {c for c in COMMANDS if any(under(i, c) for i in imports(m))} - {c for c in COMMANDS if under(m, c)}
        assert not commands, f"{m} imports the command(s) {sorted(commands)}"


def test_the_library_never_imports_the_face():
    for m in MODULES:
        if room(m) in ("face", "commands"):
            continue
        bad = {i for i in imports(m) if is_face(i)}
        assert not bad, f"{m} imports the package face {sorted(bad)}"


@pytest.mark.parametrize("package", sorted(OWNERS))
def test_third_party_packages_belong_to_their_rooms(package):
    for m in MODULES:
        if package in imports(m):
            assert any(under(m, o) for o in OWNERS[package]), f"{m} imports {package} ({', '.join(OWNERS[package])}'s)"


def test_analysis_and_the_store_reach_no_torch_even_through_another_module():
    for m in MODULES:
        if under(m, "lldist.analysis") or under(m, "lldist.store") or under(m, "lldist.cells"):
            found = reach(m) & {"torch", "torchvision", "mpi4py", "transformers"}
            assert not found, f"{m} reaches {sorted(found)} through its imports"


def test_the_numerics_reach_no_mpi_and_the_transport_nothing_of_the_work():
    for m in MODULES:
        if any(under(m, r) for r in ("lldist.evaluation", "lldist.directions", "lldist.cells", "lldist.workloads",
                                     "lldist.inputs")):
            assert "mpi4py" not in reach(m), f"{m} reaches mpi4py"
        if under(m, "lldist.transport"):
            found = reach(m) & {"torch", "h5py", "matplotlib", "transformers"}
            assert not found, f"{m} reaches {sorted(found)}: the transport knows messages, not the work"


def test_the_top_level_holds_the_commands_the_face_config_errors_and_version():
    top = {m for m in MODULES if m.count(".") == 1 and not is_package(m)}
    assert top <= COMMANDS | FACE | {"lldist.config", "lldist.errors", "lldist.version"}, sorted(top)
    assert len(top) <= TOP_LEVEL_AT_MOST, f"{len(top)} modules at the top: {sorted(top)}"


def test_every_room_says_what_it_holds():
    """Each room's __init__ maps it: every module of the room is named in its docstring."""
    for r in [r for r in ROOMS if r in MODULES and is_package(r)]:
        doc = ast.get_docstring(ast.parse(open(MODULES[r]).read())) or ""
        missing = [m.rsplit(".", 1)[1] for m in MODULES if m.startswith(r + ".") and m.count(".") == r.count(".") + 1
                   and m.rsplit(".", 1)[1] + ".py" not in doc and m.rsplit(".", 1)[1] not in doc.split()]
        assert not missing, f"{r}'s docstring does not name {missing}"


def test_analysis_runs_where_torch_cannot_be_imported(workdir):
    """Not only the import graph: a surface file read, its metrics computed and its figures
    drawn in a process where `import torch` fails."""
    from conftest import run, write_job
    job = write_job(workdir / "job.yaml", grid={"x": [-1, 1, 5], "y": [-1, 1, 4]})
    run(["lldist.surface", job], workdir)
    code = ("import sys; sys.modules['torch'] = None\n"
            "import matplotlib; matplotlib.use('Agg')\n"
            "from lldist.analysis import figures, metrics\n"
            "m, _ = metrics.of_file('out.h5')\n"
            "print(len(figures.write_all(figures.read_surface('out.h5'), figures.PlotOptions(dpi=30), '.', 's')),"
            " round(m['centre_loss'], 6))\n"
            "assert 'torch' not in [k for k, v in sys.modules.items() if v is not None]\n")
    p = subprocess.run([sys.executable, "-c", code], cwd=workdir, env=env(), capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    figures_written, centre = p.stdout.split()
    assert int(figures_written) >= 8 and float(centre) > 0
