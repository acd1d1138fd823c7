"""The step-size sweep's series, table and figure, from a config and a summary."""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

import pytest

from pipeline.config import RunConfig, load_config
from pipeline.sweep import SWEEP_FIGURE, format_sweeps, sweep_series, write_sweep
from tests.conftest import ROOT

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _config(tmp_path: Path, models: str, overrides: tuple[str, ...] = ()) -> RunConfig:
    path = tmp_path / "run.yaml"
    path.write_text(
        f"prompts:\n  path: {ROOT / 'data' / 'prompts.jsonl'}\nmodels:\n  p0: {{path: m0}}\n"
        + textwrap.indent(textwrap.dedent(models), "  ")
    )
    return load_config(path, list(overrides))


def _estimates(
    delta_h: float, delta_h1: float, ess_fraction: float, pareto_k: float = 0.25
) -> dict[str, Any]:
    """A candidate's summary entry: SE 0.1, intervals +-0.2, for both estimates."""
    return {
        "pareto_k": pareto_k,
        "pareto_k_exceeded": pareto_k > 0.7,
        "delta_H_nats": delta_h,
        "delta_H_se_nats": 0.1,
        "delta_H_low_nats": delta_h - 0.2,
        "delta_H_high_nats": delta_h + 0.2,
        "delta_H1_nats": delta_h1,
        "delta_H1_low_nats": delta_h1 - 0.2,
        "delta_H1_high_nats": delta_h1 + 0.2,
        "ess_fraction": ess_fraction,
    }


def _summary(candidates: dict[str, dict[str, Any]]) -> dict[str, Any]:
    return {"unit": "sequence", "num_prompts": 4, "num_sequences": 16, "candidates": candidates}


def test_a_sweep_is_drawn_against_the_first_order_term_at_eta_1(tmp_path: Path) -> None:
    config = _config(
        tmp_path,
        """\
        s: {from: p0, to: m1, etas: [2, 0.5, 1]}
        elsewhere: {from: m1, to: m2, eta: 0.5}
        """,
    )
    summary = _summary(
        {
            "s@eta=2": _estimates(-1.5, -0.9, 0.35, pareto_k=0.81),
            "s@eta=0.5": _estimates(-0.25, -0.21, 0.94),
            "s@eta=1": _estimates(-0.6, -0.45, 0.75),
            "elsewhere": _estimates(9.0, 9.0, 1.0),
        }
    )
    (series,) = sweep_series(config, summary)  # `elsewhere` does not start at p0
    assert (series.start, series.end) == ("p0", str(tmp_path / "m1"))
    assert [p.eta for p in series.points] == [0.5, 1.0, 2.0]
    assert [p.candidate for p in series.points] == ["s@eta=0.5", "s@eta=1", "s@eta=2"]
    assert (series.slope_candidate, series.slope) == ("s@eta=1", -0.45)
    assert (series.slope_low, series.slope_high) == (-0.65, -0.25)
    # difference = delta H - eta x dH1: -0.25 - 0.5 (-0.45) = -0.025; -1.5 - 2 (-0.45) = -0.6
    assert format_sweeps([series], "sequence").splitlines() == [
        "step-size sweep p0 -> m1 (theta0 + eta (theta1 - theta0)); first-order line eta x "
        "dH1, dH1 = -0.4500 [-0.6500, -0.2500] nats/seq (of s@eta=1)",
        "     eta    delta H     ± SE  eta x dH1  difference  ESS/N  k-hat   (nats/seq)",
        "     0.5    -0.2500   0.1000    -0.2250     -0.0250   0.94   0.25",
        "       1    -0.6000   0.1000    -0.4500     -0.1500   0.75   0.25",
        "       2    -1.5000   0.1000    -0.9000     -0.6000   0.35   0.81"
        "   unreliable weights (see the warnings)",
    ]
    assert [p.reliable for p in series.points] == [True, True, False]

    table = write_sweep(tmp_path, config, summary)
    assert table == format_sweeps([series], "sequence")
    assert (tmp_path / SWEEP_FIGURE).read_bytes().startswith(PNG_SIGNATURE)


@pytest.mark.parametrize(
    ("to", "slope_candidate"),
    [("p1", "p1"), ("m1", None)],
    ids=["to-a-candidate", "to-a-folder"],
)
def test_without_eta_1_the_line_comes_from_the_to_model_if_it_is_a_candidate(
    tmp_path: Path, to: str, slope_candidate: str | None
) -> None:
    config = _config(tmp_path, f"p1: {{path: m1}}\ns: {{from: p0, to: {to}, etas: [0.5]}}\n")
    summary = _summary(
        {"p1": _estimates(-0.6, -0.45, 0.75), "s@eta=0.5": _estimates(-0.25, -0.21, 0.94)}
    )
    (series,) = sweep_series(config, summary)
    assert series.slope_candidate == slope_candidate
    table = write_sweep(tmp_path, config, summary)
    assert table is not None
    if slope_candidate is None:
        assert series.slope is None
        assert "no first-order line" in table
        assert "     0.5    -0.2500   0.1000        n/a         n/a   0.94   0.25" in table
    else:
        assert series.slope == -0.45
    assert (tmp_path / SWEEP_FIGURE).is_file()


def test_a_point_below_the_ess_threshold_is_unreliable(tmp_path: Path) -> None:
    config = _config(tmp_path, "s: {from: p0, to: m1, etas: [1]}\n")
    summary = _summary({"s@eta=1": _estimates(-0.6, -0.45, 0.09)})
    ((point,),) = [series.points for series in sweep_series(config, summary)]
    assert not point.reliable  # weights.min_ess_fraction is 0.1
    config = _config(
        tmp_path, "s: {from: p0, to: m1, etas: [1]}\n", ("weights.min_ess_fraction=0.05",)
    )
    ((point,),) = [series.points for series in sweep_series(config, summary)]
    assert point.reliable


def test_a_run_without_interpolations_draws_no_sweep(tmp_path: Path) -> None:
    config = _config(tmp_path, "p1: {path: m1}\n")
    assert write_sweep(tmp_path, config, _summary({"p1": _estimates(-0.6, -0.45, 0.75)})) is None
    assert not (tmp_path / SWEEP_FIGURE).exists()
