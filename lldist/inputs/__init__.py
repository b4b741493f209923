"""What a run reads, and what stands for it.

  loading.py     the model at θ*, the data splits, the task; other checkpoints of the model
  rows.py        a model no rank holds whole: built on the meta device, each rank reading its rows
  identity.py    what makes two runs the same job: the hashes a file is resumed by
  recorder.py    lldist.Recorder: a training loop's checkpoint series, for pca and interpolations,
                 with each saved step's optimizer (and Adam's second moments) for the thresholds
  study_file.py  a study file: its variants, each a validated job
  series.py      a recorded run's checkpoints in training order, with their steps and optimizers
"""
