"""Everything that is written to or read from disk: the one HDF5 file of a surface and its exports.

    from lldist.store import SurfaceReader
    with SurfaceReader("out.h5") as sf:
        s = sf.read_all()        # x, y, done, values {(split, quantity): (ny, nx)}, curvature, ...

`hdf5`: the only h5py user: layout, the done mask, group commit, resume, provenance, the
output lock (SurfaceWriter is used by rank 0 alone: one writer). `export`: ParaView (VTK XML)
and interactive HTML surfaces, from arrays already read. The layout: docs/FORMAT.md.
"""

from .hdf5 import (  # noqa: F401
                   FORMAT_VERSION,
                   Lock,
                   Output,
                   SurfaceReader,
                   SurfaceWriter,
                   all_closed,
                   check_writable,
                   write_curvature,
                   write_metrics,
                   write_sharpness,
)
