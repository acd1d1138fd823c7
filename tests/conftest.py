"""Shared fixtures: one real end-to-end run of the embedded default, reused by many tests."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.cli import main

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG = ROOT / "configs" / "default.yaml"
TINY_P0 = ROOT / "data" / "models" / "tiny-p0"
TINY_P1 = ROOT / "data" / "models" / "tiny-p1"


def run_cli(*argv: str | Path) -> int:
    """Call the real command line in-process (vLLM runs in-process too)."""
    return main([str(a) for a in argv])


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The default config run through the real CLI and real vLLM, once per session."""
    run_dir = tmp_path_factory.mktemp("demo") / "run"
    assert run_cli("run", "--config", DEFAULT_CONFIG, "--out", run_dir) == 0
    return run_dir


@pytest.fixture(scope="session")
def demo_summary(demo_run: Path) -> dict:
    return json.loads((demo_run / "summary.json").read_text())
