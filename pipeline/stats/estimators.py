"""Point estimates: per-sequence columns, per-prompt sums, and the registry's formulas.

Nothing here knows about models or files. The input is the *paired frame*, a Polars
frame with one row per sampled sequence x_i (notation of ``pipeline.stats.registry``):

========== ========= =====================================================================
column     default   meaning
========== ========= =====================================================================
prompt_id  required  the prompt (sequences of one prompt are correlated)
S0, S1     required  entropy integrands: sums of teacher-forced log-probs under the
                     reference p0 and the candidate p1 over the counted tokens (nats)
L          required  number of counted tokens
d          required  S1_full - S0_full over the full sequence, EOS included (nats)
L_full     L         full length, EOS included
stratum    0         index of the sampling model that drew the sequence
log_w0     0         raw log-weight of p0 against the proposal, log p0(x)/q(x)
log_w1     d         raw log-weight of p1, log p1(x)/q(x)
log_w      log_w1    the log-weights of p1 the estimates average with (``weights``)
sample_idx (none)    only used to name a sequence in error messages
========== ========= =====================================================================

The defaults describe sampling from p0 alone (q = p0, w0 = 1, w1 = exp(d)), so a
synthetic test frame needs only the five required columns.

Computation (NumPy, float64): prompts get integer codes (sorted by ``prompt_id``);
each atom of the registry is summed per prompt with ``np.bincount``; an estimate is its
formula applied to the means m[a] = sum_i a_i / N. Weights are exponentiated after
subtracting each prompt's largest log-weight, so no prompt's weights underflow; the
run's totals rescale each prompt's sums by exp(max_q - max) (every self-normalised
ratio is unchanged by the shift). Sums run in a fixed order, so every figure is
reproducible bit for bit.

Public API: ``prepare`` (checks and groups a paired frame into ``Sequences``),
``prompt_sums`` (``PromptSums``), ``means_from_totals``, ``SampleShape``,
``estimates_from_means``, ``point_estimates``,
``within_prompt_covariance``, and ``entropy_estimates`` (frame in, every point estimate
in nats and bits out).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np
import polars as pl

from pipeline.errors import PipelineError
from pipeline.stats.registry import (
    ATOMS,
    ESTIMATES,
    NATS_PER_BIT,
    Atom,
    Columns,
    Estimate,
    Unit,
    atoms_needed,
)

REQUIRED_COLUMNS = ("prompt_id", "S0", "S1", "L", "d")
# What each checked column holds, for error messages.
_MEANING = {
    "S0": "teacher-forced log-prob sum under the reference (integrand)",
    "S1": "teacher-forced log-prob sum under the candidate (integrand)",
    "d": "log-ratio S1 - S0 of the full sequences",
    "log_w0": "log-weight of the reference against the sampling mixture",
    "log_w1": "log-weight of the candidate against the sampling mixture",
    "log_w": "stabilised log-weight of the candidate",
}


def complete_paired(frame: pl.DataFrame) -> pl.DataFrame:
    """``frame`` with the optional columns of a paired frame filled by their defaults."""
    missing = [c for c in REQUIRED_COLUMNS if c not in frame.columns]
    if missing:
        raise ValueError(
            f"paired frame lacks the column(s) {missing}; see pipeline.stats.estimators"
        )
    defaults = {
        "L_full": pl.col("L"),
        "stratum": pl.lit(0, dtype=pl.Int64),
        "log_w0": pl.lit(0.0, dtype=pl.Float64),
        "log_w1": pl.col("d"),
    }
    frame = frame.with_columns(
        **{name: value for name, value in defaults.items() if name not in frame.columns}
    )
    if "log_w" not in frame.columns:
        frame = frame.with_columns(log_w=pl.col("log_w1"))
    return frame


def check_finite(frame: pl.DataFrame) -> None:
    """Refuse a paired frame with a NaN or infinite log-prob sum or log-weight.

    A model that gives a sampled token probability 0 (or a broken checkpoint) makes
    S infinite; every estimate would silently become NaN or infinite.
    """
    columns = [c for c in _MEANING if c in frame.columns]
    bad = frame.select(
        [(~pl.col(c).cast(pl.Float64).is_finite()).sum().alias(c) for c in columns]
    ).row(0, named=True)
    for column, count in bad.items():
        if count:
            first = frame.filter(~pl.col(column).cast(pl.Float64).is_finite()).row(0, named=True)
            where = f"prompt {first['prompt_id']!r}"
            if "sample_idx" in first:
                where += f", sample {first['sample_idx']}"
            raise PipelineError(
                f"{count} sequence(s) have a non-finite {_MEANING[column]} ({column} = "
                f"{first[column]}; first: {where}). A model gave a sampled token "
                "probability 0 or produced NaN; check the model files and engine.dtype."
            )


def _prompt_codes(prompt_id: pl.Series) -> tuple[np.ndarray, pl.Series]:
    """Integer code of each row's prompt (0 .. Q-1 in sorted id order), and the ids.

    Rows come in runs of one prompt (a prompt's G samples, per sampling model, are
    written together), so the ids of the runs are ranked, not those of all N rows.
    """
    runs = prompt_id.rle_id().to_numpy().astype(np.int64)
    starts = np.flatnonzero(np.diff(runs, prepend=-1))
    run_ids = prompt_id.gather(starts)
    run_codes = run_ids.rank("dense").to_numpy().astype(np.int64) - 1
    return run_codes[runs], run_ids.unique().sort()


def _group_max(values: np.ndarray, codes: np.ndarray, groups: int) -> np.ndarray:
    result = np.full(groups, -np.inf)
    np.maximum.at(result, codes, values)
    return result


@dataclass(frozen=True)
class Covariance:
    """Within-prompt covariances under p0 of x and d, and their jackknife pieces.

    ``per_prompt``: Cov_q (null-valued NaN for a prompt with one sequence).
    ``pseudo``: per sequence, -(n_q - 1) Cov_q(without that sequence), the jackknife's
    influence of the sequence up to a per-prompt constant (NaN when n_q < 3).
    """

    per_prompt: np.ndarray
    pseudo: np.ndarray


class SampleShape(NamedTuple):
    """How many prompts, and the fewest sequences in an occupied stratum and a prompt."""

    num_prompts: int
    smallest_stratum: int
    smallest_prompt: int

    def combine(self, other: SampleShape) -> SampleShape:
        """The shape of two disjoint sets of prompts together (two shards)."""
        return SampleShape(
            self.num_prompts + other.num_prompts,
            min(self.smallest_stratum, other.smallest_stratum),
            min(self.smallest_prompt, other.smallest_prompt),
        )


@dataclass(frozen=True)
class Sequences:
    """A checked paired frame as arrays, grouped by prompt and by stratum.

    ``prompt`` codes index ``prompt_ids``; a stratum is one (prompt, sampling model)
    pair, coded ``prompt * num_models + stratum``, so ``stratum // num_models`` is its
    prompt. ``weights[w]`` holds exp(log w - max over the prompt), ``scale[w]`` the
    per-prompt factor exp(max_q - max over the run) back to a common shift, and
    ``run_weights[w]`` exp(log w - max over the run).
    """

    prompt_ids: pl.Series
    prompt: np.ndarray
    stratum: np.ndarray
    num_models: int
    prompt_size: np.ndarray
    stratum_size: np.ndarray
    columns: Columns
    log_w1: np.ndarray
    log_w: np.ndarray
    weights: Mapping[str, np.ndarray]
    scale: Mapping[str, np.ndarray]
    run_weights: Mapping[str, np.ndarray]
    # Within-prompt covariances by atom name, computed once (``covariance``).
    covariances: dict[str, Covariance] = field(default_factory=dict, repr=False)

    @property
    def num_sequences(self) -> int:
        """N."""
        return len(self.prompt)

    @property
    def num_prompts(self) -> int:
        """Q."""
        return len(self.prompt_ids)

    @property
    def shape(self) -> SampleShape:
        """Prompt count and the smallest stratum and prompt (for ``interval_warnings``)."""
        occupied = self.stratum_size[self.stratum_size > 0]
        return SampleShape(
            self.num_prompts,
            int(occupied.min()) if len(occupied) else 0,
            int(self.prompt_size.min()) if self.num_prompts else 0,
        )


def _float(frame: pl.DataFrame, column: str) -> np.ndarray:
    return frame[column].cast(pl.Float64).to_numpy()


def prepare(frame: pl.DataFrame, run_max: Mapping[str, float] | None = None) -> Sequences:
    """Check a paired frame (columns, finiteness) and group it into ``Sequences``.

    ``run_max`` (``"w0"``, ``"w1"``: the largest of ``log_w0`` and ``log_w`` over the
    whole run) is given when the frame is one shard of a run, so that ``scale`` and
    ``run_weights`` use the run's common shift; by default the frame is the run.
    """
    frame = complete_paired(frame)
    check_finite(frame)
    prompt, prompt_ids = _prompt_codes(frame["prompt_id"])
    num_prompts = len(prompt_ids)
    model = frame["stratum"].cast(pl.Int64).to_numpy()
    num_models = int(model.max()) + 1 if len(model) else 1
    stratum = prompt * num_models + model
    S0, S1, d = _float(frame, "S0"), _float(frame, "S1"), _float(frame, "d")
    length = _float(frame, "L")
    with np.errstate(divide="ignore"):
        inv_length = np.where(length > 0, 1.0 / length, 0.0)
    columns = Columns(
        S0=S0,
        S1=S1,
        L=length,
        L_full=_float(frame, "L_full"),
        d=d,
        e=d - (S1 - S0),
        inv_L=inv_length,
    )
    weights, scale, run_weights = {}, {}, {}
    for name, column in (("w0", "log_w0"), ("w1", "log_w")):
        log_w = _float(frame, column)
        prompt_max = _group_max(log_w, prompt, num_prompts)
        shift = prompt_max.max() if run_max is None else run_max[name]
        weights[name] = np.exp(log_w - prompt_max[prompt])
        scale[name] = np.exp(prompt_max - shift)
        run_weights[name] = np.exp(log_w - shift)
    return Sequences(
        prompt_ids=prompt_ids,
        prompt=prompt,
        stratum=stratum,
        num_models=num_models,
        prompt_size=np.bincount(prompt, minlength=num_prompts),
        stratum_size=np.bincount(stratum, minlength=num_prompts * num_models),
        columns=columns,
        log_w1=_float(frame, "log_w1"),
        log_w=_float(frame, "log_w"),
        weights=weights,
        scale=scale,
        run_weights=run_weights,
    )


def _sum(seqs: Sequences, values: np.ndarray | float) -> np.ndarray:
    """Per-prompt sums of a per-sequence array (or of a constant)."""
    if np.ndim(values) == 0:
        return seqs.prompt_size * float(values)
    return np.bincount(seqs.prompt, weights=values, minlength=seqs.num_prompts)


def within_prompt_covariance(seqs: Sequences, x: np.ndarray) -> Covariance:
    """Cov_q(x, d) = sum w0 (x - x_w)(d - d_w) / (sum w0 - sum w0^2 / sum w0) per prompt.

    With w0 = 1 this is the unbiased covariance. Deviations from the weighted prompt
    means are formed first (two passes), so large common offsets of S0 do not cancel
    digits. The delete-one values come in closed form, by removing sequence j from its
    prompt's sums.
    """
    w, d, p = seqs.weights["w0"], seqs.columns.d, seqs.prompt
    sw, sw2 = _sum(seqs, w), _sum(seqs, w * w)
    with np.errstate(divide="ignore", invalid="ignore"):
        xc = x - (_sum(seqs, w * x) / sw)[p]
        dc = d - (_sum(seqs, w * d) / sw)[p]
        sx, sd, sxd = _sum(seqs, w * xc), _sum(seqs, w * dc), _sum(seqs, w * xc * dc)
        cov = (sxd - sx * sd / sw) / (sw - sw2 / sw)
        rest = sw[p] - w
        rest_x, rest_d = sx[p] - w * xc, sd[p] - w * dc
        left_out = (sxd[p] - w * xc * dc - rest_x * rest_d / rest) / (
            rest - (sw2[p] - w * w) / rest
        )
    return Covariance(cov, -(seqs.prompt_size[p] - 1) * left_out)


def covariance(seqs: Sequences, atom: Atom) -> Covariance:
    """The within-prompt covariance of a covariance atom (computed once per ``seqs``)."""
    if atom.name not in seqs.covariances:
        x = np.broadcast_to(atom.integrand(seqs.columns), seqs.prompt.shape)
        seqs.covariances[atom.name] = within_prompt_covariance(seqs, x)
    return seqs.covariances[atom.name]


def atom_values(seqs: Sequences, atom: Atom, run_shift: bool = False) -> np.ndarray | float:
    """Per-sequence values of a sum atom: each prompt's own weight shift, or the run's."""
    integrand = atom.integrand(seqs.columns)
    if atom.weight is None:
        return integrand
    weights = seqs.run_weights if run_shift else seqs.weights
    return weights[atom.weight] * integrand


@dataclass(frozen=True)
class PromptSums:
    """Per-prompt sums of atoms (Q x k), each prompt with its own weight shift.

    ``scale`` (Q x k) turns them into sums with the run's common shift; a covariance
    atom's "sum" is n_q Cov_q (scale 1).
    """

    names: tuple[str, ...]
    local: np.ndarray
    scale: np.ndarray

    def column(self, name: str) -> int:
        """Position of atom ``name``."""
        return self.names.index(name)

    def run_matrix(self) -> np.ndarray:
        """Per-prompt sums on the run's common weight shift (bootstrap input)."""
        return self.local * self.scale

    def run_totals(self) -> np.ndarray:
        """Sums of the atoms over these prompts, on the run's common weight shift."""
        return self.run_matrix().sum(axis=0)

    def run_means(self) -> dict[str, float]:
        """m[a] over the whole run (these prompts)."""
        return means_from_totals(self.names, self.run_totals())

    def prompt_means(self) -> dict[str, np.ndarray]:
        """m[a] within each prompt (arrays over prompts)."""
        sizes = self.local[:, self.column("n")]
        return {name: self.local[:, j] / sizes for j, name in enumerate(self.names)}


