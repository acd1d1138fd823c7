"""The driver: plan, reconcile with the run directory, run the stages, compute statistics.

``run_pipeline`` checks everything that can be checked before a model runs (config,
model folders, shared tokenizer, the prompt file, the run directory), then runs the
stages in order:

1. ``prompts`` (here, in the driver): stream the prompt file, tokenize it and write
   one ``prompts/part-N`` per shard, holding one shard in memory at a time;
2. ``sample``: the reference model samples every shard (``samples/part-N``);
3. ``score/<model>``: each model teacher-forces every shard (``scores/<model>/part-N``);
4. ``stats``: Polars over the parts, ``summary.json`` and ``summary.parquet``.

Stages 2 and 3 are run shard by shard by an executor (``pipeline.executors``: in this
process, or a pool of Ray actors), each shard by a worker that reads its inputs from
files and writes its part atomically, stamped with the fingerprint of the stage's
inputs (``provenance``). Running the same command on the same run directory again
resumes: shards that are valid (``pipeline.verify``: checksums, fingerprint, planned
keys, sums) are kept, the others are redone, and because sampling seeds derive from
prompt ids the result is identical to an uninterrupted run, on either backend. A run
directory belongs to one set of inputs: resuming with a different config, model or
library version is refused with what differs, unless ``force`` starts the affected
stages over. A model whose scores are all valid is not even loaded; a model whose
folder changed since it was hashed is refused before its engine loads.

Everything from reconciling to the finished manifest runs under the directory's lock
(``pipeline.lock``), and so does ``run_stats``. The statistics are removed before
anything else is written and rewritten last, after every part has been verified
against the manifest, and the manifest says complete only after them.
"""

from __future__ import annotations

import os
import shutil
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import __version__
from pipeline.artifacts import (
    MANIFEST,
    SCHEMA_VERSION,
    library_versions,
    part_name,
    prompts_dir,
    read_manifest,
    remove_summaries,
    remove_temporaries,
    require_run_dir,
    stage_folder,
    stray_parts,
    write_json,
)
from pipeline.candidates import materialise_models
from pipeline.config import (
    STATS_SECTIONS,
    RunConfig,
    config_hash,
    parse_overrides,
    set_dotted,
    validate_config,
)
from pipeline.errors import EnvironmentProblem, PipelineError
from pipeline.figures import write_report_figure
from pipeline.identity import check_model_unchanged
from pipeline.lock import LOCK_FILE, RunLock
from pipeline.models import (
    check_shared_tokenizer,
    load_tokenizer,
    model_context_length,
)
from pipeline.preflight import ModelShape, check_kv_cache, check_settings, model_shape
from pipeline.prompts import iter_prompts, prompt_file_digest, write_prompt_shards
from pipeline.provenance import (
    differences,
    fingerprint,
    prompts_inputs,
    sample_inputs,
    score_inputs,
)
from pipeline.stats.summary import compute_summary, write_summary
from pipeline.sweep import SWEEP_FIGURE, write_sweep
from pipeline.terminal import (
    LOGGER,
    StageProgress,
    StepProgress,
    attach_run_log,
    count_prompts,
    run_scope,
)
from pipeline.verify import Expected, shard_problem, verify_run
from pipeline.worker import StageTask


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _log(message: str) -> None:
    LOGGER.info(message)


def default_run_dir(config: RunConfig, root: Path = Path("runs")) -> Path:
    """``runs/date=<UTC date>/run=<HHMMSS>-<config hash>``: sortable, Hive-partitioned."""
    now = datetime.now(UTC)
    return root / f"date={now:%Y-%m-%d}" / f"run={now:%H%M%S}-{config_hash(config)[:8]}"


@dataclass(frozen=True)
class _Plan:
    """Everything a run needs, worked out before anything is written."""

    config: RunConfig
    paths: dict[str, Path]  # the folders vLLM loads (pipeline.candidates made them)
    identities: dict[str, dict[str, Any]]
    stage_inputs: dict[str, dict[str, Any]]  # "prompts", "sample" and "score/<model>"
    model_context: int  # the smallest max_position_embeddings of the models
    stop_token_ids: frozenset[int]

    def fingerprint(self, stage: str) -> str:
        return fingerprint(self.stage_inputs[stage])


