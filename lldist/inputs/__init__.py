"""What a run reads, and what stands for it.

  loading.py     the model at θ*, the data splits, the task; other checkpoints of the model
  identity.py    what makes two runs the same job: the hashes a file is resumed by
  recorder.py    lldist.Recorder: a training loop's checkpoint series, for pca and interpolations
  study_file.py  a study file: its variants, each a validated job
"""
