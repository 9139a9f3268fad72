"""Time formulas of a profile, ``Σ coefficient · b^i · s^j`` seconds, and how they are fitted to measured
points: per profile mode (``static``, ``batch``, ``sequence``; see ``cost.model_profile``), by non-negative
least squares on chosen columns, and the per-length fits of the figures a sequence profile keeps.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Any, Sequence

import numpy as np
import sympy

from galvatron_fx.errors import ConfigError

B, S = sympy.symbols("b s", positive=True)
PROFILE_MODES = ("static", "batch", "sequence")


@dataclass(frozen=True)
class TimeFormula:
    """Seconds as ``Σ coefficient · b^i · s^j``; ``terms`` holds ``(i, j, coefficient)``."""

    terms: tuple[tuple[int, int, float], ...] = ()

    @cached_property
    def expr(self) -> sympy.Expr:
        return sympy.Add(*(sympy.Float(c) * B**i * S**j for i, j, c in self.terms)) if self.terms else sympy.Integer(0)

    @cached_property
    def _function(self):
        return sympy.lambdify((B, S), self.expr, "math")

    def __call__(self, batch: float, seq: float) -> float:
        return float(self._function(batch, seq)) if self.terms else 0.0

    def fixed_s(self, seq: float) -> float:
        """The batch-independent part at sequence length ``seq``: per-call overhead (launches, dispatch)."""
        return sum(c * seq**j for i, j, c in self.terms if i == 0)

    def scaled(self, factor: float) -> "TimeFormula":
        return TimeFormula(tuple((i, j, c * factor) for i, j, c in self.terms))

    def to_json(self) -> list:
        return [[i, j, c] for i, j, c in self.terms]

    @classmethod
    def from_json(cls, value: Any) -> "TimeFormula":
        terms = tuple((int(i), int(j), float(c)) for i, j, c in value)
        if any(i < 0 or j < 0 or i > 3 or j > 3 or c != c for i, j, c in terms):
            raise ValueError(f"terms {value!r} out of range")
        return cls(terms)


def _legacy_fit(samples: Sequence[tuple[float, float, float]]) -> TimeFormula:
    """``fit_time_formula`` without a profile mode (see there)."""
    seqs = {s for _, s, _ in samples}
    basis = [(0, 0), (1, 0)] + ([(1, 1)] if len(seqs) >= 2 else []) + ([(1, 2)] if len(seqs) >= 3 else [])
    if len({b for b, _, _ in samples}) < 2 and len(seqs) < 2:
        basis = [(1, 0)]
    while True:
        matrix = np.array([[b**i * s**j for i, j in basis] for b, s, _ in samples], dtype=float)
        target = np.array([t for _, _, t in samples], dtype=float)
        coefficients = np.linalg.lstsq(matrix, target, rcond=None)[0]
        if (coefficients >= 0).all() or len(basis) == 1:
            break
        basis = [term for term, c in zip(basis, coefficients) if c >= 0] or [(1, 0)]
    return TimeFormula(tuple((i, j, float(max(c, 0.0))) for (i, j), c in zip(basis, coefficients)))


# A column of a fit: ``Σ weight · b^i · s^j`` over its ``(i, j, weight)``; its coefficient scales every term.
Column = tuple[tuple[int, int, float], ...]


def _column_values(column: Column, samples: Sequence[tuple[float, float, float]]) -> np.ndarray:
    return np.array([sum(w * b**i * s**j for i, j, w in column) for b, s, _ in samples], dtype=float)


def fit_terms(samples: Sequence[tuple[float, float, float]], columns: Sequence[Column]) -> TimeFormula:
    """Least squares of ``(batch, seq, seconds)`` samples on ``columns`` with non-negative coefficients:
    columns whose coefficient comes out negative are dropped and the rest fitted again (columns are scaled
    to unit norm first, so that ``1`` and ``b·s²`` solve together)."""
    columns = [tuple(c) for c in columns]
    target = np.array([t for _, _, t in samples], dtype=float)
    while True:
        matrix = np.stack([_column_values(c, samples) for c in columns], axis=1)
        norms = np.linalg.norm(matrix, axis=0)
        norms[norms == 0] = 1.0
        coefficients = np.linalg.lstsq(matrix / norms, target, rcond=None)[0] / norms
        if (coefficients >= 0).all() or len(columns) == 1:
            break
        columns = [c for c, value in zip(columns, coefficients) if value >= 0]
    terms: dict[tuple[int, int], float] = {}
    for column, value in zip(columns, coefficients):
        for i, j, weight in column:
            terms[(i, j)] = terms.get((i, j), 0.0) + float(max(value, 0.0)) * weight
    return TimeFormula(tuple((i, j, c) for (i, j), c in sorted(terms.items()) if c > 0))


def _identifiable(samples: Sequence[tuple[float, float, float]], columns: Sequence[Column]) -> bool:
    matrix = np.stack([_column_values(c, samples) for c in columns], axis=1)
    norms = np.linalg.norm(matrix, axis=0)
    norms[norms == 0] = 1.0
    return int(np.linalg.matrix_rank(matrix / norms, tol=1e-9)) == len(columns)


def fit_time_formula(
    samples: Sequence[tuple[float, float, float]],
    profile_mode: str | None = None,
    *,
    seq_shape: Sequence[tuple[int, float]] | None = None,
) -> TimeFormula:
    """Least-squares fit of ``(batch, seq, seconds)`` samples with non-negative coefficients.

    ``profile_mode`` None: basis ``1, b`` when one sequence length was measured; ``1, b, b·s`` with two;
    ``1, b, b·s, b·s²`` (attention's quadratic part) with three or more. Terms that would come out negative
    are dropped. ``"static"``: ``b``; ``"batch"``: ``1, b``; ``"sequence"``: with two lengths and
    ``seq_shape`` (the layer's work per sample as ``(j, c)`` terms ``Σ c·s^j``, e.g. its FLOPs by
    ``fit_seq_terms``), ``1, b·shape(s)``; otherwise ``1, b·s, b·s²`` where the samples determine all three
    (three or more lengths, or two at two or more batch sizes), else ``1, b·s``.
    """
    if profile_mode is None:
        return _legacy_fit(samples)
    one = (((0, 0, 1.0),),)
    if profile_mode == "static":
        return fit_terms(samples, [((1, 0, 1.0),)])
    if profile_mode == "batch":
        columns = [*one, ((1, 0, 1.0),)]
        return fit_terms(samples, columns if _identifiable(samples, columns) else columns[1:])
    if profile_mode != "sequence":
        raise ConfigError(f"profile mode {profile_mode!r} is unknown", f"use one of {', '.join(PROFILE_MODES)}")
    linear, quadratic = ((1, 1, 1.0),), ((1, 2, 1.0),)
    if len({s for _, s, _ in samples}) < 3 and seq_shape:
        shape = tuple((1, int(j), float(c)) for j, c in seq_shape if c > 0)
        if shape:
            for columns in ([*one, shape], [shape]):
                if _identifiable(samples, columns):
                    return fit_terms(samples, columns)
    for columns in ([*one, linear, quadratic], [*one, linear], [linear]):
        if _identifiable(samples, columns):
            return fit_terms(samples, columns)
    return fit_terms(samples, [linear])


def fit_seq_terms(points: Sequence[tuple[float, float]]) -> tuple[tuple[int, float], ...]:
    """A figure against the sequence length, from ``(seq, value)`` points: ``(j, c)`` terms of ``Σ c·s^j``.

    One length: proportional to ``s``. Two: proportional where the points say so; ``s, s²`` where the
    figure grows faster than ``s`` (attention that materialises its ``s × s`` scores), ``1, s`` where it
    grows slower (a per-sample part that does not scale, e.g. a classifier's). Three or more: ``1, s, s²``,
    non-negative least squares. Memory figures are exact counts, so the fit recovers them exactly.
    """
    by_seq: dict[float, list[float]] = {}
    for s, value in points:
        by_seq.setdefault(float(s), []).append(float(value))
    pts = sorted((s, sum(v) / len(v)) for s, v in by_seq.items())
    if not pts or all(v == 0 for _, v in pts):
        return ()
    if len(pts) == 1:
        return ((1, pts[0][1] / pts[0][0]),)
    samples = [(1.0, s, v) for s, v in pts]
    if len(pts) == 2:
        (s1, v1), (s2, v2) = pts
        excess = v2 * s1 - v1 * s2  # > 0: faster than linear
        if abs(excess) <= 2.0 * s2 + 1e-9 * abs(v2 * s1):  # per-sample counts are rounded to whole bytes
            powers: tuple[int, ...] = (1,)
        else:
            powers = (1, 2) if excess > 0 else (0, 1)
    else:
        powers = (0, 1, 2)
    formula = fit_terms(samples, [((1, j, 1.0),) for j in powers])
    return tuple((j, c) for _, j, c in formula.terms)


def eval_seq_terms(terms: Sequence[tuple[int, float]], seq: float) -> float:
    """``Σ c·s^j`` of ``fit_seq_terms``' terms at ``seq``."""
    return float(sum(c * seq**j for j, c in terms))


def resolve_profile_mode(profile_mode: str | None, batches: Sequence[int], seqs: Sequence[int]) -> str:
    """The profile mode for measuring ``batches`` × ``seqs``: as given (checked against the lists), or, left
    out, ``sequence`` with two or more sequence lengths, ``batch`` with two or more batch sizes, else
    ``static``. Raises ConfigError where the lists do not fit the mode."""
    batch_count, seq_count = len(set(batches)), len(set(seqs))
    if profile_mode is None:
        return "sequence" if seq_count >= 2 else "batch" if batch_count >= 2 else "static"
    needs = {
        "static": (batch_count == 1 and seq_count == 1, "one micro-batch size at one sequence length", "4", "64"),
        "batch": (
            batch_count >= 2 and seq_count == 1,
            "two or more micro-batch sizes at one sequence length",
            "2,4,8",
            "64",
        ),
        "sequence": (seq_count >= 2, "two or more sequence lengths", "2,4,8", "32,64"),
    }
    if profile_mode not in needs:
        raise ConfigError(f"profile mode {profile_mode!r} is unknown", f"use one of {', '.join(PROFILE_MODES)}")
    fits, what, batches_example, seqs_example = needs[profile_mode]
    if not fits:
        raise ConfigError(
            f"profile mode {profile_mode} measures {what}, but micro-batch sizes {sorted(set(batches))} and "
            f"sequence lengths {sorted(set(seqs))} were given",
            f"give e.g. --batches {batches_example} --seqs {seqs_example} with --profile-mode {profile_mode}",
        )
    return profile_mode
