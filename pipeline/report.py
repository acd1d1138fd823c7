"""Report: the summary as a readable terminal table."""

from __future__ import annotations

from typing import Any

_UNIT_LABEL = {"sequence": "nats/seq", "per_token": "nats/token"}


def _row(label: str, value: Any, unit: str = "") -> str:
    if isinstance(value, float):
        text = f"{value:.6g}" if abs(value) < 1e-3 and value != 0 else f"{value:.4f}"
    else:
        text = str(value)
    return f"  {label:<38} {text:>14}  {unit}"


def format_summary(summary: dict[str, Any]) -> str:
    """Lines of the terminal report: one block per candidate, then run diagnostics."""
    unit = _UNIT_LABEL[summary["unit"]]
    bits_unit = unit.replace("nats", "bits")
    lines = [
        f"entropy-pipeline summary  (unit: {summary['unit']}, include_eos: "
        f"{str(summary['include_eos']).lower()}, reference: {summary['reference_model']})",
        _row("prompts", summary["num_prompts"]),
        _row("sequences", summary["num_sequences"]),
    ]
    for name, est in summary["candidates"].items():
        lines += [
            f"candidate {name} vs {summary['reference_model']}",
            _row("H(p0)", est["H0_nats"], unit),
            _row("H(p1)  (SNIS)", est["H1_nats"], unit),
            _row("delta H = H(p1) - H(p0)", est["delta_H_nats"], unit),
            _row("delta H", est["delta_H_bits"], bits_unit),
            _row("ESS", est["ess"]),
            _row("ESS / N", est["ess_fraction"]),
            _row(
                "log-weight min / median / max",
                f"{est['log_weight_min']:.3f} / {est['log_weight_median']:.3f} / "
                f"{est['log_weight_max']:.3f}",
            ),
            _row("per-token NLL p0", est["per_token_nll_p0_nats"], "nats/token"),
            _row("per-token NLL p0", est["per_token_nll_p0_bits"], "bits/token"),
            _row("per-token NLL p1  (SNIS)", est["per_token_nll_p1_nats"], "nats/token"),
            _row("per-token NLL p1  (SNIS)", est["per_token_nll_p1_bits"], "bits/token"),
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
    return "\n".join(lines)
