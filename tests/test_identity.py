"""Model content hashes: cached while no file of the folder changed, re-checked before use."""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import pytest

import pipeline.identity
from pipeline.errors import PipelineError
from pipeline.identity import cache_file, check_model_unchanged, content_hash
from pipeline.models import model_content_hash
from tests.conftest import TINY_P0, TINY_P1


@pytest.fixture
def hashes(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> list[Path]:
    """A private cache dir; returns the list of folders actually hashed, in order."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    hashed: list[Path] = []

    def counting(path: Path) -> str:
        hashed.append(path)
        return model_content_hash(path)

    monkeypatch.setattr(pipeline.identity, "model_content_hash", counting)
    return hashed


def test_a_folder_is_hashed_once_while_its_files_are_unchanged(
    tmp_path: Path, hashes: list[Path]
) -> None:
    model = shutil.copytree(TINY_P1, tmp_path / "p1")
    expected = model_content_hash(TINY_P1)
    assert content_hash(model) == expected
    assert content_hash(model) == expected
    assert hashes == [model]
    cached = json.loads(cache_file().read_text())
    assert cache_file() == tmp_path / "cache" / "entropy-pipeline" / "hashes.json"
    assert cached[str(model.resolve())]["sha256"] == expected
    names = [entry[0] for entry in cached[str(model.resolve())]["files"]]
    assert names == sorted(p.name for p in TINY_P1.iterdir())


def test_weights_swapped_with_the_same_size_and_time_are_hashed_again(
    tmp_path: Path, hashes: list[Path]
) -> None:
    """cp -p keeps size and modification time; the status-change time gives it away."""
    model = shutil.copytree(TINY_P1, tmp_path / "p1")
    recorded = content_hash(model)
    weights = model / "model.safetensors"
    before = weights.stat()
    shutil.copy2(TINY_P0 / "model.safetensors", weights)
    # Make size and modification time exactly what they were.
    assert weights.stat().st_size == before.st_size
    os.utime(weights, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert weights.stat().st_mtime_ns == before.st_mtime_ns
    assert content_hash(model) == model_content_hash(model) != recorded
    assert hashes == [model, model]
    with pytest.raises(PipelineError) as changed:
        check_model_unchanged("p1", model, recorded)
    assert str(changed.value) == (
        f"model 'p1' changed after the run recorded it: {model} now has content sha256 "
        f"{model_content_hash(model)[:16]}..., the run recorded {recorded[:16]}... Put the "
        "recorded model back and resume, or run again (with --force to redo what the old "
        "model made, or with a new --out)."
    )
    shutil.copy2(TINY_P1 / "model.safetensors", weights)
    check_model_unchanged("p1", model, recorded)  # back as recorded: accepted


def test_a_model_folder_that_is_gone_is_named(tmp_path: Path, hashes: list[Path]) -> None:
    with pytest.raises(PipelineError, match=f"model 'p1': folder {tmp_path / 'p1'} does not"):
        check_model_unchanged("p1", tmp_path / "p1", "0" * 64)


def test_a_damaged_cache_counts_as_empty(tmp_path: Path, hashes: list[Path]) -> None:
    cache_file().parent.mkdir(parents=True)
    cache_file().write_text('{"truncated": ')
    assert content_hash(TINY_P0) == model_content_hash(TINY_P0)
    assert list(json.loads(cache_file().read_text())) == [str(TINY_P0.resolve())]


def test_a_cache_that_cannot_be_written_is_a_warning(
    tmp_path: Path, hashes: list[Path], caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "entropy-pipeline").write_text("a file where the folder goes")
    with caplog.at_level(logging.WARNING, logger="entropy_pipeline"):
        assert content_hash(TINY_P0) == model_content_hash(TINY_P0)
    assert caplog.messages == [
        f"cannot write the model hash cache {cache_file()} (File exists); models will be "
        "hashed again"
    ]
