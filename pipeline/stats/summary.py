"""Statistics stage: read a run's Parquet artifacts, write per_prompt.parquet and the summary.

Loads no model, so it re-runs in seconds with other ``entropy.*``, ``weights.*`` and
``uncertainty.*`` options. The paired frame handed to the estimators is built here,
and this is where ``include_eos`` is applied: it changes the integrands S0, S1 and
the length L, never the log-weights, which always compare the full sampled sequences
(EOS included).

Sampling from several models (``sampling.models``): model m (in
``config.sampling_models`` order) draws sample_idx = m G + g, G =
``sampling.num_samples`` (samples/ for the first model, samples/<model>/ for further
ones; each shard's score parts hold its rows in that order, see ``PairedShards``), and
every sequence is scored under every model. The proposal is the equal mixture of the sampling
models, log q_i = logsumexp_m S_m,full,i - log M (the balance heuristic), and the
paired frame carries log w0 = S0_full - log q and log w1 = S1_full - log q. With the
reference alone sampling, log q = S0_full, so log w0 = 0 and log w1 = d exactly.

Shard by shard. Shards hold whole prompts, so everything per prompt is computed one
shard at a time and the driver's memory does not grow with the run (docs/design.md §5,
"Statistics in bounded memory"). What needs the whole run is reduced to a few numbers
per candidate: a first, cheap pass over the log-weights (``LogWeightScan``: extremes,
log sum exp, the Pareto tail's largest draws) fits the weight stabilisation; a second
pass over the full paired frame of each shard adds the run totals of the atoms, the
within-stratum scatter matrix of the prompt-set errors, the bootstrap's replicate
totals and the weight diagnostics' sums, and writes the shard's per-prompt rows. The
medians and quantiles of the diagnostics are exact order statistics found by re-reading
(``pipeline.stats.quantiles``).

Public API: ``shard_parts`` (``RunParts``), ``PairedShards``, ``paired_frame``,
``generation_diagnostics``, ``candidate_summary``, ``compute_summary`` (also writes
per_prompt.parquet), ``write_summary``.
"""

from __future__ import annotations

import math
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.artifacts import (
    PER_PROMPT_PARQUET,
    SEQUENCE_SCHEMA,
    SUMMARY,
    SUMMARY_PARQUET,
    sample_folders,
    scan_checked,
    scores_dir,
    table_writer,
    write_json,
    write_table,
)
from pipeline.config import STATS_SECTIONS, RunConfig
from pipeline.errors import PipelineError
from pipeline.stats.estimators import (
    PromptSums,
    SampleShape,
    Sequences,
    check_finite,
    estimates_from_means,
    means_from_totals,
    prepare,
    prompt_sums,
    with_bits,
)
from pipeline.stats.quantiles import exact_quantiles
from pipeline.stats.registry import (
    PER_PROMPT_ESTIMATES,
    PER_PROMPT_SCHEMA,
    RUN_KEYS,
    SUMMARY_SCHEMA,
    Unit,
    atoms_needed,
    candidate_keys,
)
from pipeline.stats.uncertainty import (
    INTERVAL_ESTIMATES,
    ClusterBootstrap,
    interval_warnings,
    per_prompt_errors,
    prompt_set_standard_errors,
    stratum_scatter,
    wald_intervals,
)
from pipeline.stats.weights import (
    LOG_WEIGHT_QUANTILES,
    PROMPT_ESS_QUANTILES,
    LogWeightScan,
    WeightTotals,
    fit_stabiliser,
    weight_warnings,
)

KEYS = ["prompt_id", "sample_idx"]
# Prompts listed in the summary (and the report) by |delta H| / SE.
TOP_PROMPTS = 5
# Bytes of per-prompt ESS read back at a time for its quantiles.
_SPILL_CHUNK = 1 << 20
# Values an exact quantile may gather in memory (``exact_quantiles``' max_gathered).
_MAX_GATHERED = 1 << 16
# Sequences the statistics read at a time (whole shards; see ``RunParts``).
STATS_BATCH_ROWS = 16_384


