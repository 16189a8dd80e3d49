"""The wheel installs heads/, training/, kernels/ and conf/ under specdec/ and nothing at top level."""

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel_names(tmp_path_factory):
    src = tmp_path_factory.mktemp("src")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    for folder in ("specdec", "heads", "training", "kernels", "conf"):
        shutil.copytree(ROOT / folder, src / folder, ignore=shutil.ignore_patterns("__pycache__"))
    out = tmp_path_factory.mktemp("wheel")
    cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), str(src)]
    subprocess.run(cmd, check=True, capture_output=True)
    (wheel,) = out.glob("specdec-*.whl")
    return zipfile.ZipFile(wheel).namelist()


def test_subpackages_live_under_specdec(wheel_names):
    for sub in ("heads", "training", "kernels"):
        assert f"specdec/{sub}/__init__.py" in wheel_names
    assert "specdec/verify.py" in wheel_names
    assert "specdec/conf/train.yaml" in wheel_names and "specdec/conf/head/medusa.yaml" in wheel_names
    assert "specdec/generate_repo/custom_generate/generate.py" in wheel_names  # transformers' custom_generate


def test_nothing_else_at_top_level(wheel_names):
    top = {name.split("/")[0] for name in wheel_names}
    assert all(t == "specdec" or t.endswith(".dist-info") for t in top), top
    assert not top & {"heads", "training", "kernels", "conf", "tests"}
