"""One declaration per estimate; everything else about estimates is derived from here.

Every estimate is a smooth function of *means over the sampled sequences* of a few
per-sequence quantities, the **atoms**. The point estimate, the per-prompt estimates,
each cluster-bootstrap replicate and the influence function of the error bars are the
same ``Estimate.formula`` applied to other means (run totals, one prompt's sums,
resampled totals, or linearised means; see ``pipeline.stats.uncertainty``). From
``ESTIMATES`` and the key declarations below come: the per-prompt sums that are
computed (``atoms_needed``), the summary keys and their ``_bits`` twins
(``candidate_keys``), ``SUMMARY_SCHEMA`` and ``PER_PROMPT_SCHEMA``, the report's rows
(``pipeline.report``) and the README's tables (``render_estimates_table``,
``render_summary_keys``; regenerate them with ``python -m pipeline.stats.registry
README.md``, check with ``--check``; ``tests/test_registry.py`` fails when they are stale).

To add an estimate: append one ``Estimate`` (and an ``Atom`` if it needs a new
per-sequence quantity), then test it; nothing else changes.

Notation. Sequence i of prompt q was drawn by one of the M sampling models m (with
the reference alone sampling, M = 1). log q_i = logsumexp_m S_m,full,i - log M is the
log-density of the equal mixture of the sampling models (the balance heuristic,
Veach & Guibas 1995), and for a target t (the reference p0 or the candidate p1) the
raw weight is w_t,i = p_t(x_i) / q(x_i). With the reference alone sampling, w0 = 1
and w1 = exp(d), so every formula below is the single-proposal self-normalised
importance sampling (SNIS) estimator. Other columns (``Columns``): S0, S1 the entropy
integrands (teacher-forced log-prob sums over the counted tokens, nats), L the
counted length, L_full the full length (EOS included), d = S1_full - S0_full (nats),
e = d - (S1 - S0) the EOS position's log-ratio (0 when ``include_eos`` is true), and
1/L taken as 0 when L = 0 (a completion that is only EOS, with ``include_eos``
false, has no counted token and a rate of 0).

A mean m[a] = sum_i a_i / N runs over all N sampled sequences; a covariance atom's
mean is the sequence-weighted mean over prompts of the within-prompt covariance
under p0, Cov_q(x, d) = sum w0 (x - x_w)(d - d_w) / (sum w0 - sum w0^2 / sum w0)
(x_w the w0-weighted prompt mean): with w0 = 1 the unbiased covariance, and with
equal numbers of sequences per prompt the plain mean over prompts.

Derivation. Every sample is scored under every model, so p_t(x_i) / q(x_i) is known
for every target and E_q[w_t f] = E_pt[f]: an expectation under p_t is the
self-normalised ratio E_pt[f] ~ m[w_t f] / m[w_t] over all pooled samples (the
unknown normalisers cancel, and with equal G per sampling model the pooled samples
are a stratified sample of q). Hence H(p_t) = -E_pt[S_t] ~ -m[w_t S_t] / m[w_t];
per token, the ratio of expected sums -E_pt[S_t] / E_pt[L] ~ -m[w_t S_t] / m[w_t L];
KL(p1 || p0) = E_p1[d] ~ m[w1 d] / m[w1] (per token over E_p1[L_full]). The first-order
terms are slopes at eps = 0 along p_eps ~ p0^(1-eps) p1^eps: d/deps E_eps[f] =
Cov_p0(f, d), and d/deps log p_eps(x) = d - E_p0[d] has mean 0, so the sequence slope
of H is -Cov_p0(S0, d); without the EOS position the conditional EOS log-prob moves
too, adding E_p0[e] to first order; per token the quotient rule gives
(-Cov(S0, d) + E[e] - h0 Cov(L, d)) / E[L]; the rate E[-S/L] moves by
-Cov(S0/L, d) - E[(d - E d)/L] + E[e/L] = -Cov((S0 + 1)/L, d) + E[e/L]. Under mixture
sampling the p0-expectations and covariances are taken with the weights w0.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa

Unit = Literal["sequence", "per_token"]
UNITS: tuple[Unit, ...] = ("sequence", "per_token")
NATS_PER_BIT = math.log(2.0)
# Which weight multiplies an atom's integrand: w0 = p0/q, w1 = p1/q (stabilised), or 1.
Weight = Literal["w0", "w1"] | None


@dataclass(frozen=True)
class Columns:
    """Per-sequence float64 arrays an atom's integrand may read (see the module notes)."""

    S0: np.ndarray
    S1: np.ndarray
    L: np.ndarray
    L_full: np.ndarray
    d: np.ndarray
    e: np.ndarray
    inv_L: np.ndarray