def means_from_totals(names: tuple[str, ...], totals: np.ndarray) -> dict[str, float]:
    """m[a] = total of a / N, N the total of ``n``."""
    count = totals[names.index("n")]
    return {name: float(t / count) for name, t in zip(names, totals, strict=True)}


def prompt_sums(seqs: Sequences, names: tuple[str, ...] | None = None) -> PromptSums:
    """Per-prompt sums of the atoms ``names`` (default: every atom an estimate reads)."""
    names = atoms_needed() if names is None else names
    local = np.empty((seqs.num_prompts, len(names)))
    scale = np.ones_like(local)
    for j, name in enumerate(names):
        atom = ATOMS[name]
        if atom.covariance:
            local[:, j] = seqs.prompt_size * covariance(seqs, atom).per_prompt
        else:
            local[:, j] = _sum(seqs, atom_values(seqs, atom))
            if atom.weight is not None:
                scale[:, j] = seqs.scale[atom.weight]
    return PromptSums(tuple(names), local, scale)


def estimates_from_means(
    means: Mapping[str, Any], unit: Unit, estimates: tuple[Estimate, ...] = ESTIMATES
) -> dict[str, Any]:
    """Each estimate's formula on ``means`` (floats, arrays or linearised means).

    An undefined value (0/0, e.g. a covariance of one sequence) is NaN.
    """
    with np.errstate(divide="ignore", invalid="ignore"):
        return {e.name: e.formula(means, unit) for e in estimates}


def point_estimates(sums: PromptSums, unit: Unit) -> dict[str, float]:
    """Every estimate of the registry (nats) from the run's per-prompt sums."""
    return {k: float(v) for k, v in estimates_from_means(sums.run_means(), unit).items()}


def with_bits(values: Mapping[str, float], suffix: str = "") -> dict[str, float]:
    """``{name}{suffix}_nats`` and ``{name}{suffix}_bits`` (nats / ln 2) for each value."""
    row = {}
    for name, value in values.items():
        row[f"{name}{suffix}_nats"] = value
        row[f"{name}{suffix}_bits"] = value / NATS_PER_BIT
    return row


def entropy_estimates(frame: pl.DataFrame, unit: Unit) -> dict[str, float]:
    """Every point estimate of a paired frame, as ``<name>_nats`` and ``<name>_bits``."""
    seqs = prepare(frame)
    return with_bits(point_estimates(prompt_sums(seqs), unit))
