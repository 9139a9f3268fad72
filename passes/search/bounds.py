"""A lower bound on the iteration time of every plan that extends a partial stage: the front points that
cannot beat the incumbent are dropped while the fronts are built, not after.

For a run of layers with memory ``M``, time ``X`` and sync ``G`` inside stage ``s``:

    Σ_s X_s  >=  S = X + (fastest embedding/head time) + H(rest, m_avail − M)
    iteration time  >=  S + (c − 1)·max(X, S / pp) + syncs·G        (the slowest stage is at least the mean)

where ``rest`` are the body layers outside the run and ``H(rest, m)`` the least time they can take when
their memory adds up to at most ``m`` bytes (every stage's budget counts, minus the embedding's least
memory and the run's own cap). ``H`` is bounded from below by its Lagrangian relaxation

    H(rest, m)  >=  max_λ≥0  Σ_{l in rest} min_j (x_lj + λ·mem_lj)  −  λ·m

(weak duality: any λ gives a valid bound), so the bound is the upper envelope of one line per λ in M.
Redistribution and p2p are left out (both >= 0), and other stages'
in-flight counts are taken at their least: every relaxation only lowers the bound.

A whole setting is bounded the same way stage by stage (``StageBound``, ``division_bound_s``): stage ``s``
over layers ``[a, b)`` takes at least H of those layers in its own budget with its own in-flight count
(infinite where their least memory does not fit), and the iteration at least the least Σ_s + (c − 1)·the
least max_s of those over divisions.

requires: a CostTable (search.front), non-negative terms.
ensures:  ``RestBound.promising`` never drops a point that some plan beating ``bound_s`` extends;
          ``division_bound_s`` over ``StageBound`` spans never exceeds a fitting plan's time.
"""

from __future__ import annotations

import numpy as np

_SLACK = 1e-9  # relative: never prune a tie on rounding


