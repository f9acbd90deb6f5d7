"""The reproduction report: every claim of the paper beside what the kit measured, from the results JSON only.

(Over 400 lines: the report's sections — claims, headline, seeds, one per application, paired verdicts — each a
function of the results JSON; split them and every section would import the same formatting helpers.)

``write(results_dir)`` reads ``<results_dir>/<application>.json`` (written by :func:`cnt.experiment.run_application`)
as typed records (:class:`cnt.results.ApplicationResult`), writes ``summary.json`` beside them and ``REPORT.md`` one
folder up (``papers/REPORT.md``). Every number in the report is formatted from those files, so the report and the
JSON cannot disagree.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import time
from pathlib import Path

from . import atomic
from .applications import APPLICATIONS, DEFAULT_FAMILY
from .baselines import BASELINES as REGISTRY
from .evaluate.paired import PairedTest, holm, paired_test
from .evaluate.suite import get_profile
from .outcomes import (PER_BUDGET, at_budget, best_budget, gap_share, past, reported, side_delta, side_effects,
                       side_limits, utility_delta, utility_held, utility_kept, utility_tolerance)
from .plots import figure_plan
from .results import ApplicationResult, MethodEntry
from .stability import stabilities

APPLICATION_ORDER = tuple(APPLICATIONS)  # the registry's order
BASELINES = tuple(REGISTRY)  # the baseline registry's names, in its order
SUMMARY_METHODS = ("cnt", "cnt_minimal", *BASELINES)
PAPER = {  # the paper's claims and their source: the abstract of arXiv 2603.18449 (quoted words in quotes; it gives
    # no sparsity figure, so the sparsity row judges the kit's own goal, labelled as such)
    "sparsity": 'abstract: "a minimal subset of neurons" (no figure given; judged against the kit\'s goal, not the '
                "paper's: ≥ 90% of the gap with ≤ 0.25% of the weights)",
    "utility": 'abstract: degradation "less than 1%" "for most models"',
    "effect": "abstract (paraphrase): the function is added or removed (refusal up / down, StereoSet SS toward 50)",
    "baselines": "abstract (paraphrase): CNT outperforms five baselines",
}




def family_of(r: ApplicationResult) -> str:
    return r.family or r.config.get("family") or DEFAULT_FAMILY


def whole_split(r: ApplicationResult) -> bool:
    """Whether the run measured its reported settings on the whole eval split of its function (the two-stage
    ``report`` profile, or any profile that takes every harmful prompt or StereoSet item of ``eval``)."""
    try:
        p = get_profile(r.config.get("profile", ""))
    except ValueError:
        return False
    return p.split == "eval" and (p.stereoset if r.metric == "stereoset_ss" else p.harmful) is None


def run_label(app: str, r: ApplicationResult) -> str:
    """The run's name, marked as history when it was not measured on the whole eval split (an earlier profile and
    earlier code: its numbers stand as the record of that run, not as the kit's current evidence)."""
    if whole_split(r):
        return app
    return f"{app} (history: `{r.config.get('profile', '?')}` profile, {r.when[:10] or 'date unknown'})"


def load_results(results_dir: str | Path, applications=APPLICATION_ORDER) -> dict[str, ApplicationResult]:
    """Every application result under ``results_dir`` as typed records, keyed by its name (``disalignment`` for the
    default family, ``disalignment.<family>`` for others), ordered by application, default family first. Other JSON
    files there (frontiers, benchmarks, the summary) are passed over."""
    found = []
    for path in Path(results_dir).glob("*.json"):
        d = json.loads(path.read_text())
        if isinstance(d, dict) and d.get("application") in applications and "methods" in d:
            r = ApplicationResult.from_dict(d, str(path))
            fam = family_of(r)
            found.append(((applications.index(r.application), fam != DEFAULT_FAMILY, fam, r.tag or ""), path.stem, r))
    return {stem: r for _, stem, r in sorted(found, key=lambda x: x[:2])}


def summary(results: dict[str, ApplicationResult]) -> dict:
    """The shape ``papers/results/summary.json`` promises (one entry per budget or setting per method): the default
    family under ``applications``; any other family's runs, in the same shape, under ``families[<family>]``; tagged
    variant runs (another donor, say) under ``variants[<result name>]``."""
    out: dict = {"applications": {}}
    for stem, r in results.items():
        fam = family_of(r)
        if r.tag:
            out.setdefault("variants", {})[stem] = {"family": fam, "application": r.application,
                                                    **_summary_entry(r)}
            continue
        apps = out["applications"] if fam == DEFAULT_FAMILY else out.setdefault("families", {}).setdefault(fam, {})
        apps[r.application] = _summary_entry(r)
    if found := stabilities(results):
        out["stability"] = found
    return out