@dataclass(frozen=True)
class Atom:
    """A per-sequence quantity whose mean over the sequences some estimate uses.

    ``covariance`` false: a_i = weight_i x integrand_i, summed per prompt.
    ``covariance`` true: the within-prompt covariance under p0 of the integrand and d
    (weight must be ``"w0"``); its per-prompt "sum" is n_q Cov_q.
    """

    name: str
    weight: Weight
    integrand: Callable[[Columns], np.ndarray | float]
    text: str
    covariance: bool = False


def _one(_: Columns) -> float:
    return 1.0


ATOMS: dict[str, Atom] = {
    atom.name: atom
    for atom in (
        Atom("n", None, _one, "1 (counts sequences)"),
        Atom("w0", "w0", _one, "w0"),
        Atom("w0_S0", "w0", lambda c: c.S0, "w0 S0"),
        Atom("w0_L", "w0", lambda c: c.L, "w0 L"),
        Atom("w0_e", "w0", lambda c: c.e, "w0 e"),
        Atom("w0_rate", "w0", lambda c: c.S0 * c.inv_L, "w0 S0 / L"),
        Atom("w0_e_rate", "w0", lambda c: c.e * c.inv_L, "w0 e / L"),
        Atom("w1", "w1", _one, "w1"),
        Atom("w1_S1", "w1", lambda c: c.S1, "w1 S1"),
        Atom("w1_L", "w1", lambda c: c.L, "w1 L"),
        Atom("w1_L_full", "w1", lambda c: c.L_full, "w1 L_full"),
        Atom("w1_d", "w1", lambda c: c.d, "w1 d"),
        Atom("w1_rate", "w1", lambda c: c.S1 * c.inv_L, "w1 S1 / L"),
        Atom("cov_S0_d", "w0", lambda c: c.S0, "Cov_q(S0, d)", covariance=True),
        Atom("cov_L_d", "w0", lambda c: c.L, "Cov_q(L, d)", covariance=True),
        Atom(
            "cov_rate_d",
            "w0",
            lambda c: (c.S0 + 1.0) * c.inv_L,
            "Cov_q((S0 + 1) / L, d)",
            covariance=True,
        ),
    )
}

# The means an estimate's formula reads: atom name -> float, array or linearised mean.
Means = Mapping[str, Any]
Formula = Callable[[Means, Unit], Any]


def _h0(m: Means, unit: Unit) -> Any:
    return -m["w0_S0"] / (m["w0"] if unit == "sequence" else m["w0_L"])


def _h1(m: Means, unit: Unit) -> Any:
    return -m["w1_S1"] / (m["w1"] if unit == "sequence" else m["w1_L"])


def _kl(m: Means, unit: Unit) -> Any:
    return m["w1_d"] / (m["w1"] if unit == "sequence" else m["w1_L_full"])


def _delta_h1(m: Means, unit: Unit) -> Any:
    sequence_slope = -m["cov_S0_d"] + m["w0_e"] / m["w0"]
    if unit == "sequence":
        return sequence_slope
    h0 = -m["w0_S0"] / m["w0_L"]
    return (sequence_slope - h0 * m["cov_L_d"]) / (m["w0_L"] / m["w0"])


def _rate0(m: Means, unit: Unit) -> Any:
    return -m["w0_rate"] / m["w0"]


def _rate1(m: Means, unit: Unit) -> Any:
    return -m["w1_rate"] / m["w1"]


def _delta_rate1(m: Means, unit: Unit) -> Any:
    return -m["cov_rate_d"] + m["w0_e_rate"] / m["w0"]


