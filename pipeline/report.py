"""Report: the summary as a readable terminal table."""

from __future__ import annotations

from typing import Any

_UNIT_LABEL = {"sequence": "nats/seq", "per_token": "nats/token"}


def _number(value: Any) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.6g}" if abs(value) < 1e-3 and value != 0 else f"{value:.4f}"
    return str(value)


def _row(label: str, value: Any, unit: str = "") -> str:
    return f"  {label:<34} {_number(value):>12}  {unit}".rstrip()


def _interval_row(label: str, est: dict[str, Any], name: str, unit: str, level: float) -> str:
    return (
        f"{_row(label, est[f'{name}_nats'], unit)}   ± {_number(est[f'{name}_se_nats'])} "
        f"[{_number(est[f'{name}_low_nats'])}, {_number(est[f'{name}_high_nats'])}] "
        f"({level:.0%})"
    )


def format_summary(summary: dict[str, Any]) -> str:
    """Lines of the terminal report: one block per candidate, then run diagnostics."""
    unit = _UNIT_LABEL[summary["unit"]]
    level = summary["statistics_options"]["uncertainty"]["level"]
    lines = [
        f"entropy-pipeline summary  (unit: {summary['unit']}, include_eos: "
        f"{str(summary['include_eos']).lower()}, reference: {summary['reference_model']})",
        _row("prompts", summary["num_prompts"]),
        _row("sequences", summary["num_sequences"]),
    ]
    for name, est in summary["candidates"].items():
        lines += [
            f"candidate {name} vs {summary['reference_model']}   "
            f"(estimate ± SE [interval], cluster bootstrap over prompts)",
            _interval_row("H(p0)", est, "H0", unit, level),
            _interval_row("H(p1)  SNIS", est, "H1", unit, level),
            _interval_row("delta H = H(p1) - H(p0)", est, "delta_H", unit, level),
            _row("delta H", est["delta_H_bits"], unit.replace("nats", "bits")),
            _interval_row("KL(p1 || p0)  SNIS", est, "kl", unit, level),
            _interval_row("first-order delta H1", est, "delta_H1", unit, level),
            _row("identity -Cov(w,l0) - KL", est["identity_delta_H_nats"], unit),
            _row("  minus SNIS delta H", est["identity_discrepancy_nats"], unit),
            _row(f"weights ({est['weights_mode']}): ESS", est["ess"]),
            _row("ESS / N", est["ess_fraction"]),
            _row(
                "log-weight min / median / max",
                f"{est['log_weight_min']:.3f} / {est['log_weight_median']:.3f} / "
                f"{est['log_weight_max']:.3f}",
            ),
        ]
        if est["weights_mode"] == "clip":
            lines.append(_row("fraction clipped", est["fraction_clipped"]))
        if est["weights_mode"] == "psis":
            lines.append(
                _row(
                    "Pareto k-hat (threshold)",
                    f"{est['pareto_k']:.3f} ({est['pareto_k_threshold']:.3f})",
                )
            )
        lines += [
            _row("per-token NLL p0", est["per_token_nll_p0_nats"], "nats/token"),
            _row("per-token NLL p0", est["per_token_nll_p0_bits"], "bits/token"),
            _row("per-token NLL p1  SNIS", est["per_token_nll_p1_nats"], "nats/token"),
            _row("per-token NLL p1  SNIS", est["per_token_nll_p1_bits"], "bits/token"),
        ]
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
    return "\n".join(lines)
