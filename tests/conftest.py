"""Shared fixtures (one real end-to-end run of the embedded default) and test lanes.

Markers (declared in pyproject.toml): ``engine`` for tests that start a vLLM engine or
a Ray cluster, ``slow`` for tests that take long without one. ``make test-fast`` runs
``-m "not engine and not slow"``. A test is marked ``engine`` automatically when its
module imports ``run_cli`` (the real command line, which starts engines) or when it
uses ``demo_run``/``demo_summary``; others can carry ``@pytest.mark.engine``. A test
that is not marked and still imports vLLM or Ray fails, naming itself, instead of
silently making the fast lane slow. The check sees imports of modules not loaded yet,
so it is complete where no engine test ran before (the fast lane) for vLLM, which no
test module imports at collection; a module-level import of Ray (or of vLLM) in a test
module would blunt it to the submodules loaded later.
"""

from __future__ import annotations

import json
import re
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

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


def engines_loaded(run_dir: Path) -> list[str]:
    """The model folders whose vLLM engines a run started, in order (from its run.log)."""
    started = re.findall(
        r"Initializing a V1 LLM engine .* model='([^']+)'", (run_dir / "run.log").read_text()
    )
    return [Path(path).name for path in started]


ENGINE_FIXTURES = frozenset({"demo_run", "demo_summary"})
ENGINE_LIBRARIES = frozenset({"vllm", "ray"})


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist reads the groups
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark ``engine`` every test that drives the real CLI or uses the shared run, and
    put every test without an ``xdist_group`` in its module's group.

    ``make test`` runs two pytest-xdist workers with ``--dist loadgroup``: a group runs
    on one worker, so a module's shared runs (module fixtures) are made once, unless
    the module splits its tests into groups of its own (``test_resume.py`` does).
    """
    for item in items:
        module = getattr(item, "module", None)
        uses_cli = getattr(module, "run_cli", None) is run_cli
        fixtures = set(getattr(item, "fixturenames", ()))
        if uses_cli or fixtures & ENGINE_FIXTURES:
            item.add_marker(pytest.mark.engine)
        if item.get_closest_marker("xdist_group") is None:
            item.add_marker(pytest.mark.xdist_group(item.path.name))


class EngineImportInUnmarkedTest(RuntimeError):
    """A test without the ``engine`` marker imported vLLM or Ray."""


# The node id of the running test when it is not marked ``engine``, else None.
_unmarked_test: list[str | None] = [None]


def _refuse_engine_imports(event: str, args: tuple[Any, ...]) -> None:
    # An audit hook sees real imports only (not find_spec probes, not modules already
    # loaded), and only the main thread's: background threads of an earlier engine
    # test are not the running test's doing.
    if event != "import" or _unmarked_test[0] is None:
        return
    library = str(args[0]).partition(".")[0]
    if library in ENGINE_LIBRARIES and threading.current_thread() is threading.main_thread():
        raise EngineImportInUnmarkedTest(
            f"{_unmarked_test[0]} imports {args[0]} but is not marked `engine`: add "
            "@pytest.mark.engine (or use run_cli / demo_run, which mark it), so that "
            "`make test-fast` leaves it out."
        )


sys.addaudithook(_refuse_engine_imports)


@pytest.fixture(autouse=True)
def _engine_marker_is_honest(request: pytest.FixtureRequest) -> Iterator[None]:
    """Arm the import check for the duration of a test not marked ``engine``."""
    marked = request.node.get_closest_marker("engine") is not None
    _unmarked_test[0] = None if marked else request.node.nodeid
    try:
        yield
    finally:
        _unmarked_test[0] = None
