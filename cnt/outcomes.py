"""What each setting of an application run did on eval, judged by the run's own limits, and which setting of each
method the run reports.

* where a score lies between the target's and the donor's (:func:`gap_share`, the share of the gap it closed);
* the changes against the unmodified target: utility (:func:`utility_delta`: perplexity relative, MMLU / NQ-Open in
  points) and the side metrics (:func:`side_delta`: false refusal, the specialist's skill, in points);
* whether a setting held utility (:func:`utility_kept`): perplexity within the run's own limit, the side metrics
  within :func:`side_limits`;
* the reported setting of each method (:func:`reported`): CNT's best budget (:func:`best_budget`: the furthest toward
  the donor among the budgets that held utility), random and weight-delta at that budget, a baseline's setting chosen
  on validation. The report's verdicts and the figures read the same choice from here.
"""

from __future__ import annotations

from .results import ApplicationResult, MethodEntry

UTILITY_TOLERANCE = 0.02  # a result without a search record: "kept utility" within +2% perplexity (judge's default)
# the kit's utility goals for the side metrics, in points against the target: the specialist's skill down by at most
# 5, false refusal up by at most 5 (a run's own rule, where its JSON records one, sets false refusal's)
SIDE_LIMITS = {"arithmetic_acc": -0.05, "false_refusal_rate": 0.05}
PER_BUDGET = ("random", "weight_delta")  # baselines measured at every CNT budget; reported at CNT's best one


def gap_share(score: float, target: float, donor: float) -> float:
    """Where ``score`` lies on the way from the target's value (0) to the donor's (1): the share of the donor–target
    gap a modified model closed (NaN where the two do not differ)."""
    gap = donor - target
    return (score - target) / gap if gap else float("nan")


def utility_delta(r: ApplicationResult, e: MethodEntry) -> dict:
    """``e``'s utility against the target: perplexity as a relative change, MMLU and NQ-Open in points."""
    t = r.target_utility
    out = {u: e.utility[u] - t[u] for u in ("mmlu", "nq_open") if u in e.utility and u in t}
    if "perplexity" in e.utility and t.get("perplexity"):
        out["perplexity"] = e.utility["perplexity"] / t["perplexity"] - 1
    return out


def side_delta(r: ApplicationResult, e: MethodEntry) -> dict:
    """The specialist's skill and false refusal, in points against the unmodified target (where measured)."""
    t, m = r.target_side, e.side
    return {k: m[k] - t[k] for k in SIDE_LIMITS if m.get(k) is not None and t.get(k) is not None}


def utility_tolerance(r: ApplicationResult) -> float:
    """The perplexity limit the run's own search rule used (recorded in its JSON), else :data:`UTILITY_TOLERANCE`."""
    return float((r.search or {}).get("max_ppl_increase", UTILITY_TOLERANCE))


def utility_held(d: dict, allowance: float = UTILITY_TOLERANCE) -> bool:
    """Whether a utility change (as :func:`utility_delta` gives it) stays within ``allowance``."""
    worst = max([d.get("perplexity", 0.0), -d.get("mmlu", 0.0), -d.get("nq_open", 0.0)])
    return worst <= allowance


def side_limits(r: ApplicationResult) -> dict:
    """:data:`SIDE_LIMITS`, with false refusal's limit the one the run's own rule used (from its JSON: the validation
    rule, or the search's)."""
    search = r.search or {}
    fr = next((d["max_false_refusal_increase"] for d in ((r.validation or {}).get("rule"), search.get("rule"), search)
               if d and d.get("max_false_refusal_increase") is not None), None)
    return {**SIDE_LIMITS, **({"false_refusal_rate": float(fr)} if fr is not None else {})}


def past(v: float, limit: float) -> bool:
    """Whether a change ``v`` went past ``limit`` (an upper limit when positive, a lower one when negative)."""
    return v > limit if limit > 0 else v < limit


def side_effects(r: ApplicationResult, e: MethodEntry) -> dict:
    """The side metrics (false refusal, the specialist's skill) that moved past :func:`side_limits` against the
    target."""
    limits = side_limits(r)
    return {k: v for k, v in side_delta(r, e).items() if past(v, limits[k])}


def utility_kept(r: ApplicationResult, e: MethodEntry) -> bool:
    """Whether ``e`` held utility on eval by the run's own limits: perplexity (MMLU, NQ) within
    :func:`utility_tolerance`, false refusal and the specialist's skill within :func:`side_limits`."""
    return utility_held(utility_delta(r, e), utility_tolerance(r)) and not side_effects(r, e)


def best_budget(r: ApplicationResult, name: str = "cnt") -> MethodEntry | None:
    """CNT's best budget (``name``: CNT, or one of its locator variants, ``cnt_<scorer>``): the one that moved
    furthest toward the donor among those that held utility on eval (:func:`utility_kept`; all of them when none did),
    the sparser one on a tie — so a budget that went as far only by breaking a utility limit is not the one
    reported."""
    entries = r.entries(name)
    if not entries:
        return None
    pool = [e for e in entries if utility_kept(r, e)] or entries
    sign = 1 if r.higher_is_goal else -1
    return max(pool, key=lambda e: (sign * e.score, -e.param_fraction))


def at_budget(r: ApplicationResult, name: str, cnt: MethodEntry) -> MethodEntry | None:
    """The entry of the per-budget method ``name`` (:data:`PER_BUDGET`) measured at the budget of the CNT entry
    ``cnt``: the one whose setting records the same budget, or (results that did not record it) the one at the same
    share of MLP neurons. None when the run measured ``name`` at no such budget (a CNT budget in weights that chose
    heads moves fewer MLP neurons than random's at the same budget: the recorded budget, not the neurons, matches)."""
    for e in r.entries(name):
        budget = (e.setting or {}).get("budget")
        if budget is not None and cnt.budget is not None:
            if abs(budget - cnt.budget) <= 1e-9 * max(1.0, abs(budget)):
                return e
        elif (e.neuron_fraction is not None and cnt.neuron_fraction is not None
              and round(e.neuron_fraction, 6) == round(cnt.neuron_fraction, 6)):
            return e
    return None


def reported(r: ApplicationResult, name: str) -> MethodEntry | None:
    """The setting of method ``name`` the run reports: CNT's best budget (and each locator variant's: a method whose
    entries are CNT budgets); random and weight-delta at CNT's budget (:func:`at_budget`; else the one nearest in MLP
    neurons); any other method's first entry (its setting chosen on validation, or its one setting). None when the
    run has no entry of ``name``."""
    entries = r.entries(name)
    if not entries:
        return None
    if name == "cnt" or all(e.budget is not None for e in entries):
        return best_budget(r, name)
    cnt = best_budget(r)
    if name in PER_BUDGET and cnt is not None and cnt.neuron_fraction is not None:
        return at_budget(r, name, cnt) or min(entries, key=lambda x: abs((x.neuron_fraction or 0.0)
                                                                         - cnt.neuron_fraction))
    return entries[0]
