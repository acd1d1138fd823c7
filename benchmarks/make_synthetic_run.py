"""Write a synthetic, complete run directory that ``entropy-pipeline stats`` accepts.

Usage::

    python benchmarks/make_synthetic_run.py OUT_DIR --sequences N
        [--samples-per-prompt 8] [--seed 0] [--part-rows 1000000]

No model is involved: the per-token log-probs are random numbers with a plausible
shape, written in the exact Parquet layout the pipeline produces (see
``pipeline/artifacts.py``)::

    prompts/part-0000k.parquet        PROMPTS_SCHEMA, one row per prompt
    samples/part-0000k.parquet        SEQUENCE_SCHEMA, decode-time log-probs (= p0's)
    scores/p0/part-0000k.parquet      SEQUENCE_SCHEMA, teacher-forced under p0
    scores/p1/part-0000k.parquet      SEQUENCE_SCHEMA, teacher-forced under p1
    manifest.json                     status "complete", a valid config, its hash

Distributions (all drawn with NumPy, part by part, so memory stays bounded):

* ``G = --samples-per-prompt`` sequences per prompt; row r belongs to prompt r // G
  with ``sample_idx`` r % G (the last prompt has fewer if N is not a multiple of G).
* prompt ids look like the pipeline's default ids, ``sha256:`` and 16 hex digits (a
  bijective 64-bit mix of the prompt index, so unique and in no particular order:
  sorting by id really reorders the rows, as in a real run).
* sequence length L ~ uniform on 1..16 (``MAX_TOKENS`` = 16, mean 8.5 tokens); a
  sequence of length 16 has ``finish_reason`` "length" (it hit max_tokens), every
  shorter one "stop" and ends with the EOS id 2.
* token ids uniform on 0..VOCAB-1; p0's per-token log-probs are -(Exponential(mean 2)
  + 1e-4) in float32 (all negative); p1's are p0's times exp(eps), eps ~ N(0, 0.05^2)
  per token, so they stay negative and the log-weights S1 - S0 are moderate (standard
  deviation about 0.45 nats, ESS fraction about 0.81).
* the samples' decode-time log-probs equal p0's teacher-forced ones (decode equals
  prefill, the max |decode - prefill| diagnostic is 0).
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from _common import argument_parser

from pipeline.artifacts import (
    MANIFEST,
    PROMPTS_SCHEMA,
    SCHEMA_VERSION,
    SEQUENCE_SCHEMA,
    library_versions,
    part_name,
    prompts_dir,
    samples_dir,
    scores_dir,
    write_table,
)
from pipeline.config import config_hash, validate_config
from pipeline.provenance import fingerprint

MAX_TOKENS = 16
VOCAB = 32_000
EOS_ID = 2
P0_MEAN_NLL = 2.0
P1_LOG_SCALE_SD = 0.05
REFERENCE, CANDIDATE = "p0", "p1"
_HEX = np.frombuffer(b"0123456789abcdef", dtype=np.uint8)
_ID_PREFIX = np.frombuffer(b"sha256:", dtype=np.uint8)


def _mix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64 finaliser: a bijection of uint64, so distinct inputs stay distinct."""
    x = x.astype(np.uint64, copy=True)
    x ^= x >> np.uint64(30)
    x *= np.uint64(0xBF58476D1CE4E5B9)
    x ^= x >> np.uint64(27)
    x *= np.uint64(0x94D049BB133111EB)
    x ^= x >> np.uint64(31)
    return x


def prompt_ids(first: int, count: int, seed: int) -> pa.StringArray:
    """Ids ``sha256:<16 hex digits>`` of prompts ``first .. first + count - 1``.

    Parameters
    ----------
    first : int
        Index of the first prompt.
    count : int
        Number of prompts.
    seed : int
        Run seed; it changes every id.

    Returns
    -------
    pa.StringArray
        ``count`` unique fixed-width ids, built without a Python loop.
    """
    index = np.arange(first, first + count, dtype=np.uint64)
    with np.errstate(over="ignore"):
        mixed = _mix64(index + np.uint64(seed) * np.uint64(0x9E3779B97F4A7C15))
    shifts = np.arange(60, -4, -4, dtype=np.uint64)
    digits = _HEX[((mixed[:, None] >> shifts[None, :]) & np.uint64(0xF)).astype(np.intp)]
    prefix = np.broadcast_to(_ID_PREFIX, (count, _ID_PREFIX.size))
    data = np.ascontiguousarray(np.concatenate([prefix, digits], axis=1)).ravel()
    width = _ID_PREFIX.size + shifts.size
    offsets = (np.arange(count + 1, dtype=np.int32) * width).astype(np.int32)
    return pa.StringArray.from_buffers(count, pa.py_buffer(offsets), pa.py_buffer(data))


