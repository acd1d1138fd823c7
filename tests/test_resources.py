"""Shipped resources: configs, prompts and models are found by name, from any folder."""

from __future__ import annotations

import json
import subprocess
import sys
import tomllib
from importlib import metadata
from pathlib import Path

import pytest
from pydantic import BaseModel

import pipeline
from pipeline.config import load_config
from pipeline.errors import PipelineError
from pipeline.resources import (
    DEFAULT_CONFIG,
    RESOURCE_ROOT,
    config_argument,
    shipped_config,
    shipped_config_names,
)
from tests.conftest import ROOT

PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_a_checkout_reads_its_own_folders() -> None:
    # No pipeline/_resources in a checkout: the top-level configs/ and data/ are used.
    assert RESOURCE_ROOT == ROOT
    assert DEFAULT_CONFIG == ROOT / "configs" / "default.yaml"
    assert shipped_config_names() == sorted(p.stem for p in (ROOT / "configs").glob("*.yaml"))
    assert {"default", "gpu", "enumerable"} <= set(shipped_config_names())


def _paths(model: BaseModel) -> list[Path]:
    """Every path setting of a (nested) config model, whatever kind of model it is."""
    found: list[Path] = []
    for name in type(model).model_fields:
        value = getattr(model, name)
        values = value.values() if isinstance(value, dict) else [value]
        for item in values:
            if isinstance(item, Path):
                found.append(item)
            elif isinstance(item, BaseModel):
                found += _paths(item)
    return found


@pytest.mark.parametrize("name", shipped_config_names())
def test_every_shipped_config_uses_only_shipped_files(
    name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # the working directory must not matter
    config = load_config(shipped_config(name))
    model_paths = [path for model in config.models.values() for path in _paths(model)]
    assert model_paths
    for path in [config.prompts.path, *model_paths]:
        assert path.exists(), path
        assert path.is_relative_to(RESOURCE_ROOT / "data"), path
    # ...and those files are the ones pyproject.toml puts into the wheel.
    data = PYPROJECT["tool"]["setuptools"]["package-data"]
    assert config.prompts.path.name in data["pipeline._resources.data"]
    for path in model_paths:
        assert path.parent == RESOURCE_ROOT / "data" / "models", path


def test_config_argument_is_decided_by_spelling() -> None:
    assert config_argument("gpu") == ROOT / "configs" / "gpu.yaml"
    assert config_argument("default") == DEFAULT_CONFIG
    # A suffix or a folder means a file, whether or not it exists.
    assert config_argument("gpu.yaml") == Path("gpu.yaml")
    assert config_argument("my.yml") == Path("my.yml")
    assert config_argument("./gpu") == Path("gpu")
    assert config_argument("configs/gpu") == Path("configs/gpu")
    with pytest.raises(PipelineError, match=r"no shipped config named 'gpus'.*default, "):
        config_argument("gpus")


def test_default_config_is_the_shipped_default(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    assert load_config() == load_config(ROOT / "configs" / "default.yaml")


def test_wheel_lists_every_code_package() -> None:
    # An explicit package list (needed for the resource mapping) must not miss code.
    code_packages = {
        ".".join(folder.relative_to(ROOT).parts)
        for folder in [ROOT / "pipeline", *(ROOT / "pipeline").rglob("*")]
        if folder.is_dir() and folder.name != "__pycache__" and any(folder.glob("*.py"))
    }
    listed = set(PYPROJECT["tool"]["setuptools"]["packages"])
    assert code_packages <= listed, f"add to [tool.setuptools] packages: {code_packages - listed}"
    mapped = PYPROJECT["tool"]["setuptools"]["package-dir"]
    assert mapped == {"pipeline._resources.configs": "configs", "pipeline._resources.data": "data"}


def test_one_version_string() -> None:
    assert "version" not in PYPROJECT["project"]
    assert PYPROJECT["project"]["dynamic"] == ["version"]
    assert PYPROJECT["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "pipeline.__version__"}
    assert metadata.version("entropy-pipeline") == pipeline.__version__


def test_python_dash_m_runs_the_command_line(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "pipeline", "--version"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=True,
    )
    assert done.stdout.strip() == f"entropy-pipeline {pipeline.__version__}"


def test_docker_image_command_names_a_shipped_config() -> None:
    # The image runs from /app with no source tree: its config must come from the wheel.
    command = next(
        line for line in (ROOT / "Dockerfile").read_text().splitlines() if line.startswith("CMD")
    )
    arguments = json.loads(command.removeprefix("CMD"))
    config = arguments[arguments.index("--config") + 1]
    assert config_argument(config).parent == RESOURCE_ROOT / "configs"
