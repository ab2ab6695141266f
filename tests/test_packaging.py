"""The package builds as an sdist and a wheel (`python -m build`, the install path the README and the model cards
give, since hf_basis is not on PyPI), and the wheel installs and imports in a fresh virtual environment."""

import os
import shutil
import subprocess
import sys
import sysconfig
import tomllib
import venv
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(cmd: list[str], **kwargs) -> subprocess.CompletedProcess:
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=120, **kwargs)
    assert run.returncode == 0, f"{cmd}\n{run.stdout[-3000:]}\n{run.stderr[-3000:]}"
    return run


@pytest.mark.slow
def test_build_sdist_and_wheel_then_install_in_a_clean_venv(tmp_path):
    pytest.importorskip("build", reason="the `test` extra installs `build`")
    # Build from a copy of what the sdist needs, so the checkout gets no build/ or *.egg-info folders.
    src = tmp_path / "src"
    shutil.copytree(ROOT / "hf_basis", src / "hf_basis", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md", "setup.cfg", "hf_basis_cli.py"):
        shutil.copy2(ROOT / name, src / name)
    # --no-isolation: the build backend (setuptools) comes from this environment, no download. Without --sdist /
    # --wheel, build makes the sdist and then the wheel from the unpacked sdist: the sdist must be complete.
    _run([sys.executable, "-m", "build", "--no-isolation", "--outdir", str(tmp_path / "dist"), str(src)])
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    wheel = tmp_path / "dist" / f"hf_basis-{version}-py3-none-any.whl"
    assert wheel.is_file() and (tmp_path / "dist" / f"hf_basis-{version}.tar.gz").is_file()
    names = zipfile.ZipFile(wheel).namelist()
    assert "hf_basis_cli.py" in names and "hf_basis/metrics/perplexity/perplexity.py" in names
    assert not any(n.startswith(("tests/", "recipes/", "benchmarks/")) for n in names)
    metadata = zipfile.ZipFile(wheel).read(f"hf_basis-{version}.dist-info/METADATA").decode()
    assert "License-Expression: Apache-2.0" in metadata

    # A fresh venv that sees this environment's packages (torch, transformers, ...) through a .pth line, and gets
    # hf_basis itself only from the wheel (--no-deps: nothing is downloaded).
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=False).create(env_dir)
    python = env_dir / "bin" / "python"
    purelib = Path(_run([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"]).stdout.strip())
    (purelib / "outer_env.pth").write_text(sysconfig.get_path("purelib") + "\n")
    _run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index", "-q", str(wheel)])
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    code = "import hf_basis, hf_basis_cli; print(hf_basis.__file__); print(hf_basis.convert.__name__)"
    out = _run([str(python), "-c", code], cwd=tmp_path, env=env).stdout.split()
    assert out[0].startswith(str(purelib)) and out[1] == "convert"  # the installed copy, not the checkout
    help_text = _run([str(env_dir / "bin" / "hf-basis"), "--help"], cwd=tmp_path, env=env).stdout
    assert "usage: hf-basis" in help_text