def _summary_entry(r: ApplicationResult) -> dict:
    methods = {}
    for name in SUMMARY_METHODS:
        entries = r.methods.get(name)
        if entries is None:
            continue
        methods[name] = [{"neuron_fraction": e.neuron_fraction, "param_fraction": e.param_fraction,
                          "score": e.score, "ci": list(e.ci),
                          "utility": {u: e.utility.get(u) for u in ("mmlu", "nq_open", "perplexity")},
                          **({"setting": e.setting} if e.setting is not None else {}),
                          **({"variant": e.variant} if e.variant is not None else {})} for e in entries]
    comparisons = [{"baseline": x["baseline"], "cnt_better": x["cnt_better"], "significant": x["significant"],
                    "test": x["test"].to_dict() if x["test"] else None, "p_holm": x["p_holm"],
                    "utility_test": x["utility_test"].to_dict() if x["utility_test"] else None,
                    "utility_p_holm": x["utility_p_holm"]} for x in (compare_baselines(r) if r.entries("cnt") else [])]
    per_budget = []
    for x in neuron_level_table(r):
        row = {"budget": x["cnt"].budget, "neuron_fraction": x["fraction"], "beats": x["beats"]}
        for n in PER_BUDGET:
            row[n + "_test"] = x[n + "_test"].to_dict() if x[n + "_test"] else None
            row[n + "_p_holm"] = x.get(n + "_p_holm")
        per_budget.append(row)
    return {"target": r.target, "donor": r.donor, "metric": r.metric,
            "higher_is_goal": r.higher_is_goal, "target_score": r.target_score,
            "donor_score": r.donor_score,
            "target_utility": {u: r.target_utility.get(u) for u in ("mmlu", "nq_open", "perplexity")},
            "methods": methods, "comparisons": comparisons, "per_budget": per_budget}


# ---------------------------------------------------------------------------------------------------------------------
# formatting
# ---------------------------------------------------------------------------------------------------------------------

def _fmt_test(t: PairedTest, p_adjusted: float | None = None) -> str:
    """A paired test in words: the effect (B − A, in the metric's per-item units) with its CI and the p-value."""
    p = t.p if p_adjusted is None else p_adjusted
    return (f"{'McNemar' if t.test == 'mcnemar_exact' else 'paired bootstrap'} Δ {t.effect:+.3g} "
            f"[{t.ci[0]:+.3g}, {t.ci[1]:+.3g}], p{'_holm' if p_adjusted is not None else ''} = {p:.2g}, n = {t.n}")


def _pct(x: float | None, digits: int = 1) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.{digits}f}%"


def _score(r: ApplicationResult, v: float | None) -> str:
    if v is None:
        return "–"
    return _pct(v) if r.metric == "refusal_rate" else f"{v:.1f}"


def _ci(r: ApplicationResult, ci) -> str:
    return f"[{_score(r, ci[0])}, {_score(r, ci[1])}]" if ci else ""


def _share(r: ApplicationResult, e: MethodEntry) -> float:
    return gap_share(e.score, r.target_score, r.donor_score)


def _share_ci(r: ApplicationResult, e: MethodEntry) -> tuple[float, float]:
    a, b = (gap_share(c, r.target_score, r.donor_score) for c in e.ci)
    return (min(a, b), max(a, b))


SIDE_LABELS = {"arithmetic_acc": "skill", "false_refusal_rate": "false refusal"}


def _fmt_side(d: dict) -> str:
    return ", ".join(f"{SIDE_LABELS[k]} {100 * v:+.1f} pp" for k, v in d.items())


def _fmt_delta(d: dict) -> str:
    parts = []
    if "mmlu" in d:
        parts.append(f"MMLU {100 * d['mmlu']:+.1f} pp")
    if "nq_open" in d:
        parts.append(f"NQ {100 * d['nq_open']:+.1f} pp")
    if "perplexity" in d:
        parts.append(f"ppl {100 * d['perplexity']:+.1f}%")
    return ", ".join(parts) or "–"


