"""The step-size sweep: delta H(eta) of interpolated models against the first-order line.

A sweep (``models.<name>: {from, to, etas}``) scores theta(eta) = theta0 + eta
(theta1 - theta0) for several eta, each an ordinary candidate scored on the reference's
samples, so every point uses the same draws. When ``from`` is the reference model,
delta H(eta) = H(theta(eta)) - H(theta0), and the first-order line is eta x dH1, where
dH1 is the first-order term (``delta_H1``) of the candidate at eta = 1, i.e. of theta1
itself; without eta = 1 in the sweep, of the candidate ``to`` names, when ``to`` is a
candidate of the run. (dH1 is the slope of delta H along p0^(1 - e) p1^e at e = 0; the
log-ratio of theta(eta) is eta times theta1's to first order in the weights, so a step
in the linear regime has delta H(eta) close to eta x dH1 for small eta, and the points
depart from the line as eta grows.) The figure ``sweep.png`` and the table show each
point with its interval (the run's ``uncertainty`` settings), the line with the
interval of dH1 scaled by eta, and the effective sample size, which falls as the
candidate moves away from the sampling model.

Interpolations whose ``from`` is not the reference (by name) are not drawn: their delta
H at eta = 0 is not 0 and the line has no meaning for them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.config import Interpolation, RunConfig
from pipeline.figures import save_png
from pipeline.stats.registry import ESTIMATES, Unit

SWEEP_FIGURE = "sweep.png"
_DELTA_H = next(e for e in ESTIMATES if e.name == "delta_H")


@dataclass(frozen=True)
class SweepPoint:
    """One eta of a sweep: the candidate's delta H with its interval (nats), its weights.

    ``reliable`` is false when the run warns about the candidate's importance weights:
    Pareto k-hat above its threshold, or ESS / N below ``weights.min_ess_fraction``.
    """

    candidate: str
    eta: float
    delta_h: float
    delta_h_se: float | None
    delta_h_low: float | None
    delta_h_high: float | None
    ess_fraction: float | None
    pareto_k: float | None
    reliable: bool


@dataclass(frozen=True)
class SweepSeries:
    """The interpolations of one pair (``from`` the reference, ``to``), by increasing eta.

    ``slope_candidate`` is the candidate whose first-order term dH1 (``slope``, nats,
    with its interval) makes the line eta x dH1; None when the run has none (see the
    module notes).
    """

    start: str
    end: str
    points: list[SweepPoint]
    slope_candidate: str | None
    slope: float | None
    slope_low: float | None
    slope_high: float | None


def _reliable(estimates: dict[str, Any], min_ess_fraction: float) -> bool:
    """False when the run warns about the weights (k-hat, or ESS / N; missing: no warning)."""
    ess = estimates["ess_fraction"]
    return not estimates["pareto_k_exceeded"] and not (ess is not None and ess < min_ess_fraction)


def sweep_series(config: RunConfig, summary: dict[str, Any]) -> list[SweepSeries]:
    """The sweeps of a run: its interpolation candidates from the reference, by ``to``."""
    reference, min_ess = config.reference_model, config.weights.min_ess_fraction
    groups: dict[str, list[tuple[str, Interpolation]]] = {}
    for name in config.candidates:
        model = config.models[name]
        if isinstance(model, Interpolation) and model.start == reference:
            groups.setdefault(model.end, []).append((name, model))
    estimates = summary["candidates"]
    series = []
    for end, members in groups.items():
        points = sorted(
            (
                SweepPoint(
                    candidate=name,
                    eta=model.eta,
                    delta_h=estimates[name]["delta_H_nats"],
                    delta_h_se=estimates[name]["delta_H_se_nats"],
                    delta_h_low=estimates[name]["delta_H_low_nats"],
                    delta_h_high=estimates[name]["delta_H_high_nats"],
                    ess_fraction=estimates[name]["ess_fraction"],
                    pareto_k=estimates[name]["pareto_k"],
                    reliable=_reliable(estimates[name], min_ess),
                )
                for name, model in members
            ),
            key=lambda point: point.eta,
        )
        at_one = [point.candidate for point in points if point.eta == 1.0]
        source = at_one[0] if at_one else (end if end in estimates else None)
        slope = estimates[source] if source is not None else {}
        series.append(
            SweepSeries(
                start=reference,
                end=end,
                points=points,
                slope_candidate=source,
                slope=slope.get("delta_H1_nats"),
                slope_low=slope.get("delta_H1_low_nats"),
                slope_high=slope.get("delta_H1_high_nats"),
            )
        )
    return series


def _end_label(end: str) -> str:
    return Path(end).name if "/" in end else end


def _number(value: float | None, digits: int = 4) -> str:
    return "n/a" if value is None else f"{value:+.{digits}f}"


def format_sweeps(series: list[SweepSeries], unit: Unit) -> str:
    """The sweeps as a terminal table: delta H(eta), eta x dH1, their difference, ESS / N."""
    value_unit = _DELTA_H.value_unit(unit)
    blocks = []
    for sweep in series:
        if sweep.slope is None:
            line = "no first-order line: the sweep has no eta = 1 and `to` is no candidate"
        else:
            line = (
                f"first-order line eta x dH1, dH1 = {_number(sweep.slope)} "
                f"[{_number(sweep.slope_low)}, {_number(sweep.slope_high)}] {value_unit} "
                f"(of {sweep.slope_candidate})"
            )
        rows = [
            f"step-size sweep {sweep.start} -> {_end_label(sweep.end)} "
            f"(theta0 + eta (theta1 - theta0)); {line}",
            f"  {'eta':>6}  {'delta H':>9}  {'± SE':>7}  {'eta x dH1':>9}  "
            f"{'difference':>10}  {'ESS/N':>5}  {'k-hat':>5}   ({value_unit})",
        ]
        for point in sweep.points:
            linear = None if sweep.slope is None else point.eta * sweep.slope
            difference = None if linear is None else point.delta_h - linear
            se = "n/a" if point.delta_h_se is None else f"{point.delta_h_se:.4f}"
            ess = "n/a" if point.ess_fraction is None else f"{point.ess_fraction:.2f}"
            k_hat = "n/a" if point.pareto_k is None else f"{point.pareto_k:.2f}"
            rows.append(
                f"  {point.eta:>6g}  {_number(point.delta_h):>9}  {se:>7}  "
                f"{_number(linear):>9}  {_number(difference):>10}  {ess:>5}  {k_hat:>5}"
                + ("" if point.reliable else "   unreliable weights (see the warnings)")
            )
        blocks.append("\n".join(rows))
    return "\n\n".join(blocks)


def plot_sweeps(
    series: list[SweepSeries],
    unit: Unit,
    level: float,
    min_ess_fraction: float,
    title: str,
    path: Path,
) -> Path:
    """Write the sweep figure to ``path`` (PNG, atomically).

    Top: delta H(eta) with its ``level`` intervals, the reference at (0, 0) and the
    line eta x dH1 with the band eta x [dH1 low, dH1 high]. Bottom: ESS / N of each
    point (raw weights) and the ``min_ess_fraction`` below which the run warns. Points
    whose weights the run warns about are drawn hollow.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    figure, (top, bottom) = plt.subplots(
        2, 1, figsize=(7.5, 6.5), sharex=True, gridspec_kw={"height_ratios": [3, 1]}
    )
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for index, sweep in enumerate(series):
        colour = colours[index % len(colours)]
        etas = np.array([p.eta for p in sweep.points])
        values = np.array([p.delta_h for p in sweep.points])
        low = np.array([np.nan if p.delta_h_low is None else p.delta_h_low for p in sweep.points])
        high = np.array(
            [np.nan if p.delta_h_high is None else p.delta_h_high for p in sweep.points]
        )
        name = f"{sweep.start} → {_end_label(sweep.end)}: " if len(series) > 1 else ""
        if sweep.slope is not None:
            line_etas = np.linspace(min(0.0, etas.min()), etas.max(), 100)
            top.plot(
                line_etas,
                line_etas * sweep.slope,
                linestyle="--",
                color=colour,
                label=rf"{name}first order $\eta\,\delta H_1$ "
                rf"($\delta H_1$ of {sweep.slope_candidate})",
            )
            if sweep.slope_low is not None and sweep.slope_high is not None:
                top.fill_between(
                    line_etas,
                    line_etas * sweep.slope_low,
                    line_etas * sweep.slope_high,
                    color=colour,
                    alpha=0.15,
                    linewidth=0,
                    label=rf"$\eta \times$ {level:.0%} interval of $\delta H_1$",
                )
        reliable = np.array([p.reliable for p in sweep.points])
        for shown, hollow, label in (
            (reliable, False, rf"{name}$\Delta H(\eta)$, {level:.0%} interval"),
            (~reliable, True, f"{name}unreliable weights (Pareto k or ESS warning)"),
        ):
            if shown.any():
                top.errorbar(
                    etas[shown],
                    values[shown],
                    yerr=np.vstack([values - low, high - values])[:, shown],
                    fmt="o",
                    color=colour,
                    markerfacecolor="white" if hollow else colour,
                    capsize=4,
                    label=label,
                )
        bottom.plot(etas, [p.ess_fraction for p in sweep.points], "-", color=colour)
        for shown, hollow in ((reliable, False), (~reliable, True)):
            bottom.plot(
                etas[shown],
                [p.ess_fraction for p, keep in zip(sweep.points, shown, strict=True) if keep],
                "o",
                color=colour,
                markerfacecolor="white" if hollow else colour,
            )
    etas = sorted({0.0, *(p.eta for sweep in series for p in sweep.points)})
    bottom.set_xticks(etas, [f"{eta:g}" for eta in etas])
    bottom.axhline(
        min_ess_fraction, color="grey", linestyle=":", linewidth=1, label="warning threshold"
    )
    bottom.legend(fontsize="small", loc="lower left")
    top.plot(
        [0.0],
        [0.0],
        marker="s",
        color="black",
        linestyle="none",
        label=r"$\eta = 0$: $\theta_0$ itself",
    )
    top.axhline(0.0, color="grey", linewidth=0.6)
    top.set_ylabel(rf"$\Delta H = H(\theta_\eta) - H(\theta_0)$  [{_DELTA_H.value_unit(unit)}]")
    top.set_title(title, fontsize="medium")
    top.legend(fontsize="small")
    top.grid(alpha=0.3)
    bottom.set_ylim(0.0, 1.05)
    bottom.set_ylabel("ESS / N")
    bottom.set_xlabel(
        r"step size $\eta$   ($\theta_\eta = \theta_0 + \eta\,(\theta_1 - \theta_0)$)"
    )
    bottom.grid(alpha=0.3)
    figure.tight_layout()
    try:
        return save_png(figure, path, dpi=120)
    finally:
        plt.close(figure)


def write_sweep(run_dir: Path, config: RunConfig, summary: dict[str, Any]) -> str | None:
    """Draw ``sweep.png`` into ``run_dir`` and return the sweep table; None without a sweep."""
    series = sweep_series(config, summary)
    if not series:
        return None
    unit = summary["unit"]
    titles = ", ".join(rf"$\theta_0$ = {s.start}, $\theta_1$ = {_end_label(s.end)}" for s in series)
    title = (
        f"Step-size sweep: {titles}\n{summary['num_prompts']} prompts, "
        f"{summary['num_sequences']} sampled sequences, unit {unit}"
    )
    plot_sweeps(
        series,
        unit,
        config.uncertainty.level,
        config.weights.min_ess_fraction,
        title,
        run_dir / SWEEP_FIGURE,
    )
    return format_sweeps(series, unit)
