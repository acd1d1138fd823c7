"""History: every run's summary under a folder, as one table and one plot.

Each finished run leaves ``summary.parquet`` (one row per candidate, declared schema
``SUMMARY_SCHEMA``). The default run layout ``runs/date=YYYY-MM-DD/run=HHMMSS-hash/``
is Hive-partitioned, so Polars scans a season of nights in one call and filters by
date (a partition) and candidate (a column) without opening the rest.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl

from pipeline.artifacts import SUMMARY_PARQUET, SUMMARY_SCHEMA, scan_checked
from pipeline.errors import PipelineError

_ESTIMATES = (("H0", "H(p0)"), ("H1", "H(p1)"), ("delta_H", "delta H"))


def gather_history(runs_root: Path) -> pl.DataFrame:
    """One row per (run, candidate), oldest first, with ``run_dir`` and ``started_at``."""
    files = sorted(runs_root.rglob(SUMMARY_PARQUET))
    if not files:
        raise PipelineError(
            f"no {SUMMARY_PARQUET} under {runs_root}: no finished run is stored there."
        )
    return (
        scan_checked(files, SUMMARY_SCHEMA, include_file_paths="summary_path")
        .with_columns(
            run_dir=pl.col("summary_path").str.strip_suffix(f"/{SUMMARY_PARQUET}"),
            started_at=pl.col("run_started_at").str.to_datetime(time_zone="UTC"),
        )
        .drop("summary_path")
        .sort("started_at", "candidate")
        .collect()
    )


def format_history(history: pl.DataFrame) -> str:
    """The history as a terminal table (estimates in each run's own unit)."""
    table = history.select(
        pl.col("started_at").dt.strftime("%Y-%m-%d %H:%M").alias("started (UTC)"),
        pl.col("run_dir").str.split("/").list.last().alias("run"),
        "candidate",
        "unit",
        pl.col("H0_nats").round(4).alias("H0"),
        pl.col("H1_nats").round(4).alias("H1"),
        pl.col("delta_H_nats").round(4).alias("delta H"),
        pl.col("delta_H_se_nats").round(4).alias("SE"),
        pl.col("ess_fraction").round(3).alias("ESS/N"),
        pl.col("num_warnings").alias("warnings"),
    )
    with pl.Config(
        tbl_rows=-1,
        tbl_cols=-1,
        tbl_width_chars=160,
        tbl_hide_dataframe_shape=True,
        tbl_hide_column_data_types=True,
    ):
        return str(table)


def plot_history(history: pl.DataFrame, path: Path) -> Path:
    """PNG of H0, H1 and delta H (nats) with their intervals over time, per candidate.

    One column of panels per unit present in the history, since sequence and per-token
    entropies cannot share an axis.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    units = history["unit"].unique(maintain_order=True).to_list()
    figure, axes = plt.subplots(
        len(_ESTIMATES), len(units), figsize=(6 * len(units), 8), squeeze=False, sharex=True
    )
    for column, unit in enumerate(units):
        in_unit = history.filter(pl.col("unit") == unit)
        for row, (name, label) in enumerate(_ESTIMATES):
            axis = axes[row][column]
            for candidate in in_unit["candidate"].unique(maintain_order=True).to_list():
                series = in_unit.filter(pl.col("candidate") == candidate)
                value = series[f"{name}_nats"].to_numpy()
                error = np.vstack(
                    [
                        value - series[f"{name}_low_nats"].to_numpy(),
                        series[f"{name}_high_nats"].to_numpy() - value,
                    ]
                )
                axis.errorbar(
                    series["started_at"].to_numpy(),
                    value,
                    yerr=error,
                    marker="o",
                    capsize=3,
                    label=candidate,
                )
            axis.set_ylabel(f"{label} (nats/{'seq' if unit == 'sequence' else 'token'})")
            if name == "delta_H":
                axis.axhline(0.0, color="grey", linewidth=0.8)
            axis.legend(fontsize="small")
        axes[0][column].set_title(f"unit: {unit}")
        axes[-1][column].set_xlabel("run started (UTC)")
    figure.autofmt_xdate()
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp.png")
    figure.savefig(temporary, dpi=100)
    plt.close(figure)
    temporary.replace(path)
    return path