def _fmt_change(utility: dict, side: dict) -> str:
    """Utility and side changes in one phrase (``ppl +3.1%, false refusal +13.6 pp``)."""
    return ", ".join(p for p in (_fmt_delta(utility) if utility else "", _fmt_side(side)) if p) or "–"


SPARSITY_GOAL = 0.9  # share of the gap the sparsity claim is judged at
SPARSITY_BUDGET = 0.0025  # the kit's own goal for a minimal subset, in weights (the paper's abstract gives none)


def headline(r: ApplicationResult) -> tuple[str, MethodEntry] | None:
    """CNT's headline entry and what it is: the minimal subset when the search found one, else the sparsest budget
    that reached 90% of the gap on eval, else the best budget (:func:`cnt.outcomes.best_budget`). Among budgets that
    reached 90%, the sparsest one that held utility (:func:`cnt.outcomes.utility_kept`) comes first."""
    if r.entries("cnt_minimal"):
        return "cnt_minimal", r.entries("cnt_minimal")[0]
    reached = [e for e in r.entries("cnt") if _share(r, e) >= SPARSITY_GOAL]
    if reached:
        kept = [e for e in reached if utility_kept(r, e)] or reached
        return "cnt (sparsest budget reaching 90%)", min(kept, key=lambda e: e.param_fraction)
    e = best_budget(r)
    return ("cnt (best budget)", e) if e else None


INCONCLUSIVE = "inconclusive: donor and target CIs overlap"
UNTESTED = "untested: no paired test"


def gap_significant(r: ApplicationResult) -> bool:
    """Whether the donor and the target differ on the eval split (their 95% CIs do not overlap): without that, a share
    of the gap — sparsity, beating baselines — is a ratio of noise and no claim is judged on it."""
    (tlo, thi), (dlo, dhi) = r.target_ci, r.donor_ci
    return thi < dlo or dhi < tlo


def _goal_better(r: ApplicationResult, a: float, b: float) -> bool:
    return a > b if r.higher_is_goal else a < b


SIGNIFICANCE = 0.05  # family-wise, after Holm's adjustment across an application's baselines


def paired(a: MethodEntry | None, b: MethodEntry | None, key: str, r: ApplicationResult) -> PairedTest | None:
    """``b`` against ``a`` on the same eval items (``key``: the metric or ``perplexity``; ``a`` None: the target):
    McNemar for refusals, the paired bootstrap otherwise. None when either side has no per-item outcomes (results
    written before they were recorded) or they cover different items: then no verdict is drawn from it."""
    xs = (r.target_per_item if a is None else a.per_item) or {}
    ys = (b.per_item or {}) if b is not None else {}
    if key not in xs or key not in ys or len(xs[key]) != len(ys[key]) or not xs[key]:
        return None
    return paired_test(xs[key], ys[key])


def compare_baselines(r: ApplicationResult) -> list[dict]:
    """CNT (its best budget, :func:`cnt.outcomes.best_budget`) against each baseline's reported setting
    (:func:`cnt.outcomes.reported`: chosen on validation; random and weight-delta at that CNT budget).
    ``cnt_better``: CNT went further toward the donor. ``cnt_better_at_utility``: CNT went further, or the baseline
    went further only by breaking utility — perplexity up by more than the run's limit (+2%), MMLU/NQ down likewise,
    false refusal up or the specialist's skill down by more than 5 points (:func:`cnt.outcomes.side_limits`); each
    limit widened to CNT's own change where CNT's was larger — the paper's claim is about the function *at kept
    utility*. ``baseline_side``: the baseline's false refusal and skill against the target. ``test``: CNT against
    the baseline on the same eval items (:func:`paired`), ``p_holm`` its p-value after Holm's adjustment across the
    application's baselines, ``significant`` whether CNT went further with ``p_holm`` below :data:`SIGNIFICANCE`
    (None: no paired test possible); ``utility_test`` / ``utility_p_holm``: the baseline's perplexity against the
    target's, item by item, adjusted the same way."""
    cnt_best = best_budget(r)
    cnt_delta = utility_delta(r, cnt_best)
    allowance = max(utility_tolerance(r), cnt_delta.get("perplexity", 0.0))
    cnt_side = side_delta(r, cnt_best)
    side_allowance = {k: (max if lim > 0 else min)(lim, cnt_side.get(k, 0.0)) for k, lim in side_limits(r).items()}
    rows = []
    for name in BASELINES:
        e = reported(r, name)
        if e is None:
            continue
        better = _goal_better(r, cnt_best.score, e.score)
        delta, side = utility_delta(r, e), side_delta(r, e)
        held = utility_held(delta, allowance) and not any(past(v, side_allowance[k]) for k, v in side.items())
        rows.append({"baseline": name, "entry": e, "cnt": cnt_best, "cnt_better": better,
                     "test": paired(e, cnt_best, r.metric, r), "utility_test": paired(None, e, "perplexity", r),
                     "baseline_utility_held": held, "baseline_utility": delta, "baseline_side": side,
                     "cnt_better_at_utility": better or not held,
                     "cnt_share": _share(r, cnt_best), "baseline_share": _share(r, e)})
    for key, out in (("test", "p_holm"), ("utility_test", "utility_p_holm")):
        adjusted = holm({x["baseline"]: x[key].p for x in rows if x[key] is not None})
        for x in rows:
            x[out] = adjusted.get(x["baseline"])
    for x in rows:
        x["significant"] = None if x["p_holm"] is None else bool(x["cnt_better"] and x["p_holm"] < SIGNIFICANCE)
    return rows


