"""Between processes: who computes which cells, and how their results reach the one writer.

`runner`: the only mpi4py user: the whole conversation between rank 0 and the workers,
documented as a message sequence at its top. `progress`: cells done, rate, ETA, memory.
This package imports nothing of lldist but `errors`: what to compute comes in as a room
(lldist/run.py), which cells next as the room's schedule (lldist/schedule.py).
"""
