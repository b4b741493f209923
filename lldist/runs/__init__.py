"""What each command does, on every rank, under the command's own name; the command itself
(lldist/<name>.py) only reads its command line and calls here.

  surface.py    one surface: the room transport/runner.py talks to (prepare, build, evaluate a
                chunk, take a result, close)
  train.py      training a job's model, and the loop a curve's bend trains with
  optimum.py    a computation at θ* every rank joins, written once: launch, gate, fail,
                store the result where it may go
  hessian.py    the Hessian (GGN, Fisher) at θ*: spectrum, trace, density, blocks, jackknife
  sharded_hessian.py  the same over ranks: in a shard group (no rank holds the model or a whole
                      vector) or a data group (every rank the model, no rank a whole vector)
  sharpness.py  the sharpness measures at θ*
  connect.py    lldist.connect: a curve's bend trained, and the surfaces of its paths
  study.py      lldist.study: every variant's surface and measures, then the report
  series.py     lldist.series: every measure at every checkpoint of a recorded run, as units
                the runner hands out (a room like surface.py's)
  threads.py    how many CPU threads a rank takes: the job's, the CPU mask's share less the
                busy CPUs, one where one runs a batch faster
"""