def neuron_level_table(r: ApplicationResult) -> list[dict]:
    """Per budget: CNT's best variant against random and weight-delta measured at the same budget
    (:func:`cnt.outcomes.at_budget`), each on the same eval items (:func:`paired`, under ``<name>_test``), the
    p-values Holm-adjusted across every comparison of the table (``<name>_p_holm``). ``beats``: True where CNT went
    further than each baseline measured there with ``p_holm`` below :data:`SIGNIFICANCE`, False where it did not, None
    where there is no verdict — no baseline at that budget, or one without per-item outcomes (no paired test)."""
    rows = []
    for e in r.entries("cnt"):
        row = {"fraction": e.neuron_fraction, "cnt": e}
        for name in PER_BUDGET:
            row[name] = at_budget(r, name, e)
            row[name + "_test"] = paired(row[name], e, r.metric, r) if row[name] is not None else None
        rows.append(row)
    adjusted = holm({(i, name): row[name + "_test"].p for i, row in enumerate(rows) for name in PER_BUDGET
                     if row[name + "_test"] is not None})
    for i, row in enumerate(rows):
        verdicts = []
        for name in (n for n in PER_BUDGET if row[n] is not None):
            row[name + "_p_holm"] = p = adjusted.get((i, name))
            verdicts.append(None if p is None else _goal_better(r, row["cnt"].score, row[name].score)
                            and p < SIGNIFICANCE)
        row["beats"] = None if not verdicts or None in verdicts else all(verdicts)
    return rows


def beats_cell(row: dict) -> str:
    """A :func:`neuron_level_table` row's verdict with its Holm-adjusted p-values, or why there is none."""
    present = [n for n in PER_BUDGET if row[n] is not None]
    if not present:
        return "– (not measured at this budget)"
    if row["beats"] is None:
        return "– (no per-item outcomes: no paired test)"
    ps = ", ".join(f"{n.replace('_', '-')} {row[n + '_p_holm']:.2g}" for n in present)
    return f"{'yes' if row['beats'] else 'no'} (Holm p: {ps})"


def beats_summary(rows: list[dict]) -> str:
    """Whether CNT beat random and weight-delta at every budget of a run, by the paired verdicts of
    :func:`neuron_level_table`, saying how many budgets had none."""
    if not rows:
        return "–"
    yes, none = sum(x["beats"] is True for x in rows), sum(x["beats"] is None for x in rows)
    if not any(x[n] is not None for x in rows for n in PER_BUDGET):
        return "– (random and weight-delta not run)"
    if none == len(rows):
        return "– (no per-item outcomes: no paired test)"
    tested = len(rows) - none
    verdict = "yes" if yes == tested else f"no ({yes}/{tested})"
    return verdict + (f"; {none} of {len(rows)} budgets without a paired test" if none else "")


# ---------------------------------------------------------------------------------------------------------------------
# the report
# ---------------------------------------------------------------------------------------------------------------------

