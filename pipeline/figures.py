"""The per-run figure ``report.png``: how far the weights stray, and delta H prompt by prompt.

The stats step draws it beside ``summary.json`` (``run`` and ``stats`` both call
``write_report_figure``) from the run's own files, with matplotlib's Agg backend (no
display needed). Two panels:

* **Log-weights.** The histogram of log w = S1 - log q over every sampled sequence,
  one per candidate, where S1 is the candidate's full-sequence log-prob and q the
  proposal: the reference alone (log q = S0, so log w = S1 - S0) or the equal mixture
  of the sampling models (``pipeline.stats.summary.paired_frame``, which the estimates
  use too). The legend gives the summary's ESS = (sum w)^2 / sum w^2, ESS/N and Pareto
  k-hat. A narrow peak at 0 means p1 is close to the proposal; a long right tail means a
  few sequences carry most of the weight and ESS/N is small.
* **Per-prompt delta H.** Each prompt's delta H (``per_prompt.parquet``, in the run's
  unit) with the interval estimate +- z SE, where SE is the prompt's within-prompt
  standard error and z the normal quantile of ``uncertainty.level``; the run's delta H
  and its interval are the shaded band. Up to ``MAX_LABELLED_PROMPTS`` prompts, one
  labelled row each, sorted by delta H; beyond, the sorted values as a line with their
  interval band, without labels.

Public API: ``REPORT_FIGURE``, ``MAX_LABELLED_PROMPTS``, ``write_report_figure``,
``plot_report``, ``save_png``.
"""

from __future__ import annotations

from pathlib import Path
from statistics import NormalDist
from typing import TYPE_CHECKING, Any

import numpy as np
import polars as pl

from pipeline.artifacts import PER_PROMPT_PARQUET, _temporary_name
from pipeline.config import RunConfig
from pipeline.errors import naming
from pipeline.stats.summary import paired_frame

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

REPORT_FIGURE = "report.png"
# More prompts than this are drawn as a sorted band: row labels would not be legible.
MAX_LABELLED_PROMPTS = 60
# Histogram bins: numpy's "auto" rule, at most this many.
_MAX_BINS = 80
_LABEL_CHARACTERS = 28
# The typographic minus sign, as matplotlib draws negative tick labels.
_MINUS = " \N{MINUS SIGN} "
_UNIT_LABEL = {"sequence": "nats/seq", "per_token": "nats/token"}


def _log_weights(
    run_dir: Path, summary: dict[str, Any], config: RunConfig
) -> dict[str, np.ndarray]:
    """Per candidate, log w1 of every sampled sequence (nats), as the estimates use it."""
    reference = summary["reference_model"]
    return {
        name: paired_frame(
            run_dir,
            reference,
            name,
            config.entropy.include_eos,
            config.sampling_models,
            config.sampling.num_samples,
        )["log_w1"].to_numpy()
        for name in summary["candidates"]
    }


def _candidate(summary: dict[str, Any]) -> str:
    """The candidate in axis labels: its name when there is one, else "candidate"."""
    names = list(summary["candidates"])
    return names[0] if len(names) == 1 else "candidate"


def _count(number: int, noun: str) -> str:
    """``1 prompt``, ``1,200 prompts``."""
    return f"{number:,} {noun}{'' if number == 1 else 's'}"


def _interval(est: dict[str, Any]) -> str:
    """``-0.583 [-1.08, -0.0846]``, or the value alone when it has no interval."""
    text = f"{est['delta_H_nats']:.3g}"
    if est["delta_H_low_nats"] is not None:
        text += f" [{est['delta_H_low_nats']:.3g}, {est['delta_H_high_nats']:.3g}]"
    return text


def _bin_edges(values: np.ndarray) -> np.ndarray:
    edges = np.histogram_bin_edges(values, bins="auto")
    if len(edges) - 1 > _MAX_BINS:
        edges = np.linspace(edges[0], edges[-1], _MAX_BINS + 1)
    return edges


