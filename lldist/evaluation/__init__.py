"""The numerics of a cell: loss, metrics and curvature of a model at given weights. No MPI, no
HDF5: the runs hand them data, directions and a rank group's process group.

  evaluator.py  many cells per data pass, weights set in place; the plain reference loop
  tasks.py      what a loss and a metric are (classification, regression, language modelling),
                and the plain mean over a split
  groups.py     a rank group's torch.distributed world; FSDP2 sharding by rows
  collectives.py  a CPU group's torch collectives over the runner's MPI link (not gloo's TCP)
  curvature.py  Hessian-vector products, extreme eigenvalues, trace, spectral density (Lanczos)
  lanczos.py    Lanczos, Hutchinson's trace and SLQ on vectors no rank holds whole (rows per rank)
  sharded.py    the Hessian of a model sharded over a rank group: products by differences of
                the sharded gradient
  data_rows.py  the Hessian over ranks that each hold the model: exact products over each
                rank's batches, every vector split over the ranks
  operators.py  the Hessian's, the Gauss-Newton's and the empirical Fisher's products
  blocks.py     per-block spectra: which parameters each block holds
  attention.py  fused attention switched to the math path for double backward
  curves.py     Bezier and polychain curves, the bend's module, BatchNorm statistics recomputed
  sharpness.py  worst- and average-case adaptive sharpness, SAM's, PAC-Bayes
"""
