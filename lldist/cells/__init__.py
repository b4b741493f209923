"""Which cells, where, and how they are drawn: numpy only (no torch, MPI or HDF5).

  grid.py      the axis convention, stated once; cell numbering; the chunk size
  schedule.py  which cells next: the whole grid (Sweep) or where the picture needs them
               (Adaptive), and how an adaptive grid is read back (reconstruct)
  levels.py    the contour levels: one rule for the figures, the adaptive grid and its reading
"""
