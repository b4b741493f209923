"""Exports for ParaView and the browser, read back by VTK's own reader."""

import h5py
import numpy as np
import pytest
from conftest import run, write_job


@pytest.mark.slow
def test_vts_reads_back_in_vtk_and_html_is_written(workdir):
    vtk = pytest.importorskip("vtk")
    from vtk.util.numpy_support import vtk_to_numpy
    job = write_job(workdir / "job.yaml", grid={"x": [-1.0, 1.0, 7], "y": [-0.5, 0.5, 4]})
    run(["lldist.surface", job], workdir)
    p = run(["lldist.plot", "out.h5", "--vtk", "--html"], workdir)
    assert "out.vts" in p.stdout
    r = vtk.vtkXMLStructuredGridReader()
    r.SetFileName("out.vts")
    r.Update()
    g = r.GetOutput()
    dims = [0, 0, 0]
    g.GetDimensions(dims)
    assert dims == [7, 4, 1]
    pts = vtk_to_numpy(g.GetPoints().GetData())
    with h5py.File("out.h5", "r") as f:
        loss, acc, x, y = f["test/loss"][()], f["test/acc"][()], f["x"][()], f["y"][()]
    np.testing.assert_array_equal(pts[:, 2], loss.ravel())  # z is the loss, row by row
    np.testing.assert_array_equal(pts[:, 0], np.tile(x, 4))
    np.testing.assert_array_equal(pts[:, 1], np.repeat(y, 7))
    pd = g.GetPointData()
    np.testing.assert_array_equal(vtk_to_numpy(pd.GetArray("test/acc")), acc.ravel())
    assert vtk_to_numpy(pd.GetArray("computed")).all()
    pytest.importorskip("plotly")
    html = open("out_test_loss.html").read()
    assert "plotly" in html.lower() and '"type":"surface"' in html.replace(" ", "")