def _plan(config: RunConfig) -> _Plan:
    reference = config.reference_model
    models = materialise_models(config)
    paths = {name: model.path for name, model in models.items()}
    tokenizers = {
        name: load_tokenizer(name, paths[name]) for name in [reference, *config.candidates]
    }
    check_shared_tokenizer(tokenizers)
    identities = {name: model.identity for name, model in models.items()}
    libraries = library_versions()
    sections = config.model_dump(mode="json")
    reference_hash = identities[reference]["content_sha256"]
    prompted = prompts_inputs(
        sections, prompt_file_digest(config.prompts.path), reference_hash, libraries
    )
    stage_inputs = {"prompts": prompted}
    for index, sampler in enumerate(config.sampling_models):
        stage_inputs[_sample_stage(config, index)] = sample_inputs(
            sections,
            sampler,
            index,
            identities[sampler]["content_sha256"],
            fingerprint(prompted),
            libraries,
        )
    samples = [
        fingerprint(stage_inputs[_sample_stage(config, index)])
        for index in range(len(config.sampling_models))
    ]
    for name in config.models:
        stage_inputs[f"score/{name}"] = score_inputs(
            samples, identities[name]["content_sha256"], config.engine.dtype, libraries
        )
    return _Plan(
        config=config,
        paths=paths,
        identities=identities,
        stage_inputs=stage_inputs,
        model_context=min(model_context_length(p) for p in paths.values()),
        stop_token_ids=frozenset(
            {tokenizers[reference].eos_token_id, *config.sampling.stop_token_ids}
        ),
    )


def _sample_stage(config: RunConfig, sampler_index: int) -> str:
    """``sample`` for the first sampling model, ``sample/<model>`` for further ones."""
    return "sample" if sampler_index == 0 else f"sample/{config.sampling_models[sampler_index]}"


def _is_new(run_dir: Path) -> bool:
    """True for a run directory to start: missing, or empty but for its lock file.

    Anything else must be a run directory (a manifest beside it) to resume: a folder
    of the user's is never written into.
    """
    if run_dir.exists() and not run_dir.is_dir():
        raise PipelineError(
            f"{run_dir} is a file; --out names a run directory (a new folder, or a run to resume)."
        )
    if not run_dir.exists() or not any(p.name != LOCK_FILE for p in run_dir.iterdir()):
        return True
    if not (run_dir / MANIFEST).is_file():
        raise PipelineError(
            f"{run_dir} holds files but no {MANIFEST}: it is not a run directory. "
            "Choose a new --out."
        )
    return False


