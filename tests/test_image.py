"""The container image, built from docker/Dockerfile and run: the quickstart and a 2-rank MPI
job inside it give the numbers a run outside gives.

No Docker daemon and no image registry here: Debian's buildah builds the Dockerfile as root
(vfs storage, chroot isolation), on a base made with debootstrap from Debian's packages
(python3, python3-venv) and imported with `buildah from scratch`. pip inside the build reaches
PyPI as pip does here (the CA bundle of a TLS-intercepting proxy is mounted when PIP_CERT
names one). The CPU variant is built where torch's CPU index can be reached; where it cannot
(here), the pypi variant: the pinned torch/torchvision pair from PyPI (CUDA-capable wheels that
run on a CPU). A local CPU wheel of torch beside PyPI's torchvision is not a pair: torchvision's
operators fail to load ("operator torchvision::nms does not exist"), so a torchvision: model is
run inside the image, and the versions it records are checked. `.ci/run` installs buildah and
debootstrap.
"""

import os
import shutil
import subprocess
import time

import h5py
import numpy as np
import pytest
from conftest import ROOT, run

pytestmark = pytest.mark.slow

BASE = "localhost/lldist-test-base"
IMAGE = "localhost/lldist:cpu-test"
STORAGE = ["--storage-driver", "vfs"]
GRID = ["--set", "grid.x=[-1,1,9]", "--set", "grid.y=[-1,1,9]"]


