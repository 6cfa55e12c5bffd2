"""The package installs with one import root and imports from outside the source tree."""

from __future__ import annotations

import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CHECK = (
    "import headlab, headlab.kernels, headlab.analyses, headlab.app, headlab.zoo;"
    "from headlab.kernels.reference import patched_attention;"
    "print(headlab.__file__); print(headlab.kernels.__file__)"
)


def test_installed_package_imports_from_outside_the_tree(tmp_path):
    out = subprocess.run([sys.executable, "-c", CHECK], cwd=tmp_path, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    kernels_file = Path(out.stdout.splitlines()[1])
    assert kernels_file.name == "__init__.py"


def test_wheel_maps_subpackages_under_one_root(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path), str(ROOT)],
                   check=True, capture_output=True)
    (wheel,) = tmp_path.glob("headlab-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    for needed in ("headlab/__init__.py", "headlab/kernels/reference.py", "headlab/analyses/__init__.py",
                   "headlab/app/__init__.py", "headlab/app/server.py", "headlab/app/assets/headlab.css", "headlab/zoo/__init__.py", "headlab/zoo/tasks-llama/model.safetensors",
                   "headlab/zoo/tasks-llama/card.json", "headlab/zoo/tasks-llama/tokenizer.json",
                   "headlab/zoo/pycode-llama/model.safetensors", "headlab/zoo/pycode-llama/heldout.jsonl.gz"):
        assert needed in names
    assert not [n for n in names if n.startswith(("kernels/", "app/", "analyses/", "tests/"))]


@pytest.mark.parametrize("editable", [False, True], ids=["install", "editable"])
def test_pip_install_into_a_fresh_venv(tmp_path, editable):
    # A bare venv that sees this environment's packages (torch, pip, setuptools) through a .pth
    # file — whether this environment is the system Python or a venv itself.
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    py = venv / "bin" / "python"
    site = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          check=True, capture_output=True, text=True).stdout.strip()
    ours = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    (Path(site) / "outer.pth").write_text("\n".join(sorted(ours)) + "\n")
    target = ["-e", str(ROOT)] if editable else [str(ROOT)]
    subprocess.run([str(py), "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", *target],
                   check=True, capture_output=True)
    out = subprocess.run([str(py), "-c", CHECK], cwd=tmp_path, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    headlab_file = Path(out.stdout.splitlines()[0])
    if editable:
        assert headlab_file.is_relative_to(ROOT)
    else:
        assert headlab_file.is_relative_to(venv)
    assert (venv / "bin" / "headlab").exists()