def _flat(inputs: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested inputs as dotted keys, so that a difference names the one setting."""
    flat: dict[str, Any] = {}
    for key, value in inputs.items():
        if isinstance(value, dict):
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _reconcile(run_dir: Path, plan: _Plan, force: bool) -> dict[str, Any]:
    """Check an existing run directory against the plan; return its manifest (or {}).

    Stages whose recorded inputs differ are refused, or with ``force`` deleted.
    """
    if _is_new(run_dir):
        return {}
    manifest = read_manifest(run_dir)
    recorded = manifest.get("inputs", {})
    stages = dict(manifest.get("stages", {}))

    def has_parts(stage: str) -> bool:
        return any(stage_folder(run_dir, stage).glob("part-*.parquet"))

    # A stage that wrote nothing yet (it failed before its first shard) binds nothing.
    stale = {
        stage: differences(_flat(recorded[stage]), _flat(current))
        for stage, current in plan.stage_inputs.items()
        if stage in recorded and recorded[stage] != current and has_parts(stage)
    }
    if stale and not force:
        listed = "; ".join(f"{stage}: {line}" for stage, diff in stale.items() for line in diff)
        raise PipelineError(
            f"run directory {run_dir} was made from other inputs ({listed}). Use the "
            "original config and models to resume, a new --out for a new run, or --force "
            "to redo the stages that differ."
        )
    for stage in stale:
        _log(f"--force: starting {stage} over")
        # Only the stage's own parts: samples/ also holds further samplers' folders.
        for part in stage_folder(run_dir, stage).glob("part-*.parquet"):
            part.unlink()
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

    def set(self, key: str, value: Any) -> None:
        self.content[key] = value
        write_json(self.content, self.path)

    def finish(self) -> None:
        self.content["status"] = "complete"
        write_json(self.content, self.path)


def _require_writable(run_dir: Path) -> None:
    """Create ``run_dir`` (with its parents) and check that this process may write it.

    A file where a folder must be is the input's fault (exit status 2); a missing
    permission or a read-only file system the machine's (``EnvironmentProblem``, 1).
    """
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError) as err:
        raise PipelineError(
            f"run directory {run_dir} cannot be created ({err.strerror}: a file is in the "
            "way); choose another --out."
        ) from None
    except OSError as err:
        raise EnvironmentProblem(
            f"run directory {run_dir} cannot be created ({err.strerror}); choose another --out."
        ) from None
    if not os.access(run_dir, os.W_OK | os.X_OK):
        raise EnvironmentProblem(
            f"run directory {run_dir} cannot be written (permission denied); choose another --out."
        )


def _prompt_shards(plan: _Plan, run_dir: Path, manifest: _Manifest) -> dict[str, Any]:
    """Run the prompts stage unless its parts are all there; return its record.

    The record holds the number of prompts of every shard and the longest prompt.
    """
    config, stage = plan.config, "prompts"
    done = manifest.content["stages"].get(stage)
    folder = prompts_dir(run_dir)
    if done is not None:
        problems = [
            (index, problem)
            for index, rows in enumerate(done["shard_sizes"])
            if (
                problem := shard_problem(
                    folder / part_name(index),
                    Expected("prompts", plan.fingerprint(stage), index, rows),
                )
            )
            is not None
        ]
        if not problems:
            return done
        index, problem = problems[0]
        _log(f"  prompts: {part_name(index)} is {problem}; tokenizing the prompts again")
    started = time.perf_counter()
    tokenizer = load_tokenizer(config.reference_model, plan.paths[config.reference_model])
    context = config.engine.max_model_len or plan.model_context
    shards = write_prompt_shards(
        count_prompts(
            iter_prompts(config.prompts.path, tokenizer, config.prompts.limit),
            config.prompts.path,
        ),
        folder,
        config.shards.prompts_per_shard,
        config.seed,
        config.sampling.max_tokens,
        context,
        lambda index: {
            "fingerprint": plan.fingerprint(stage),
            "shard": str(index),
            "content": "prompts",
        },
    )
    manifest.stage_done(
        stage,
        time.perf_counter() - started,
        num_prompts=sum(shards.sizes),
        shard_sizes=shards.sizes,
        longest_prompt_tokens=shards.longest_prompt_tokens,
    )
    return manifest.content["stages"][stage]


def _remove_strays(run_dir: Path, plan: _Plan, num_shards: int) -> None:
    """Delete part files beyond the run's shards (an older cut of the prompts, a copy)."""
    for stage in plan.stage_inputs:
        for stray in stray_parts(stage_folder(run_dir, stage), num_shards):
            _log(f"  {stage}: removed {stray.name}, not one of the run's {num_shards} shards")
            stray.unlink()


def _prompt_ids(run_dir: Path, num_shards: int) -> list[pa.ChunkedArray]:
    """Each shard's prompt ids, from the prompts parts (the prompts stage verified them)."""
    ids = []
    for index in range(num_shards):
        with pq.ParquetFile(prompts_dir(run_dir) / part_name(index)) as part:
            ids.append(part.read(columns=["prompt_id"])["prompt_id"])
    return ids


def _todo(task: StageTask, prompt_ids: list[pa.ChunkedArray], also: set[int]) -> list[int]:
    """Shards of ``task``'s stage to (re)make: invalid ones, and those in ``also``.

    Valid is what ``pipeline.verify`` says: checksums, fingerprint, keys and sums.
    """
    todo = []
    for index, ids in enumerate(prompt_ids):
        path = task.output_path(index)
        problem = shard_problem(path, task.expected_output(index, ids))
        if problem is not None and problem != "missing":
            _log(f"  {task.stage}: {path.parent.name}/{path.name} is {problem}; redoing it")
        if problem is not None or index in also:
            todo.append(index)
    return todo


def _engine_tasks(
    plan: _Plan, run_dir: Path, prompts_record: dict[str, Any], max_model_len: int
) -> list[StageTask]:
    """One sample task per sampling model, then one score task per model.

    Scoring starts under the model that sampled last, whose engine the local executor
    still holds (``executors.LocalExecutor``); the others follow reference first.
    """
    config = plan.config
    samplers = tuple(
        (sampler, plan.fingerprint(_sample_stage(config, index)))
        for index, sampler in enumerate(config.sampling_models)
    )
    common = {
        "run_dir": run_dir.resolve(),
        "prompts_fingerprint": plan.fingerprint("prompts"),
        "sampling_models": samplers,
        "engine": config.engine,
        "max_model_len": max_model_len,
        "longest_prompt_tokens": prompts_record["longest_prompt_tokens"],
        "run_seed": config.seed,
        "sampling": config.sampling,
        "stop_token_ids": plan.stop_token_ids,
    }
    tasks = [
        StageTask(
            kind="sample",
            model=sampler,
            model_path=plan.paths[sampler],
            fingerprint=sampler_fingerprint,
            sampler_index=index,
            **common,
        )
        for index, (sampler, sampler_fingerprint) in enumerate(samplers)
    ]
    last_sampler = samplers[-1][0]
    scored = sorted([config.reference_model, *config.candidates], key=lambda m: m != last_sampler)
    for name in scored:
        tasks.append(
            StageTask(
                kind="score",
                model=name,
                model_path=plan.paths[name],
                fingerprint=plan.fingerprint(f"score/{name}"),
                sampler_index=-1,
                **common,
            )
        )
    return tasks


def _show_sweep(run_dir: Path, config: RunConfig, summary: dict[str, Any]) -> None:
    """Draw sweep.png and print the sweep table when the run has a step-size sweep."""
    table = write_sweep(run_dir, config, summary)
    if table is not None:
        _log(f"{table}\nsweep figure written to {run_dir / SWEEP_FIGURE}")


def _check_kv_cache(
    plan: _Plan, shapes: list[ModelShape], longest_prompt: int, max_model_len: int
) -> None:
    """Refuse a KV cache too small for one sequence, on the device the engines get."""
    from pipeline.engine import detect_device, resolve_profile

    config = plan.config
    device = config.engine.device
    if device == "auto":
        if config.execution.backend != "local":
            return  # each Ray worker detects its own device; vLLM checks there
        device = detect_device()
    profile = resolve_profile(config.engine, device, longest_prompt, config.sampling.num_samples)
    check_kv_cache(config, shapes, profile.kv_cache_memory_bytes, device, max_model_len)


def _summary_identity(manifest: dict[str, Any]) -> dict[str, Any]:
    """The manifest's run identity, which the summary carries (``history`` matches them)."""
    return {
        "run_id": manifest.get("run_id"),
        "config_hash": manifest["config_hash"],
        "run_started_at": manifest.get("started_at", manifest.get("created_at")),
    }


@run_scope  # closes run.log and the progress bars however the run ends
def run_pipeline(config: RunConfig, run_dir: Path, force: bool = False) -> dict[str, Any]:
    """Run, or resume, every stage in ``run_dir`` and return the summary.

    Config, models and settings are checked before the run directory is made; the
    stages then run under its lock (``pipeline.lock``): a second run, or ``stats``,
    on the same directory is refused at once, naming this one.
    """
    plan = _plan(config)
    shapes = [model_shape(name, path) for name, path in plan.paths.items()]
    check_settings(config, shapes)
    _is_new(run_dir)  # refuses a folder of the user's before a lock file is put into it
    _require_writable(run_dir)
    with RunLock(run_dir, "run"):
        return _run_stages(plan, shapes, run_dir, force)


def _run_stages(
    plan: _Plan, shapes: list[ModelShape], run_dir: Path, force: bool
) -> dict[str, Any]:
    """``run_pipeline`` from reconciling to the finished manifest, under the lock."""
    from pipeline.executors import open_executor

    config = plan.config
    previous = _reconcile(run_dir, plan, force)
    fresh = not previous
    for leftover in remove_temporaries(run_dir):  # no other writer: the lock is held
        _log(f"  removed a temporary file left by an interrupted run: {leftover}")
    # The statistics describe the data as it was; they are written again at the end,
    # after the manifest says running and before it says complete.
    remove_summaries(run_dir)
    manifest = _Manifest(
        run_dir,
        {
            "schema_version": SCHEMA_VERSION,
            # Made once per run directory; the summary carries it (_summary_identity).
            "run_id": previous.get("run_id") or uuid.uuid4().hex,
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
                "column sampling_seed of prompts/; a further sampling model m: of "
                "sha256(run_seed NUL m NUL prompt_id)",
            },
            "execution": config.execution.model_dump(mode="json"),
            "inputs": plan.stage_inputs,
            "stages": previous.get("stages", {}),
        },
    )
    attach_run_log(run_dir)
    try:
        prompts_record = _prompt_shards(plan, run_dir, manifest)
        # Just what the prompts need, within the models' context, unless set explicitly.
        max_model_len = config.engine.max_model_len or min(
            plan.model_context,
            prompts_record["longest_prompt_tokens"] + config.sampling.max_tokens + 1,
        )
        _check_kv_cache(plan, shapes, prompts_record["longest_prompt_tokens"], max_model_len)
    except PipelineError:
        if fresh:  # bad prompts or settings found with the prompts: leave nothing behind
            shutil.rmtree(run_dir, ignore_errors=True)
        raise
    group = config.sampling.num_samples
    shard_sizes = prompts_record["shard_sizes"]
    _remove_strays(run_dir, plan, len(shard_sizes))
    prompt_ids = _prompt_ids(run_dir, len(shard_sizes))
    manifest.set("engine", {"max_model_len": max_model_len})
    samplers = " + ".join(config.sampling_models)
    _log(
        f"entropy-pipeline: {prompts_record['num_prompts']} prompts x {group} samples "
        f"from {samplers} in {len(shard_sizes)} shard(s) -> {run_dir}"
    )
    remade: set[int] = set()
    with open_executor(config.execution) as executor:
        manifest.set("executor", executor.description())
        for task in _engine_tasks(plan, run_dir, prompts_record, max_model_len):
            if task.kind == "sample":
                todo = _todo(task, prompt_ids, set())
                remade |= set(todo)
            else:
                # Re-made samples invalidate every model's scores of those shards.
                todo = _todo(task, prompt_ids, remade)
            if not todo:
                continue
            # Right before its engine loads: the model may have changed or gone since
            # it was hashed for the plan.
            check_model_unchanged(
                task.model, task.model_path, plan.identities[task.model]["content_sha256"]
            )
            started = time.perf_counter()
            progress = StageProgress(task.stage, shards=len(todo), of=len(shard_sizes))
            for done in executor.run(task, todo):
                progress.done(done)
            manifest.stage_done(task.stage, time.perf_counter() - started, shards_made=len(todo))

    started = time.perf_counter()
    progress = StepProgress("stats", "summary and figures")
    verify_run(run_dir, manifest.content)
    summary = {**compute_summary(run_dir, config), **_summary_identity(manifest.content)}
    write_summary(run_dir, summary)
    write_report_figure(run_dir, summary, config)
    _show_sweep(run_dir, config, summary)
    progress.done()
    manifest.stage_done("stats", time.perf_counter() - started)
    manifest.finish()
    return summary


def run_stats(run_dir: Path, overrides: list[str]) -> dict[str, Any]:
    """Recompute ``summary.json`` of a finished run with other statistics options.

    Holds the run directory's lock throughout (a run writing it refuses this, and
    this a run), and verifies every part against the manifest before reading them.
    """
    require_run_dir(run_dir)  # before the lock: no lock file in a folder that is no run
    with RunLock(run_dir, "stats"):
        return _recompute_stats(run_dir, overrides)


def _recompute_stats(run_dir: Path, overrides: list[str]) -> dict[str, Any]:
    """``run_stats`` under the lock."""
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
    verify_run(run_dir, manifest)
    remove_summaries(run_dir)  # a kill while they are rewritten leaves none, not a mix
    summary = {**compute_summary(run_dir, config), **_summary_identity(manifest)}
    write_summary(run_dir, summary)
    write_report_figure(run_dir, summary, config)
    _show_sweep(run_dir, config, summary)
    return summary
