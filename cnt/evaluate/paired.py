"""Paired tests: two methods measured on the *same* eval items, compared item by item (not by two independent CIs).

* :func:`mcnemar` — binary outcomes (refused or not): the exact McNemar test, a two-sided binomial test on the
  discordant items (``b``: A yes / B no, ``c``: A no / B yes; ``p = min(1, 2·P(X ≤ min(b, c)))``, ``X ~ Bin(b + c,
  1/2)``; no discordant item: ``p = 1``).
* :func:`paired_bootstrap` — any per-item value (a StereoSet item's stereotype preference, a passage's NLL per token):
  items resampled jointly for both methods, the mean difference's percentile CI and a two-sided bootstrap p-value
  (``2·min(#{d* ≤ 0}, #{d* ≥ 0}) + 1`` over ``n_boot + 1``, at most 1; all-equal outcomes give 1).
* :func:`paired_test` — the one that fits the outcomes (McNemar for booleans), with the effect (mean of B − mean of A)
  and its paired-bootstrap 95% CI in both cases.
* :func:`holm` — Holm's step-down adjustment of a family of p-values (e.g. CNT against every baseline of one
  application): ``p_(i) · (m − i + 1)``, made monotone, at most 1.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from math import comb
from typing import Mapping, Sequence

import numpy as np


@dataclass(frozen=True)
class PairedTest:
    """B against A on the same ``n`` items: ``effect`` = mean(B) − mean(A) with its 95% ``ci``, the test's ``p``;
    ``discordant`` (McNemar): items where only A (first) or only B (second) was positive."""

    test: str
    n: int
    effect: float
    ci: tuple[float, float]
    p: float
    discordant: tuple[int, int] | None = None

    def to_dict(self) -> dict:
        d = asdict(self)
        d["ci"] = [float(self.ci[0]), float(self.ci[1])]
        d["discordant"] = list(self.discordant) if self.discordant is not None else None
        return d


def _pair(a: Sequence, b: Sequence) -> tuple[np.ndarray, np.ndarray]:
    if len(a) != len(b):
        raise ValueError(f"paired outcomes must cover the same items: {len(a)} against {len(b)}")
    if not len(a):
        raise ValueError("paired outcomes: no items")
    return np.asarray(a, dtype=float), np.asarray(b, dtype=float)


def mcnemar(a: Sequence[bool], b: Sequence[bool]) -> tuple[float, tuple[int, int]]:
    """The exact McNemar test's two-sided p-value and the discordant counts (only A, only B)."""
    x, y = _pair(a, b)
    only_a, only_b = int(((x > 0) & (y <= 0)).sum()), int(((x <= 0) & (y > 0)).sum())
    n = only_a + only_b
    if n == 0:
        return 1.0, (0, 0)
    tail = sum(comb(n, i) for i in range(min(only_a, only_b) + 1)) / 2 ** n
    return min(1.0, 2 * tail), (only_a, only_b)


def paired_bootstrap(a: Sequence[float], b: Sequence[float], *, n_boot: int = 2000,
                     seed: int = 0) -> tuple[float, tuple[float, float], float]:
    """The mean difference B − A, its percentile 95% CI and two-sided p-value, items resampled jointly."""
    x, y = _pair(a, b)
    d = y - x
    rng = np.random.default_rng(seed)
    boots = d[rng.integers(0, len(d), (n_boot, len(d)))].mean(1)
    lo, hi = np.quantile(boots, [0.025, 0.975])
    p = min(1.0, 2 * (min(int((boots <= 0).sum()), int((boots >= 0).sum())) + 1) / (n_boot + 1))
    return float(d.mean()), (float(lo), float(hi)), float(p)


def paired_test(a: Sequence, b: Sequence, *, n_boot: int = 2000, seed: int = 0) -> PairedTest:
    """B against A on the same items: McNemar for binary outcomes, else the paired bootstrap (its CI in both)."""
    effect, ci, p = paired_bootstrap(a, b, n_boot=n_boot, seed=seed)
    if all(isinstance(v, (bool, np.bool_)) for v in list(a) + list(b)):
        p, discordant = mcnemar(a, b)
        return PairedTest("mcnemar_exact", len(a), effect, ci, p, discordant)
    return PairedTest("paired_bootstrap", len(a), effect, ci, p)


def holm(pvalues: Mapping[str, float]) -> dict[str, float]:
    """Holm-adjusted p-values of a family of tests (same keys)."""
    order = sorted(pvalues, key=lambda k: pvalues[k])
    m, running, out = len(order), 0.0, {}
    for i, k in enumerate(order):
        running = max(running, min(1.0, (m - i) * pvalues[k]))
        out[k] = running
    return out
