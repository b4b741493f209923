"""lldist from Python: any model, any data, any loss, in a notebook or under MPI. Each call
takes the model, data and loss as lldist.landscape does, gives the model back unchanged (also
after an error or Ctrl-C), runs in-process or, under mpirun, over every rank, and keeps its
result in an HDF5 file given as out= (a rerun resumes it).

    import lldist
    ls = lldist.landscape(model, data, x=(-1, 1, 51), y=(-1, 1, 51))   # a Landscape
    ls.loss, ls.acc, ls.plot(), ls.metrics()
    h = lldist.curvature(model, data, top=3, density=True)           # a Curvature: the Hessian at θ*
    s = lldist.sharpness_measures(model, data)                        # a Sharpness
    c = lldist.connect_minima(a, b, data, train=(x, y), epochs=5)     # a Connection: a curve between minima
    ls2 = lldist.open("out.h5")

`data`: a DataLoader, a Dataset of (x, y) samples, an `(x, y)` pair of tensors, or an iterable
of batches (tuples or dicts of tensors, HuggingFace style). An (x, y) pair or a Dataset is
evaluated in batches of `batch_size`; batches given by a DataLoader or an iterable are kept
as they come. The computation is the pipeline's own: the same evaluator, file, resume and
MPI coordinator (`mpirun -n 8 python my_script.py`: rank 0 returns the result, the other
ranks None after their share).

  inputs       what the face takes from the caller: data, arguments, the job it records, kept()
  landscapes   landscape(), open() and the Landscape record
  optimum      curvature() and sharpness_measures(), and their Curvature and Sharpness records
  connecting   connect_minima() and its Connection record
  series       series(): a recorded run's series, as lldist.series (lldist/series.py) calls it
"""

from .inputs import as_data  # noqa: F401
from .landscapes import Landscape, landscape, open  # noqa: F401,A004
from .optimum import Block, Curvature, Sharpness, curvature, sharpness_measures  # noqa: F401
from .connecting import Connection, connect_minima  # noqa: F401