def _nll0(m: Means, unit: Unit) -> Any:
    return _h0(m, "per_token")


def _nll1(m: Means, unit: Unit) -> Any:
    return _h1(m, "per_token")


@dataclass(frozen=True)
class Estimate:
    """One estimate (nats): how it is computed, named, labelled and documented.

    ``formula(means, unit)`` uses only arithmetic (+, -, *, /), so it runs unchanged
    on floats, on arrays of bootstrap replicates or prompts, and on linearised means
    (which makes its influence function). ``text`` is the formula as the docs show it
    for each unit. ``estimand`` says what the number estimates.
    """

    name: str
    label: str
    formula: Formula
    text: Mapping[Unit, str]
    estimand: str
    interval: bool = True
    per_prompt: bool = False
    per_token_always: bool = False

    @property
    def needs(self) -> tuple[str, ...]:
        """The atoms (per-prompt sums) the formula reads, in ``ATOMS`` order."""
        return _atoms_read(self.formula)

    def value_unit(self, unit: Unit) -> str:
        """Unit of the value under ``entropy.unit`` = ``unit``: nats/seq or nats/token."""
        return "nats/token" if self.per_token_always or unit == "per_token" else "nats/seq"


def _same(text: str) -> dict[Unit, str]:
    return {"sequence": text, "per_token": text}


ESTIMATES: tuple[Estimate, ...] = (
    Estimate(
        "H0",
        "H({reference})",
        _h0,
        {"sequence": "-m[w0 S0] / m[w0]", "per_token": "-m[w0 S0] / m[w0 L]"},
        "entropy of the reference p0 (sequence: nats per completion; per_token: "
        "expected log-loss sum over expected length)",
        per_prompt=True,
    ),
    Estimate(
        "H1",
        "H({candidate})",
        _h1,
        {"sequence": "-m[w1 S1] / m[w1]", "per_token": "-m[w1 S1] / m[w1 L]"},
        "entropy of the candidate p1, self-normalised importance sampling",
        per_prompt=True,
    ),
    Estimate(
        "delta_H",
        "delta H = H({candidate}) - H({reference})",
        lambda m, unit: _h1(m, unit) - _h0(m, unit),
        _same("H1 - H0"),
        "the entropy change of the step",
        per_prompt=True,
    ),
    Estimate(
        "kl",
        "KL({candidate} || {reference})",
        _kl,
        {"sequence": "m[w1 d] / m[w1]", "per_token": "m[w1 d] / m[w1 L_full]"},
        "KL(p1 ‖ p0) of whole completions (EOS included, whatever include_eos), "
        "per completion or per token of p1",
        per_prompt=True,
    ),
    Estimate(
        "delta_H1",
        "first-order delta H1",
        _delta_h1,
        {
            "sequence": "-m[Cov_q(S0, d)] + m[w0 e] / m[w0]",
            "per_token": "(-m[Cov_q(S0, d)] + ebar - h0 m[Cov_q(L, d)]) / Lbar, with "
            "ebar = m[w0 e] / m[w0], h0 = H0 per token, Lbar = m[w0 L] / m[w0]",
        },
        "slope at eps = 0 of delta H along p_eps ~ p0^(1-eps) p1^eps: the "
        "first-order term of delta H in d (gradient-free)",
        per_prompt=True,
    ),
    Estimate(
        "H0_rate",
        "rate E[-S/L] of {reference}",
        _rate0,
        _same("-m[w0 S0 / L] / m[w0]"),
        "mean per-completion rate E_p0[-S0/L] (nats/token in either unit)",
        per_token_always=True,
    ),
    Estimate(
        "H1_rate",
        "rate E[-S/L] of {candidate}",
        _rate1,
        _same("-m[w1 S1 / L] / m[w1]"),
        "mean per-completion rate E_p1[-S1/L], self-normalised importance sampling",
        per_token_always=True,
    ),
    Estimate(
        "delta_H_rate",
        "delta rate",
        lambda m, unit: _rate1(m, unit) - _rate0(m, unit),
        _same("H1_rate - H0_rate"),
        "change of the mean per-completion rate",
        per_token_always=True,
    ),
    Estimate(
        "delta_H1_rate",
        "first-order delta rate",
        _delta_rate1,
        _same("-m[Cov_q((S0 + 1) / L, d)] + m[w0 e / L] / m[w0]"),
        "first-order term of delta_H_rate along the same path",
        per_token_always=True,
    ),
    Estimate(
        "per_token_nll_p0",
        "per-token NLL {reference}",
        _nll0,
        _same("-m[w0 S0] / m[w0 L]"),
        "per-token negative log-likelihood of p0's samples under p0 (= H0 per token)",
        interval=False,
        per_token_always=True,
    ),
    Estimate(
        "per_token_nll_p1",
        "per-token NLL {candidate}",
        _nll1,
        _same("-m[w1 S1] / m[w1 L]"),
        "the same for p1, self-normalised (= H1 per token)",
        interval=False,
        per_token_always=True,
    ),
)
ESTIMATE_NAMES = tuple(e.name for e in ESTIMATES)
INTERVAL_PARTS = ("se", "low", "high")