def synthetic_config(samples_per_prompt: int, seed: int) -> tuple[dict[str, Any], str]:
    """A config tree that validates as ``RunConfig``, and its hash.

    Parameters
    ----------
    samples_per_prompt : int
        ``sampling.num_samples``.
    seed : int
        Run seed.

    Returns
    -------
    tuple of (dict, str)
        The resolved config as JSON-ready data, and ``config_hash`` of it.
    """
    tree = {
        "seed": seed,
        "prompts": {"path": "synthetic/prompts.jsonl"},
        "models": {REFERENCE: {"path": "synthetic/p0"}, CANDIDATE: {"path": "synthetic/p1"}},
        "reference_model": REFERENCE,
        "sampling": {"num_samples": samples_per_prompt, "max_tokens": MAX_TOKENS},
    }
    config = validate_config(tree, "of the synthetic benchmark run")
    return config.model_dump(mode="json"), config_hash(config)


def stage_inputs(samples_per_prompt: int, seed: int) -> dict[str, dict[str, Any]]:
    """Each stage's inputs, as a run's manifest records them (``verify_run`` reads them).

    Their fingerprints go into every part, as the pipeline's own stages write them.
    """
    common = {"generator": "benchmarks/make_synthetic_run.py", "seed": seed}
    return {
        "prompts": {**common, "samples_per_prompt": samples_per_prompt},
        "sample": {**common, "model": REFERENCE, "sampling model index": 0},
        f"score/{REFERENCE}": {**common, "model": REFERENCE},
        f"score/{CANDIDATE}": {**common, "model": CANDIDATE},
    }


def _write_part(table: pa.Table, folder: Path, index: int, fields: dict[str, str]) -> Path:
    """Write ``folder/part-<index>.parquet`` atomically, with the pipeline's metadata."""
    return write_table(table, folder / part_name(index), {**fields, "shard": str(index)})


def _sequence_table(
    ids: pa.Array,
    sample_idx: np.ndarray,
    token_ids: pa.ListArray,
    finish_reason: pa.Array,
    offsets: np.ndarray,
    logprobs: np.ndarray,
    lengths: np.ndarray,
) -> pa.Table:
    """One SEQUENCE_SCHEMA table; ``S`` is the float64 sum of each row's log-probs."""
    sums = np.add.reduceat(logprobs.astype(np.float64), offsets[:-1])
    lists = pa.ListArray.from_arrays(pa.array(offsets), pa.array(logprobs))
    return pa.Table.from_arrays(
        [ids, pa.array(sample_idx), token_ids, finish_reason, lists, pa.array(sums), lengths],
        schema=SEQUENCE_SCHEMA,
    )


