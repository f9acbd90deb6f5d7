"""How stable CNT's located subset is across seeds: runs of one application that differ only in their seed (another
split draw, other locate prompts, other mask initialisations) compared budget by budget — the effect's mean and spread,
the minimal subset's size, and the overlap of the selected units (Jaccard) beside the overlap two random subsets of the
same sizes would have by chance, and of their layer maps — over every pair of seeds, and against the seed whose subset
moved the function furthest (the best-scored one: how far the other draws land from the subset a researcher would keep).

Pure functions of :class:`cnt.results.ApplicationResult` records; :mod:`cnt.report` prints them and writes them into
``summary.json``. A run's selected units are ``MethodEntry.units`` (``{kind: {layer: [index, ...]}}``)."""

from __future__ import annotations

import itertools
import statistics
from collections.abc import Mapping, Sequence

from .arch import ArchFingerprint
from .outcomes import gap_share
from .provenance import same_code
from .results import ApplicationResult, MethodEntry

# what may differ between two runs that count as seeds of one CNT configuration: the seed, the name a grid's seed axis
# gives the run, and the baselines' settings (a seed run may measure CNT alone: `-p baselines "[]"`)
SEED_KEYS = ("seed", "tag", "baselines", "lambdas", "densities", "random_seeds", "sft_steps", "sft_small_data")


def unit_set(units: Mapping[str, Mapping]) -> set[tuple[str, int, int]]:
    """``{kind: {layer: [index]}}`` (JSON keys may be strings) as a set of ``(kind, layer, index)``."""
    return {(kind, int(layer), int(i)) for kind, layers in units.items() for layer, idx in layers.items() for i in idx}


def jaccard(a: set, b: set) -> float:
    """|a ∩ b| / |a ∪ b| (1.0 for two empty sets)."""
    union = len(a | b)
    return len(a & b) / union if union else 1.0


def containment(a: set, b: set) -> float:
    """|a ∩ b| / min(|a|, |b|): 1.0 when the smaller set lies inside the larger (subsets of different sizes, such as
    two seeds' minimal subsets, can share every unit of the smaller yet have a small Jaccard overlap)."""
    small = min(len(a), len(b))
    return len(a & b) / small if small else 1.0


def chance_jaccard(k1: int, k2: int, n: int) -> float:
    """The expected Jaccard overlap of two uniformly random subsets of sizes ``k1`` and ``k2`` out of ``n`` units
    (ratio of expectations: E|∩| = k1·k2/n): what an unstable locator would show."""
    if n <= 0 or not 0 <= k1 <= n or not 0 <= k2 <= n:
        raise ValueError(f"subset sizes {k1}, {k2} must lie in [0, n = {n}]")
    inter = k1 * k2 / n
    union = k1 + k2 - inter
    return inter / union if union else 1.0


def layer_overlap(a: Sequence[int], b: Sequence[int]) -> float:
    """Weighted Jaccard of two per-layer unit counts, Σ min / Σ max: 1.0 when both put the same number of units in
    every layer, whichever units they are."""
    if len(a) != len(b):
        raise ValueError(f"layer maps of different depth: {len(a)} and {len(b)} layers")
    hi = sum(max(x, y) for x, y in zip(a, b))
    return sum(min(x, y) for x, y in zip(a, b)) / hi if hi else 1.0


def _config_key(r: ApplicationResult) -> tuple:
    cfg = {k: v for k, v in r.config.items() if k not in SEED_KEYS}
    return r.application, r.donor, r.target, repr(sorted(cfg.items()))


def seed_groups(results: Mapping[str, ApplicationResult]) -> list[list[tuple[str, ApplicationResult]]]:
    """Runs that differ only in their seed (and the tag a grid's seed axis gives them), two or more per group, each
    ordered by seed; groups in the order their first run appears."""
    groups: dict[tuple, list] = {}
    for name, r in results.items():
        groups.setdefault(_config_key(r), []).append((name, r))
    return [sorted(g, key=lambda x: x[1].config.get("seed", 0)) for g in groups.values()
            if len({r.config.get("seed", 0) for _, r in g}) == len(g) > 1]


def _mean_sd(xs: Sequence[float]) -> tuple[float, float]:
    return statistics.fmean(xs), statistics.stdev(xs) if len(xs) > 1 else 0.0


def _share(r: ApplicationResult, e: MethodEntry) -> float:
    return gap_share(e.score, r.target_score, r.donor_score)