def _weights_panel(axis: Axes, log_weights: dict[str, np.ndarray], summary: dict[str, Any]) -> None:
    reference, sampling = summary["reference_model"], summary["sampling_models"]
    edges = _bin_edges(np.concatenate(list(log_weights.values())))
    for j, (name, values) in enumerate(log_weights.items()):
        est = summary["candidates"][name]
        label = f"{name}: ESS {est['ess']:,.1f} of {len(values):,}, ESS/N {est['ess_fraction']:.2f}"
        if est["pareto_k"] is not None:
            label += f", Pareto k̂ {est['pareto_k']:.2f}"
        counts, _ = np.histogram(values, bins=edges)
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


def _per_prompt_panel(axis: Axes, per_prompt: pl.DataFrame, summary: dict[str, Any]) -> None:
    level = summary["statistics_options"]["uncertainty"]["level"]
    z = NormalDist().inv_cdf(0.5 + level / 2)
    unit = _UNIT_LABEL[summary["unit"]]
    names = list(summary["candidates"])
    prompts = per_prompt["prompt_id"].n_unique()
    labelled = prompts <= MAX_LABELLED_PROMPTS
    # Rows in the first candidate's order of delta H, so the others read against it.
    order = (
        per_prompt.filter(pl.col("candidate") == names[0])
        .sort("delta_H_nats", nulls_last=True)["prompt_id"]
        .to_list()
    )
    rank = {prompt: i for i, prompt in enumerate(order)}
    offsets = (np.arange(len(names)) - (len(names) - 1) / 2) * min(0.6 / len(names), 0.25)
    for j, name in enumerate(names):
        rows = per_prompt.filter(pl.col("candidate") == name)
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
        axis.set_ylabel(f"{prompts:,} prompts, sorted by ΔH")
        axis.set_ylim(-0.5, prompts - 0.5)
    axis.set_xlabel(
        f"ΔH = H({_candidate(summary)}){_MINUS}H({summary['reference_model']})  ({unit})"
    )
    axis.set_title(f"ΔH per prompt ± {z:.2f} within-prompt SE ({level:.0%}); band: all prompts")
    # Under the panel, where it hides no prompt (the layout makes room for it).
    axis.figure.legend(
        *axis.get_legend_handles_labels(), loc="outside lower right", ncols=2, frameon=False
    )


def plot_report(
    log_weights: dict[str, np.ndarray], per_prompt: pl.DataFrame, summary: dict[str, Any]
) -> Figure:
    """The report figure from the candidates' log-weights and the per-prompt table.

    Parameters
    ----------
    log_weights
        Per candidate (in ``summary["candidates"]`` order), log w of every sequence, nats.
    per_prompt
        ``per_prompt.parquet``'s columns ``candidate``, ``prompt_id``,
        ``delta_H_nats`` and ``delta_H_se_nats`` (in the run's unit).
    summary
        The run's summary (``compute_summary``), for names, units, ESS and intervals.
    """
    from matplotlib.figure import Figure

    prompts = per_prompt["prompt_id"].n_unique()
    rows = prompts if prompts <= MAX_LABELLED_PROMPTS else 20
    figure = Figure(figsize=(15, max(5.0, 1.8 + 0.21 * rows)), layout="constrained")
    weights, deltas = figure.subplots(1, 2, width_ratios=[1, 1.15])
    _weights_panel(weights, log_weights, summary)
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
    ``include_eos``). Returns the figure's path.
    """
    per_prompt = pl.read_parquet(
        run_dir / PER_PROMPT_PARQUET,
        columns=["candidate", "prompt_id", "delta_H_nats", "delta_H_se_nats"],
    )
    figure = plot_report(_log_weights(run_dir, summary, config), per_prompt, summary)
    return save_png(figure, run_dir / REPORT_FIGURE)
