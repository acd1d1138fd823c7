"""Verified reads on a synthetic run: every way a part can be wrong is refused by name.

The run has two shards (2 prompts, then 1), G = 2 samples per prompt, samples from p0
and scores under p0 and p1, written as the pipeline writes them; each test damages
one part the way a disk, a copy or an edit would, and ``verify_run`` must name it.
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from pipeline.artifacts import (
    PER_PROMPT_SCHEMA,
    PROMPTS_SCHEMA,
    SEQUENCE_SCHEMA,
    SUMMARY_SCHEMA,
    part_name,
    sequence_row,
    stage_folder,
    write_table,
)
from pipeline.errors import PipelineError
from pipeline.provenance import fingerprint
from pipeline.verify import S_RELATIVE_TOLERANCE, expected_keys, sequence_problem, verify_run
from tests.damage import flip_bit_in_values, rewrite

G = 2
SIZES = [2, 1]
INPUTS: dict[str, dict[str, Any]] = {
    "prompts": {"seed": 0},
    "sample": {"seed": 0, "sampling model index": 0},
    "score/p0": {"model content": "a"},
    "score/p1": {"model content": "b"},
}
CONTENT = {"prompts": "prompts", "sample": "samples", "score/p0": "scores", "score/p1": "scores"}


def _logprobs(rng: np.random.Generator, n: int) -> list[float]:
    return (-rng.exponential(size=n)).tolist()


@pytest.fixture
def run(tmp_path: Path) -> tuple[Path, dict[str, Any]]:
    run_dir = tmp_path / "run"
    rng = np.random.default_rng(3)
    for index, size in enumerate(SIZES):
        ids = [f"q{index}-{i}" for i in range(size)]
        tables = {
            "prompts": pa.Table.from_pylist(
                [
                    {"prompt_id": p, "source": "x", "prompt_token_ids": [1], "sampling_seed": 9}
                    for p in ids
                ],
                schema=PROMPTS_SCHEMA,
            )
        }
        for stage in ("sample", "score/p0", "score/p1"):
            rows = [
                sequence_row(p, g, [5, 6, 1], "stop", _logprobs(rng, 3))
                for p in ids
                for g in range(G)
            ]
            tables[stage] = pa.Table.from_pylist(rows, schema=SEQUENCE_SCHEMA)
        for stage, table in tables.items():
            write_table(
                table,
                stage_folder(run_dir, stage) / part_name(index),
                {
                    "fingerprint": fingerprint(INPUTS[stage]),
                    "shard": str(index),
                    "content": CONTENT[stage],
                },
            )
    manifest = {
        "inputs": INPUTS,
        "stages": {"prompts": {"shard_sizes": SIZES}},
        "config": {"sampling": {"num_samples": G}},
    }
    return run_dir, manifest


def _refused(run_dir: Path, manifest: dict[str, Any], path: Path) -> str:
    """verify_run's message, which must name ``path`` and say how to redo it."""
    with pytest.raises(PipelineError) as refused:
        verify_run(run_dir, manifest)
    message = str(refused.value)
    assert message.startswith(f"{path} is ")
    assert message.endswith(
        f", so statistics of run {run_dir} would be wrong. Run `entropy-pipeline run --out "
        f"{run_dir}` with the run's config to redo it."
    )
    assert "\n" not in message
    return message.removeprefix(f"{path} is ").partition(", so statistics")[0]


def _part(run_dir: Path, stage: str, index: int) -> Path:
    return stage_folder(run_dir, stage) / part_name(index)


def _with_row(path: Path, row: int, **values: Any) -> pa.Table:
    rows = pq.read_table(path).to_pylist()
    rows[row].update(values)
    return pa.Table.from_pylist(rows, schema=SEQUENCE_SCHEMA)


def test_a_sound_run_passes(run: tuple[Path, dict[str, Any]]) -> None:
    verify_run(*run)


def test_a_flipped_bit_in_log_probs_is_found_by_the_page_checksum(
    run: tuple[Path, dict[str, Any]],
) -> None:
    run_dir, manifest = run
    path = _part(run_dir, "score/p1", 1)
    flip_bit_in_values(path, "token_logprobs")
    # Without the checksums the file reads, and differently: the bit hit a value.
    assert (
        pq.read_table(path)["token_logprobs"]
        != pq.read_table(_part(run_dir, "score/p0", 1))["token_logprobs"]
    )
    assert _refused(run_dir, manifest, path) == (
        "damaged (could not verify page integrity, CRC checksum verification failed for "
        "page_ordinal 0)"
    )


