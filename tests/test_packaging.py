"""The wheel installs heads/, training/, kernels/ and conf/ under specdec/ and nothing at top level."""

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    src = tmp_path_factory.mktemp("src")
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(ROOT / name, src / name)
    ignore = shutil.ignore_patterns("__pycache__", "work", "hydra")
    for folder in ("specdec", "heads", "training", "kernels", "conf", "assets", "data"):
        shutil.copytree(ROOT / folder, src / folder, ignore=ignore)
    out = tmp_path_factory.mktemp("wheel")
    cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), str(src)]
    subprocess.run(cmd, check=True, capture_output=True)
    (path,) = out.glob("specdec-*.whl")
    return path


@pytest.fixture(scope="module")
def wheel_names(wheel):
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


def test_the_wheel_carries_the_demo_models_the_prompts_and_the_license(wheel_names):
    for name in ("specdec/assets/demo/target/config.json", "specdec/assets/demo/eagle/model.safetensors",
                 "specdec/data/HumanEval.jsonl.gz", "specdec/data/HumanEval.LICENSE", "specdec/py.typed"):  # fmt: skip
        assert name in wheel_names, name
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in wheel_names)


def test_the_installed_wheel_works_from_another_folder(wheel, tmp_path):
    """The wheel installed into a fresh venv (its own files only: the dependencies are this
    environment's, reached through a path entry that does not run this environment's editable
    install), then `specdec generate`, `specdec profile` and the smoke recipe from a folder that is
    not the checkout: demo models, prompts and configs come from the package."""
    import sysconfig

    fresh = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(fresh)], check=True, capture_output=True)
    python = fresh / "bin" / "python"
    site = Path(
        subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                       check=True, capture_output=True, text=True).stdout.strip()
    )  # fmt: skip
    # a plain path line: the dependencies' folder is on sys.path, its .pth files (our editable install) are not run
    (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site), str(wheel)],
        check=True, capture_output=True,
    )  # fmt: skip
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("SPECDEC_DEMO_DIR", "PYTHONPATH")}
    env.update(TRITON_INTERPRET="1", PYTHONUNBUFFERED="1")

    def run(*args):
        res = subprocess.run([str(python), *args], cwd=elsewhere, env=env, capture_output=True, text=True, timeout=600)
        assert res.returncode == 0, res.stderr[-2000:]
        return res

    where = run("-c", "import specdec; print(specdec.__file__)")
    assert where.stdout.startswith(str(site)), where.stdout  # the installed copy, not the checkout
    run("-m", "specdec.cli", "generate", "--prompt", "def add(a, b):", "--proposer", "ngram", "--max-new-tokens", "8",
        "--device", "cpu")  # fmt: skip
    run("-m", "specdec.cli", "profile", "--proposer", "ngram", "--limit", "1", "--max-new-tokens", "8",
        "--device", "cpu", "--out", "report", "--quiet")  # fmt: skip
    assert (elsewhere / "report" / "report.json").is_file()
    run("-m", "specdec.training.lm", "size=smoke", "out=smoke")  # every stage, HumanEval from the package
    assert (elsewhere / "smoke" / "eval.json").is_file() and (elsewhere / "smoke" / "eagle3" / "config.json").is_file()