def from_invocation(results: dict[str, ApplicationResult], invocation: dict) -> bool:
    """Whether every result was written within ``invocation`` (a ``timings.json`` record with its end ``when`` and
    ``seconds``; a record without ``when`` proves nothing)."""
    if not invocation.get("when") or not results:
        return False
    end = dt.datetime.fromisoformat(invocation["when"])
    start = end - dt.timedelta(seconds=invocation.get("seconds", 0) + 1)
    try:
        return all(start <= dt.datetime.fromisoformat(r.when) <= end + dt.timedelta(seconds=1)
                   for r in results.values())
    except ValueError:  # a result without its time
        return False


def render(results: dict[str, ApplicationResult], figures: str = "figures", timings: dict | None = None) -> str:
    """``timings``: ``papers/runs/timings.json`` (written by ``cnt reproduce``), for the duration of the last full
    default invocation."""
    full = (timings or {}).get("last_full_invocation")
    took = ""
    if full and (not results or from_invocation(results, full)):
        took = (f" The last full `make reproduce` took {full['seconds'] / 60:.1f} min in one invocation ("
                f"{len(full['notebooks'])} notebooks, {full.get('jobs', 1)} side by side; `papers/runs/timings.json`)"
                + (" and wrote every result below." if results else "."))
    elif results:
        took = (" The results below do not all come from one `make reproduce` invocation: each section states its own "
                "run and its time (the notebook's entry in `papers/runs/timings.json` says how it was run)")
        if full:
            took += f"; the last full default invocation took {full['seconds'] / 60:.1f} min"
            took += f" ({full['when'][:10]})" if full.get("when") else ""
        took += "."
    L = ["# Reproduction report — Cross-Model Neuron Transfer (arXiv 2603.18449)", "",
         "Regenerated (`make reproduce`, or `cnt report` alone) from `papers/results/*.json` on "
         f"{time.strftime('%Y-%m-%d %H:%M')}. "
         "Every number below is formatted from those files; scores are on the eval splits with 95% CIs (Wilson for "
         "rates, bootstrap for SS); all hyper-parameters (α, λ, density, layer, CNT variant, minimal subset) were "
         "chosen on the validation split. Share of gap = (method − target) / (donor − target)." + took, ""]
    if not results:
        return "\n".join(L + ["No results yet: run `make reproduce`."]) + "\n"
    no_lm_eval = [stem for stem, r in results.items() if "mmlu" not in r.target_utility]
    if no_lm_eval:
        L += [f"Utility in {', '.join(no_lm_eval)} is perplexity, with the specialist's skill and false refusal beside "
              "it: the `report` and `sweep` profiles skip MMLU and NQ-Open, which for the SmolLM2 zoo sit at chance "
              "level (see its card, `papers/zoo.md`) and could not register a 1% change. `-p profile=quick` or `full` "
              "adds them.",
              ""]
    history = [stem for stem, r in results.items() if not whole_split(r)]
    if history:
        L += [f"Marked *history*: {', '.join(history)} — runs measured before the two-stage evaluation (their reported "
              "settings on a sample of the eval split, e.g. the `sweep` profile's 48 harmful prompts or 160 StereoSet "
              "items, and with the code of their date); they stand as the record of those runs until re-run with "
              "`-p profile=report`, and their verdicts carry the width of their CIs.", ""]
    L += ["## Claims", "", "| claim (source) | application | measured | verdict |", "|---|---|---|---|"]
    for app, r in results.items():
        if (found := headline(r)) is None:
            continue
        label, h = found
        sh, (slo, shi) = _share(r, h), _share_ci(r, h)
        pf = h.param_fraction
        verdict = (INCONCLUSIVE if not gap_significant(r) else
                   "supported" if pf <= SPARSITY_BUDGET and sh >= SPARSITY_GOAL else
                   "partly: sparse but short of 90% of the gap" if pf <= SPARSITY_BUDGET else
                   f"not reached: needs more than {_pct(SPARSITY_BUDGET, 2)} of weights")
        L.append(f"| sparsity: {PAPER['sparsity']} | {run_label(app, r)} | {label}: {_pct(pf, 3)} of weights "
                 f"({_pct(h.neuron_fraction, 2)} of MLP neurons) → {_pct(sh, 0)} of the gap [{_pct(slo, 0)}, "
                 f"{_pct(shi, 0)}] | {verdict} |")
    for app, r in results.items():
        if (found := headline(r)) is None:
            continue
        label, h = found
        d = utility_delta(r, h)
        worst = max([abs(d.get("mmlu", 0)), abs(d.get("nq_open", 0)), max(d.get("perplexity", 0), 0)])
        ci = h.utility_ci.get("mmlu")
        width = f"; MMLU CI ±{100 * (ci[1] - ci[0]) / 2:.0f} pp at this sample size" if ci else ""
        verdict = "within 1%" if worst <= 0.01 else "within 2%" if worst <= 0.02 else "exceeds 1%"
        side, bad = side_delta(r, h), side_effects(r, h)
        if bad:
            verdict += f"; but {_fmt_side(bad)}"
        measured = _fmt_delta(d) + (f"; {_fmt_side(side)}" if side else "")
        L.append(f"| utility: {PAPER['utility']} | {run_label(app, r)} | {label}: {measured}{width} | {verdict} |")
    for app, r in results.items():
        if (found := headline(r)) is None:
            continue
        label, h = found
        moved = _goal_better(r, h.score, r.target_score)
        test = paired(None, h, r.metric, r)
        verdict = ("not reproduced" if not moved else
                   "direction right; no paired test (the results hold no per-item outcomes)" if test is None else
                   "supported" if test.p < SIGNIFICANCE else "direction right, not significant")
        tested = f"; paired against the target: {_fmt_test(test)}" if test is not None else ""
        L.append(f"| effect: {PAPER['effect']} | {run_label(app, r)} | {r.metric} {_score(r, r.target_score)} → "
                 f"{_score(r, h.score)} {_ci(r, h.ci)} (donor {_score(r, r.donor_score)}){tested} | {verdict} |")
    for app, r in results.items():
        rows = compare_baselines(r)
        if not rows:
            continue
        won = [x["baseline"] for x in rows if x["cnt_better"]]
        sig = [f"{x['baseline']} ({_fmt_test(x['test'], x['p_holm'])})" for x in rows if x["significant"]]
        untested = [x["baseline"] for x in rows if x["significant"] is None]
        broke = [f"{x['baseline']} ({_fmt_change(x['baseline_utility'], x['baseline_side'])})" for x in rows
                 if not x["cnt_better"] and not x["baseline_utility_held"]]
        lost = [x["baseline"] for x in rows if not x["cnt_better_at_utility"]]
        verdict = (f"supported ({len(rows)}/{len(rows)} at kept utility)" if not lost else
                   f"partly: {len(rows) - len(lost)}/{len(rows)} beaten at kept utility")
        if not gap_significant(r):
            verdict = f"{INCONCLUSIVE} (point estimates: {verdict})"
        elif untested:  # a verdict needs its test
            verdict = f"{UNTESTED} (point estimates: {verdict})"
        significantly = (f"; significantly (paired test, Holm-adjusted p < {SIGNIFICANCE:g}): {', '.join(sig)}"
                         if sig else "")
        if untested:
            significantly += f"; no paired test for {', '.join(untested)} (the results hold no per-item outcomes)"
        went_further = f"; went further only by breaking utility: {', '.join(broke)}" if broke else ""
        not_better = f"; went further with utility kept: {', '.join(lost)}" if lost else ""
        L.append(f"| baselines: {PAPER['baselines']} | {run_label(app, r)} | CNT "
                 f"({_pct(rows[0]['cnt'].param_fraction, 2)} of weights) moved further than {', '.join(won) or 'none'}"
                 f"{significantly}{went_further}{not_better} | {verdict} |")
    L += ["", *family_table(results), ""]
    L += seeds_section(results)
    for app, r in results.items():
        L += application_section(app, r, figures)
    return "\n".join(L) + "\n"


