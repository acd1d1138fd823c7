"""report.png on synthetic run directories: a valid PNG of the expected size, and panels
that show what the summary and per_prompt.parquet hold, for 1 prompt and for many; the
log-weight histograms counted shard by shard, and the per-prompt rows read beyond the
row limit (every k-th)."""

from __future__ import annotations

import shutil
import struct
from pathlib import Path

import numpy as np
import polars as pl
import pytest

import pipeline.figures
from pipeline.artifacts import scores_dir
from pipeline.config import RunConfig, load_config
from pipeline.figures import (
    MAX_LABELLED_PROMPTS,
    REPORT_FIGURE,
    log_weight_histograms,
    per_prompt_rows,
    plot_report,
    write_report_figure,
)
from pipeline.stats.summary import PER_PROMPT_PARQUET, compute_summary, paired_frame
from tests.conftest import DEFAULT_CONFIG, TINY_P1
from tests.synthetic import write_run

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _png_size(path: Path) -> tuple[int, int]:
    """Width and height in pixels, from the PNG's IHDR chunk (right after the signature)."""
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def _run(
    tmp_path: Path,
    prompts: int,
    per_model: int = 4,
    models: tuple[str, ...] = ("p0", "p1"),
    sampling: tuple[str, ...] = ("p0",),
) -> tuple[Path, dict, object]:
    run_dir = write_run(tmp_path, list(models), list(sampling), prompts, per_model)
    overrides = [f"sampling.num_samples={per_model}", f"sampling.models=[{', '.join(sampling)}]"]
    if len(models) > 2:
        overrides += [f"models.{m}.path={TINY_P1}" for m in models[2:]]
    config = load_config(DEFAULT_CONFIG, overrides)
    return run_dir, compute_summary(run_dir, config), config


@pytest.mark.parametrize(
    ("prompts", "height"),
    [
        # 100 dpi, 15 in wide; 1.8 in + 0.21 in per labelled row, at least 5 in.
        (1, 500),
        (42, round(100 * (1.8 + 0.21 * 42))),
        # Beyond MAX_LABELLED_PROMPTS the sorted band is drawn at the height of 20 rows.
        (MAX_LABELLED_PROMPTS + 20, round(100 * (1.8 + 0.21 * 20))),
    ],
)
def test_report_figure_is_a_png_beside_the_summary(
    tmp_path: Path, prompts: int, height: int
) -> None:
    run_dir, summary, config = _run(tmp_path, prompts)
    path = write_report_figure(run_dir, summary, config)
    assert path == run_dir / REPORT_FIGURE
    assert _png_size(path) == (1500, height)
    assert not list(run_dir.glob(".*.tmp-*"))


def _panels(tmp_path: Path, prompts: int, **run: object) -> tuple[object, dict, pl.DataFrame]:
    run_dir, summary, config = _run(tmp_path, prompts, **run)
    per_prompt = pl.read_parquet(run_dir / PER_PROMPT_PARQUET)
    figure = plot_report(
        log_weight_histograms(run_dir, summary, config), per_prompt_rows(run_dir, summary), summary
    )
    return figure, summary, per_prompt


def _all_log_weights(run_dir: Path, name: str, config: RunConfig) -> np.ndarray:
    """Every sequence's log w1 of candidate ``name``, all in memory (fine for a test)."""
    return paired_frame(
        run_dir,
        "p0",
        name,
        config.entropy.include_eos,
        config.sampling_models,
        config.sampling.num_samples,
    )["log_w1"].to_numpy()


