"""The stage seam: one engine stage's shards, made one at a time by a worker.

A ``StageTask`` is everything a worker needs to make any shard of one stage (sample,
or score under one model): small and picklable, so that the same task runs in this
process (the local executor) or in a Ray actor on another machine. A worker reads
its inputs from the run directory (``prompts/part-N``, and for scoring
``samples/part-N``), verified as every read is (``pipeline.verify``: checksums,
fingerprint, keys, S), runs its engine, checks what the engine returned the same way
(a NaN or infinite log-prob is refused here, naming the model, prompt and sample),
and writes its one output part atomically. The driver alone plans, reconciles,
writes the manifest and computes the statistics.
"""

from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import pyarrow as pa

from pipeline.artifacts import (
    part_name,
    prompts_dir,
    sample_folders,
    scores_dir,
    write_table,
)
from pipeline.config import EngineConfig, SamplingConfig
from pipeline.errors import PipelineError
from pipeline.provenance import sampling_seed
from pipeline.verify import (
    Expected,
    PartProblem,
    expected_keys,
    keys_problem,
    read_part,
    sequence_problem,
)

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

    def engine_inputs(self) -> tuple[object, ...]:
        """What the task's engine is built from (``ShardWorker``).

        Tasks with equal inputs can share one engine, as sampling with a model and then
        scoring under it do.
        """
        return (
            self.model_path,
            self.engine,
            self.max_model_len,
            self.longest_prompt_tokens,
            self.sampling.num_samples,
            self.run_seed,
        )

    def output_path(self, index: int) -> Path:
        """Where shard ``index`` of this stage is written."""
        if self.kind == "score":
            return scores_dir(self.run_dir, self.model) / part_name(index)
        return self.samples_path(self.sampler_index, index)

    def samples_path(self, sampler_index: int, index: int) -> Path:
        """Where sampling model ``sampler_index`` writes shard ``index``."""
        folders = sample_folders(self.run_dir, [model for model, _ in self.sampling_models])
        return folders[sampler_index] / part_name(index)

    def output_keys(self, prompt_ids: pa.ChunkedArray) -> pa.Table:
        """The keys of a part of this stage, given its shard's prompt ids.

        A sample part holds the G completions of its sampling model for each prompt; a
        score part every sampling model's rows, in model order.
        """
        samplers = (
            [self.sampler_index] if self.kind == "sample" else range(len(self.sampling_models))
        )
        return expected_keys(prompt_ids, self.sampling.num_samples, samplers)

    def expected_output(self, index: int, prompt_ids: pa.ChunkedArray) -> Expected:
        """What part ``index`` of this stage must be, given that shard's prompt ids."""
        return Expected(
            "samples" if self.kind == "sample" else "scores",
            self.fingerprint,
            index,
            keys=self.output_keys(prompt_ids),
        )


@dataclass(frozen=True)
class ShardDone:
    """A finished shard: its index, rows written and seconds spent."""

    index: int
    rows: int
    seconds: float


def read_input_part(path: Path, expected: Expected) -> pa.Table:
    """Read a part another stage wrote, verified (``pipeline.verify.read_part``)."""
    try:
        return read_part(path, expected)
    except PartProblem as problem:
        raise PipelineError(
            f"{path} is {problem}; it cannot be used as input. Re-run "
            "`entropy-pipeline run --out` on the run directory to redo it."
        ) from None


class ShardWorker:
    """Holds one engine and makes a stage's shards one after another.

    ``task`` may be replaced by another task with the same ``engine_inputs``.
    """

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
            prompts_dir(task.run_dir) / part_name(index),
            Expected("prompts", task.prompts_fingerprint, index),
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
            # the statistics read them in (stats.summary.PairedShards).
            samples = pa.concat_tables(
                read_input_part(
                    self.task.samples_path(m, index),
                    Expected(
                        "samples",
                        fingerprint,
                        index,
                        keys=expected_keys(prompts["prompt_id"], task.sampling.num_samples, [m]),
                    ),
                )
                for m, (_, fingerprint) in enumerate(task.sampling_models)
            )
            table = score_shard(self.llm, prompts, samples, task.engine.score_batch_size)
            content = "scores"
        problem = keys_problem(table, task.output_keys(prompts["prompt_id"])) or sequence_problem(
            table
        )
        if problem is not None:
            raise PipelineError(
                f"model {task.model!r} ({task.stage}, shard {index}): vLLM's output is "
                f"{problem}; nothing was written. A NaN or infinite log-prob means the model "
                "gives a sampled token probability 0 or computes NaN: check its weights and "
                "engine.dtype."
            )
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
