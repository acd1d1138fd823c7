"""The stage seam: one engine stage's shards, made one at a time by a worker.

A ``StageTask`` is everything a worker needs to make any shard of one stage (sample,
or score under one model): small and picklable, so that the same task runs in this
process (the local executor) or in a Ray actor on another machine. A worker reads
its inputs from the run directory (``prompts/part-N``, and for scoring
``samples/part-N``), checks that they were made from the inputs the task expects,
runs its engine, and writes its one output part atomically. The driver alone plans,
reconciles, writes the manifest and computes the statistics.
"""

from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.artifacts import (
    PROMPTS_SCHEMA,
    SEQUENCE_SCHEMA,
    part_name,
    prompts_dir,
    sample_folders,
    scores_dir,
    shard_problem,
    write_table,
)
from pipeline.config import EngineConfig, SamplingConfig
from pipeline.errors import PipelineError
from pipeline.provenance import sampling_seed

# Test hook: when the environment names a file here and that file exists, the first
# worker to remove it SIGKILLs itself in the middle of its shard, so tests can check
# that a killed worker's shard is redone and the bytes do not change.
KILL_ONCE_ENV = "ENTROPY_PIPELINE_TEST_KILL_WORKER_ONCE"


@dataclass(frozen=True)
class StageTask:
    """What a worker needs to make any shard of one engine stage."""

    kind: Literal["sample", "score"]
    model: str
    model_path: Path
    run_dir: Path
    fingerprint: str  # stamped on every output part
    prompts_fingerprint: str  # expected on the prompts parts read
    # Sampling models in order, each with the fingerprint of its samples; a sample
    # task makes the samples of ``sampling_models[sampler_index]``, a score task reads
    # them all.
    sampling_models: tuple[tuple[str, str], ...]
    sampler_index: int
    engine: EngineConfig
    max_model_len: int
    longest_prompt_tokens: int
    run_seed: int
    sampling: SamplingConfig
    stop_token_ids: frozenset[int]

    @property
    def stage(self) -> str:
        """The manifest's name of this stage: ``sample``, ``sample/<model>`` or ``score/<model>``.

        ``sample`` is the first sampling model's stage; further sampling models (mixture
        sampling) have ``sample/<model>``.
        """
        if self.kind == "score":
            return f"score/{self.model}"
        return "sample" if self.sampler_index == 0 else f"sample/{self.model}"

    def output_path(self, index: int) -> Path:
        """Where shard ``index`` of this stage is written."""
        if self.kind == "score":
            return scores_dir(self.run_dir, self.model) / part_name(index)
        return self.samples_path(self.sampler_index, index)

    def samples_path(self, sampler_index: int, index: int) -> Path:
        """Where sampling model ``sampler_index`` writes shard ``index``."""
        folders = sample_folders(self.run_dir, [model for model, _ in self.sampling_models])
        return folders[sampler_index] / part_name(index)


@dataclass(frozen=True)
class ShardDone:
    """A finished shard: its index, rows written and seconds spent."""

    index: int
    rows: int
    seconds: float


def read_input_part(path: Path, schema: pa.Schema, fingerprint: str) -> pa.Table:
    """Read a part another stage wrote, refusing one made from other inputs."""
    rows = pq.read_metadata(path).num_rows if path.exists() else -1
    problem = shard_problem(path, schema, fingerprint, rows)
    if problem is not None:
        raise PipelineError(
            f"{path} is {problem}; it cannot be used as input. Re-run "
            "`entropy-pipeline run --out` on the run directory to redo it."
        )
    return pq.read_table(path)


class ShardWorker:
    """Holds one engine for a stage and makes its shards one after another."""

    def __init__(self, task: StageTask) -> None:
        from pipeline.engine import detect_device, load_engine, resolve_profile

        if not task.run_dir.is_dir():
            raise PipelineError(
                f"run directory {task.run_dir} is not visible on host {os.uname().nodename}: "
                "on a cluster the run directory and the model folders must be on storage "
                "every node mounts at the same path."
            )
        self.task = task
        device = detect_device() if task.engine.device == "auto" else task.engine.device
        self.profile = resolve_profile(
            task.engine, device, task.longest_prompt_tokens, task.sampling.num_samples
        )
        self.llm = load_engine(
            task.model,
            task.model_path,
            task.engine,
            self.profile,
            task.max_model_len,
            task.run_seed,
        )

    def make(self, index: int) -> ShardDone:
        """Make shard ``index`` of the task's stage and write it atomically."""
        from pipeline.sample import sample_shard
        from pipeline.score import score_shard

        task, started = self.task, time.perf_counter()
        prompts = read_input_part(
            prompts_dir(task.run_dir) / part_name(index), PROMPTS_SCHEMA, task.prompts_fingerprint
        )
        _maybe_kill_for_test()
        if task.kind == "sample":
            table = sample_shard(
                self.llm,
                prompts,
                task.sampling,
                task.stop_token_ids,
                self.profile,
                first_sample_idx=task.sampler_index * task.sampling.num_samples,
                seeds=_seeds(prompts, task.run_seed, task.model, task.sampler_index),
            )
            content = "samples"
        else:
            # Every sampling model's sequences of this shard, in order: the row order
            # the statistics read them in (artifacts.scan_samples).
            samples = pa.concat_tables(
                read_input_part(self.task.samples_path(m, index), SEQUENCE_SCHEMA, fingerprint)
                for m, (_, fingerprint) in enumerate(task.sampling_models)
            )
            table = score_shard(self.llm, prompts, samples, task.engine.score_batch_size)
            content = "scores"
        write_table(
            table,
            task.output_path(index),
            {
                "fingerprint": task.fingerprint,
                "shard": str(index),
                "content": content,
                "model": task.model,
            },
        )
        return ShardDone(index, table.num_rows, time.perf_counter() - started)

    def close(self) -> None:
        """Shut the engine down (frees its memory for the next model's engine)."""
        from pipeline.engine import shutdown_engine

        shutdown_engine(self.llm)


def _seeds(prompts: pa.Table, run_seed: int, model: str, sampler_index: int) -> list[int]:
    """Request seeds: the prompts table's for the first sampling model, else hashed anew."""
    if sampler_index == 0:
        return prompts.column("sampling_seed").to_pylist()
    return [sampling_seed(run_seed, p, model) for p in prompts.column("prompt_id").to_pylist()]


def _maybe_kill_for_test() -> None:
    marker = os.environ.get(KILL_ONCE_ENV)
    if not marker:
        return
    try:
        os.unlink(marker)
    except FileNotFoundError:
        return
    os.kill(os.getpid(), signal.SIGKILL)