class _Tracer:
    """Stands in for a mean while a formula runs, to record which atoms it reads."""

    def __init__(self, read: set[str]) -> None:
        self.read = read

    def _op(self, *_: object) -> _Tracer:
        return self

    __add__ = __radd__ = __sub__ = __rsub__ = __mul__ = __rmul__ = _op
    __truediv__ = __rtruediv__ = __neg__ = _op


class _Recording(Mapping[str, _Tracer]):
    def __init__(self) -> None:
        self.read: set[str] = set()

    def __getitem__(self, name: str) -> _Tracer:
        if name not in ATOMS:
            raise KeyError(f"formula reads {name!r}, which is not declared in ATOMS")
        self.read.add(name)
        return _Tracer(self.read)

    def __iter__(self) -> Iterator[str]:
        return iter(ATOMS)

    def __len__(self) -> int:
        return len(ATOMS)


def _atoms_read(formula: Formula) -> tuple[str, ...]:
    recording = _Recording()
    for unit in UNITS:
        formula(recording, unit)
    return tuple(name for name in ATOMS if name in recording.read)


def atoms_needed(estimates: tuple[Estimate, ...] = ESTIMATES) -> tuple[str, ...]:
    """Atoms read by any of ``estimates``, in ``ATOMS`` order (always with ``n``)."""
    needed = {"n"}.union(*(e.needs for e in estimates))
    return tuple(name for name in ATOMS if name in needed)


def estimate_keys(estimate: Estimate) -> list[str]:
    """Summary keys of one estimate: value, interval parts, each in nats and bits."""
    parts = ("", *(f"_{p}" for p in INTERVAL_PARTS)) if estimate.interval else ("",)
    return [f"{estimate.name}{part}_{u}" for part in parts for u in ("nats", "bits")]


@dataclass(frozen=True)
class Key:
    """A summary key that is not an estimate: its Arrow type (None: JSON only) and meaning."""

    name: str
    type: pa.DataType | None
    meaning: str


# Per candidate, besides the estimates. Weight diagnostics refer to the candidate's
# raw weights w1 = p1/q unless the name says "stabilised".
DIAGNOSTICS: tuple[Key, ...] = (
    Key("weights_mode", pa.string(), "weight stabilisation applied: none, clip or psis"),
    Key("ess", pa.float64(), "Kish effective sample size (sum w1)^2 / sum w1^2, raw weights"),
    Key("ess_fraction", pa.float64(), "ess / N"),
    Key("ess_stabilised", pa.float64(), "the same for the weights the estimates use"),
    Key("ess_stabilised_fraction", pa.float64(), "ess_stabilised / N"),
    Key("prompt_ess_min", pa.float64(), "smallest per-prompt ESS (raw weights)"),
    Key("prompt_ess_p05", pa.float64(), "5th percentile of the per-prompt ESS"),
    Key("prompt_ess_median", pa.float64(), "median per-prompt ESS"),
    Key("mean_weight", pa.float64(), "m = mean of the raw weights w1; its expectation is 1"),
    Key("mean_weight_se", pa.float64(), "standard error of mean_weight (within-prompt)"),
    Key("mean_weight_z", pa.float64(), "(mean_weight - 1) / mean_weight_se"),
    Key("log_weight_min", pa.float64(), "smallest raw log-weight log w1 (nats)"),
    Key("log_weight_median", pa.float64(), "median raw log-weight"),
    Key("log_weight_max", pa.float64(), "largest raw log-weight"),
    Key("pareto_k", pa.float64(), "PSIS tail shape k-hat of the raw weights (null: no fit)"),
    Key("pareto_k_threshold", pa.float64(), "reliability threshold min(1 - 1/log10 N, 0.7)"),
    Key("pareto_k_exceeded", pa.bool_(), "pareto_k > pareto_k_threshold"),
    Key("pareto_k_note", pa.string(), "why pareto_k is null (too few draws, tied tail)"),
    Key("fraction_clipped", pa.float64(), "weights.mode clip: fraction of weights cut"),
    Key("clip_threshold", pa.float64(), "weights.mode clip: tau"),
    Key("prompts_largest_delta_H", None, "up to 5 prompts with the largest |delta H| / SE"),
    Key("warnings", None, "this candidate's warnings"),
)

