"""lldist: loss landscapes of neural networks (Li et al. 2018), computed at cluster scale.

    python -m lldist.train job.yaml       # train the job's model (optional)
    python -m lldist.surface job.yaml     # compute the surface into one HDF5 file (MPI-aware)
    python -m lldist.plot out.h5          # contours, heat maps, 3D surfaces, 1D curves

    import lldist                         # from Python, any model, data and loss
    ls = lldist.landscape(model, data, x=(-1, 1, 51), y=(-1, 1, 51))
    ls.loss, ls.acc, ls.plot(); lldist.open("out.h5")

The commands and the notebook API live at the top of the package; the machinery below them in
directions/, evaluation/ (no MPI, no HDF5), workloads/ (models, data), store/ (the only h5py
user) and transport/ (the only mpi4py user): README.md's Layout. See README.md for the
job-file reference and docs/FORMAT.md for the output file.
"""

from .errors import UserError  # noqa: F401 - a ValueError: what lldist raises for bad input
from .version import __version__  # noqa: F401


def landscape(model, data, **kwargs):
    """lldist.api.landscape: a loss landscape of any model, from Python (see lldist/api.py)."""
    from .api import landscape as _landscape
    return _landscape(model, data, **kwargs)


def open(path):  # noqa: A001 - lldist.open(path), beside the builtin it shadows only here
    """lldist.api.open: the landscape stored in an lldist file, complete or not."""
    from .api import open as _open
    return _open(path)
