"""The whole pipeline: validate inputs, sample, score every model, compute statistics.

``run_pipeline`` checks everything that can be checked before a model runs (config,
model folders, shared tokenizer, prompt file, prompt lengths, the run directory) and
only then writes, so bad input leaves nothing behind.

Work is done in shards of prompts. Each shard's samples and each model's scores of it
are written atomically as they finish, stamped with the fingerprint of their inputs
(``provenance``). Running the same command on the same run directory again resumes:
shards that are complete and valid are kept, missing or damaged ones are redone, and
because sampling seeds derive from prompt ids the result is identical to an
uninterrupted run. A run directory belongs to one set of inputs: resuming with a
different config, model or library version is refused with what differs, unless
``force`` starts the affected stages over. A model whose scores are all valid is not
even loaded, so adding a candidate to a finished run scores only that candidate.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from pipeline import __version__
from pipeline.artifacts import (
    MANIFEST,
    PROMPTS_SCHEMA,
    SCHEMA_VERSION,
    SEQUENCE_SCHEMA,
    library_versions,
    part_name,
    prompts_dir,
    read_manifest,
    remove_temporaries,
    samples_dir,
    scores_dir,
    shard_problem,
    write_json,
    write_table,
)
from pipeline.config import (
    STATS_SECTIONS,
    RunConfig,
    config_hash,
    parse_overrides,
    set_dotted,
    validate_config,
)
from pipeline.errors import PipelineError
from pipeline.lora import is_adapter, merged_checkpoint
from pipeline.models import (
    check_shared_tokenizer,
    load_tokenizer,
    model_context_length,
    model_identity,
    require_model_dir,
)
from pipeline.prompts import Prompt, check_prompt_lengths, load_prompts
from pipeline.provenance import (
    differences,
    fingerprint,
    prompts_digest,
    sample_inputs,
    score_inputs,
)
from pipeline.stats.summary import compute_summary, write_summary


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def default_run_dir(config: RunConfig, root: Path = Path("runs")) -> Path:
    """``runs/date=<UTC date>/run=<HHMMSS>-<config hash>``: sortable, Hive-partitioned."""
    now = datetime.now(UTC)
    return root / f"date={now:%Y-%m-%d}" / f"run={now:%H%M%S}-{config_hash(config)[:8]}"


@dataclass(frozen=True)
class _Plan:
    """Everything a run needs, worked out before anything is written."""

    config: RunConfig
    paths: dict[str, Path]  # full checkpoints (LoRA adapters already merged)
    prompts: list[Prompt]
    shards: list[list[Prompt]]
    identities: dict[str, dict[str, Any]]
    stage_inputs: dict[str, dict[str, Any]]  # "sample" and "score/<model>"
    max_model_len: int
    step_budget: int
    stop_token_ids: frozenset[int]

    def fingerprint(self, stage: str) -> str:
        return fingerprint(self.stage_inputs[stage])


def _plan(config: RunConfig) -> _Plan:
    from pipeline.sample import sampling_step_budget

    reference = config.reference_model
    paths = {
        name: merged_checkpoint(name, model.path, model.base, config.merged_models_dir.resolve())
        if is_adapter(model.path)
        else model.path
        for name, model in config.models.items()
    }
    tokenizers = {
        name: load_tokenizer(name, paths[name]) for name in [reference, *config.candidates]
    }
    check_shared_tokenizer(tokenizers)
    tokenizer = tokenizers[reference]
    max_model_len = config.engine.max_model_len or min(
        model_context_length(p) for p in paths.values()
    )
    prompts = load_prompts(config.prompts.path, tokenizer, config.prompts.limit)
    check_prompt_lengths(prompts, config.sampling.max_tokens, max_model_len)
    identities = {name: model_identity(name, path) for name, path in paths.items()}
    for name, model in config.models.items():
        if paths[name] != model.path:
            identities[name]["lora_adapter"] = str(model.path)
    libraries = library_versions()
    size = config.shards.prompts_per_shard
    sections = config.model_dump(mode="json")
    sampled = sample_inputs(
        sections,
        identities[reference]["content_sha256"],
        prompts_digest([p.prompt_id for p in prompts], [p.token_ids for p in prompts]),
        libraries,
    )
    stage_inputs = {"sample": sampled}
    for name in config.models:
        stage_inputs[f"score/{name}"] = score_inputs(
            fingerprint(sampled), identities[name]["content_sha256"], config.engine.dtype, libraries
        )
    return _Plan(
        config=config,
        paths=paths,
        prompts=prompts,
        shards=[prompts[i : i + size] for i in range(0, len(prompts), size)],
        identities=identities,
        stage_inputs=stage_inputs,
        max_model_len=max_model_len,
        step_budget=sampling_step_budget(
            prompts, config.sampling.num_samples, config.engine.max_num_batched_tokens
        ),
        stop_token_ids=frozenset({tokenizer.eos_token_id, *config.sampling.stop_token_ids}),
    )


def _stage_folders(run_dir: Path, stage: str) -> list[Path]:
    if stage == "sample":
        return [prompts_dir(run_dir), samples_dir(run_dir)]
    return [scores_dir(run_dir, stage.removeprefix("score/"))]


def _reconcile(run_dir: Path, plan: _Plan, force: bool) -> dict[str, Any]:
    """Check an existing run directory against the plan; return its manifest (or {}).

    Stages whose recorded inputs differ are refused, or with ``force`` deleted.
    """
    if not run_dir.exists() or not any(run_dir.iterdir()):
        return {}
    if not (run_dir / MANIFEST).is_file():
        raise PipelineError(
            f"{run_dir} holds files but no {MANIFEST}: it is not a run directory. "
            "Choose a new --out."
        )
    manifest = read_manifest(run_dir)
    recorded = manifest.get("inputs", {})
    stages = dict(manifest.get("stages", {}))

    def has_parts(stage: str) -> bool:
        return any(any(f.glob("part-*.parquet")) for f in _stage_folders(run_dir, stage))

    # A stage that wrote nothing yet (it failed before its first shard) binds nothing.
    stale = {
        stage: differences(recorded[stage], current)
        for stage, current in plan.stage_inputs.items()
        if stage in recorded and recorded[stage] != current and has_parts(stage)
    }
    if stale and not force:
        lines = [f"  {stage}: {line}" for stage, diff in stale.items() for line in diff]
        raise PipelineError(
            f"run directory {run_dir} was made from other inputs:\n"
            + "\n".join(lines)
            + "\nUse the original config and models to resume, a new --out for a new run, "
            "or --force to redo the stages that differ."
        )
    for stage in stale:
        _log(f"--force: starting {stage} over")
        for folder in _stage_folders(run_dir, stage):
            shutil.rmtree(folder, ignore_errors=True)
        stages.pop(stage, None)
    return {**manifest, "stages": stages}


class _Manifest:
    """The run's manifest, rewritten atomically whenever a stage completes."""

    def __init__(self, run_dir: Path, content: dict[str, Any]) -> None:
        self.path = run_dir / MANIFEST
        self.content = content
        write_json(self.content, self.path)

    def stage_done(self, stage: str, seconds: float, **details: Any) -> None:
        self.content["stages"][stage] = {
            "seconds": round(seconds, 3),
            "completed_at": _now(),
            **details,
        }
        write_json(self.content, self.path)

    def finish(self) -> None:
        self.content["status"] = "complete"
        write_json(self.content, self.path)


