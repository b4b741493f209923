"""Which cells, where, and how they are drawn: numpy only (no torch, MPI or HDF5).

  grid.py      the axis convention, stated once; cell numbering; the chunk size
  schedule.py  which cells next: the whole grid (Sweep) or where the picture needs them
               (Adaptive, tier by tier, within a budget), and how an adaptive grid is read back
  interpolation.py  how an adaptive grid is read between its cells (multilevel cubic) and how
               wrong that reading may be (the error estimate the schedule decides by)
  levels.py    the contour levels: one rule for the figures, the adaptive grid and its reading
"""
