"""Between processes: who computes which cells, and how their results reach the one writer.

`runner`: the only mpi4py user: the whole conversation between rank 0 and the workers,
documented as a message sequence at its top. `schedule`: which cells next (the sweep, the
adaptive grid; numpy only). `progress`: cells done, rate, ETA, memory.
`coordbench`: rank 0 alone under load (`python -m lldist.transport.coordbench`, driven by
`python -m lldist.bench coordinator`).
"""
