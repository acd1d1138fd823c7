"""The installed wheel, not the checkout: it must find its configs, prompts and models.

Builds the wheel from the current tree, installs it (no dependencies: they come from
the test's own environment, added as a path after the scratch environment's own
packages) into a scratch virtual environment, and runs the command line from a
folder outside the checkout.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest
import yaml

import pipeline
from tests.conftest import ROOT

pytestmark = pytest.mark.slow

# What a wheel is built from; everything else in the checkout stays out of it.
_SOURCES = ("pyproject.toml", "README.md", "pipeline", "configs", "data")


def _run(*command: str | Path, cwd: Path) -> str:
    done = subprocess.run(
        [str(c) for c in command],
        cwd=cwd,
        capture_output=True,
        text=True,
        check=False,
        # PYTHONPATH or a stray PYTHONHOME would let the checkout leak in.
        env={k: v for k, v in os.environ.items() if not k.startswith("PYTHON")},
    )
    assert done.returncode == 0, f"{command}: {done.stderr}"
    return done.stdout


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A scratch virtual environment with the wheel of this tree installed."""
    scratch = tmp_path_factory.mktemp("wheel")
    source = scratch / "source"
    source.mkdir()
    for name in _SOURCES:
        if (ROOT / name).is_dir():
            shutil.copytree(
                ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__")
            )
        else:
            shutil.copy2(ROOT / name, source / name)
    pip = (sys.executable, "-m", "pip", "--disable-pip-version-check")
    offline = ("--no-index", "--no-deps")
    _run(
        *pip, "wheel", *offline, "--no-build-isolation", "-w", scratch / "dist", source, cwd=scratch
    )
    (wheel,) = (scratch / "dist").glob("entropy_pipeline-*.whl")
    venv = scratch / "venv"
    _run(sys.executable, "-m", "venv", "--without-pip", venv, cwd=scratch)
    purelib = "import sysconfig; print(sysconfig.get_path('purelib'))"
    site = Path(_run(venv / "bin" / "python", "-c", purelib, cwd=scratch).strip())
    # The dependencies: this environment's packages, searched after the venv's own.
    (site / "dependencies.pth").write_text(sysconfig.get_path("purelib") + "\n")
    # --ignore-installed: never uninstall the copy this test environment runs from.
    target = ("--python", venv / "bin" / "python")
    _run(*pip, *target, "install", *offline, "--ignore-installed", wheel, cwd=scratch)
    return venv


def test_wheel_holds_the_shipped_files_and_nothing_else(installed: Path) -> None:
    (wheel,) = (installed.parent / "dist").glob("*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    shipped = [
        path.relative_to(ROOT).as_posix()
        for folder in ("configs", "data/models")
        for path in (ROOT / folder).rglob("*")
        if path.is_file()
    ] + ["data/prompts.jsonl", "data/enumerable_prompts.jsonl"]
    assert {f"pipeline/_resources/{name}" for name in shipped} <= names
    assert not [name for name in names if "corpus" in name or name.startswith("tests/")]
    assert wheel.name.startswith(f"entropy_pipeline-{pipeline.__version__}-")


def test_installed_package_runs_outside_the_checkout(installed: Path, tmp_path: Path) -> None:
    bin_dir = installed / "bin"
    code = "import pipeline, pipeline.resources as r; print(pipeline.__file__, r.RESOURCE_ROOT)"
    module, root = _run(bin_dir / "python", "-c", code, cwd=tmp_path).split()
    assert Path(module).is_relative_to(installed)
    assert Path(root) == Path(module).parent / "_resources"

    printed = _run(bin_dir / "entropy-pipeline", "config", cwd=tmp_path)
    config = yaml.safe_load(printed)
    paths = [config["prompts"]["path"], *(m["path"] for m in config["models"].values())]
    for path in map(Path, paths):
        assert path.is_relative_to(Path(root) / "data"), path
        assert path.exists(), path
    gpu = yaml.safe_load(
        _run(bin_dir / "entropy-pipeline", "config", "--config", "gpu", cwd=tmp_path)
    )
    assert Path(gpu["prompts"]["path"]).is_relative_to(root)

    assert "usage: entropy-pipeline" in _run(
        bin_dir / "python", "-m", "pipeline", "--help", cwd=tmp_path
    )
    version = _run(bin_dir / "entropy-pipeline", "--version", cwd=tmp_path).strip()
    assert version == f"entropy-pipeline {pipeline.__version__}"
    reference = _run(bin_dir / "entropy-pipeline", "config", "--reference", cwd=tmp_path)
    assert reference.startswith("| key | type | default | meaning |")
