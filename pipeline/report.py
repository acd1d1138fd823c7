"""Report: the summary as a readable terminal table (rows from the estimate registry)."""

from __future__ import annotations

from typing import Any

from pipeline.stats.registry import ESTIMATES, NATS_PER_BIT, Unit

# Values closer to 0 than this (nats) are rounding error of differences, shown as 0.
_ROUNDING = 1e-12


def _number(value: Any) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        if abs(value) < _ROUNDING:
            return "0"
        return f"{value:.6g}" if abs(value) < 1e-3 else f"{value:.4f}"
    return str(value)


def _row(label: str, value: Any, unit: str = "") -> str:
    return f"  {label:<36} {_number(value):>12}  {unit}"


def _estimate_rows(est: dict[str, Any], unit: Unit, names: dict[str, str]) -> list[str]:
    rows = []
    for e in ESTIMATES:
        value = est[f"{e.name}_nats"]
        # The unit padded, so that the intervals line up in one column.
        line = _row(e.label.format(**names), value, f"{e.value_unit(unit):<10}")
        if e.interval:
            line += (
                f"  ± {_number(est[f'{e.name}_se_nats'])} "
                f"[{_number(est[f'{e.name}_low_nats'])}, {_number(est[f'{e.name}_high_nats'])}]"
            )
        if value is not None:
            line += f"  ({_number(value / NATS_PER_BIT)} bits)"
        rows.append(line)
    return rows


def _weight_rows(est: dict[str, Any]) -> list[str]:
    lines = [
        _row("ESS, raw weights", est["ess"]),
        _row("ESS / N", est["ess_fraction"]),
    ]
    if est["weights_mode"] != "none":
        lines.append(
            _row(f"ESS / N, {est['weights_mode']} weights", est["ess_stabilised_fraction"])
        )
    lines += [
        _row(
            "per-prompt ESS min / 5% / median",
            f"{_number(est['prompt_ess_min'])} / {_number(est['prompt_ess_p05'])} / "
            f"{_number(est['prompt_ess_median'])}",
        ),
        _row(
            "mean weight (expect 1) ± SE, z",
            f"{_number(est['mean_weight'])} ± {_number(est['mean_weight_se'])}, "
            f"z = {_number(est['mean_weight_z'])}",
        ),
        _row(
            "log-weight min / median / max",
            f"{est['log_weight_min']:.3f} / {est['log_weight_median']:.3f} / "
            f"{est['log_weight_max']:.3f}",
        ),
    ]
    if est["pareto_k"] is not None:
        k = f"{est['pareto_k']:.3f} ({est['pareto_k_threshold']:.3f})"
        lines.append(_row("Pareto k-hat (threshold)", k))
    else:
        lines.append(_row("Pareto k-hat", "n/a") + f"  {est['pareto_k_note']}")
    if est["weights_mode"] == "clip":
        lines.append(_row("fraction clipped", est["fraction_clipped"]))
    return lines


def _prompt_rows(est: dict[str, Any], unit: str) -> list[str]:
    if not est["prompts_largest_delta_H"]:
        return []
    lines = ["  prompts with the largest |delta H| / SE:"]
    for p in est["prompts_largest_delta_H"]:
        lines.append(
            f"    {p['prompt_id']:<34} {_number(p['delta_H_nats']):>10} ± "
            f"{_number(p['delta_H_se_nats'])} {unit}  (z = {p['z']:.1f})"
        )
    return lines


def format_summary(summary: dict[str, Any]) -> str:
    """Lines of the terminal report: one block per candidate, then run diagnostics."""
    unit = summary["unit"]
    short = {"sequence": "nats/seq", "per_token": "nats/token"}[unit]
    level = summary["statistics_options"]["uncertainty"]["level"]
    reference = summary["reference_model"]
    lines = [
        f"entropy-pipeline summary  (unit: {unit}, include_eos: "
        f"{str(summary['include_eos']).lower()}, reference: {reference}, sampled by: "
        f"{', '.join(summary['sampling_models'])})",
        f"uncertainty: {summary['uncertainty_method']}",
        _row("prompts", summary["num_prompts"]),
        _row("sequences", summary["num_sequences"]),
    ]
    for name, est in summary["candidates"].items():
        names = {"reference": reference, "candidate": name}
        lines.append(
            f"candidate {name} vs {reference}   (estimate ± SE [{level:.0%} interval], "
            f"{summary['uncertainty_estimand']})"
        )
        lines += _estimate_rows(est, unit, names)
        lines.append(f"  weights ({est['weights_mode']})")
        lines += _weight_rows(est)
        lines += _prompt_rows(est, short)
    lines += [
        "samples",
        _row("mean generation length", summary["avg_gen_length"], "tokens"),
        _row("ended by EOS / stop token", summary["fraction_ended_by_eos"]),
        _row("ended by length limit", summary["fraction_ended_by_length"]),
        _row(
            "max |decode - prefill| log-prob",
            summary["max_abs_decode_vs_prefill_logprob_diff"],
            "nats",
        ),
    ]
    lines += [f"WARNING {warning}" for warning in summary["warnings"]]
    return "\n".join(line.rstrip() for line in lines)
