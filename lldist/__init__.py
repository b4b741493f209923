"""lldist: loss landscapes of neural networks (Li et al. 2018), computed at cluster scale.

    python -m lldist.train job.yaml       # train the job's model (optional)
    python -m lldist.surface job.yaml     # compute the surface into one HDF5 file (MPI-aware)
    python -m lldist.plot out.h5          # contours, heat maps, 3D surfaces, 1D curves

See README.md for the job-file reference and docs/FORMAT.md for the output file.
"""

__version__ = "0.1.0"
