"""Surfaces for other tools: ParaView (VTK XML structured grid) and the browser (one
self-contained HTML file with an interactive 3D surface). Reads the Surface of
SurfaceReader.read_all (an adaptive grid's reconstruction included); no torch, MPI or HDF5.

    python -m lldist.plot out.h5 --vtk      # out.vts: open in ParaView ("Warp By Scalar" not needed)
    python -m lldist.plot out.h5 --html     # out_<split>_<quantity>.html (needs lldist[html]: plotly)

The VTK file is written by hand: its XML format is simple and stable, and a VTK dependency
(140 MB) for writing one file would be out of proportion; the tests read it back with VTK's
own reader. The HTML uses plotly (optional extra `lldist[html]`), which embeds its JavaScript
so the file works offline and in notebooks.
"""

from __future__ import annotations

import base64
import struct

import numpy as np


def _array(name: str, values: np.ndarray, components: int = 1) -> str:
    """A DataArray in VTK's binary inline encoding: base64 of a UInt32 byte count, then the
    little-endian float64 values."""
    data = np.ascontiguousarray(values, dtype="<f8").tobytes()
    blob = base64.b64encode(struct.pack("<I", len(data)) + data).decode()
    return (f'<DataArray type="Float64" Name="{name}" NumberOfComponents="{components}" format="binary">'
            f"{blob}</DataArray>")


def write_vts(s, path: str, height: str = "loss", log: bool = False) -> str:
    """The surface as a structured grid: points (alpha, beta, z) with z the first split's
    `height` quantity (its log10 with `log`), every quantity of every split as point data, and
    `computed` (1 where the cell was computed, 0 where interpolated or missing). 1D surfaces
    are a line of points. NaN (overflowed or not computed) stays NaN: ParaView leaves a gap."""
    x = np.asarray(s.x, dtype=float)
    y = np.asarray(s.y, dtype=float) if s.y is not None else np.zeros(1)
    nx, ny = len(x), len(y)
    split = s.splits[0]
    z = np.asarray(s.values[(split, height)], dtype=float).reshape(ny, nx)
    if log:
        with np.errstate(all="ignore"):
            z = np.log10(z)
    X, Y = np.meshgrid(x, y)  # (ny, nx): VTK's x index runs fastest, as the file's rows do
    points = np.stack([X.ravel(), Y.ravel(), z.ravel()], axis=1)
    arrays = [_array(f"{sp}/{q}", np.asarray(v, dtype=float).ravel()) for (sp, q), v in s.values.items()]
    arrays.append(_array("computed", np.asarray(s.done, dtype=float).ravel()))
    extent = f"0 {nx - 1} 0 {ny - 1} 0 0"
    text = (
        '<?xml version="1.0"?>\n'
        '<VTKFile type="StructuredGrid" version="1.0" byte_order="LittleEndian" header_type="UInt32">\n'
        f'<StructuredGrid WholeExtent="{extent}">\n<Piece Extent="{extent}">\n'
        f'<PointData Scalars="{split}/{height}">\n' + "\n".join(arrays) + "\n</PointData>\n"
        "<Points>\n" + _array("Points", points, 3) + "\n</Points>\n"
        "</Piece>\n</StructuredGrid>\n</VTKFile>\n")
    with open(path, "w") as f:
        f.write(text)
    return path


def write_html(s, path: str, split: str, q: str = "loss", log: bool = False) -> str:
    """One interactive 3D surface (plotly, JavaScript embedded): rotate, zoom, hover values."""
    try:
        import plotly.graph_objects as go
    except ImportError:
        from ..errors import UserError
        raise UserError("--html needs plotly: pip install 'lldist[html]'")
    z = np.asarray(s.values[(split, q)], dtype=float)
    if log:
        with np.errstate(all="ignore"):
            z = np.log10(z)
    title = f"{s.name}: {split} {'log10 ' if log else ''}{q}"
    if s.y is None:
        fig = go.Figure(go.Scatter(x=s.x, y=z, mode="lines+markers"))
        fig.update_layout(title=title, xaxis_title="alpha", yaxis_title=q)
    else:
        fig = go.Figure(go.Surface(x=s.x, y=s.y, z=z, colorscale="Viridis",
                                   contours={"z": {"show": True, "usecolormap": True, "project": {"z": True}}}))
        fig.update_layout(title=title, scene={"xaxis_title": "alpha (x)", "yaxis_title": "beta (y)",
                                              "zaxis_title": ("log10 " if log else "") + q})
    fig.write_html(path, include_plotlyjs=True, full_html=True)
    return path
