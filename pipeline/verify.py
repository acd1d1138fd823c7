"""Every read verifies what it reads: a part is used only if it is the part the plan expects.

A part of a stage (``prompts/part-N``, ``samples[/<m>]/part-N``, ``scores/<m>/part-N``)
is valid when all of these hold:

- it reads as Parquet and every page matches its CRC-32 (``write_table`` writes page
  checksums; a flipped bit anywhere in the data is found here);
- its metadata says the expected content (prompts, samples or scores), shard index
  and layout version, its columns are the declared schema, and its fingerprint is the
  fingerprint of the stage's inputs recorded in the manifest (a part of another run,
  seed or model is refused);
- it has the planned rows: for sampling model m of M, shard N's prompts in order,
  each with sample_idx m G + 0 ... m G + G - 1 (G = ``sampling.num_samples``); a score
  part holds the rows of every sampling model's part, in model order;
- every sequence is consistent: L = the number of token ids = the number of token
  log-probs, every log-prob and S finite, and S = sum of the token log-probs.

The last check compares S with a float64 sum of the stored float32 log-probs, to
within ``S_RELATIVE_TOLERANCE`` x sum |log-prob|. The writer sums the same values in
float64 (``artifacts.sequence_row``), so the two differ only by summation order:
at most 2 (n - 1) 2^-53 sum |x| for n tokens (Higham, *Accuracy and Stability of
Numerical Algorithms*, 2002, §4.2), below 1e-10 sum |x| for n up to 4.5 x 10^5
tokens. A tolerance instead of bit equality keeps the check independent of summation
order (the writer's or NumPy's), and still catches an S or any token log-prob
altered by more than 10^-9 of the sequence's total; smaller changes of stored bits
are caught by the page checksums.

``shard_problem`` says what is wrong with one part (the driver redoes it);
``read_part`` reads one or raises ``PartProblem`` (a worker reads its inputs);
``verify_run`` checks every part of a run against its manifest before statistics,
one part in memory at a time, and refuses the first bad one naming the file.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.artifacts import (
    PROMPTS_SCHEMA,
    SEQUENCE_SCHEMA,
    part_name,
    schema_version,
    stage_folder,
    stray_parts,
)
from pipeline.errors import PipelineError
from pipeline.provenance import fingerprint

Content = Literal["prompts", "samples", "scores"]
KEYS = ("prompt_id", "sample_idx")
S_RELATIVE_TOLERANCE = 1e-9
_KEYS_SCHEMA = pa.schema([SEQUENCE_SCHEMA.field(key) for key in KEYS])


class PartProblem(Exception):
    """A part that cannot be used; the message says why, without the path."""


@dataclass(frozen=True)
class Expected:
    """What one part must be (see the module notes).

    ``rows`` None: the row count is not checked on its own (``keys``, when given, fix
    it). ``keys``: the (prompt_id, sample_idx) of every row, in order (``expected_keys``).
    """

    content: Content
    fingerprint: str
    shard: int
    rows: int | None = None
    keys: pa.Table | None = None

    @property
    def schema(self) -> pa.Schema:
        """The declared schema of the part's content."""
        return PROMPTS_SCHEMA if self.content == "prompts" else SEQUENCE_SCHEMA


def expected_keys(
    prompt_ids: pa.Array | pa.ChunkedArray, num_samples: int, samplers: Sequence[int]
) -> pa.Table:
    """Keys (prompt_id, sample_idx) of a shard's sequences, in order.

    For each sampling model m in ``samplers``: each prompt of ``prompt_ids`` in order,
    with sample_idx m G + g for g = 0 ... G - 1 (G = ``num_samples``).
    """
    ids = pa.chunked_array([prompt_ids]) if isinstance(prompt_ids, pa.Array) else prompt_ids
    repeated = pc.take(ids, np.repeat(np.arange(len(ids)), num_samples))
    within = np.tile(np.arange(num_samples, dtype=np.int32), len(ids))
    return pa.concat_tables(
        pa.Table.from_arrays([repeated, pa.array(m * num_samples + within)], schema=_KEYS_SCHEMA)
        for m in samplers
    )


