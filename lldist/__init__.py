"""lldist: loss landscapes of neural networks (Li et al. 2018), computed at cluster scale.

    python -m lldist.train job.yaml       # train the job's model (optional)
    python -m lldist.surface job.yaml     # compute the surface into one HDF5 file (MPI-aware)
    python -m lldist.plot out.h5          # contours, heat maps, 3D surfaces, 1D curves

    import lldist                         # from Python, any model, data and loss
    ls = lldist.landscape(model, data, x=(-1, 1, 51), y=(-1, 1, 51))
    ls.loss, ls.acc, ls.plot(); lldist.open("out.h5")

At the top: this face, the commands (surface, plot, train, study, hessian, sharpness, connect,
metrics, info, bench), config, errors and version. Below, one room per concern: runs/ (what
each command does on every rank), inputs/, directions/, evaluation/, cells/, analysis/,
workloads/, store/ (the only h5py user), transport/ (the only mpi4py user); README.md's
Layout maps them, tests/test_layout.py keeps them apart. README.md has the job-file
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


def landscape(model, data, **kwargs):
    """lldist.api.landscape: a loss landscape of any model, from Python (see lldist/api.py)."""
    from .api import landscape as _landscape
    return _landscape(model, data, **kwargs)


def open(path):  # noqa: A001 - lldist.open(path), beside the builtin it shadows only here
    """lldist.api.open: the landscape stored in an lldist file, complete or not."""
    from .api import open as _open
    return _open(path)


def Recorder(path, every=1, unit="step"):  # noqa: N802 - lldist.Recorder, a class to its users
    """lldist.inputs.recorder.Recorder: your own training loop's checkpoint series, as pca reads it."""
    from .inputs.recorder import Recorder as _Recorder
    return _Recorder(path, every, unit)