@dataclass(frozen=True)
class RunParts:
    """Where every shard's files are, read in batches of consecutive shards.

    ``samples`` holds each sampling model's samples folder (in order), ``scores`` each
    model's scores folder, ``names`` the part names (the same in every folder), and
    ``batches`` the (first, stop) shard ranges the statistics read at a time: whole
    shards of about ``STATS_BATCH_ROWS`` sequences, so that per-query costs are paid
    once per batch while memory stays bounded by the batch.
    """

    run_dir: Path
    samples: tuple[Path, ...]
    scores: Mapping[str, Path]
    names: tuple[str, ...]
    batches: tuple[tuple[int, int], ...]
    num_sequences: int

    def __len__(self) -> int:
        return len(self.batches)

    def _names(self, batch: int) -> tuple[str, ...]:
        first, stop = self.batches[batch]
        return self.names[first:stop]

    def sample_parts(self, batch: int) -> list[Path]:
        """The batch's samples parts: shard by shard, each sampling model's part."""
        return [folder / name for name in self._names(batch) for folder in self.samples]

    def score_parts(self, batch: int, model: str) -> list[Path]:
        """The batch's scores parts under ``model``, shard by shard."""
        return [self.scores[model] / name for name in self._names(batch)]


def _batches(rows: Sequence[int], batch_rows: int) -> tuple[tuple[int, int], ...]:
    """Consecutive shard ranges of at least ``batch_rows`` rows (the last may be short)."""
    batches, first, total = [], 0, 0
    for shard, count in enumerate(rows):
        total += count
        if total >= batch_rows:
            batches.append((first, shard + 1))
            first, total = shard + 1, 0
    if first < len(rows):
        batches.append((first, len(rows)))
    return tuple(batches)


def shard_parts(run_dir: Path, sampling_models: Sequence[str], models: Sequence[str]) -> RunParts:
    """The files of every shard, refusing a run whose stages did not write them all."""
    folders = sample_folders(run_dir, list(sampling_models))
    names = [sorted(path.name for path in folder.glob("part-*.parquet")) for folder in folders]
    if not names[0]:
        raise PipelineError(
            f"no Parquet parts in {folders[0]}: the stage that writes them did not finish."
        )
    if any(found != names[0] for found in names):
        raise PipelineError(
            f"the sampling models' folders {[str(f) for f in folders]} hold different "
            "shards: the sample stage did not finish for this run. Re-run "
            "`entropy-pipeline run --out` on it."
        )
    for model in models:
        found = sorted(path.name for path in scores_dir(run_dir, model).glob("part-*.parquet"))
        if found != names[0]:
            raise PipelineError(
                f"the scores under {model} ({len(found)} parts) do not cover the "
                f"{len(names[0])} sampled shards: the score stage did not finish for this "
                "run. Re-run `entropy-pipeline run --out` on it."
            )
    rows = []
    for name in names[0]:
        shard_files = [folder / name for folder in folders]
        # Every file's schema is checked here, once; the passes then read them unchecked.
        scan_checked(
            [*shard_files, *(scores_dir(run_dir, m) / name for m in models)], SEQUENCE_SCHEMA
        )
        rows.append(sum(pq.ParquetFile(path).metadata.num_rows for path in shard_files))
    return RunParts(
        run_dir,
        tuple(folders),
        {model: scores_dir(run_dir, model) for model in models},
        tuple(names[0]),
        _batches(rows, STATS_BATCH_ROWS),
        sum(rows),
    )


def _model_scores(parts: list[Path], tag: str, include_eos: bool) -> pl.LazyFrame:
    """Keys, full-sequence sum and length, and integrand sum and length of one model."""
    ended_by_stop = pl.col("finish_reason") == "stop"
    drop_last = ended_by_stop & (not include_eos)
    last_logprob = pl.col("token_logprobs").list.last().cast(pl.Float64)
    return pl.scan_parquet(parts).select(
        *(pl.col(key).alias(f"{key}_{tag}") for key in KEYS),
        pl.col("S").alias(f"S_full_{tag}"),
        pl.col("L").alias(f"L_full_{tag}"),
        (pl.col("S") - pl.when(drop_last).then(last_logprob).otherwise(0.0)).alias(f"S_{tag}"),
        (pl.col("L") - drop_last.cast(pl.Int32)).alias(f"L_{tag}"),
    )