def buildah(*args, check=True, timeout=1800, **kw):
    p = subprocess.run(["buildah", *STORAGE, *args], capture_output=True, text=True, timeout=timeout, **kw)
    if check and p.returncode != 0:
        raise AssertionError(f"buildah {' '.join(args)} exited {p.returncode}:\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    return p


def make_base():
    if buildah("images", "-q", BASE, check=False).stdout.strip():
        return
    if not shutil.which("debootstrap"):
        pytest.skip("debootstrap is not installed (apt-get install debootstrap)")
    rootfs = "/var/tmp/lldist-test-rootfs"
    shutil.rmtree(rootfs, ignore_errors=True)
    p = subprocess.run(["debootstrap", "--variant=minbase", "--include=python3,python3-venv,ca-certificates",
                        "bookworm", rootfs, "http://deb.debian.org/debian"], capture_output=True, text=True, timeout=1800)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    ctr = buildah("from", "scratch").stdout.strip()
    buildah("copy", ctr, rootfs, "/")
    buildah("config", "--env", "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            "--env", "LANG=C.UTF-8", ctr)
    buildah("commit", "-q", ctr, BASE)
    buildah("rm", ctr)
    shutil.rmtree(rootfs, ignore_errors=True)


@pytest.fixture(scope="module")
def image():
    if not shutil.which("buildah"):
        pytest.skip("buildah is not installed (apt-get install buildah debootstrap)")
    if os.getuid() != 0:
        pytest.skip("buildah's chroot isolation needs root on this machine")
    make_base()
    args = ["build", "--isolation", "chroot", "-f", "docker/Dockerfile", "--build-arg", f"BASE={BASE}", "-t", IMAGE]
    cert = os.environ.get("PIP_CERT")
    if cert and os.path.exists(cert):
        args += ["-v", f"{cert}:/host-ca.crt:ro", "--build-arg", "PIP_CERT=/host-ca.crt"]
    reachable = subprocess.run(["python3", "-c", "import urllib.request as u; u.urlopen('https://download.pytorch.org/whl/cpu/', timeout=10)"],
                               capture_output=True).returncode == 0
    if not reachable:  # PyPI's pair, pinned: the offline site's route (docker/README.md)
        args += ["--build-arg", "VARIANT=pypi"]
    # vfs storage keeps each image as a full copy (6.4 GB with PyPI's CUDA wheels): a rebuild
    # leaves the old one dangling, and a few runs fill the disk (a CI run failed "no space left
    # on device"). Clear leftovers before, and the image after: only the small base is kept.
    clear_images()
    t = time.time()
    try:
        buildah(*args, ".", cwd=ROOT)
        size = buildah("images", "--format", "{{.Size}}", IMAGE).stdout.strip()
        print(f"\nbuilt {IMAGE} in {time.time() - t:.0f} s: {size}")
        yield IMAGE
    finally:
        clear_images()


def clear_images():
    buildah("rm", "--all", check=False)
    buildah("rmi", "-f", IMAGE, check=False)
    buildah("rmi", "--prune", check=False)


def inside(image, workdir, command, timeout=900):
    ctr = buildah("from", image).stdout.strip()
    try:
        return buildah("run", "--isolation", "chroot", "-v", f"{workdir}:/work", "--workingdir", "/work", ctr,
                       "--", "sh", "-c", command, timeout=timeout)
    finally:
        buildah("rm", ctr, check=False)


def test_quickstart_and_an_mpi_job_inside_the_image_equal_a_run_outside(image, workdir):
    job = "/opt/lldist/jobs/quickstart.yaml"
    grid = " ".join(GRID)
    p = inside(image, workdir, f"python -m lldist.surface {job} {grid} --out in1.h5 && python -m lldist.plot in1.h5 "
                               f"&& mpiexec -n 2 python -m lldist.surface {job} {grid} --out in2.h5 "
                               "&& python -c 'import torch; print(\"torch\", torch.__version__)'")
    assert "rank 1/2 on" in p.stdout + p.stderr
    assert os.path.exists("in1_test_loss_contour.png") and os.path.exists("runs/quickstart/model.pt")
    # outside: the same job on the checkpoint the image trained
    run(["lldist.surface", os.path.join(ROOT, "jobs", "quickstart.yaml"), *GRID, "--out", "out.h5"], workdir)
    with h5py.File("in1.h5", "r") as a, h5py.File("in2.h5", "r") as b, h5py.File("out.h5", "r") as c:
        assert a.attrs["job_hash"] == c.attrs["job_hash"]  # the same job: checkpoint, data, directions
        same_torch = a.attrs["torch_version"].split("+")[0] == c.attrs["torch_version"].split("+")[0]
        for q in ("test/loss", "test/acc"):
            np.testing.assert_array_equal(a[q][()], b[q][()])  # 1 rank and 2 ranks inside
            if same_torch:
                np.testing.assert_array_equal(a[q][()], c[q][()])
            else:
                np.testing.assert_allclose(a[q][()], c[q][()], rtol=1e-5, atol=1e-7)
        assert set(b["chunks"][: b["nchunks"][()]]["rank"].tolist()) == {0, 1}


def test_the_image_says_what_it_is(image, workdir):
    p = inside(image, workdir, "python -m lldist.surface --help && which mpiexec python "
                               "&& python -c 'import mpi4py.MPI as m; print(m.Get_library_version())' "
                               "&& cat /opt/lldist/versions.txt")
    assert "/opt/venv/bin/mpiexec" in p.stdout and "/opt/venv/bin/python" in p.stdout
    assert "MPICH" in p.stdout
    import sys
    sys.path.insert(0, os.path.join(ROOT, "docker"))
    from pins import pin
    torch_v, vision_v = pin("torch", os.path.join(ROOT, "setup.cfg")), pin("torchvision", os.path.join(ROOT, "setup.cfg"))
    line = p.stdout.strip().splitlines()[-1]
    assert line.startswith("lldist ") and f"torch {torch_v}" in line and f"torchvision {vision_v}" in line, line


def test_a_torchvision_model_runs_inside_the_image(image, workdir):
    """The reviewer's offline CPU image could not import torchvision (a CPU torch from a local
    wheel beside PyPI's torchvision): a torchvision: model, start to file, inside."""
    p = inside(image, workdir, "python -m lldist.surface /opt/lldist/jobs/quickstart.yaml --out tv.h5 "
                               "--set model.name=torchvision:squeezenet1_1 --set model.args={} --set model.checkpoint=null --set train=null "
                               "--set data.name=python:lldist.workloads.synthetic:random_images "
                               "--set grid.x=[-1,1,3] --set grid.y=null --set eval.batch_size=32")
    assert "done: 3 cells" in p.stdout, p.stdout + p.stderr
    with h5py.File("tv.h5", "r") as f:
        assert f["done"][()].all() and np.isfinite(f["test/loss"][()]).all()
