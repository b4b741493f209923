"""lldist: loss landscapes of neural networks (Li et al. 2018), computed at cluster scale.

    python -m lldist.train job.yaml       # train the job's model (optional)
    python -m lldist.surface job.yaml     # compute the surface into one HDF5 file (MPI-aware)
    python -m lldist.plot out.h5          # contours, heat maps, 3D surfaces, 1D curves

    import lldist                         # from Python, any model, data and loss
    ls = lldist.landscape(model, data, x=(-1, 1, 51), y=(-1, 1, 51))
    ls.loss, ls.acc, ls.plot(), ls.metrics(); lldist.open("out.h5")
    h = lldist.curvature(model, data, top=3)          # the Hessian at θ*: lambda_max, trace, density
    s = lldist.sharpness_measures(model, data)        # worst/average adaptive, SAM, PAC-Bayes
    c = lldist.connect_minima(a, b, data, train=(x, y))   # a trained curve between two minima
    s = lldist.series("job.yaml")                     # every measure at every checkpoint of a run

At the top: this face, the commands (surface, plot, train, study, hessian, sharpness, connect,
series, metrics, info, bench), config, errors and version. Below, one room per concern: runs/ (what
each command does on every rank), inputs/, directions/, evaluation/, cells/, analysis/,
workloads/, store/ (the only h5py user), transport/ (the only mpi4py user); docs/LAYOUT.md
maps them, tests/test_layout.py keeps them apart. README.md has the job-file
reference, docs/FORMAT.md the output file.
"""

import os as _os

# OpenMP threads that spin-wait between parallel regions hold cores other processes want: beside
# two busy processes on 2 cores a small CNN's surface fell from 118 to 16 cells/s (0.84 at worst)
# with the default spinning, and kept 68 with passive waits (`python -m lldist.bench threads`,
# docs/PERFORMANCE.md); idle, passive costs up to a third on models whose ops are tiny, nothing
# on large ones. So passive is the default, set before torch (and its OpenMP) is loaded, unless
# the user chose: OMP_WAIT_POLICY=ACTIVE gives the spinning back on a node of one's own.
if "OMP_WAIT_POLICY" not in _os.environ and "GOMP_SPINCOUNT" not in _os.environ:
    _os.environ["OMP_WAIT_POLICY"] = "PASSIVE"

from .errors import UserError  # noqa: E402,F401 - a ValueError: what lldist raises for bad input
from .version import __version__  # noqa: E402,F401


# The face, imported on first use (PEP 562): `import lldist` stays light (the commands that draw
# import no torch), and lldist.landscape is the function itself, so help() and a notebook's
# Shift-Tab show its real signature. None of these names is a submodule's: importing
# lldist.hessian binds the module on the package, which would replace a function of that name.
_FACE = {"landscape": "lldist.api", "open": "lldist.api", "curvature": "lldist.api",
        "sharpness_measures": "lldist.api", "Landscape": "lldist.api", "Curvature": "lldist.api",
        "Sharpness": "lldist.api", "connect_minima": "lldist.api", "Connection": "lldist.api",
        "Recorder": "lldist.inputs.recorder"}
__all__ = ["UserError", "__version__", "series", *_FACE]


def __getattr__(name: str):
    if name == "series":  # the command's module, callable as the function (lldist/series.py says why)
        import importlib
        return importlib.import_module("lldist.series")
    if name in _FACE:
        import importlib
        value = getattr(importlib.import_module(_FACE[name]), name)
        globals()[name] = value  # once: the next use is a plain attribute
        return value
    raise AttributeError(f"module 'lldist' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_FACE))