def _where(table: pa.Table, row: int) -> str:
    """``prompt 'x', sample_idx 3`` of a sequences table's ``row``."""
    return (
        f"prompt {table['prompt_id'][row].as_py()!r}, sample_idx {table['sample_idx'][row].as_py()}"
    )


def keys_problem(table: pa.Table, keys: pa.Table) -> str | None:
    """Why ``table``'s (prompt_id, sample_idx) rows are not ``keys``, or None."""
    found = table.select(list(KEYS))
    if found.num_rows != keys.num_rows:
        return f"holding {found.num_rows} rows instead of {keys.num_rows}"
    differs = np.flatnonzero(
        ~(
            np.asarray(pc.equal(found["prompt_id"], keys["prompt_id"]))
            & np.asarray(pc.equal(found["sample_idx"], keys["sample_idx"]))
        )
    )
    if len(differs) == 0:
        return None
    row = int(differs[0])
    return (
        f"out of line with the plan: row {row} holds {_where(found, row)}, the plan "
        f"{_where(keys, row)}"
    )


def sequence_problem(table: pa.Table) -> str | None:
    """Why the sequences of a SEQUENCE_SCHEMA table are inconsistent, or None.

    Checks L against the token ids and log-probs, finiteness of every log-prob and
    of S, and S against the sum of the log-probs (module notes).
    """
    if table.num_rows == 0:
        return None
    length = np.asarray(table["L"], dtype=np.int64)
    for column in ("completion_token_ids", "token_logprobs"):
        counts = np.asarray(pc.list_value_length(table[column]), dtype=np.int64)
        if (bad := np.flatnonzero(counts != length)).size:
            row = int(bad[0])
            return (
                f"inconsistent: L = {length[row]} but {counts[row]} entries in {column} "
                f"({_where(table, row)})"
            )
    logprobs = table["token_logprobs"].combine_chunks()
    values = np.asarray(pc.list_flatten(logprobs), dtype=np.float64)
    rows = np.asarray(pc.list_parent_indices(logprobs), dtype=np.int64)
    if (bad := np.flatnonzero(~np.isfinite(values))).size:
        position = int(bad[0])
        row = int(rows[position])
        token = position - int(np.flatnonzero(rows == row)[0])
        return (
            f"holding a non-finite token log-prob ({values[position]}; {_where(table, row)}, "
            f"token {token})"
        )
    stored = np.asarray(table["S"], dtype=np.float64)
    if (bad := np.flatnonzero(~np.isfinite(stored))).size:
        row = int(bad[0])
        return f"holding a non-finite S ({stored[row]}; {_where(table, row)})"
    # bincount adds each row's values in float64; only the order may differ from S's.
    total = np.bincount(rows, weights=values, minlength=table.num_rows)
    scale = np.bincount(rows, weights=np.abs(values), minlength=table.num_rows)
    if (bad := np.flatnonzero(np.abs(stored - total) > S_RELATIVE_TOLERANCE * scale)).size:
        row = int(bad[0])
        return (
            f"inconsistent: S = {float(stored[row])!r} but its token log-probs sum to "
            f"{float(total[row])!r} ({_where(table, row)})"
        )
    return None


def _one_line(err: Exception) -> str:
    return " ".join(str(err).split()) or type(err).__name__


