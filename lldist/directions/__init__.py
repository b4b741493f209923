"""Directions in weight space: where the plane through theta* points.

    from lldist.directions import model_state, make_directions, pca_directions

`basic`: random Gaussian directions with filter-wise (or layer, weight) normalization and the
line to a target checkpoint, over the model's float state (Li et al. 2018, section 4).
`pca`: the top two principal directions of a training trajectory (section 7).
The Hessian's eigenvectors (`directions.kind: hessian`) come from `evaluation.curvature`.
Pure tensor code: no MPI, no HDF5.
"""

from .basic import (  # noqa: F401
                    EPS,
                    STREAM_TAG,
                    cosine,
                    describe,
                    make_directions,
                    model_state,
                    target_direction,
)
from .pca import pca_directions  # noqa: F401
from .recipe import Recipe, direction, gaussian  # noqa: F401