def write_part(
    run_dir: Path,
    part: int,
    first_row: int,
    rows: int,
    samples_per_prompt: int,
    seed: int,
    fingerprints: dict[str, str],
) -> int:
    """Generate and write part ``part`` (rows ``first_row ..``) of every table.

    Parameters
    ----------
    run_dir : Path
        The run directory.
    part : int
        Part number (file ``part-<part>.parquet``).
    first_row : int
        Global index of the part's first sequence; a multiple of ``samples_per_prompt``.
    rows : int
        Number of sequences in this part.
    samples_per_prompt : int
        G, sequences per prompt.
    seed : int
        Run seed; with ``part`` it seeds this part's generator.
    fingerprints : dict[str, str]
        Each stage's fingerprint, written into its parts' metadata.

    Returns
    -------
    int
        Number of tokens in the part.
    """
    rng = np.random.default_rng([seed, part])
    row = np.arange(first_row, first_row + rows, dtype=np.int64)
    first_prompt = first_row // samples_per_prompt
    prompt_of_row = row // samples_per_prompt
    num_prompts = int(prompt_of_row[-1]) - first_prompt + 1
    ids = prompt_ids(first_prompt, num_prompts, seed)
    row_ids = ids.take(pa.array(prompt_of_row - first_prompt))
    sample_idx = (row % samples_per_prompt).astype(np.int32)

    lengths = rng.integers(1, MAX_TOKENS + 1, size=rows, dtype=np.int32)
    offsets = np.zeros(rows + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    tokens = int(offsets[-1])
    stopped = lengths < MAX_TOKENS
    finish_reason = pa.array(["length", "stop"]).take(pa.array(stopped.astype(np.int8)))
    token_values = rng.integers(3, VOCAB, size=tokens, dtype=np.int32)
    token_values[offsets[1:][stopped] - 1] = EOS_ID
    token_ids = pa.ListArray.from_arrays(pa.array(offsets), pa.array(token_values))
    del token_values

    logp0 = rng.exponential(P0_MEAN_NLL, size=tokens)
    logp0 += 1e-4
    np.negative(logp0, out=logp0)
    logp0 = logp0.astype(np.float32)
    scale = rng.normal(0.0, P1_LOG_SCALE_SD, size=tokens)
    np.exp(scale, out=scale)
    logp1 = (logp0 * scale).astype(np.float32)
    del scale

    length_array = pa.array(lengths)
    p0 = _sequence_table(
        row_ids, sample_idx, token_ids, finish_reason, offsets, logp0, length_array
    )
    # Decode-time log-probs equal the teacher-forced p0 ones: the same table, other folder.
    _write_part(
        p0,
        samples_dir(run_dir),
        part,
        {"fingerprint": fingerprints["sample"], "content": "samples"},
    )
    _write_part(
        p0,
        scores_dir(run_dir, REFERENCE),
        part,
        {"fingerprint": fingerprints[f"score/{REFERENCE}"], "content": "scores"},
    )
    del p0, logp0
    p1 = _sequence_table(
        row_ids, sample_idx, token_ids, finish_reason, offsets, logp1, length_array
    )
    _write_part(
        p1,
        scores_dir(run_dir, CANDIDATE),
        part,
        {"fingerprint": fingerprints[f"score/{CANDIDATE}"], "content": "scores"},
    )
    del p1, logp1

    prompt_lengths = rng.integers(4, 33, size=num_prompts, dtype=np.int32)
    prompt_offsets = np.zeros(num_prompts + 1, dtype=np.int32)
    np.cumsum(prompt_lengths, out=prompt_offsets[1:])
    prompt_tokens = rng.integers(3, VOCAB, size=int(prompt_offsets[-1]), dtype=np.int32)
    prompts = pa.Table.from_arrays(
        [
            ids,
            pc.binary_join_element_wise("synthetic prompt ", ids, ""),
            pa.ListArray.from_arrays(pa.array(prompt_offsets), pa.array(prompt_tokens)),
            pa.array(rng.integers(0, 2**62, size=num_prompts, dtype=np.int64)),
        ],
        schema=PROMPTS_SCHEMA,
    )
    _write_part(
        prompts,
        prompts_dir(run_dir),
        part,
        {"fingerprint": fingerprints["prompts"], "content": "prompts"},
    )
    return tokens


def make_run(
    run_dir: Path,
    sequences: int,
    samples_per_prompt: int = 8,
    seed: int = 0,
    part_rows: int = 1_000_000,
) -> dict[str, Any]:
    """Write a complete synthetic run of ``sequences`` sequences into ``run_dir``.

    Parameters
    ----------
    run_dir : Path
        Folder to create; it must be empty or absent.
    sequences : int
        Total number of sampled sequences N.
    samples_per_prompt : int
        G, sequences per prompt.
    seed : int
        Seed of every random draw.
    part_rows : int
        Approximate rows per part file (rounded down to a multiple of G).

    Returns
    -------
    dict
        The manifest written last (its presence means the run is complete).
    """
    if sequences < 1 or samples_per_prompt < 1:
        raise ValueError("--sequences and --samples-per-prompt must be positive")
    if run_dir.exists() and any(run_dir.iterdir()):
        raise FileExistsError(f"{run_dir} is not empty")
    run_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    config, digest = synthetic_config(samples_per_prompt, seed)
    step = max(samples_per_prompt, part_rows // samples_per_prompt * samples_per_prompt)
    inputs = stage_inputs(samples_per_prompt, seed)
    fingerprints = {stage: fingerprint(values) for stage, values in inputs.items()}
    tokens = 0
    shard_sizes = []
    for part, first_row in enumerate(range(0, sequences, step)):
        rows = min(step, sequences - first_row)
        tokens += write_part(run_dir, part, first_row, rows, samples_per_prompt, seed, fingerprints)
        shard_sizes.append(-(-rows // samples_per_prompt))
        print(
            f"part {part}: {first_row + rows}/{sequences} sequences "
            f"({time.perf_counter() - started:.1f} s)",
            file=sys.stderr,
            flush=True,
        )
    manifest = {
        "schema_version": SCHEMA_VERSION,
        "status": "complete",
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "config_hash": digest,
        "config": config,
        "libraries": library_versions(),
        "inputs": inputs,
        "stages": {"prompts": {"shard_sizes": shard_sizes}},
        "synthetic": {
            "generator": "benchmarks/make_synthetic_run.py",
            "sequences": sequences,
            "samples_per_prompt": samples_per_prompt,
            "prompts": -(-sequences // samples_per_prompt),
            "seed": seed,
            "parts": len(shard_sizes),
            "tokens": tokens,
            "length_distribution": f"uniform on 1..{MAX_TOKENS}",
            "seconds": round(time.perf_counter() - started, 1),
        },
    }
    temporary = run_dir / f".{MANIFEST}.tmp-{os.getpid()}"
    temporary.write_text(json.dumps(manifest, indent=2) + "\n")
    os.replace(temporary, run_dir / MANIFEST)
    return manifest


def main(argv: list[str] | None = None) -> int:
    """Command line of the generator; return the exit status."""
    parser = argument_parser(__doc__)
    parser.add_argument("out_dir", type=Path, help="run directory to create (empty or absent)")
    parser.add_argument("--sequences", type=int, required=True, help="number of sequences N")
    parser.add_argument("--samples-per-prompt", type=int, default=8, help="G (default 8)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument(
        "--part-rows", type=int, default=1_000_000, help="rows per part file (default 1M)"
    )
    args = parser.parse_args(argv)
    manifest = make_run(
        args.out_dir, args.sequences, args.samples_per_prompt, args.seed, args.part_rows
    )
    print(json.dumps(manifest["synthetic"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
