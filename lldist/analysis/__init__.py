"""What is made of finished files, offline: no torch, MPI or model, even indirectly (the
store reads the files). `python -m lldist.plot`, `lldist.metrics`, `lldist.info` and a study's
report draw on these.

  metrics.py       the landscape's shape as numbers (basin, convexity, roughness, barriers)
  figures.py       every figure of a surface and the comparisons of several
  export.py        ParaView (VTK) and interactive HTML surfaces
  spectrum.py      the Hessian's spectral density, smoothed and summed up
  uncertainty.py   intervals from the stored standard errors (Wilson's for accuracy)
  stability.py     an optimizer's edge of stability: 2/η, momentum's and Adam's thresholds
  series_figures.py  a series file's figures: λmax against step with the threshold, each measure
  significance.py  the study's tests: Welch, Kendall, the bootstrap
  verdicts.py      the study's answers: sharper or not, beyond the error bars or not
  report.py        the study's Markdown and HTML report
"""
