"""The numerics of a cell: loss, metrics and curvature of a model at given weights. No MPI, no HDF5.

`evaluator`: many cells per data pass, weights set in place, the plain reference loop.
`tasks`: what a loss and a metric are (classification, regression, language modelling).
`curvature`: Hessian-vector products, extreme eigenvalues, trace, spectral density.
"""
