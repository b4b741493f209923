"""The one HDF5 file of a surface: the only h5py user, and free of torch (analysis/ reads it
without). The layout: docs/FORMAT.md.

    from lldist.store import SurfaceReader
    with SurfaceReader("out.h5") as sf:
        s = sf.read_all()        # Surface: x, y, done, values {(split, quantity): (ny, nx)}, curvature, ...

  layout.py   what a new file holds, allocated whole at creation; the format and its version
  reader.py   SurfaceReader (never writes) and its records: Surface, Points
  writer.py   SurfaceWriter: rank 0's, the one writer; the group commit, values before done marks
  output.py   Output: a run's output checked, locked, resumed or made anew; Lock
  results.py  what is added to a finished file: curvature, sharpness, metrics
  series.py   a series file (python -m lldist.series): its layout, its one writer, read_series
"""

from .layout import FORMAT_VERSION  # noqa: F401
from .output import Lock, Output, all_closed, check_writable  # noqa: F401
from .reader import Points, Surface, SurfaceReader  # noqa: F401
from .results import write_curvature, write_metrics, write_sharpness  # noqa: F401
from .writer import SurfaceWriter  # noqa: F401
