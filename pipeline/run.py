"""The whole pipeline: validate inputs, sample, score every model, compute statistics.

``run_pipeline`` checks everything that can be checked before a model runs (config,
model folders, shared tokenizer, prompt file, prompt lengths) and only then creates
the run directory, so bad input leaves nothing behind. The manifest is written first
with status ``running`` and updated as each stage completes; ``summary.json`` exists
only once every stage has finished, and ``stats`` refuses a run that did not finish.
"""

from __future__ import annotations

import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pipeline import __version__
from pipeline.artifacts import (
    MANIFEST,
    SCHEMA_VERSION,
    library_versions,
    prompts_dir,
    read_manifest,
    samples_dir,
    scores_dir,
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
from pipeline.models import (
    check_shared_tokenizer,
    load_tokenizer,
    model_context_length,
    model_identity,
)
from pipeline.prompts import check_prompt_lengths, load_prompts
from pipeline.stats.summary import compute_summary, write_summary


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def default_run_dir(config: RunConfig, root: Path = Path("runs")) -> Path:
    """``runs/<UTC date>/<HHMMSS>-<config hash>``: sortable and unique per config."""
    now = datetime.now(UTC)
    return root / now.strftime("%Y-%m-%d") / f"{now.strftime('%H%M%S')}-{config_hash(config)[:8]}"


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


class _Manifest:
    """The run's manifest, rewritten atomically whenever a stage completes."""

    def __init__(self, run_dir: Path, content: dict[str, Any]) -> None:
        self.path = run_dir / MANIFEST
        self.content = content
        write_json(self.content, self.path)

    def stage_done(self, stage: str, started: float, **details: Any) -> None:
        self.content["stages"][stage] = {
            "seconds": round(time.perf_counter() - started, 3),
            "completed_at": _now(),
            **details,
        }
        write_json(self.content, self.path)

    def finish(self) -> None:
        self.content["status"] = "complete"
        write_json(self.content, self.path)


def run_pipeline(config: RunConfig, run_dir: Path) -> dict[str, Any]:
    """Run every stage into ``run_dir`` (which must not hold anything) and return the summary."""
    from pipeline.engine import open_engine
    from pipeline.sample import prompts_table, sample_completions, sampling_step_budget
    from pipeline.score import score_sequences

    if run_dir.exists() and any(run_dir.iterdir()):
        raise PipelineError(
            f"run directory {run_dir} already holds files; choose a new --out (a run "
            "directory belongs to one run)."
        )
    reference = config.reference_model
    paths = {name: model.path for name, model in config.models.items()}
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
    budget = sampling_step_budget(
        prompts, config.sampling.num_samples, config.engine.max_num_batched_tokens
    )
    _log(
        f"entropy-pipeline: {len(prompts)} prompts x {config.sampling.num_samples} samples "
        f"-> {run_dir}"
    )

    run_dir.mkdir(parents=True, exist_ok=True)
    digest = config_hash(config)
    manifest = _Manifest(
        run_dir,
        {
            "schema_version": SCHEMA_VERSION,
            "status": "running",
            "created_at": _now(),
            "entropy_pipeline_version": __version__,
            "config_hash": digest,
            "config": config.model_dump(mode="json"),
            "models": {name: model_identity(name, path) for name, path in paths.items()},
            "libraries": library_versions(),
            "dtype": config.engine.dtype,
            "seeds": {
                "run_seed": config.seed,
                "per_prompt": "first 62 bits of sha256(run_seed NUL prompt_id), "
                "column sampling_seed of prompts/",
            },
            "engine": {"max_model_len": max_model_len, "max_num_batched_tokens": budget},
            "stages": {},
        },
    )
    provenance = {"config_hash": digest}
    stop_token_ids = {tokenizer.eos_token_id, *config.sampling.stop_token_ids}

    engine_args = (config.engine, max_model_len, budget, config.seed)
    started = time.perf_counter()
    with open_engine(reference, paths[reference], *engine_args) as llm:
        _log(f"sample: {reference} ({paths[reference]})")
        write_table(
            prompts_table(prompts, config.seed),
            prompts_dir(run_dir),
            {**provenance, "content": "prompts"},
        )
        samples = sample_completions(
            llm, prompts, config.sampling, config.seed, stop_token_ids, budget
        )
        write_table(
            samples, samples_dir(run_dir), {**provenance, "content": "samples", "model": reference}
        )
        manifest.stage_done("sample", started, sequences=samples.num_rows)
        prompt_ids = {p.prompt_id: p.token_ids for p in prompts}
        started = time.perf_counter()
        _log(f"score: {reference}")
        scores = score_sequences(
            llm, reference, samples, prompt_ids, config.engine.score_batch_size
        )
        write_table(
            scores,
            scores_dir(run_dir, reference),
            {**provenance, "content": "scores", "model": reference},
        )
        manifest.stage_done(f"score/{reference}", started)
    for name in config.candidates:
        started = time.perf_counter()
        _log(f"score: {name} ({paths[name]})")
        with open_engine(name, paths[name], *engine_args) as llm:
            scores = score_sequences(llm, name, samples, prompt_ids, config.engine.score_batch_size)
        write_table(
            scores, scores_dir(run_dir, name), {**provenance, "content": "scores", "model": name}
        )
        manifest.stage_done(f"score/{name}", started)

    started = time.perf_counter()
    summary = {**compute_summary(run_dir, config), **provenance}
    write_summary(run_dir, summary)
    manifest.stage_done("stats", started)
    manifest.finish()
    return summary


def run_stats(run_dir: Path, overrides: list[str]) -> dict[str, Any]:
    """Recompute ``summary.json`` of a finished run with other ``entropy.*`` options."""
    manifest = read_manifest(run_dir)
    if manifest.get("status") != "complete":
        done = ", ".join(manifest.get("stages", {})) or "none"
        raise PipelineError(
            f"run {run_dir} did not finish (stages completed: {done}); its artifacts "
            "are incomplete. Run the pipeline again into a new directory."
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
    }
    write_summary(run_dir, summary)
    return summary