# The run: top level of summary.json, and columns of every summary.parquet row.
RUN_KEYS: tuple[Key, ...] = (
    Key("unit", pa.string(), "entropy.unit"),
    Key("include_eos", pa.bool_(), "entropy.include_eos"),
    Key("reference_model", pa.string(), "the reference p0"),
    Key("sampling_models", None, "the models that sampled (the proposal is their mixture)"),
    Key("num_prompts", pa.int64(), "prompts"),
    Key("num_sequences", pa.int64(), "N, sampled sequences (all sampling models)"),
    Key("avg_gen_length", pa.float64(), "mean completion length, EOS included (tokens)"),
    Key("fraction_ended_by_eos", pa.float64(), "fraction of completions ended by EOS or stop"),
    Key("fraction_ended_by_length", pa.float64(), "fraction that hit max_tokens"),
    Key(
        "max_abs_decode_vs_prefill_logprob_diff",
        pa.float64(),
        "largest |decode-time - teacher-forced| token log-prob of the sampling model (nats)",
    ),
    Key("uncertainty_estimand", pa.string(), "prompt_set or population"),
    Key("uncertainty_method", pa.string(), "how the intervals were computed, in words"),
    Key("statistics_options", None, "the entropy, weights and uncertainty settings used"),
    Key("run_id", pa.string(), "the run directory's id (manifest run_id), made once per run"),
    Key("config_hash", pa.string(), "hash of the run's resolved config"),
    Key("run_started_at", pa.string(), "UTC start time of the run"),
)

# Top level of summary.json besides RUN_KEYS and the first candidate's keys.
STRUCTURE_KEYS: tuple[Key, ...] = (
    Key("candidate", pa.string(), "the candidate whose keys are also at the top level"),
    Key("candidates", None, "every candidate's keys, by name"),
    Key("warnings", None, "all warnings, each prefixed by its candidate"),
)


def candidate_keys() -> list[str]:
    """Keys of one candidate's entry in summary.json, in order."""
    keys = [key for e in ESTIMATES for key in estimate_keys(e)]
    return keys + [k.name for k in DIAGNOSTICS]


def _summary_schema() -> pa.Schema:
    fields = [pa.field("candidate", pa.string())]
    fields += [pa.field(k.name, k.type) for k in RUN_KEYS if k.type is not None]
    fields += [pa.field(name, pa.float64()) for e in ESTIMATES for name in estimate_keys(e)]
    fields += [pa.field(k.name, k.type) for k in DIAGNOSTICS if k.type is not None]
    fields.append(pa.field("num_warnings", pa.int64()))
    return pa.schema(fields)


# summary.parquet: one row per candidate of a run (the run's keys, the candidate's
# estimates and diagnostics); values that do not apply (e.g. fraction_clipped without
# clipping) or cannot be estimated are null.
SUMMARY_SCHEMA = _summary_schema()

PER_PROMPT_ESTIMATES: tuple[Estimate, ...] = tuple(e for e in ESTIMATES if e.per_prompt)


