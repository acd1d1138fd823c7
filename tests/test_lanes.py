"""Test lanes: engine tests are marked, and an unmarked test cannot start an engine."""

from __future__ import annotations

import types
from dataclasses import dataclass, field
from pathlib import Path

import pytest

import tests.conftest as conftest


@dataclass
class _Item:
    module: types.ModuleType
    fixturenames: tuple[str, ...] = ()
    marks: list[pytest.Mark] = field(default_factory=list)
    path: Path = Path("tests/test_plain.py")

    def add_marker(self, mark: pytest.MarkDecorator) -> None:
        self.marks.append(mark.mark)

    def get_closest_marker(self, name: str) -> pytest.Mark | None:
        return next((mark for mark in self.marks if mark.name == name), None)


def test_engine_tests_are_marked_by_what_they_use() -> None:
    drives_cli = types.ModuleType("drives_cli")
    drives_cli.run_cli = conftest.run_cli
    plain = types.ModuleType("plain")
    items = [
        _Item(drives_cli),
        _Item(plain, ("tmp_path", "demo_summary")),
        _Item(plain, ("tmp_path",)),
    ]
    conftest.pytest_collection_modifyitems(items)
    assert [[mark.name for mark in item.marks if mark.name == "engine"] for item in items] == [
        ["engine"],
        ["engine"],
        [],
    ]


def test_a_test_runs_in_its_modules_xdist_group_unless_it_names_one() -> None:
    plain = types.ModuleType("plain")
    own = _Item(plain, marks=[pytest.mark.xdist_group("own").mark])
    items = [_Item(plain), own]
    conftest.pytest_collection_modifyitems(items)
    assert [[mark.args for mark in item.marks] for item in items] == [
        [("test_plain.py",)],
        [("own",)],
    ]


def test_an_unmarked_test_that_imports_vllm_fails_with_its_name() -> None:
    # A submodule that does not exist: the check must fire before the import runs.
    # __import__ is what an import statement calls (importlib.import_module bypasses
    # the audit event, but the code under test imports vLLM with statements).
    with pytest.raises(conftest.EngineImportInUnmarkedTest) as caught:
        __import__("vllm._lane_probe")
    assert "test_lanes.py::test_an_unmarked_test_that_imports_vllm_fails" in str(caught.value)
    assert "@pytest.mark.engine" in str(caught.value)
    with pytest.raises(conftest.EngineImportInUnmarkedTest):
        __import__("ray._lane_probe")


@pytest.mark.engine
def test_a_marked_test_is_not_checked() -> None:
    # Checked through the hook itself: importing vLLM here would take seconds.
    assert conftest._unmarked_test[0] is None
    conftest._refuse_engine_imports("import", ("vllm._lane_probe", None, [], [], []))
