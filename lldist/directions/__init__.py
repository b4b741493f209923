"""Directions in weight space: where the plane through θ* points. Every kind is one module here,
the job key `directions.kind` its name; kinds.py is what they share (making a job's directions,
describing them, identity, materializing what the file keeps). Nothing is imported here: the
record can be read without torch (the store writes and reads it).

  record.py   Directions: one plane's tensors (x, y, target, bend) or recipe, attrs, planes
  kinds.py    the registry of kinds; make, describe, inputs, points, materialize, check_rows
  random.py   random: filter-normalized Gaussian (Li et al. 2018, section 4), as tensors or recipe
  target.py   target: the line to another checkpoint (align.py: weight matching first)
  pca.py      pca: the plane of a training trajectory (section 7), and how well it holds it
  hessian.py  hessian: the Hessian's top eigenvectors at θ*
  file.py     file: another lldist file's directions
  plane.py    plane: through three models (Garipov et al. 2018)
  curve.py    curve: a Bezier or polychain curve between two minima (lldist.connect)
  recipe.py   a random direction as its seed and per-row streams: any shard makes its rows
  align.py    permutation alignment (Ainsworth et al.'s weight matching)
  state.py    the float state directions live in (model_state), and their cosine

No MPI here; the file kind reads its source through the store.
"""