def _hull_slopes(mem: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Exchange rates (seconds per byte) along the lower convex hull of (mem, x): where the LP optimum bends."""
    order = np.lexsort((x, mem))
    hull: list[tuple[float, float]] = []
    for m, t in zip(mem[order].astype(float), x[order]):
        if hull and hull[-1][0] == m:
            continue
        while len(hull) >= 2 and (hull[-1][1] - hull[-2][1]) * (m - hull[-1][0]) >= (t - hull[-1][1]) * (
            hull[-1][0] - hull[-2][0]
        ):
            hull.pop()
        hull.append((m, t))
    return np.array([(a[1] - b[1]) / (b[0] - a[0]) for a, b in zip(hull, hull[1:]) if b[1] < a[1]])


def multipliers(table, types: tuple[str, ...], in_flight) -> np.ndarray:
    """The λ of the Lagrangian bounds: 0, where the layers' exchange of time for memory bends, and a steep
    one (a run that cannot fit at all gets a huge bound)."""
    slopes = [np.zeros(1)]
    for t in dict.fromkeys(types):
        ok = table.useful[t]
        if ok.any():
            slopes.append(_hull_slopes(table.memory(t, in_flight)[ok], table.x[t][ok]))
    lam = np.unique(np.concatenate(slopes))
    if len(lam) > 96:  # any subset of multipliers is still a valid bound
        lam = lam[np.unique(np.linspace(0, len(lam) - 1, 96).round().astype(int))]
    return np.concatenate([lam, [lam[-1] * 1e3 + 1e-30]])


def _cheapest(x: np.ndarray, mem: np.ndarray, ok: np.ndarray, lam: np.ndarray) -> np.ndarray:
    """Per λ: min over the strategies ``ok`` of x + λ·mem (inf if none)."""
    if not ok.any():
        return np.full(len(lam), np.inf)
    return (x[ok][:, None] + mem[ok].astype(float)[:, None] * lam[None, :]).min(axis=0)


class RestBound:
    """Per (table, in-flight count of the rest, cap set): the Lagrangian terms of each layer type."""

    def __init__(self, table, types: tuple[str, ...], in_flight, caps: np.ndarray, per_cap: bool):
        self.lam = multipliers(table, types, in_flight)
        # phi[t][cap index, λ]: min_j x + λ·mem over the strategies allowed under that cap (all if not per_cap)
        self.phi = {}
        for t in dict.fromkeys(types):
            mem = table.memory(t, in_flight)
            self.phi[t] = np.array(
                [
                    _cheapest(table.x[t], mem, table.useful[t] & (table.peak[t] <= cap), self.lam)
                    for cap in (caps if per_cap else caps[-1:])
                ]
            )
        self.per_cap = per_cap
        self.total = sum(self.phi[t] for t in types)

    def promising(
        self,
        run_types: tuple[str, ...],
        cap_index: int,
        m_avail: float,
        c: int,
        syncs: int,
        fixed_s: float,
        bound_s: float,
        pp: int = 1,
    ):
        """A mask function over (M, X, G) of the run's points: True where some plan under ``bound_s`` may extend it."""
        if not np.isfinite(bound_s):
            return None
        row = cap_index if self.per_cap else 0
        rest = self.total[row] - sum(self.phi[t][row] for t in run_types)
        if not np.all(np.isfinite(rest)):
            return lambda M, X, G: np.zeros(len(M), bool)
        # each line is a valid bound on its own; lower it by more than its rounding error
        error = 1e-9 * (np.abs(self.total[row]) + np.abs(rest) + self.lam * (2 * abs(m_avail) + 1))
        slopes, breaks, icepts = _envelope(self.lam, rest - self.lam * m_avail - error)
        limit = bound_s * (1 + _SLACK) + 1e-12

        def mask(M, X, G):
            i = np.searchsorted(breaks, M, side="right")
            total = X + fixed_s + icepts[i] + slopes[i] * M  # Σ_s X_s at least
            return total + (c - 1) * np.maximum(X, total / pp) + syncs * G <= limit

        return mask


def _envelope(slopes: np.ndarray, intercepts: np.ndarray):
    """Upper envelope of lines y = s·M + b (slopes ascending): (slopes, breakpoints, intercepts) of its pieces."""
    keep: list[int] = []
    for i in range(len(slopes)):
        if keep and slopes[keep[-1]] == slopes[i]:
            if intercepts[i] <= intercepts[keep[-1]]:
                continue
            keep.pop()
        while len(keep) >= 2:
            a, b = keep[-2], keep[-1]
            # b is never on top if a and i cross at or left of where a and b cross
            if (intercepts[i] - intercepts[a]) * (slopes[b] - slopes[a]) >= (intercepts[b] - intercepts[a]) * (
                slopes[i] - slopes[a]
            ):
                keep.pop()
            else:
                break
        keep.append(i)
    s, b = slopes[keep], intercepts[keep]
    breaks = (b[:-1] - b[1:]) / (s[1:] - s[:-1])
    return s, breaks, b


class StageBound:
    """Per (table, in-flight count): a lower bound on the seconds of a stage's body layers ``[a, b)`` whose
    memory adds up to at most ``budget`` bytes, for every ``a < b`` at once (the Lagrangian bound above,
    per span: max over λ of Σ_{a <= l < b} min_j (x_lj + λ·mem_lj) − λ·budget); inf where even the layers'
    least memory exceeds the budget."""

    _CELLS = 1 << 22  # spans × multipliers evaluated per block of start layers

    def __init__(self, table, types: tuple[str, ...], in_flight):
        self.lam = multipliers(table, types, in_flight)
        phi = {
            t: _cheapest(table.x[t], table.memory(t, in_flight), table.useful[t], self.lam)
            for t in dict.fromkeys(types)
        }
        self.prefix = np.concatenate([np.zeros((1, len(self.lam))), np.cumsum([phi[t] for t in types], axis=0)])
        least = [table.memory(t, in_flight)[table.useful[t]].min(initial=np.iinfo(np.int64).max) for t in types]
        self.least_bytes = np.concatenate([[0], np.cumsum(least, dtype=np.float64)])

    def spans_s(self, budget: float) -> np.ndarray:
        """[a, b] → the bound for layers [a, b) (inf where b <= a)."""
        n = len(self.prefix)
        out = np.full((n, n), np.inf)
        block = max(1, self._CELLS // (n * len(self.lam)))
        for lo in range(0, n - 1, block):
            starts = self.prefix[lo : lo + block]
            value = self.prefix[None, :, :] - starts[:, None, :] - self.lam * budget
            # each line is a valid bound on its own; lower it by more than its rounding error
            error = 1e-9 * (np.abs(self.prefix)[None] + np.abs(starts)[:, None] + self.lam * (2 * abs(budget) + 1))
            out[lo : lo + block] = np.maximum((value - error).max(axis=2), 0.0)
        out[self.least_bytes[None, :] - self.least_bytes[:, None] > budget] = np.inf
        out[np.tril_indices(n)] = np.inf
        return out


def division_bound_s(spans: list[np.ndarray], chunks: int) -> float:
    """A lower bound on  Σ_s X_s + (chunks − 1)·max_s X_s  over every division of the layers into
    ``len(spans)`` non-empty stages, where stage ``s`` over ``[a, b)`` takes at least ``spans[s][a, b]``
    seconds: the least sum over divisions plus (chunks − 1) × the least maximum (each a small dynamic
    programme over stage ends; the two minima may come from different divisions, which only lowers it)."""
    total, slowest = spans[0][0].copy(), spans[0][0].copy()
    for span in spans[1:]:
        total = np.min(total[:, None] + span, axis=0)
        slowest = np.min(np.maximum(slowest[:, None], span), axis=0)
    return float(total[-1] + ((chunks - 1) * slowest[-1] if chunks > 1 else 0.0))  # 0 · inf is NaN
