"""The layout's rules, read from the code: every import of every module of lldist/, at module
level or inside a function, resolved to the lldist module it names.

  * no cycle between modules;
  * transport/ imports nothing of lldist but errors (and its own modules);
  * store/ imports neither transport/ nor the package face (lldist/__init__.py);
  * no library module imports a command module (the figures the API draws come from
    figures.py, what the API and the Hessian need of a run from run.py and loading.py);
  * the numerics (directions/, evaluation/, grid, schedule, levels) import neither mpi4py nor
    h5py; h5py is the store's alone, mpi4py the transport's alone.
"""

import ast
import os

import pytest
from conftest import ROOT

PKG = os.path.join(ROOT, "lldist")
COMMANDS = {"lldist.surface", "lldist.plot", "lldist.study", "lldist.hessian", "lldist.train", "lldist.metrics",
            "lldist.info", "lldist.bench", "lldist.sharpness", "lldist.connect"}
NUMERICS = ("lldist.directions", "lldist.evaluation", "lldist.grid", "lldist.schedule", "lldist.levels")


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


def under(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def test_the_reader_sees_the_known_arrows():
    """The test reads imports as they are: a few arrows that must be there (else it reads nothing)."""
    g = graph()
    assert "lldist.transport.runner" in g["lldist.run"]
    assert "lldist.store.hdf5" in g["lldist.store"]
    assert "lldist.figures" in g["lldist.api"]  # inside Landscape.plot: lazy imports count
    assert "h5py" in imports("lldist.store.hdf5") and "mpi4py" in imports("lldist.transport.runner")


def test_no_cycles():
    g = graph()
    state, stack = {}, []

    def visit(m):
        state[m] = "open"
        stack.append(m)
        for n in sorted(g[m]):
            if state.get(n) == "open":
                cycle = stack[stack.index(n):] + [n]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if n not in state:
                visit(n)
        stack.pop()
        state[m] = "done"
    for m in sorted(g):
        if m not in state:
            visit(m)


def test_transport_imports_only_errors():
    for m in MODULES:
        if under(m, "lldist.transport"):
            bad = {i for i in imports(m) if i.startswith("lldist") and not under(i, "lldist.transport")
                   and i != "lldist.errors"}
            assert not bad, f"{m} imports {sorted(bad)}"


def test_store_imports_neither_transport_nor_the_package_face():
    for m in MODULES:
        if under(m, "lldist.store"):
            bad = {i for i in imports(m) if under(i, "lldist.transport") or i == "lldist"}
            assert not bad, f"{m} imports {sorted(bad)}"


def test_library_modules_never_import_commands():
    commands = {m for m in MODULES if any(under(m, c) for c in COMMANDS)}
    for m in MODULES:
        if m in commands:
            continue
        bad = {i for i in imports(m) if any(under(i, c) for c in COMMANDS)}
        assert not bad, f"library module {m} imports the command module(s) {sorted(bad)}"


def test_numerics_import_neither_mpi_nor_hdf5_and_owners_are_alone():
    for m in MODULES:
        used = imports(m)
        if any(under(m, n) for n in NUMERICS):
            assert not {"mpi4py", "h5py"} & used, f"{m} imports {sorted({'mpi4py', 'h5py'} & used)}"
        if "h5py" in used:
            assert under(m, "lldist.store"), f"{m} imports h5py (the store's alone)"
        if "mpi4py" in used:
            assert under(m, "lldist.transport"), f"{m} imports mpi4py (the transport's alone)"
