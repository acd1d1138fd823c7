"""Atomic writes: temporary names unique per host and process, ignored by readers,
strict JSON, and a failed write that leaves nothing behind and names its file."""

from __future__ import annotations

import errno
import json
import math
import os
import socket
from pathlib import Path

import pyarrow as pa
import pytest

from pipeline.artifacts import (
    SEQUENCE_SCHEMA,
    TEMPORARY_GLOB,
    _temporary_name,
    remove_temporaries,
    scan,
    sequence_row,
    write_json,
    write_table,
)


def _shard(path: Path, rows: int) -> Path:
    table = pa.Table.from_pylist(
        [sequence_row(f"q{i}", 0, [5, 2], "stop", [-1.0, -0.5]) for i in range(rows)],
        schema=SEQUENCE_SCHEMA,
    )
    return write_table(table, path, {"content": "samples"})


def test_temporary_names_are_per_host_and_process_and_ignored_by_readers(
    tmp_path: Path,
) -> None:
    part = _shard(tmp_path / "samples" / "part-00000.parquet", 3)
    temporary = _temporary_name(part)
    assert temporary.name == f".part-00000.parquet.tmp-{socket.gethostname()}-{os.getpid()}"
    assert temporary.match(TEMPORARY_GLOB)
    # A half-written part of another writer is not data...
    _shard(tmp_path / "other" / "part-00000.parquet", 5).rename(temporary)
    assert scan(tmp_path / "samples", SEQUENCE_SCHEMA).collect().height == 3
    # ...and a resume removes it.
    assert remove_temporaries(tmp_path) == [temporary]


def test_write_json_is_strict_json(tmp_path: Path) -> None:
    path = tmp_path / "summary.json"
    write_json({"H0_nats": 1.5, "bad": None}, path)
    assert json.loads(path.read_text()) == {"H0_nats": 1.5, "bad": None}
    with pytest.raises(ValueError, match="not JSON compliant"):
        write_json({"H0_nats": math.nan}, path)
    assert json.loads(path.read_text()) == {"H0_nats": 1.5, "bad": None}
    assert list(tmp_path.iterdir()) == [path]


def test_a_write_that_fails_names_its_file_and_leaves_no_temporary(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def full_disk(self: Path, text: str) -> int:
        self.write_bytes(text[:10].encode())  # a part was written, then the disk filled
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Path, "write_text", full_disk)
    with pytest.raises(OSError, match="No space left on device") as caught:
        write_json({"a": 1}, tmp_path / "manifest.json")
    assert caught.value.errno == errno.ENOSPC
    assert caught.value.filename == str(tmp_path / "manifest.json")
    assert list(tmp_path.iterdir()) == []