def read_part(path: Path, expected: Expected) -> pa.Table:
    """Read the part at ``path``, verified against ``expected`` (module notes).

    Raises
    ------
    PartProblem
        Saying what is wrong: missing, unreadable or damaged, another content, shard,
        schema, fingerprint or row layout, or inconsistent sequences.
    """
    if not path.is_file():
        raise PartProblem("missing")
    try:
        with pq.ParquetFile(path, page_checksum_verification=True) as handle:
            table = handle.read()
    except Exception as err:  # pyarrow raises several types for damaged files
        raise PartProblem(f"damaged ({_one_line(err)})") from None
    metadata = table.schema.metadata or {}
    content = metadata.get(b"content", b"").decode()
    if content != expected.content:
        raise PartProblem(f"not a part of {expected.content} (its metadata says {content!r})")
    version = metadata.get(b"schema_version", b"").decode()
    if version != str(schema_version(expected.schema)):
        raise PartProblem(
            f"written by another schema version ({version!r}, expected "
            f"{schema_version(expected.schema)})"
        )
    if not table.schema.remove_metadata().equals(expected.schema):
        raise PartProblem("holding unexpected columns")
    if metadata.get(b"fingerprint", b"").decode() != expected.fingerprint:
        raise PartProblem("written from other inputs (its fingerprint is not this run's)")
    if metadata.get(b"shard", b"").decode() != str(expected.shard):
        raise PartProblem(f"shard {metadata.get(b'shard', b'?').decode()}, not {expected.shard}")
    if expected.rows is not None and table.num_rows != expected.rows:
        raise PartProblem(f"holding {table.num_rows} rows instead of {expected.rows}")
    if expected.keys is not None and (problem := keys_problem(table, expected.keys)):
        raise PartProblem(problem)
    if expected.content != "prompts" and (problem := sequence_problem(table)):
        raise PartProblem(problem)
    return table


def shard_problem(path: Path, expected: Expected) -> str | None:
    """Why the part at ``path`` cannot be reused, or None when it is valid."""
    try:
        read_part(path, expected)
    except PartProblem as problem:
        return str(problem)
    return None


def _refuse(path: Path, problem: str, run_dir: Path) -> PipelineError:
    return PipelineError(
        f"{path} is {problem}, so statistics of run {run_dir} would be wrong. Run "
        f"`entropy-pipeline run --out {run_dir}` with the run's config to redo it."
    )


def verify_run(run_dir: Path, manifest: dict[str, Any]) -> None:
    """Check every part of every stage of ``run_dir`` against its manifest.

    Reads one part at a time (page checksums included). The plan comes from the
    manifest alone: ``inputs`` (each stage's fingerprint and sampling model index) and
    the prompts stage's shard sizes, and ``config.sampling.num_samples``.

    Raises
    ------
    PipelineError
        Naming the first part that is missing, damaged, foreign or inconsistent, or a
        stray part beyond the run's shards, and saying that ``run --out`` redoes it.
    """
    inputs: dict[str, dict[str, Any]] = manifest["inputs"]
    sizes: list[int] = manifest["stages"]["prompts"]["shard_sizes"]
    group = manifest["config"]["sampling"]["num_samples"]
    samplers = {
        stage: stage_inputs["sampling model index"]
        for stage, stage_inputs in inputs.items()
        if stage.split("/")[0] == "sample"
    }
    every_sampler = range(len(samplers))
    for stage in inputs:
        for stray in stray_parts(stage_folder(run_dir, stage), len(sizes)):
            raise _refuse(stray, f"not one of the run's {len(sizes)} shards", run_dir)
    for index, size in enumerate(sizes):
        prompts_path = stage_folder(run_dir, "prompts") / part_name(index)
        try:
            prompt_ids = read_part(
                prompts_path, Expected("prompts", fingerprint(inputs["prompts"]), index, size)
            )["prompt_id"]
        except PartProblem as problem:
            raise _refuse(prompts_path, str(problem), run_dir) from None
        for stage, stage_inputs in inputs.items():
            if stage == "prompts":
                continue
            sampler = samplers.get(stage)
            expected = Expected(
                "scores" if sampler is None else "samples",
                fingerprint(stage_inputs),
                index,
                keys=expected_keys(
                    prompt_ids, group, every_sampler if sampler is None else [sampler]
                ),
            )
            path = stage_folder(run_dir, stage) / part_name(index)
            if (problem := shard_problem(path, expected)) is not None:
                raise _refuse(path, problem, run_dir)
