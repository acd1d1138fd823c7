"""The files the project ships beside its code: configs, demo prompts and tiny models.

In a source checkout they are the repository's top-level ``configs/`` and ``data/``.
An installed wheel carries the same folders as ``pipeline/_resources/configs`` and
``pipeline/_resources/data`` (mapped in ``pyproject.toml``, not copied in the
repository), so ``entropy-pipeline run`` finds its default config, prompts and models
from any working directory. The shipped configs name their prompts and models by
paths relative to the config file (``../data/...``), which hold in both layouts.
"""

from __future__ import annotations

import os
from pathlib import Path

from pipeline.errors import PipelineError

_PACKAGE_DIR = Path(__file__).resolve().parent
# A wheel puts them here (see [tool.setuptools.package-dir] in pyproject.toml); in a
# checkout, or an editable install of one, they sit beside the package. The installed
# copy wins, so an installed package never reads a checkout that happens to be nearby.
_INSTALLED_ROOT = _PACKAGE_DIR / "_resources"
RESOURCE_ROOT = _INSTALLED_ROOT if (_INSTALLED_ROOT / "configs").is_dir() else _PACKAGE_DIR.parent
SHIPPED_CONFIGS = RESOURCE_ROOT / "configs"
DEFAULT_CONFIG = SHIPPED_CONFIGS / "default.yaml"
CONFIG_SUFFIXES = (".yaml", ".yml")


def shipped_config_names() -> list[str]:
    """Names of the shipped configs (``default``, ``gpu``, ...), sorted."""
    return sorted(path.stem for path in SHIPPED_CONFIGS.glob("*.yaml"))


def shipped_config(name: str) -> Path:
    """Path of the shipped config called ``name`` (``configs/<name>.yaml``)."""
    path = SHIPPED_CONFIGS / f"{name}.yaml"
    if not path.is_file():
        names = ", ".join(shipped_config_names()) or f"none (no configs in {SHIPPED_CONFIGS})"
        raise PipelineError(
            f"there is no shipped config named {name!r}; the shipped configs are: "
            f"{names}. To use a file, give its path with a .yaml suffix or a folder, "
            "as in ./my.yaml."
        )
    return path


def config_argument(value: str) -> Path:
    """The config file meant by a ``--config`` value: a file path or a shipped name.

    The spelling decides, never the file system: a value with a ``.yaml``/``.yml``
    suffix or a path separator is a file; a bare word (``gpu``) names a shipped
    config, so ``--config gpu`` works from any folder, in a wheel or a checkout.
    """
    if value.endswith(CONFIG_SUFFIXES) or "/" in value or os.sep in value:
        return Path(value)
    return shipped_config(value)