def test_few_prompts_are_labelled_rows_sorted_by_delta_h(tmp_path: Path) -> None:
    figure, summary, per_prompt = _panels(tmp_path, prompts=7)
    weights, deltas = figure.axes
    expected = per_prompt.sort("delta_H_nats")["prompt_id"].to_list()
    assert [label.get_text() for label in deltas.get_yticklabels()] == expected
    # The histogram counts every sequence once (filled steps, then their outline).
    filled, outline = weights.patches
    assert filled.get_data().values.sum() == summary["num_sequences"] == 7 * 4
    np.testing.assert_array_equal(outline.get_data().values, filled.get_data().values)
    legend = [text.get_text() for text in weights.get_legend().get_texts()]
    est = summary["candidates"]["p1"]
    assert legend == [
        f"p1: ESS {est['ess']:,.1f} of 28, ESS/N {est['ess_fraction']:.2f}"
        + (f", Pareto k̂ {est['pareto_k']:.2f}" if est["pareto_k"] is not None else "")
    ]
    assert weights.get_xlabel() == "log w = S(p1) \N{MINUS SIGN} S(p0)  (nats per sequence)"
    assert deltas.get_xlabel() == "ΔH = H(p1) \N{MINUS SIGN} H(p0)  (nats/seq)"


def test_one_prompt(tmp_path: Path) -> None:
    figure, _, per_prompt = _panels(tmp_path, prompts=1)
    deltas = figure.axes[1]
    assert [label.get_text() for label in deltas.get_yticklabels()] == per_prompt[
        "prompt_id"
    ].to_list()


def test_many_prompts_are_a_sorted_band_without_labels(tmp_path: Path) -> None:
    prompts = MAX_LABELLED_PROMPTS + 5
    figure, _, per_prompt = _panels(tmp_path, prompts=prompts)
    deltas = figure.axes[1]
    assert len(deltas.get_yticks()) == 0
    assert deltas.get_ylabel() == f"{prompts} prompts, sorted by ΔH"
    (line,) = [line for line in deltas.get_lines() if line.get_label().endswith("(sorted)")]
    np.testing.assert_array_equal(line.get_xdata(), np.sort(per_prompt["delta_H_nats"]))


def test_mixture_sampling_and_two_candidates(tmp_path: Path) -> None:
    figure, _, per_prompt = _panels(
        tmp_path, prompts=3, models=("p0", "p1", "p2"), sampling=("p0", "p1")
    )
    weights, deltas = figure.axes
    assert weights.get_xlabel() == "log w = S(candidate) \N{MINUS SIGN} log q  (nats per sequence)"
    assert weights.get_title().endswith("the mixture of p0, p1")
    legend = [text.get_text() for text in weights.get_legend().get_texts()]
    assert [entry.split(":")[0] for entry in legend] == ["p1", "p2"]
    # Each candidate's histogram counts all its sequences: 3 prompts x 2 samplers x 4.
    assert [patch.get_data().values.sum() for patch in weights.patches[::2]] == [24, 24]
    # One row per prompt, in the first candidate's order of delta H; candidate j of M
    # is shifted by (j - (M - 1) / 2) min(0.6 / M, 0.25) = -+0.125 for M = 2.
    order = per_prompt.filter(candidate="p1").sort("delta_H_nats")["prompt_id"].to_list()
    for name, shift, bars in zip(["p1", "p2"], [-0.125, 0.125], deltas.containers, strict=True):
        line = bars.lines[0]
        expected = per_prompt.filter(candidate=name).select("prompt_id", "delta_H_nats").rows()
        assert sorted(zip(line.get_ydata(), line.get_xdata(), strict=True)) == sorted(
            (order.index(prompt) + shift, value) for prompt, value in expected
        )
    (legend,) = figure.legends  # the per-prompt panel's, under it
    labels = [text.get_text() for text in legend.get_texts()]
    assert [label.split(",")[0] for label in labels] == ["p1", "p2", "p1", "p2"]


