"""History: every run's summary under a folder, as one table and one plot.

Each finished run leaves ``summary.parquet`` (one row per candidate, declared schema
``SUMMARY_SCHEMA``). The default run layout ``runs/date=YYYY-MM-DD/run=HHMMSS-hash/``
is Hive-partitioned, so Polars scans a season of nights in one call and filters by
date (a partition) and candidate (a column) without opening the rest.

A run enters the history only when its summary describes the data beside it: the
manifest says ``complete``, and the summary carries the manifest's identity (config
hash, start time, and run id where the manifest records one). A run being written
(locked), unfinished, damaged, or whose summary belongs to other data is skipped with
the reason; it never fails the whole history. Summaries written by older versions,
with fewer columns, are read with the missing columns as null, so one history spans
schema changes.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.artifacts import (
    MANIFEST,
    SUMMARY_PARQUET,
    SUMMARY_SCHEMA,
    read_manifest,
)
from pipeline.errors import PipelineError
from pipeline.lock import check_not_locked

_ESTIMATES = (("H0", "H(p0)"), ("H1", "H(p1)"), ("delta_H", "delta H"))

# summary.parquet column -> the manifest key that must hold the same value.
_IDENTITY = {"config_hash": "config_hash", "run_started_at": "started_at", "run_id": "run_id"}

# Statistics options shown on each row, those the summaries record.
_OPTIONS = (
    ("unit", "unit"),
    ("include_eos", "EOS"),
    ("weights_mode", "weights"),
    ("uncertainty_estimand", "estimand"),
)


@dataclass(frozen=True)
class History:
    """The rows of the readable runs, and the runs left out with the reason."""

    table: pl.DataFrame  # SUMMARY_SCHEMA columns, run_dir and started_at; oldest first
    skipped: list[tuple[Path, str]]


def check_output_path(path: Path, option: str) -> None:
    """Refuse an output file that cannot be written: a folder, or a path under a file.

    Checked before anything is read or written, so a typo costs nothing.
    """
    if path.is_dir():
        raise PipelineError(f"{option} {path} is a folder; name the file to write.")
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise PipelineError(
                    f"{option} {path}: {parent} is a file, not a folder; choose another path."
                )
            return


def _in_current_schema(table: pa.Table) -> pl.DataFrame:
    """A summary of any version in SUMMARY_SCHEMA: columns it lacks are null."""
    columns = []
    for field in SUMMARY_SCHEMA:
        if field.name not in table.column_names:
            columns.append(pa.nulls(table.num_rows, field.type))
            continue
        try:
            columns.append(table[field.name].cast(field.type))
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            raise PipelineError(
                f"its {SUMMARY_PARQUET} has column {field.name} of type "
                f"{table.schema.field(field.name).type}, not {field.type}"
            ) from None
    return pl.DataFrame(pa.Table.from_arrays(columns, schema=SUMMARY_SCHEMA))


def _read_run(run_dir: Path) -> pl.DataFrame:
    """The summary rows of one run, or PipelineError saying why they cannot be shown."""
    check_not_locked(run_dir)
    manifest = read_manifest(run_dir, any_version=True)
    if manifest.get("status") != "complete":
        raise PipelineError(
            f"it did not finish (status {manifest.get('status')!r}): it is running, was "
            "interrupted, or failed"
        )
    path = run_dir / SUMMARY_PARQUET
    if not path.is_file():
        raise PipelineError(f"it has no {SUMMARY_PARQUET}")
    try:
        # partitioning=None: the run's date= and run= folders are not columns here.
        table = pq.read_table(path, partitioning=None)
    except Exception as err:  # pyarrow raises several types for damaged files
        raise PipelineError(f"its {SUMMARY_PARQUET} is damaged ({err})") from None
    if table.num_rows == 0:
        raise PipelineError(f"its {SUMMARY_PARQUET} holds no rows")
    frame = _in_current_schema(table)
    recorded = {column: key for column, key in _IDENTITY.items() if key in manifest}
    if not recorded:
        raise PipelineError(f"its {MANIFEST} records no run identity to check the summary by")
    for column, key in recorded.items():
        found = frame[column].unique().to_list()
        if found != [manifest[key]]:
            raise PipelineError(
                f"its {SUMMARY_PARQUET} is not the summary of the data beside it ({column} "
                f"{', '.join(map(repr, found))}, manifest {key} {manifest[key]!r}); run "
                "`entropy-pipeline stats` on it to recompute the summary"
            )
    return frame.with_columns(run_dir=pl.lit(str(run_dir)))


def gather_history(runs_root: Path) -> History:
    """Every run under ``runs_root``: rows (run, candidate) oldest first, and the skipped.

    Raises
    ------
    PipelineError
        When ``runs_root`` is missing, is a file, or holds no run directory.
    """
    if not runs_root.exists():
        raise PipelineError(
            f"{runs_root} does not exist; pass the folder that holds the run directories "
            "(by default `runs`)."
        )
    if not runs_root.is_dir():
        raise PipelineError(
            f"{runs_root} is a file; pass the folder that holds the run directories."
        )
    run_dirs = sorted(
        {path.parent for name in (SUMMARY_PARQUET, MANIFEST) for path in runs_root.rglob(name)}
    )
    if not run_dirs:
        raise PipelineError(
            f"no {SUMMARY_PARQUET} under {runs_root}: no finished run is stored there."
        )
    frames, skipped = [], []
    for run_dir in run_dirs:
        try:
            frames.append(_read_run(run_dir))
        except PipelineError as err:
            skipped.append((run_dir, str(err).rstrip(".")))
    if not frames:
        frames.append(
            _in_current_schema(SUMMARY_SCHEMA.empty_table()).with_columns(
                run_dir=pl.lit(None, pl.String)
            )
        )
    table = (
        pl.concat(frames)
        .with_columns(started_at=pl.col("run_started_at").str.to_datetime(time_zone="UTC"))
        .sort("started_at", "candidate", nulls_last=True)
    )
    return History(table=table, skipped=skipped)


def format_history(history: pl.DataFrame) -> str:
    """The history as a terminal table (estimates in each run's own unit)."""
    table = history.select(
        pl.col("started_at").dt.strftime("%Y-%m-%d %H:%M").alias("started (UTC)"),
        pl.col("run_dir").str.split("/").list.last().alias("run"),
        "candidate",
        *(pl.col(column).alias(label) for column, label in _OPTIONS if column in history.columns),
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

    from pipeline.figures import save_png

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
    try:
        return save_png(figure, path)
    finally:
        plt.close(figure)