@dataclass(frozen=True)
class PairedShards:
    """The paired frame of one candidate, one batch of shards at a time (``RunParts``).

    The score stage writes each model's shard row for row in the order of the samples
    shard, so the tables are put side by side instead of joined (a join on the string
    keys held ~300 bytes per sequence); the keys are compared row by row, and score
    files that do not cover exactly the sampled sequences, in order, are refused.
    ``stratum`` = sample_idx // ``num_samples`` is the sampling model's index.
    """

    parts: RunParts
    reference: str
    candidate: str
    include_eos: bool
    sampling_models: tuple[str, ...]
    num_samples: int

    def __len__(self) -> int:
        return len(self.parts)

    @property
    def num_sequences(self) -> int:
        """N, from the Parquet footers of the samples (``shard_parts`` read them)."""
        return self.parts.num_sequences

    def _lazy(self, batch: int) -> pl.LazyFrame:
        models = list(dict.fromkeys([self.reference, self.candidate, *self.sampling_models]))
        tags = {model: str(i) for i, model in enumerate(models)}
        aligned = pl.lit(True)
        for tag in tags.values():
            for key in KEYS:
                aligned = aligned & (pl.col(key) == pl.col(f"{key}_{tag}"))
        ref, cand = tags[self.reference], tags[self.candidate]
        proposal = [pl.col(f"S_full_{tags[m]}") for m in self.sampling_models]
        top = pl.max_horizontal(proposal)
        # Balance heuristic: log of the equal mixture's density. With one sampling model
        # this is its S_full exactly (top + log 1 - log 1).
        log_q = top + pl.sum_horizontal([(s - top).exp() for s in proposal]).log()
        log_q = log_q - math.log(len(self.sampling_models))
        sampled = pl.scan_parquet(self.parts.sample_parts(batch)).select(KEYS)
        scores = [
            _model_scores(self.parts.score_parts(batch, m), tag, self.include_eos)
            for m, tag in tags.items()
        ]
        return pl.concat([sampled, *scores], how="horizontal").select(
            *KEYS,
            aligned=aligned.fill_null(False),
            stratum=(pl.col("sample_idx") // self.num_samples).cast(pl.Int64),
            S0=f"S_{ref}",
            S1=f"S_{cand}",
            L=f"L_{ref}",
            L_full=f"L_full_{ref}",
            d=pl.col(f"S_full_{cand}") - pl.col(f"S_full_{ref}"),
            log_w0=pl.col(f"S_full_{ref}") - log_q,
            log_w1=pl.col(f"S_full_{cand}") - log_q,
        )

    def _checked(self, frame: pl.LazyFrame) -> pl.DataFrame:
        # Streaming: the list columns are read in batches and reduced to scalars.
        found = frame.collect(engine="streaming")
        misaligned = found.filter(~pl.col("aligned"))
        if misaligned.height:
            first = misaligned.row(0, named=True)
            raise PipelineError(
                f"{misaligned.height} sampled sequence(s) have no score, or a score out of "
                f"order, under one of {[self.reference, self.candidate]} or the sampling "
                f"models (first: prompt {first['prompt_id']!r}, sample "
                f"{first['sample_idx']}); the score stage did not finish for this run. "
                "Re-run `entropy-pipeline run --out` on it."
            )
        return found.drop("aligned")

    def frame(self, batch: int) -> pl.DataFrame:
        """One row per sequence of the batch: the columns of ``pipeline.stats.estimators``."""
        return self._checked(self._lazy(batch))

    def log_weights(self, batch: int) -> pl.DataFrame:
        """Keys, d and the raw log-weights of the batch, checked (no per-token column read)."""
        frame = self._checked(self._lazy(batch).select(*KEYS, "aligned", "d", "log_w0", "log_w1"))
        check_finite(frame)
        return frame

    def raw_log_w1(self, batch: int) -> np.ndarray:
        """The batch's raw log-weights of the candidate alone (for re-reading passes)."""
        return self._lazy(batch).select("log_w1").collect()["log_w1"].to_numpy()


def paired_frame(
    run_dir: Path,
    reference: str,
    candidate: str,
    include_eos: bool,
    sampling_models: Sequence[str],
    num_samples: int,
) -> pl.DataFrame:
    """The whole paired frame of a run, every shard in order (``PairedShards.frame``).

    For tests and small runs: it holds every sequence's row, which the statistics
    stage never does.
    """
    models = list(dict.fromkeys([reference, candidate, *sampling_models]))
    shards = PairedShards(
        shard_parts(run_dir, sampling_models, models),
        reference,
        candidate,
        include_eos,
        tuple(sampling_models),
        num_samples,
    )
    return pl.concat([shards.frame(k) for k in range(len(shards))])


def generation_diagnostics(
    parts: RunParts, sampling_models: Sequence[str], num_samples: int
) -> dict[str, Any]:
    """Length and stop statistics of the samples, and the decode-vs-prefill mismatch.

    ``max_abs_decode_vs_prefill_logprob_diff`` is the largest |decode-time log-prob -
    teacher-forced log-prob under the model that sampled the token|, in nats. Read a
    batch of shards at a time (``parts``, which must list the sampling models' scores)
    and added up; prompts are counted batch by batch (a prompt's samples are all in one
    shard).
    """
    counts = dict.fromkeys(("num_prompts", "num_sequences", "tokens", "stop", "length"), 0)
    largest_diff: float | None = None
    model = pl.col("sample_idx") // num_samples
    prefill = pl.col("prefill_0")
    for m in range(1, len(sampling_models)):
        prefill = pl.when(model == m).then(pl.col(f"prefill_{m}")).otherwise(prefill)
    for batch in range(len(parts)):
        samples = pl.scan_parquet(parts.sample_parts(batch))
        prefills = [
            pl.scan_parquet(parts.score_parts(batch, sampler)).select(
                pl.col("token_logprobs").alias(f"prefill_{m}")
            )
            for m, sampler in enumerate(sampling_models)
        ]
        # Row for row, as in PairedShards (which checks that the keys line up).
        diff = (
            pl.concat(
                [samples.select("sample_idx", pl.col("token_logprobs").alias("decode")), *prefills],
                how="horizontal",
            )
            .select(
                (pl.col("decode") - prefill)
                .list.eval(pl.element().abs())
                .list.max()
                .max()
                .cast(pl.Float64)
            )
            .collect(engine="streaming")
            .item()
        )
        if diff is not None:
            largest_diff = diff if largest_diff is None else max(largest_diff, diff)
        row = (
            samples.select(
                num_prompts=pl.col("prompt_id").n_unique(),
                num_sequences=pl.len(),
                tokens=pl.col("L").sum(),
                stop=(pl.col("finish_reason") == "stop").sum(),
                length=(pl.col("finish_reason") == "length").sum(),
            )
            .collect(engine="streaming")
            .row(0, named=True)
        )
        for key, value in row.items():
            counts[key] += value
    n = counts["num_sequences"]
    return {
        "num_prompts": counts["num_prompts"],
        "num_sequences": n,
        "avg_gen_length": counts["tokens"] / n if n else None,
        "fraction_ended_by_eos": counts["stop"] / n if n else None,
        "fraction_ended_by_length": counts["length"] / n if n else None,
        "max_abs_decode_vs_prefill_logprob_diff": largest_diff,
    }


def _interval_keys(intervals: dict[str, dict[str, float]]) -> dict[str, float]:
    row: dict[str, float] = {}
    for name, parts in intervals.items():
        for part, value in parts.items():
            row.update(with_bits({name: value}, f"_{part}"))
    return row


def per_prompt_table(
    seqs: Sequences, sums: PromptSums, unit: Unit, candidate: str, ess: np.ndarray
) -> pa.Table:
    """Per-prompt estimates with standard errors, and raw-weight ESS (PER_PROMPT_SCHEMA)."""
    errors = per_prompt_errors(seqs, sums, unit, PER_PROMPT_ESTIMATES)
    columns: dict[str, Any] = {
        "candidate": pa.array([candidate] * seqs.num_prompts, pa.string()),
        "prompt_id": seqs.prompt_ids.to_arrow().cast(pa.string()),
        "num_sequences": pa.array(seqs.prompt_size, pa.int64()),
    }
    for name, (values, se) in errors.items():
        # from_pandas: NaN (undefined, e.g. one sequence per prompt) becomes null.
        columns[f"{name}_nats"] = pa.array(values, pa.float64(), from_pandas=True)
        columns[f"{name}_se_nats"] = pa.array(se, pa.float64(), from_pandas=True)
    columns["ess"] = pa.array(ess, pa.float64())
    columns["ess_fraction"] = pa.array(ess / seqs.prompt_size, pa.float64())
    return pa.Table.from_pydict(columns, schema=PER_PROMPT_SCHEMA)


def largest_changes(frame: pl.DataFrame, count: int = TOP_PROMPTS) -> pl.DataFrame:
    """The ``count`` rows with the largest |delta H| / SE (finite ratios only).

    ``frame`` holds per-prompt rows, or earlier results of this function (column
    ``z``), so the top rows of a run are found shard by shard.
    """
    if "z" not in frame.columns:
        frame = frame.select(
            "prompt_id",
            "delta_H_nats",
            "delta_H_se_nats",
            z=pl.col("delta_H_nats") / pl.col("delta_H_se_nats"),
        ).filter(pl.col("z").is_finite())
    top = frame.top_k(count, by=pl.col("z").abs())
    return top.sort(pl.col("z").abs(), "prompt_id", descending=[True, False])


def _spilled(spill: IO[bytes]) -> Iterator[np.ndarray]:
    """The float64 values written to ``spill``, in chunks (one pass)."""
    spill.seek(0)
    while chunk := spill.read(_SPILL_CHUNK):
        yield np.frombuffer(chunk, dtype=np.float64)


def candidate_summary(
    shards: PairedShards, config: RunConfig, write_per_prompt: Callable[[pa.Table], None]
) -> dict[str, Any]:
    """Estimates, intervals, diagnostics and warnings of one candidate, batch by batch.

    The keys are ``registry.candidate_keys()``, in that order. Each batch's per-prompt
    rows (batches of whole shards, see ``RunParts``) go to ``write_per_prompt`` as they
    are computed.
    """
    entropy, weights, uncertainty = config.entropy, config.weights, config.uncertainty
    unit, num_sequences = entropy.unit, shards.num_sequences
    # Pass 1: the raw log-weights (and the checks of keys and finiteness).
    log_weights = LogWeightScan(num_sequences)
    w0_max, batch_prompts = -math.inf, []
    for batch in range(len(shards)):
        frame = shards.log_weights(batch)
        batch_prompts.append(frame["prompt_id"].n_unique())
        if frame.height:
            log_weights.add(frame["log_w1"].to_numpy())
            w0_max = max(w0_max, float(frame["log_w0"].max()))  # type: ignore[arg-type]
    stabiliser, diagnostics, warnings = fit_stabiliser(
        log_weights, weights.mode, weights.clip_threshold
    )
    run_max = {"w0": w0_max, "w1": stabiliser.stabilised_max}
    # Pass 2: each batch's per-prompt sums, added into run totals.
    names, interval_names = atoms_needed(), atoms_needed(INTERVAL_ESTIMATES)
    totals = np.zeros(len(names))
    scatter = np.zeros((len(interval_names), len(interval_names)))
    bootstrap = (
        ClusterBootstrap(batch_prompts, unit, uncertainty.replicates, uncertainty.seed)
        if uncertainty.estimand == "population" and sum(batch_prompts) >= 2
        else None
    )
    weight_totals = WeightTotals(log_weights.max, stabiliser.stabilised_max)
    shape, clipped, position = SampleShape(0, num_sequences, num_sequences), 0, 0
    top = pl.DataFrame()
    # On the run's disk: a temporary folder may be memory (tmpfs).
    with tempfile.TemporaryFile(dir=shards.parts.run_dir) as prompt_ess_spill:
        for batch in range(len(shards)):
            frame = shards.frame(batch)
            if not frame.height:
                continue
            log_w1 = frame["log_w1"].to_numpy()
            clipped += stabiliser.count_clipped(log_w1)
            seqs = prepare(
                frame.with_columns(log_w=pl.Series(stabiliser.apply(log_w1, position))), run_max
            )
            position += seqs.num_sequences
            sums = prompt_sums(seqs, names)
            totals += sums.run_totals()
            if uncertainty.estimand == "prompt_set":
                scatter += stratum_scatter(seqs, interval_names)
            if bootstrap is not None:
                bootstrap.add(batch, sums)
            prompt_ess = weight_totals.add(seqs)
            prompt_ess_spill.write(prompt_ess.tobytes())
            table = per_prompt_table(seqs, sums, unit, shards.candidate, prompt_ess)
            write_per_prompt(table)
            top = largest_changes(pl.concat([top, largest_changes(pl.from_arrow(table))]))
            shape = shape.combine(seqs.shape)
        prompt_ess_quantiles = exact_quantiles(
            lambda: _spilled(prompt_ess_spill), PROMPT_ESS_QUANTILES, max_gathered=_MAX_GATHERED
        )
    log_weight_quantiles = exact_quantiles(
        lambda: (shards.raw_log_w1(batch) for batch in range(len(shards))),
        LOG_WEIGHT_QUANTILES,
        max_gathered=_MAX_GATHERED,
    )
    means = means_from_totals(names, totals)
    values = {k: float(v) for k, v in estimates_from_means(means, unit).items()}
    if uncertainty.estimand == "prompt_set":
        errors = prompt_set_standard_errors(scatter, interval_names, means, num_sequences, unit)
        intervals = wald_intervals(values, errors, uncertainty.level)
    elif bootstrap is not None:
        intervals = bootstrap.intervals(uncertainty.level)
    else:
        nothing = {"se": math.nan, "low": math.nan, "high": math.nan}
        intervals = {e.name: nothing for e in INTERVAL_ESTIMATES}
    if stabiliser.mode == "clip":
        diagnostics["fraction_clipped"] = clipped / num_sequences
    row: dict[str, Any] = {
        **with_bits(values),
        **_interval_keys(intervals),
        **diagnostics,
        **weight_totals.diagnostics(prompt_ess_quantiles, log_weight_quantiles),
    }
    row["prompts_largest_delta_H"] = top.to_dicts()
    row["warnings"] = [
        *warnings,
        *weight_warnings(row, weights.min_ess_fraction, shards.reference, shards.candidate),
        *interval_warnings(shape, uncertainty.estimand),
    ]
    return {key: row[key] for key in candidate_keys()}


def uncertainty_method(config: RunConfig) -> str:
    """How the intervals were computed, in words (recorded in the summary)."""
    u = config.uncertainty
    if u.estimand == "prompt_set":
        return (
            "prompt_set: value for this prompt set; linearised (influence-function) "
            "variance from within-prompt deviations, jackknife for covariances, Wald "
            f"intervals at level {u.level}"
        )
    return (
        f"population: value for the population of prompts; cluster bootstrap over "
        f"prompts, {u.replicates} replicates, seed {u.seed}, percentile intervals at "
        f"level {u.level}"
    )


def compute_summary(run_dir: Path, config: RunConfig) -> dict[str, Any]:
    """The summary of a run under ``config``'s statistics options.

    Also writes ``per_prompt.parquet`` (every candidate's per-prompt estimates) into
    ``run_dir``, atomically, shard by shard.
    """
    reference, entropy = config.reference_model, config.entropy
    sampling, num_samples = config.sampling_models, config.sampling.num_samples
    models = list(dict.fromkeys([reference, *config.candidates, *sampling]))
    parts = shard_parts(run_dir, sampling, models)
    candidates = {}
    per_prompt_fields = {
        "content": "per_prompt",
        "unit": entropy.unit,
        "include_eos": str(entropy.include_eos),
    }
    with table_writer(
        run_dir / PER_PROMPT_PARQUET, PER_PROMPT_SCHEMA, per_prompt_fields
    ) as write_per_prompt:
        for name in config.candidates:
            shards = PairedShards(
                parts, reference, name, entropy.include_eos, tuple(sampling), num_samples
            )
            try:
                candidates[name] = candidate_summary(shards, config, write_per_prompt)
            except PipelineError as err:
                raise PipelineError(f"candidate {name!r}: {err}") from None
    first = config.candidates[0]
    return {
        "unit": entropy.unit,
        "include_eos": entropy.include_eos,
        "reference_model": reference,
        "sampling_models": list(sampling),
        **generation_diagnostics(parts, sampling, num_samples),
        "uncertainty_estimand": config.uncertainty.estimand,
        "uncertainty_method": uncertainty_method(config),
        "statistics_options": {
            section: getattr(config, section).model_dump(mode="json") for section in STATS_SECTIONS
        },
        "candidate": first,
        **candidates[first],
        "warnings": [f"{name}: {w}" for name, c in candidates.items() for w in c["warnings"]],
        "candidates": candidates,
    }


def _json_safe(value: Any) -> Any:
    """NaN and infinities (e.g. dH1 of a run with one sample per prompt) become null."""
    if isinstance(value, float | np.floating) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    return value


def write_summary(run_dir: Path, summary: dict[str, Any]) -> Path:
    """Write ``summary.json`` and ``summary.parquet`` atomically into ``run_dir``.

    The Parquet file has one row per candidate (SUMMARY_SCHEMA: the run's keys, the
    candidate's estimates, intervals and diagnostics), so a folder of runs laid out by
    date is one ``pl.scan_parquet("**/summary.parquet", hive_partitioning=True)`` away
    from a history table. Non-finite numbers are written as null.
    """
    summary = _json_safe(summary)
    write_json(summary, run_dir / SUMMARY)
    columns = set(SUMMARY_SCHEMA.names)
    run = {k.name: summary.get(k.name) for k in RUN_KEYS if k.name in columns}
    rows = [
        {
            "candidate": name,
            **run,
            **{k: v for k, v in estimates.items() if k in columns},
            "num_warnings": len(estimates["warnings"]),
        }
        for name, estimates in summary["candidates"].items()
    ]
    table = pa.Table.from_pylist(rows, schema=SUMMARY_SCHEMA)
    write_table(table, run_dir / SUMMARY_PARQUET, {"content": "summary"})
    return run_dir / SUMMARY
