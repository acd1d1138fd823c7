"""The per-run figure ``report.png``: how far the weights stray, and delta H prompt by prompt.

The stats step draws it beside ``summary.json`` (``run`` and ``stats`` both call
``write_report_figure``) from the run's own files, with matplotlib's Agg backend (no
display needed), in memory that does not grow with the run: like the statistics stage
(``pipeline.stats.summary``), it reads the sequences one shard at a time and keeps a
bounded number of per-prompt rows. Two panels:

* **Log-weights.** The histogram of log w = S1 - log q over every sampled sequence,
  one per candidate, where S1 is the candidate's full-sequence log-prob and q the
  proposal: the reference alone (log q = S0, so log w = S1 - S0) or the equal mixture
  of the sampling models (``PairedShards.raw_log_w1``, the log-weights the estimates
  use). The counts are added up shard by shard on bin edges shared by all candidates
  that need no pass of their own: equal bins from the smallest to the largest
  log-weight of any candidate (the summary's exact ``log_weight_min`` and
  ``log_weight_max``), ceil(2 N^(1/3)) of them for N sequences (Rice's rule), at
  least ``_MIN_BINS`` and at most ``_MAX_BINS``. The legend gives the summary's ESS =
  (sum w)^2 / sum w^2, ESS/N and Pareto k-hat. A narrow peak at 0 means p1 is close
  to the proposal; a long right tail means a few sequences carry most of the weight
  and ESS/N is small.
* **Per-prompt delta H.** Each prompt's delta H (``per_prompt.parquet``, in the run's
  unit) with the interval estimate +- z SE, where SE is the prompt's within-prompt
  standard error and z the normal quantile of ``uncertainty.level``; the run's delta H
  and its interval are the shaded band. Up to ``MAX_LABELLED_PROMPTS`` prompts, one
  labelled row each, sorted by delta H; beyond, the sorted values as a line with their
  interval band, without labels, of at most ``MAX_DRAWN_PROMPTS`` prompts: every k-th
  row of each candidate, k = ceil(prompts / ``MAX_DRAWN_PROMPTS``), read lazily. The
  file's rows are the shards in order, prompt ids sorted within a batch, so these are
  the same prompts for every candidate, spread evenly over the run, and their sorted
  line traces the run's distribution of per-prompt delta H.

Public API: ``REPORT_FIGURE``, ``MAX_LABELLED_PROMPTS``, ``MAX_DRAWN_PROMPTS``,
``LogWeightHistograms``, ``log_weight_histograms``, ``PerPromptRows``,
``per_prompt_rows``, ``write_report_figure``, ``plot_report``, ``save_png``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from statistics import NormalDist
from typing import TYPE_CHECKING, Any

import numpy as np
import polars as pl

from pipeline.artifacts import PER_PROMPT_PARQUET, _temporary_name
from pipeline.config import RunConfig
from pipeline.errors import naming
from pipeline.stats.summary import PairedShards, shard_parts

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

REPORT_FIGURE = "report.png"
# More prompts than this are drawn as a sorted band: row labels would not be legible.
MAX_LABELLED_PROMPTS = 60
# Per-prompt rows read per candidate for the band, at most: several per pixel row of
# the panel (a few hundred), so the sorted line looks as it would with every prompt,
# while memory stays the same however many prompts the run has.
MAX_DRAWN_PROMPTS = 2_000
# Histogram bins: Rice's rule ceil(2 N^(1/3)), which needs only N (no pass over the
# values), within these bounds.
_MIN_BINS = 5
_MAX_BINS = 80
_LABEL_CHARACTERS = 28
# The typographic minus sign, as matplotlib draws negative tick labels.
_MINUS = " \N{MINUS SIGN} "
_UNIT_LABEL = {"sequence": "nats/seq", "per_token": "nats/token"}


@dataclass(frozen=True)
class LogWeightHistograms:
    """What the log-weight panel draws: one histogram of log w per candidate.

    ``edges``: the bin edges in nats, shared by all candidates. ``counts``: per
    candidate (in ``summary["candidates"]`` order), the sequences in each bin.
    ``num_sequences``: N, the sampled sequences each candidate's histogram counts.
    """

    edges: np.ndarray
    counts: dict[str, np.ndarray]
    num_sequences: int


@dataclass(frozen=True)
class PerPromptRows:
    """What the per-prompt panel draws: ``per_prompt.parquet``'s rows, or every k-th.

    ``rows`` holds the columns ``candidate``, ``delta_H_nats`` and ``delta_H_se_nats``
    (in the run's unit), and ``prompt_id`` when the prompts are labelled
    (``num_prompts`` <= ``MAX_LABELLED_PROMPTS``): then every row of every candidate.
    Otherwise rows 0, k, 2k, ... of each candidate, in the file's order, k = ``step``.
    """

    rows: pl.DataFrame
    num_prompts: int
    step: int

    @property
    def labelled(self) -> bool:
        """Whether the panel has one labelled row per prompt."""
        return self.num_prompts <= MAX_LABELLED_PROMPTS


def _bin_edges(low: float, high: float, num_sequences: int) -> np.ndarray:
    """Equal bins from ``low`` to ``high`` (nats), both edges exactly the given values."""
    bins = min(max(math.ceil(2 * math.cbrt(num_sequences)), _MIN_BINS), _MAX_BINS)
    if low == high:
        # One value throughout (e.g. log w = 0 when p1 is the proposal): a unit-wide
        # range around it, as np.histogram makes for such data.
        low, high = low - 0.5, high + 0.5
    return np.linspace(low, high, bins + 1)


def log_weight_histograms(
    run_dir: Path, summary: dict[str, Any], config: RunConfig
) -> LogWeightHistograms:
    """Histograms of every candidate's log w1 (nats), counted one shard at a time.

    ``config`` is the one the summary was computed under (its sampling models and
    ``include_eos``); the bins span the summary's ``log_weight_min`` ..
    ``log_weight_max`` of all candidates. Holds one shard's log-weights at a time.
    """
    reference, names = summary["reference_model"], list(summary["candidates"])
    sampling = config.sampling_models
    parts = shard_parts(run_dir, sampling, list(dict.fromkeys([reference, *names, *sampling])))
    shards = {
        name: PairedShards(
            parts,
            reference,
            name,
            config.entropy.include_eos,
            tuple(sampling),
            config.sampling.num_samples,
        )
        for name in names
    }
    num_sequences = shards[names[0]].num_sequences
    edges = _bin_edges(
        min(summary["candidates"][name]["log_weight_min"] for name in names),
        max(summary["candidates"][name]["log_weight_max"] for name in names),
        num_sequences,
    )
    counts = {}
    for name, paired in shards.items():
        counts[name] = np.zeros(len(edges) - 1, dtype=np.int64)
        for shard in range(len(paired)):
            counts[name] += np.histogram(paired.raw_log_w1(shard), bins=edges)[0]
    return LogWeightHistograms(edges, counts, num_sequences)


def per_prompt_rows(run_dir: Path, summary: dict[str, Any]) -> PerPromptRows:
    """The rows of ``per_prompt.parquet`` the per-prompt panel draws, read lazily.

    All of them up to ``MAX_LABELLED_PROMPTS`` prompts; beyond, at most
    ``MAX_DRAWN_PROMPTS`` per candidate (every k-th), so memory does not grow with the
    number of prompts. The number of prompts is counted without loading the rows.
    """
    scan = pl.scan_parquet(run_dir / PER_PROMPT_PARQUET)
    names = list(summary["candidates"])
    counts = dict(scan.group_by("candidate").agg(pl.len()).collect(engine="streaming").iter_rows())
    # Every candidate has a row for each of the run's prompts.
    prompts = max(counts.get(name, 0) for name in names)
    values = ["delta_H_nats", "delta_H_se_nats"]
    if prompts <= MAX_LABELLED_PROMPTS:
        return PerPromptRows(scan.select("candidate", "prompt_id", *values).collect(), prompts, 1)
    # One step for all candidates, so they show the same prompts.
    step = math.ceil(prompts / MAX_DRAWN_PROMPTS)
    rows = pl.concat(
        [
            scan.filter(pl.col("candidate") == name)
            .select("candidate", *values)
            .gather_every(step)
            .collect(engine="streaming")
            for name in names
        ]
    )
    return PerPromptRows(rows, prompts, step)


def _candidate(summary: dict[str, Any]) -> str:
    """The candidate in axis labels: its name when there is one, else "candidate"."""
    names = list(summary["candidates"])
    return names[0] if len(names) == 1 else "candidate"


def _count(number: int, noun: str) -> str:
    """``1 prompt``, ``1,200 prompts``."""
    return f"{number:,} {noun}{'' if number == 1 else 's'}"


def _ordinal(number: int) -> str:
    """``2nd``, ``13th``, ``1,001st``."""
    suffix = "th"
    if not 11 <= number % 100 <= 13:
        suffix = {1: "st", 2: "nd", 3: "rd"}.get(number % 10, "th")
    return f"{number:,}{suffix}"


def _interval(est: dict[str, Any]) -> str:
    """``-0.583 [-1.08, -0.0846]``, or the value alone when it has no interval."""
    text = f"{est['delta_H_nats']:.3g}"
    if est["delta_H_low_nats"] is not None:
        text += f" [{est['delta_H_low_nats']:.3g}, {est['delta_H_high_nats']:.3g}]"
    return text


def _weights_panel(axis: Axes, histograms: LogWeightHistograms, summary: dict[str, Any]) -> None:
    reference, sampling = summary["reference_model"], summary["sampling_models"]
    edges, n = histograms.edges, histograms.num_sequences
    for j, (name, counts) in enumerate(histograms.counts.items()):
        est = summary["candidates"][name]
        label = f"{name}: ESS {est['ess']:,.1f} of {n:,}, ESS/N {est['ess_fraction']:.2f}"
        if est["pareto_k"] is not None:
            label += f", Pareto k̂ {est['pareto_k']:.2f}"
        axis.stairs(counts, edges, fill=True, alpha=0.3, color=f"C{j}", label=label)
        axis.stairs(counts, edges, linewidth=1.2, color=f"C{j}")
    axis.axvline(0.0, color="grey", linestyle="--", linewidth=0.8)
    candidate = _candidate(summary)
    if sampling == [reference]:
        axis.set_xlabel(f"log w = S({candidate}){_MINUS}S({reference})  (nats per sequence)")
        proposal = reference
    else:
        axis.set_xlabel(f"log w = S({candidate}){_MINUS}log q  (nats per sequence)")
        proposal = f"the mixture of {', '.join(sampling)}"
    axis.set_ylabel("sequences")
    axis.set_title(f"Importance log-weights of the samples from {proposal}")
    axis.margins(y=0.15)  # room above the tallest bar for the legend
    axis.legend(loc="best")


def _per_prompt_panel(axis: Axes, per_prompt: PerPromptRows, summary: dict[str, Any]) -> None:
    level = summary["statistics_options"]["uncertainty"]["level"]
    z = NormalDist().inv_cdf(0.5 + level / 2)
    unit = _UNIT_LABEL[summary["unit"]]
    names = list(summary["candidates"])
    prompts, labelled = per_prompt.num_prompts, per_prompt.labelled
    order: list[str] = []
    if labelled:
        # Rows in the first candidate's order of delta H, so the others read against it.
        order = (
            per_prompt.rows.filter(pl.col("candidate") == names[0])
            .sort("delta_H_nats", nulls_last=True)["prompt_id"]
            .to_list()
        )
    rank = {prompt: i for i, prompt in enumerate(order)}
    offsets = (np.arange(len(names)) - (len(names) - 1) / 2) * min(0.6 / len(names), 0.25)
    shown = 0
    for j, name in enumerate(names):
        rows = per_prompt.rows.filter(pl.col("candidate") == name)
        est, color = summary["candidates"][name], f"C{j}"
        if est["delta_H_low_nats"] is not None:
            axis.axvspan(est["delta_H_low_nats"], est["delta_H_high_nats"], color=color, alpha=0.12)
        axis.axvline(
            est["delta_H_nats"],
            color=color,
            linewidth=1.2,
            label=f"{name}, all prompts: ΔH = {_interval(est)} {unit}",
        )
        if not labelled:
            rows = rows.sort("delta_H_nats", nulls_last=True)
        value = rows["delta_H_nats"].to_numpy()
        half = z * rows["delta_H_se_nats"].fill_null(np.nan).to_numpy()
        if labelled:
            y = np.array([rank[p] for p in rows["prompt_id"].to_list()]) + offsets[j]
            axis.errorbar(
                value,
                y,
                xerr=half,
                fmt="o",
                markersize=3.5,
                color=color,
                elinewidth=1,
                capsize=2,
                label=f"{name}, per prompt",
            )
        else:
            y = np.arange(len(value))
            shown = max(shown, len(value))
            axis.fill_betweenx(y, value - half, value + half, color=color, alpha=0.3, linewidth=0)
            axis.plot(value, y, color=color, linewidth=1, label=f"{name}, per prompt (sorted)")
    axis.axvline(0.0, color="grey", linestyle="--", linewidth=0.8)
    if labelled:
        axis.set_yticks(range(len(order)))
        axis.set_yticklabels(
            [p if len(p) <= _LABEL_CHARACTERS else p[: _LABEL_CHARACTERS - 1] + "…" for p in order],
            fontsize="small" if prompts <= 30 else "x-small",
        )
        axis.set_ylim(len(order) - 0.5, -0.5)
    else:
        axis.set_yticks([])  # ranks: the label says what the axis holds
        every = f" (every {_ordinal(per_prompt.step)} shown)" if per_prompt.step > 1 else ""
        axis.set_ylabel(f"{prompts:,} prompts{every}, sorted by ΔH")
        axis.set_ylim(-0.5, shown - 0.5)
    axis.set_xlabel(
        f"ΔH = H({_candidate(summary)}){_MINUS}H({summary['reference_model']})  ({unit})"
    )
    axis.set_title(f"ΔH per prompt ± {z:.2f} within-prompt SE ({level:.0%}); band: all prompts")
    # Under the panel, where it hides no prompt (the layout makes room for it).
    axis.figure.legend(
        *axis.get_legend_handles_labels(), loc="outside lower right", ncols=2, frameon=False
    )


def plot_report(
    histograms: LogWeightHistograms, per_prompt: PerPromptRows, summary: dict[str, Any]
) -> Figure:
    """The report figure from the log-weight histograms and the per-prompt rows.

    Parameters
    ----------
    histograms
        Per candidate (in ``summary["candidates"]`` order), the counts of log w (nats)
        on common bins (``log_weight_histograms``).
    per_prompt
        The rows of ``per_prompt.parquet`` to draw (``per_prompt_rows``).
    summary
        The run's summary (``compute_summary``), for names, units, ESS and intervals.
    """
    from matplotlib.figure import Figure

    rows = per_prompt.num_prompts if per_prompt.labelled else 20
    figure = Figure(figsize=(15, max(5.0, 1.8 + 0.21 * rows)), layout="constrained")
    weights, deltas = figure.subplots(1, 2, width_ratios=[1, 1.15])
    _weights_panel(weights, histograms, summary)
    _per_prompt_panel(deltas, per_prompt, summary)
    figure.suptitle(
        f"{', '.join(summary['candidates'])} vs {summary['reference_model']}: "
        f"{_count(summary['num_prompts'], 'prompt')}, "
        f"{_count(summary['num_sequences'], 'sequence')} "
        f"(unit: {summary['unit']}, include_eos: {str(summary['include_eos']).lower()})",
        fontsize="large",
    )
    return figure


def save_png(figure: Figure, path: Path, dpi: int = 100) -> Path:
    """Write ``figure`` to ``path`` as PNG atomically (temporary file, then rename)."""
    temporary = _temporary_name(path)
    try:
        with naming(path):
            figure.savefig(temporary, dpi=dpi, format="png")
            temporary.replace(path)
    finally:
        temporary.unlink(missing_ok=True)
    return path


def write_report_figure(run_dir: Path, summary: dict[str, Any], config: RunConfig) -> Path:
    """Draw ``report.png`` into ``run_dir`` from its scores and ``per_prompt.parquet``.

    ``config`` is the one the summary was computed under (its sampling models and
    ``include_eos``). Memory does not grow with the run (one shard's log-weights, at
    most ``MAX_DRAWN_PROMPTS`` per-prompt rows per candidate). Returns the figure's path.
    """
    figure = plot_report(
        log_weight_histograms(run_dir, summary, config), per_prompt_rows(run_dir, summary), summary
    )
    return save_png(figure, run_dir / REPORT_FIGURE)
