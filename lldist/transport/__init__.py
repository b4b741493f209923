"""Between processes: who computes which cells, and how their results reach the one writer.

  runner.py    the only mpi4py user: the whole conversation between rank 0 and the workers
               (a surface's chunks, rank groups, a computation at θ* spread over the ranks),
               documented as a message sequence at its top
  progress.py  cells done, rate, ETA, memory

This package imports nothing of lldist but `errors`: what to compute comes in as a room
(runs/surface.py), which cells next as the room's schedule (cells/schedule.py).
"""