def test_log_weight_histograms_summed_over_shards_count_every_sequence(tmp_path: Path) -> None:
    # Three shards, mixture sampling, two candidates: the bins are common to both.
    run_dir = write_run(tmp_path, ["p0", "p1", "p2"], ["p0", "p1"], 9, 4, shards=3)
    config = load_config(
        DEFAULT_CONFIG,
        ["sampling.num_samples=4", "sampling.models=[p0, p1]", f"models.p2.path={TINY_P1}"],
    )
    summary = compute_summary(run_dir, config)
    histograms = log_weight_histograms(run_dir, summary, config)
    everything = {name: _all_log_weights(run_dir, name, config) for name in ("p1", "p2")}
    n = summary["num_sequences"]
    assert histograms.num_sequences == n == 9 * 2 * 4
    edges = histograms.edges
    # p1 holds the smallest log-weight and p2 the largest: both set the common range.
    assert everything["p1"].min() < everything["p2"].min()
    assert everything["p2"].max() > everything["p1"].max()
    # Rice's rule: ceil(2 * 72^(1/3)) = 9 equal bins over the range of both candidates.
    assert len(edges) == 9 + 1
    np.testing.assert_allclose(np.diff(edges), np.diff(edges)[0])
    assert edges[0] == min(values.min() for values in everything.values())
    assert edges[-1] == max(values.max() for values in everything.values())
    assert list(histograms.counts) == ["p1", "p2"]
    for name, values in everything.items():
        counts = histograms.counts[name]
        assert counts.sum() == n
        np.testing.assert_array_equal(counts, np.histogram(values, bins=edges)[0])


def test_log_weights_all_equal_still_draw(tmp_path: Path) -> None:
    # The candidate's scores are the reference's: log w = 0 for every sequence.
    run_dir = write_run(tmp_path, ["p0", "p1"], ["p0"], 5, 4)
    for part in scores_dir(run_dir, "p0").glob("part-*.parquet"):
        shutil.copyfile(part, scores_dir(run_dir, "p1") / part.name)
    config = load_config(DEFAULT_CONFIG, ["sampling.num_samples=4", "sampling.models=[p0]"])
    summary = compute_summary(run_dir, config)
    assert summary["log_weight_min"] == summary["log_weight_max"] == 0.0
    histograms = log_weight_histograms(run_dir, summary, config)
    # Rice's rule gives ceil(2 * 20^(1/3)) = 6 bins, over -0.5 .. 0.5 around the value.
    np.testing.assert_allclose(histograms.edges, np.linspace(-0.5, 0.5, 6 + 1))
    assert sorted(histograms.counts["p1"].tolist()) == [0] * 5 + [20]  # all in one bin
    assert _png_size(write_report_figure(run_dir, summary, config)) == (1500, 500)


@pytest.mark.parametrize(
    ("limit", "step", "label"),
    [
        (7, 6, "40 prompts (every 6th shown), sorted by ΔH"),
        (20, 2, "40 prompts (every 2nd shown), sorted by ΔH"),
        (40, 1, "40 prompts, sorted by ΔH"),
    ],
)
def test_beyond_the_row_limit_every_kth_prompt_is_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, limit: int, step: int, label: str
) -> None:
    monkeypatch.setattr(pipeline.figures, "MAX_LABELLED_PROMPTS", 5)
    monkeypatch.setattr(pipeline.figures, "MAX_DRAWN_PROMPTS", limit)
    run_dir, summary, config = _run(tmp_path, 40, models=("p0", "p1", "p2"))
    every = pl.read_parquet(run_dir / PER_PROMPT_PARQUET)
    rows = per_prompt_rows(run_dir, summary)
    assert (rows.num_prompts, rows.step) == (40, step)
    shown = -(-40 // step)  # rows 0, k, 2k, ... of 40
    assert rows.rows.height == 2 * shown <= 2 * limit
    figure = plot_report(log_weight_histograms(run_dir, summary, config), rows, summary)
    deltas = figure.axes[1]
    assert deltas.get_ylabel() == label
    assert deltas.get_ylim() == (-0.5, shown - 0.5)
    lines = [line for line in deltas.get_lines() if line.get_label().endswith("(sorted)")]
    for name, line in zip(["p1", "p2"], lines, strict=True):
        # Rows 0, k, 2k, ... of the candidate's rows in the file's order, then sorted.
        expected = every.filter(candidate=name)["delta_H_nats"].to_numpy()[::step]
        np.testing.assert_array_equal(line.get_xdata(), np.sort(expected))