def _require_writable(run_dir: Path) -> None:
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        writable = os.access(run_dir, os.W_OK | os.X_OK)
    except OSError as err:
        writable, reason = False, f" ({err.strerror})"
    else:
        reason = ""
    if not writable:
        raise PipelineError(
            f"run directory {run_dir} cannot be created or written{reason}; choose another --out."
        )


def _redo(folder: Path, plan: _Plan, stage: str, shard_sizes: list[int], schema: Any) -> list[int]:
    """Indices of the shards in ``folder`` that must be (re)made, saying why for damaged ones."""
    todo = []
    for index, rows in enumerate(shard_sizes):
        problem = shard_problem(folder / part_name(index), schema, plan.fingerprint(stage), rows)
        if problem is not None:
            if problem != "missing":
                _log(f"  {stage}: {folder.name}/{part_name(index)} is {problem}; redoing it")
            todo.append(index)
    return todo


def run_pipeline(config: RunConfig, run_dir: Path, force: bool = False) -> dict[str, Any]:
    """Run, or resume, every stage in ``run_dir`` and return the summary."""
    from pipeline.engine import open_engine
    from pipeline.sample import prompts_table, sample_completions
    from pipeline.score import score_sequences

    plan = _plan(config)
    previous = _reconcile(run_dir, plan, force)
    _require_writable(run_dir)
    for leftover in remove_temporaries(run_dir):
        _log(f"  removed a temporary file left by an interrupted run: {leftover}")
    reference = config.reference_model
    group = config.sampling.num_samples
    prompt_rows = [len(shard) for shard in plan.shards]
    sequence_rows = [len(shard) * group for shard in plan.shards]
    manifest = _Manifest(
        run_dir,
        {
            "schema_version": SCHEMA_VERSION,
            "status": "running",
            "started_at": previous.get("started_at", _now()),
            "updated_at": _now(),
            "entropy_pipeline_version": __version__,
            "config_hash": config_hash(config),
            "config": config.model_dump(mode="json"),
            "models": plan.identities,
            "libraries": library_versions(),
            "dtype": config.engine.dtype,
            "seeds": {
                "run_seed": config.seed,
                "per_prompt": "first 62 bits of sha256(run_seed NUL prompt_id), "
                "column sampling_seed of prompts/",
            },
            "engine": {
                "max_model_len": plan.max_model_len,
                "max_num_batched_tokens": plan.step_budget,
            },
            "shards": len(plan.shards),
            "inputs": plan.stage_inputs,
            "stages": previous.get("stages", {}),
        },
    )
    _log(
        f"entropy-pipeline: {len(plan.prompts)} prompts x {group} samples in "
        f"{len(plan.shards)} shard(s) -> {run_dir}"
    )
    prompt_ids = {p.prompt_id: p.token_ids for p in plan.prompts}

    def stamp(stage: str, index: int, content: str, model: str) -> dict[str, str]:
        return {
            "fingerprint": plan.fingerprint(stage),
            "shard": str(index),
            "content": content,
            "model": model,
        }

    sample_todo = sorted(
        set(_redo(samples_dir(run_dir), plan, "sample", sequence_rows, SEQUENCE_SCHEMA))
        | set(_redo(prompts_dir(run_dir), plan, "sample", prompt_rows, PROMPTS_SCHEMA))
    )
    for name in [reference, *config.candidates]:
        stage = f"score/{name}"
        # Re-made samples invalidate every model's scores of those shards.
        todo = sorted(
            set(_redo(scores_dir(run_dir, name), plan, stage, sequence_rows, SEQUENCE_SCHEMA))
            | set(sample_todo)
        )
        if not todo:
            continue
        path = plan.paths[name]
        require_model_dir(name, path)  # it may have gone since the run started
        started = time.perf_counter()
        with open_engine(
            name, path, config.engine, plan.max_model_len, plan.step_budget, config.seed
        ) as llm:
            if name == reference:
                for index in sample_todo:
                    shard = plan.shards[index]
                    _log(f"sample {name}: shard {index + 1}/{len(plan.shards)}")
                    table = prompts_table(shard, config.seed)
                    write_table(
                        table,
                        prompts_dir(run_dir) / part_name(index),
                        stamp("sample", index, "prompts", name),
                    )
                    samples = sample_completions(
                        llm,
                        shard,
                        config.sampling,
                        config.seed,
                        set(plan.stop_token_ids),
                        plan.step_budget,
                    )
                    write_table(
                        samples,
                        samples_dir(run_dir) / part_name(index),
                        stamp("sample", index, "samples", name),
                    )
                if sample_todo:
                    manifest.stage_done(
                        "sample", time.perf_counter() - started, shards_made=len(sample_todo)
                    )
                started = time.perf_counter()
            for index in todo:
                _log(f"score {name}: shard {index + 1}/{len(plan.shards)}")
                samples = pq.read_table(samples_dir(run_dir) / part_name(index))
                scores = score_sequences(
                    llm, name, samples, prompt_ids, config.engine.score_batch_size
                )
                write_table(
                    scores,
                    scores_dir(run_dir, name) / part_name(index),
                    stamp(stage, index, "scores", name),
                )
        manifest.stage_done(stage, time.perf_counter() - started, shards_made=len(todo))

    started = time.perf_counter()
    summary = {
        **compute_summary(run_dir, config),
        "config_hash": config_hash(config),
        "run_started_at": manifest.content["started_at"],
    }
    write_summary(run_dir, summary)
    manifest.stage_done("stats", time.perf_counter() - started)
    manifest.finish()
    return summary


def run_stats(run_dir: Path, overrides: list[str]) -> dict[str, Any]:
    """Recompute ``summary.json`` of a finished run with other statistics options."""
    manifest = read_manifest(run_dir)
    if manifest.get("status") != "complete":
        done = ", ".join(manifest.get("stages", {})) or "none"
        raise PipelineError(
            f"run {run_dir} did not finish (stages completed: {done}); its artifacts "
            "are incomplete. Run `entropy-pipeline run --out` on it again to resume."
        )
    tree = manifest["config"]
    for key, value in parse_overrides(overrides):
        if key.split(".")[0] not in STATS_SECTIONS:
            allowed = ", ".join(f"{section}.*" for section in STATS_SECTIONS)
            raise PipelineError(
                f"stats can change only {allowed} options; {key} is fixed by the run "
                "(samples and scores were made with it). Start a new run to change it."
            )
        set_dotted(tree, key, value)
    config = validate_config(tree, f"of run {run_dir} with overrides {overrides}")
    summary = {
        **compute_summary(run_dir, config),
        "config_hash": manifest["config_hash"],
        "run_started_at": manifest.get("started_at", manifest.get("created_at")),
    }
    write_summary(run_dir, summary)
    return summary