def _overlaps(entries: Sequence[MethodEntry], pairs: Sequence[tuple[int, int]],
              sets: Sequence[set] | None = None) -> tuple[list[float], list[float]]:
    """For each pair of entries, the Jaccard overlap of their units, and of their layer maps where both have one."""
    sets = sets if sets is not None else [unit_set(e.units) for e in entries]
    unit = [jaccard(sets[i], sets[j]) for i, j in pairs]
    layers = [layer_overlap(entries[i].per_layer, entries[j].per_layer) for i, j in pairs
              if entries[i].per_layer and entries[j].per_layer]
    return unit, layers


def _pairwise(entries: Sequence[MethodEntry], fingerprint: ArchFingerprint | None) -> dict:
    """Unit and layer-map overlap over every pair of entries, with the chance level of the unit overlap (two random
    subsets of the same sizes from the units of the kinds they hold)."""
    sets = [unit_set(e.units) for e in entries]
    pairs = list(itertools.combinations(range(len(entries)), 2))
    unit, layers = _overlaps(entries, pairs, sets)
    out = {"jaccard_mean": statistics.fmean(unit), "jaccard_min": min(unit), "jaccard_max": max(unit),
           "containment_mean": statistics.fmean(containment(sets[i], sets[j]) for i, j in pairs),
           "layer_overlap_mean": statistics.fmean(layers) if layers else None}
    if fingerprint is not None:
        n = sum(fingerprint.n_units(kind) for kind in {k for e in entries for k in e.units})
        out["jaccard_chance"] = statistics.fmean(chance_jaccard(len(sets[i]), len(sets[j]), n) for i, j in pairs)
    return out


def _against_best(entries: Sequence[MethodEntry], shares: Sequence[float], seeds: Sequence[int]) -> dict:
    """Unit and layer-map overlap of every other seed's subset with the best-scored seed's (the largest share of the
    gap; the first seed on a tie), as means over the other seeds."""
    best = max(range(len(entries)), key=lambda i: (shares[i], -i))
    unit, layers = _overlaps(entries, [(best, i) for i in range(len(entries)) if i != best])
    return {"best_seed": seeds[best], "jaccard_vs_best": statistics.fmean(unit),
            "layer_overlap_vs_best": statistics.fmean(layers) if layers else None}


def stability(group: Sequence[tuple[str, ApplicationResult]]) -> dict:
    """One group of seed runs (:func:`seed_groups`): per budget, the CNT effect (score and share of the gap) as mean ±
    sd over seeds, each seed's α, and the overlap of the selected units across seeds and against the best-scored
    seed's; the minimal subset's size per seed; every number per seed as well, so a reader can recompute the
    summary. ``same_code``: whether every run was measured by the same sources (:func:`cnt.provenance.same_code`)."""
    runs = [r for _, r in group]
    first = runs[0]
    fp = ArchFingerprint.from_dict(first.fingerprint) if first.fingerprint else None
    budgets: list[dict] = []
    for b in sorted({e.budget for r in runs for e in r.entries("cnt") if e.budget is not None}):
        at = [next((e for e in r.entries("cnt") if e.budget == b), None) for r in runs]
        if any(e is None for e in at):
            continue
        shares = [_share(r, e) for r, e in zip(runs, at)]
        row = {"budget": b, "seeds": [r.config.get("seed", 0) for r in runs], "scores": [e.score for e in at],
               "shares": shares, "alphas": [e.alpha for e in at]}
        row["score_mean"], row["score_sd"] = _mean_sd(row["scores"])
        row["share_mean"], row["share_sd"] = _mean_sd(shares)
        if all(e.units for e in at):
            row.update(_pairwise(at, fp))
            row.update(_against_best(at, shares, row["seeds"]))
        budgets.append(row)
    minimal = [(r.config.get("seed", 0), r.entries("cnt_minimal")[0] if r.entries("cnt_minimal") else None)
               for r in runs]
    found = [e for _, e in minimal if e is not None]
    out = {"application": first.application, "family": first.family or first.config.get("family"),
           "runs": [name for name, _ in group], "seeds": [r.config.get("seed", 0) for r in runs], "budgets": budgets,
           "same_code": same_code([r.code for r in runs]),
           "minimal": {"neuron_fractions": [e.neuron_fraction if e else None for _, e in minimal],
                       "param_fractions": [e.param_fraction if e else None for _, e in minimal],
                       "shares": [_share(r, e) if e else None for r, (_, e) in zip(runs, minimal)]}}
    if len(found) > 1 and all(e.units for e in found):
        out["minimal"].update(_pairwise(found, fp))
    return out


def stabilities(results: Mapping[str, ApplicationResult]) -> list[dict]:
    """:func:`stability` of every seed group in ``results``."""
    return [stability(g) for g in seed_groups(results)]