def family_table(results: dict[str, ApplicationResult]) -> list[str]:
    """One row per (family, application) run: target and donor, CNT's furthest budget, the minimal subset, and
    whether CNT beat random and weight-delta neurons at every budget (:func:`beats_summary`)."""
    L = ["## Per model family", "",
         "| family | application | donor → target | target | donor | CNT (headline) | share of gap | utility change "
         "| minimal subset | beats random & weight-delta at every budget (paired tests, Holm) |",
         "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results.values():
        label, h = headline(r) or (None, None)
        rows = neuron_level_table(r)
        mini = (r.entries("cnt_minimal") or [None])[0]
        mini_s = (f"{_pct(mini.neuron_fraction, 2)} of neurons → {_score(r, mini.score)}" if mini else
                  "not reached" if r.search else "not run")
        app = r.application + (f" ({r.tag})" if r.tag else "")
        L.append(f"| {family_of(r)} | {run_label(app, r)} | {r.donor} → {r.target} | "
                 f"{_score(r, r.target_score)} | {_score(r, r.donor_score)} | "
                 + (f"{label}: {_score(r, h.score)} {_ci(r, h.ci)} | {_pct(_share(r, h), 0)} | "
                    f"{_fmt_delta(utility_delta(r, h))}" if h else "– | – | –")
                 + f" | {mini_s} | {beats_summary(rows)} |")
    return L


def seeds_section(results: dict[str, ApplicationResult]) -> list[str]:
    """Runs that differ only in their seed (:mod:`cnt.stability`): per budget, CNT's share of the gap as mean ± sd
    over seeds, and how much the selected units overlap across seeds (Jaccard, beside two random subsets' overlap by
    chance) and their layer maps; the minimal subset's size per seed. Empty without such runs."""
    groups = stabilities(results)
    if not groups:
        return []
    L = ["## Seeds: the effect's spread and the stability of the located units", "",
         "Runs of one configuration that differ only in their seed (another split draw, other locate prompts, other "
         "mask initialisations), each measured on its own eval split. Jaccard: |A ∩ B| / |A ∪ B| of the selected "
         "units, mean [min, max] over pairs of seeds; chance: two random subsets of the same sizes; layer maps: "
         "Σ min / Σ max of the per-layer counts; vs best: the same two overlaps of the other seeds' subsets with the "
         "subset of the seed that went furthest (its seed named), mean over the other seeds.", "",
         "| application | runs | MLP neurons | share of gap, mean ± sd | per seed | α per seed | Jaccard of units "
         "| chance | layer maps | vs best seed: Jaccard; layer maps |", "|---|---|---|---|---|---|---|---|---|---|"]
    minimal = []
    for g in groups:
        runs = ", ".join(g["runs"])
        for row in g["budgets"]:
            jac = (f"{row['jaccard_mean']:.2f} [{row['jaccard_min']:.2f}, {row['jaccard_max']:.2f}]"
                   if "jaccard_mean" in row else "– (units not recorded)")
            chance = f"{row['jaccard_chance']:.3f}" if "jaccard_chance" in row else "–"
            layers = f"{row['layer_overlap_mean']:.2f}" if row.get("layer_overlap_mean") is not None else "–"
            best = (f"seed {row['best_seed']}: {row['jaccard_vs_best']:.2f}; "
                    + (f"{row['layer_overlap_vs_best']:.2f}" if row["layer_overlap_vs_best"] is not None else "–")
                    if "best_seed" in row else "–")
            L.append(f"| {g['application']} ({g['family']}) | {runs} | {_pct(row['budget'], 2)} | "
                     f"{_pct(row['share_mean'], 0)} ± {_pct(row['share_sd'], 0)} | "
                     f"{', '.join(_pct(x, 0) for x in row['shares'])} | "
                     f"{', '.join(f'{a:g}' for a in row['alphas'] if a is not None)} | {jac} | {chance} | {layers} | "
                     f"{best} |")
        m = g["minimal"]
        sizes = ", ".join("not reached" if f is None else f"{_pct(f, 2)} of neurons ({_pct(p, 3)} of weights)"
                          for f, p in zip(m["neuron_fractions"], m["param_fractions"]))
        chance = m.get("jaccard_chance", float("nan"))
        overlap = (f"; Jaccard of their units {m['jaccard_mean']:.2f} (chance {chance:.3f}), "
                   f"share of the smaller subset's units in the larger {m['containment_mean']:.2f}"
                   if "jaccard_mean" in m else "")
        minimal.append(f"- {g['application']} ({g['family']}), minimal subset per seed: {sizes}{overlap}.")
        if g.get("same_code") is not True:
            minimal.append(f"  Its runs ({runs}) were measured by "
                           + ("different versions of the kit's code (their results record different sources): the "
                              "spread mixes the seeds' draws with the code's changes." if g.get("same_code") is False
                              else "code not all recorded in their results (written before the kit kept its sources' "
                                   "digest): whether one code measured them all is not known."))
    return L + ["", *minimal, ""]


def application_section(app: str, r: ApplicationResult, figures: str) -> list[str]:
    L = [f"## {run_label(app, r)}: {r.donor} → {r.target} ({r.function})", "",
         f"Target {r.metric} {_score(r, r.target_score)} {_ci(r, r.target_ci)}, donor "
         f"{_score(r, r.donor_score)} {_ci(r, r.donor_ci)}; profile `{r.config['profile']}`; "
         f"{r.n_params:,} parameters; run {r.seconds / 60:.1f} min"
         + (f" ({r.torch_threads} torch thread{'s' if r.torch_threads > 1 else ''}; wall times in this section "
            f"come from that run)" if r.torch_threads else "") + ".", ""]
    L += ["### CNT against random and weight-delta neurons at every budget", "",
          "| MLP neurons | CNT (" + ((r.entries("cnt")[0].variant or "") if r.entries("cnt") else "")
          + ") | random (one draw, or mean ± sd over draws) | weight-delta | CNT beats both (paired test) |",
          "|---|---|---|---|---|"]
    for row in neuron_level_table(r):
        c, ra, w = row["cnt"], row["random"], row["weight_delta"]
        sd = (ra.score_sd or 0) if ra else 0
        draws = len(ra.seeds or []) if ra else 0
        L.append(f"| {_pct(row['fraction'], 2)} | {_score(r, c.score)} {_ci(r, c.ci)} | "
                 + ("–" if not ra else
                    f"{_score(r, ra.score)} ± {_score(r, sd) if r.metric != 'refusal_rate' else _pct(sd)} "
                    f"({draws} draws)" if draws > 1 else f"{_score(r, ra.score)} {_ci(r, ra.ci)}")
                 + f" | {(_score(r, w.score) + ' ' + _ci(r, w.ci)) if w else '–'} | {beats_cell(row)} |")
    L += ["", "### Every method (reported setting; swept baselines chosen on validation)", "",
          "| method | setting | params changed | score | share of gap | utility change | wall time |",
          "|---|---|---|---|---|---|---|"]
    for name, entries in r.methods.items():
        if name.startswith("cnt_") and name != "cnt_minimal":
            continue
        for e in entries:
            setting = e.setting or {k: getattr(e, k) for k in ("budget", "alpha") if getattr(e, k) is not None}
            setting = {k: v for k, v in setting.items() if k not in ("seed",) or name != "random"}
            secs = e.seconds
            side = _fmt_side(side_delta(r, e))
            L.append(f"| {name} | {_setting_str(setting)} | {_pct(e.param_fraction, 3)} | "
                     f"{_score(r, e.score)} {_ci(r, e.ci)} | {_pct(_share(r, e), 0)} | "
                     f"{_fmt_delta(utility_delta(r, e))}{'; ' + side if side else ''} | "
                     f"{f'{secs:.0f} s' if secs is not None else '–'} |")
    ceiling = (r.entries("all_mlp") or [None])[0]
    if ceiling:
        L += ["", f"Every MLP neuron of every layer at α=1 (the donor's MLPs entire — the most an α=1 subset can copy; "
                  f"the rest of the donor's difference lives in attention, norms and embeddings): "
                  f"{_score(r, ceiling.score)} "
                  f"{_ci(r, ceiling.ci)}, {_pct(_share(r, ceiling), 0)} of the gap."]
    t = r.timings
    if "cnt_total" in t:
        sft = t.get("sft")
        L += ["", f"CNT cost (task + locate + search): {t['cnt_total']:.0f} s"
              + (f"; SFT reference (incl. its data): {sft:.0f} s (ratio {t['cnt_total'] / sft:.2f})" if sft else "")
              + "."]
    stem = r.name or app
    plan = figure_plan(r)
    L += ["", *(f"![{plan[name]}]({figures}/{stem}_{name}.png)" for name in ("effect", "tradeoff", "tradeoff_ppl")
                if name in plan), ""]
    return L


def _setting_str(s: dict) -> str:
    return ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in s.items()) or "–"


def write(results_dir: str | Path = "papers/results", report: str | Path | None = None) -> tuple[Path, Path]:
    """Write ``summary.json`` (in ``results_dir``) and ``REPORT.md`` (default: beside ``results_dir``)."""
    results_dir = Path(results_dir)
    results = load_results(results_dir)
    results_dir.mkdir(parents=True, exist_ok=True)  # no results yet: an empty summary and a report that says so
    summary_path = results_dir / "summary.json"
    atomic.write_json(summary_path, summary(results))
    report = Path(report) if report else results_dir.parent / "REPORT.md"
    timings = results_dir.parent / "runs" / "timings.json"
    atomic.write_text(report, render(results, timings=json.loads(timings.read_text()) if timings.is_file() else None))
    return summary_path, report