@pytest.mark.parametrize(
    ("damage", "stage", "index", "problem"),
    [
        ("foreign", "score/p1", 0, "written from other inputs (its fingerprint is not this run's)"),
        ("deleted", "sample", 1, "missing"),
        ("garbage", "score/p0", 0, "damaged (Parquet magic bytes not found in footer. Either"),
        ("other shard", "prompts", 1, "shard 0, not 1"),
        ("samples as scores", "score/p0", 0, "not a part of scores (its metadata says 'samples')"),
        ("rows", "score/p1", 1, "holding 1 rows instead of 2"),
        (
            "order",
            "score/p0",
            0,
            "out of line with the plan: row 0 holds prompt 'q0-0', sample_idx 1, the plan "
            "prompt 'q0-0', sample_idx 0",
        ),
        ("length", "sample", 0, "inconsistent: L = 4 but 3 entries in completion_token_ids"),
        ("nan", "score/p1", 0, "holding a non-finite token log-prob (nan; prompt 'q0-1', "),
        ("inf S", "score/p1", 0, "holding a non-finite S (-inf; prompt 'q0-0', sample_idx 0)"),
        ("S", "score/p0", 1, "inconsistent: S = "),
    ],
)
def test_each_wrong_part_is_named(
    run: tuple[Path, dict[str, Any]], damage: str, stage: str, index: int, problem: str
) -> None:
    run_dir, manifest = run
    path = _part(run_dir, stage, index)
    table = pq.read_table(path)
    if damage == "foreign":
        rewrite(path, fingerprint="0123456789abcdef")
    elif damage == "deleted":
        path.unlink()
    elif damage == "garbage":
        path.write_bytes(b"PAR1 not really")
    elif damage == "other shard":
        shutil.copy(_part(run_dir, stage, 0), path)
    elif damage == "samples as scores":
        shutil.copy(_part(run_dir, "sample", index), path)
    elif damage == "rows":
        rewrite(path, table.slice(0, 1))
    elif damage == "order":
        rewrite(path, table.take([1, 0, 2, 3]))
    elif damage == "length":
        rewrite(path, _with_row(path, 0, L=4))
    elif damage == "nan":
        logprobs = table["token_logprobs"][2].as_py()
        logprobs[1] = math.nan
        rewrite(path, _with_row(path, 2, token_logprobs=logprobs, S=math.nan))
    elif damage == "inf S":
        rewrite(path, _with_row(path, 0, S=-math.inf))
    else:
        rewrite(path, _with_row(path, 1, S=table["S"][1].as_py() * (1 + 1e-7)))
    assert _refused(run_dir, manifest, path).startswith(problem)
    if damage == "nan":
        assert _refused(run_dir, manifest, path) == (
            "holding a non-finite token log-prob (nan; prompt 'q0-1', sample_idx 0, token 1)"
        )


def test_a_part_beyond_the_last_shard_is_refused(run: tuple[Path, dict[str, Any]]) -> None:
    run_dir, manifest = run
    stray = _part(run_dir, "score/p0", 2)
    shutil.copy(_part(run_dir, "score/p0", 1), stray)
    assert _refused(run_dir, manifest, stray) == "not one of the run's 2 shards"


def test_s_is_compared_within_rounding_of_the_summation_order() -> None:
    """S summed another way passes; S off by more than the tolerance does not.

    Log-probs spanning 15 orders of magnitude, so that float64 sums of the float32
    values round (of values within a few orders of magnitude they are exact).
    """
    rng = np.random.default_rng(0)
    values = (-np.exp(rng.uniform(-30, 5, size=1000))).astype(np.float32).astype(np.float64)
    exact = math.fsum(values)
    forwards = sum(values.tolist())
    assert exact != forwards  # the two sums really differ in the last bits

    def table(s: float) -> pa.Table:
        row = sequence_row("q", 0, [1] * 1000, "length", values.tolist())
        return pa.Table.from_pylist([{**row, "S": s}], schema=SEQUENCE_SCHEMA)

    assert sequence_problem(table(forwards)) is None
    assert sequence_problem(table(exact)) is None
    off = forwards - 2 * S_RELATIVE_TOLERANCE * float(np.abs(values).sum())
    assert sequence_problem(table(off)) == (
        f"inconsistent: S = {off!r} but its token log-probs sum to {forwards!r} "
        "(prompt 'q', sample_idx 0)"
    )


def test_s_is_the_float64_sum_of_the_stored_float32_values() -> None:
    row = sequence_row("q", 0, [1, 2], "length", [-0.1, -0.2])
    stored = [float(np.float32(-0.1)), float(np.float32(-0.2))]
    assert row["token_logprobs"] == stored
    assert row["S"] == stored[0] + stored[1]
    assert row["S"] != -0.1 + -0.2


def test_expected_keys_are_each_prompt_g_times_per_sampling_model() -> None:
    keys = expected_keys(pa.array(["a", "b"]), 2, [0, 1])
    assert keys.to_pydict() == {
        "prompt_id": ["a", "a", "b", "b", "a", "a", "b", "b"],
        "sample_idx": [0, 1, 0, 1, 2, 3, 2, 3],
    }
    assert keys.schema.field("sample_idx").type == pa.int32()
    assert expected_keys(pa.array(["a"]), 3, [1]).to_pydict() == {
        "prompt_id": ["a", "a", "a"],
        "sample_idx": [3, 4, 5],
    }


@pytest.mark.parametrize(
    ("schema", "version"),
    [
        (PROMPTS_SCHEMA, b"1"),
        (SEQUENCE_SCHEMA, b"1"),
        (SUMMARY_SCHEMA, b"2"),
        (PER_PROMPT_SCHEMA, b"1"),
    ],
)
def test_each_artifact_kind_carries_its_schema_version(
    tmp_path: Path, schema: pa.Schema, version: bytes
) -> None:
    path = write_table(schema.empty_table(), tmp_path / "a.parquet", {"content": "x"})
    assert pq.read_schema(path).metadata == {b"schema_version": version, b"content": b"x"}
    other = write_table(pa.table({"n": [1]}), tmp_path / "b.parquet", {"content": "history"})
    assert pq.read_schema(other).metadata == {b"content": b"history"}


def test_finite_checks_see_every_token() -> None:
    """A NaN in the last token of the last row is found too (flattened lists)."""
    rows = [sequence_row("q", g, [1, 2, 3], "length", [-1.0, -2.0, -0.5]) for g in range(3)]
    rows[2]["token_logprobs"][2] = math.inf
    table = pa.Table.from_pylist(rows, schema=SEQUENCE_SCHEMA)
    assert pc.sum(table["L"]).as_py() == 9
    assert sequence_problem(table) == (
        "holding a non-finite token log-prob (inf; prompt 'q', sample_idx 2, token 2)"
    )