def _per_prompt_schema() -> pa.Schema:
    fields = [
        pa.field("candidate", pa.string(), nullable=False),
        pa.field("prompt_id", pa.string(), nullable=False),
        pa.field("num_sequences", pa.int64(), nullable=False),
    ]
    for e in PER_PROMPT_ESTIMATES:
        fields += [
            pa.field(f"{e.name}_nats", pa.float64()),
            pa.field(f"{e.name}_se_nats", pa.float64()),
        ]
    fields += [pa.field("ess", pa.float64()), pa.field("ess_fraction", pa.float64())]
    return pa.schema(fields)


# per_prompt.parquet: one row per (candidate, prompt), estimates in the run's unit.
PER_PROMPT_SCHEMA = _per_prompt_schema()


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def render_estimates_table() -> str:
    """The README's table of estimates (Markdown), from ``ESTIMATES`` and ``ATOMS``."""
    lines = [
        "| estimate | `unit: sequence` | `unit: per_token` | interval | estimates |",
        "|---|---|---|---|---|",
    ]
    for e in ESTIMATES:
        interval = "yes" if e.interval else "no"
        lines.append(
            f"| `{e.name}` | {_cell(e.text['sequence'])} | {_cell(e.text['per_token'])} | "
            f"{interval} | {_cell(e.estimand)} |"
        )
    lines += ["", "| atom | per sequence i |", "|---|---|"]
    lines += [f"| `{a.name}` | {_cell(a.text)} |" for a in ATOMS.values()]
    return "\n".join(lines)


def render_summary_keys() -> str:
    """The README's list of summary.json keys (Markdown), from the declarations."""
    lines = ["Run (top level of `summary.json`, and a column of `summary.parquet`):", ""]
    lines += [f"- `{k.name}`: {k.meaning}" for k in RUN_KEYS]
    lines += ["", "Structure (top level of `summary.json`):", ""]
    lines += [f"- `{k.name}`: {k.meaning}" for k in STRUCTURE_KEYS]
    lines += [
        "",
        "Per candidate (under `candidates.<name>`, the first candidate's also at the top "
        "level; one `summary.parquet` row each, with `candidate` and `num_warnings`). "
        "Each estimate has `<name>_nats` and `<name>_bits`; with an interval also "
        "`<name>_se_*`, `<name>_low_*`, `<name>_high_*` in both units:",
        "",
    ]
    for e in ESTIMATES:
        suffix = ", with interval" if e.interval else ""
        lines.append(f"- `{e.name}`: {e.estimand}{suffix}")
    lines += [f"- `{k.name}`: {k.meaning}" for k in DIAGNOSTICS]
    return "\n".join(lines)


# README blocks generated from the declarations, each between its two markers.
GENERATED_BLOCKS: dict[str, Callable[[], str]] = {
    "estimates": render_estimates_table,
    "summary-keys": render_summary_keys,
}


# Written under each start marker so that nobody edits a generated block by hand.
_GENERATED_NOTE = (
    "<!-- Generated from pipeline/stats/registry.py by "
    "`python -m pipeline.stats.registry README.md`; do not edit. -->"
)


def update_document(text: str) -> str:
    """``text`` with every generated block re-rendered between its markers."""
    for name, render in GENERATED_BLOCKS.items():
        start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
        head, tail = text.find(start), text.find(end)
        if head < 0 or tail < head:
            raise ValueError(f"the document has no {start} ... {end} block")
        body = f"\n{_GENERATED_NOTE}\n\n{render()}\n\n"
        text = text[: head + len(start)] + body + text[tail:]
    return text


def main(argv: list[str] | None = None) -> int:
    """Rewrite (or, with --check, verify) the generated blocks of a Markdown file."""
    parser = argparse.ArgumentParser(description=update_document.__doc__)
    parser.add_argument("path", type=Path)
    parser.add_argument("--check", action="store_true", help="exit 1 if the file is stale")
    args = parser.parse_args(argv)
    text = args.path.read_text()
    updated = update_document(text)
    if args.check:
        return int(updated != text)
    args.path.write_text(updated)
    return 0


if __name__ == "__main__":
    sys.exit(main())
