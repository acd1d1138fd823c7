"""The config reference comes from the pydantic models; `entropy-pipeline config` prints it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Annotated, Any, Literal

import pytest
import yaml
from pydantic import BaseModel, ConfigDict, Field

from pipeline.cli import main
from pipeline.config import RunConfig, config_hash, load_config
from pipeline.config_reference import (
    END_MARKER,
    START_MARKER,
    ReferenceRow,
    reference_rows,
    reference_table,
    replace_generated,
    type_name,
)
from tests.conftest import DEFAULT_CONFIG, ROOT

# The smallest valid config: every other setting keeps the model's default.
_MINIMAL = {"prompts": {"path": "p.jsonl"}, "models": {"p0": {"path": "a"}, "p1": {"path": "b"}}}


def test_readme_reference_is_current() -> None:
    readme = (ROOT / "README.md").read_text()
    assert readme.count(START_MARKER) == 1
    assert readme.count(END_MARKER) == 1
    assert replace_generated(readme, reference_table()) == readme, (
        "the README's config reference is stale: run `make docs`"
    )


def test_every_setting_is_described() -> None:
    undescribed = [row.key for row in reference_rows() if not row.description]
    assert not undescribed, f"add Field(description=...) to {undescribed}"


def _lookup(tree: Any, key: str) -> Any:
    for part in key.split("."):
        tree = tree[part]
    return tree


def test_defaults_in_the_reference_are_the_models_defaults() -> None:
    # Independent route: the defaults pydantic fills into a minimal config, read back
    # from the reference's YAML text.
    filled = RunConfig.model_validate(_MINIMAL).model_dump(mode="json")
    checked = 0
    for row in reference_rows():
        if row.type.startswith("section") or "<name>" in row.key or row.default == "required":
            continue
        assert yaml.safe_load(row.default.strip("`")) == _lookup(filled, row.key), row.key
        checked += 1
    assert checked >= 30


def test_types_read_plainly() -> None:
    assert type_name(int) == "int"
    assert type_name(Path | None) == "path or null"
    assert type_name(Annotated[int, Field(gt=0)] | None) == "int > 0 or null"
    assert type_name(Annotated[float, Field(ge=0, le=1)]) == "float ≥ 0, ≤ 1"
    assert type_name(Literal["a", "b"]) == "`a` or `b`"
    assert type_name(Literal["a", "b", "c"]) == "`a`, `b` or `c`"
    assert type_name(list[int]) == "list of int"
    assert (
        type_name(Annotated[list[str], Field(min_length=1)] | None)
        == "non-empty list of str or null"
    )


class _Folder(BaseModel):
    """A model folder."""

    kind: Literal["folder"] = Field(default="folder", description="Kind.")
    path: Path = Field(description="Where.")


class _Adapter(BaseModel):
    """An adapter on a base."""

    kind: Literal["adapter"] = Field(description="Kind.")
    path: Path = Field(description="Where.")
    base: Path = Field(description="Its base.")


class _Pair(BaseModel):
    """Two ends, told apart from the others by their keys alone."""

    model_config = ConfigDict(title="pair")

    start: str = Field(alias="from", description="One end.")


class _Options(BaseModel):
    """Optional extras."""

    level: Annotated[float, Field(gt=0, lt=1)] = Field(default=0.5, description="A level.")


class _Toy(BaseModel):
    models: dict[str, Annotated[_Folder | _Adapter, Field(discriminator="kind")]] = Field(
        description="Named models."
    )
    pairs: dict[str, _Pair | _Folder] = Field(default_factory=dict, description="Pairs.")
    options: _Options | None = Field(default=None, description="Extras, or none.")
    tags: list[str] = Field(default_factory=list, description="Labels.")


def test_generator_walks_unions_mappings_and_optional_sections() -> None:
    # Written out by hand: what a newcomer should read for this toy config.
    assert reference_rows(_Toy) == [
        ReferenceRow("models", "mapping of name to section", "required", "Named models."),
        ReferenceRow("models.<name>.kind", "`folder`", "`folder`", "(kind: folder) Kind."),
        ReferenceRow("models.<name>.path", "path", "required", "Where."),
        ReferenceRow("models.<name>.kind", "`adapter`", "required", "(kind: adapter) Kind."),
        ReferenceRow("models.<name>.base", "path", "required", "(kind: adapter) Its base."),
        ReferenceRow("pairs", "mapping of name to section", "`{}`", "Pairs."),
        ReferenceRow("pairs.<name>.from", "str", "required", "(pair) One end."),
        ReferenceRow("pairs.<name>.kind", "`folder`", "`folder`", "(kind: folder) Kind."),
        ReferenceRow("pairs.<name>.path", "path", "required", "(kind: folder) Where."),
        ReferenceRow("options", "section or null", "`null`", "Extras, or none."),
        ReferenceRow("options.level", "float > 0, < 1", "`0.5`", "A level."),
        ReferenceRow("tags", "list of str", "`[]`", "Labels."),
    ]


def test_replace_generated_needs_both_markers() -> None:
    text = f"intro\n{START_MARKER}\nold table\n{END_MARKER}\noutro\n"
    updated = replace_generated(text, "| new |\n")
    assert updated.startswith(f"intro\n{START_MARKER}\n")
    assert updated.endswith(f"| new |\n\n{END_MARKER}\noutro\n")
    assert "old table" not in updated
    with pytest.raises(ValueError, match="markers"):
        replace_generated("no markers here", "| new |\n")


def test_config_command_prints_a_config_that_reproduces_the_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    overrides = ["entropy.unit=per_token", "sampling.num_samples=3"]
    expected = load_config(DEFAULT_CONFIG, overrides)
    monkeypatch.chdir(tmp_path)
    assert main(["config", *overrides]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith(
        f"# resolved from {DEFAULT_CONFIG}; config hash {config_hash(expected)}\n"
    )
    assert yaml.safe_load(printed)["entropy"]["unit"] == "per_token"
    saved = tmp_path / "resolved.yaml"
    saved.write_text(printed)
    assert config_hash(load_config(saved)) == config_hash(expected)


def test_config_command_takes_shipped_names_and_reports_errors(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["config", "--config", "enumerable"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["sampling"]["max_tokens"] == 4
    assert main(["config", "entropy.unit=bits"]) == 2
    assert "entropy.unit: Input should be 'sequence' or 'per_token'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exited:
        main(["config", "--config", "nightly"])
    assert exited.value.code == 2
    assert "no shipped config named 'nightly'" in capsys.readouterr().err


def test_reference_reaches_the_terminal(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["config", "--reference"]) == 0
    assert capsys.readouterr().out == reference_table()
    seed_help = " ".join(str(RunConfig.model_fields["seed"].description).split()[:4])
    for command, shown, hidden in (
        ("run", ["sampling.num_samples", "engine.dtype", "entropy.unit", seed_help], []),
        ("stats", ["entropy.unit", "weights.mode", "uncertainty.level"], ["sampling.", "engine."]),
    ):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        text = capsys.readouterr().out
        for shown_text in shown:
            assert shown_text in text, (command, shown_text)
        for prefix in hidden:
            assert f"  {prefix}" not in text, (command, prefix)


def test_config_into_a_closed_pipe_stops_quietly() -> None:
    """`entropy-pipeline config | head -1`: the reader goes away, and the command stops
    with status 141 (as command-line tools do) and nothing on stderr, not an error."""
    read_end, write_end = os.pipe()
    os.close(read_end)  # every write into the pipe now fails with EPIPE
    try:
        done = subprocess.run(
            [sys.executable, "-m", "pipeline", "config"],
            stdout=write_end,
            stderr=subprocess.PIPE,
            text=True,
            check=False,
        )
    finally:
        os.close(write_end)
    assert (done.returncode, done.stderr) == (141, "")
