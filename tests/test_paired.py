"""Paired tests on the same eval items (cnt.evaluate.paired), against hand-computed cases, and the report's use of
them: a verdict only with its test."""

import json
import math

import pytest

from cnt import outcomes, report
from cnt.evaluate import holm, mcnemar, paired_bootstrap, paired_test
from cnt.results import ApplicationResult

from .test_report import FIXTURE


@pytest.mark.parametrize("a, b, p, discordant", [
    ([1, 1, 1, 1, 1, 0], [0, 0, 0, 0, 0, 0], 2 / 2 ** 5, (5, 0)),  # 5 discordant, all one way: 2·(1/32)
    ([1] * 7 + [0, 1, 0], [0] * 7 + [1, 1, 0], 2 * (1 + 8) / 2 ** 8, (7, 1)),  # 2·(C(8,0) + C(8,1))/256
    ([1, 1, 1, 0, 0, 0], [0, 0, 0, 1, 1, 1], 1.0, (3, 3)),  # tied discordant counts: capped at 1
    ([1, 0, 1], [1, 0, 1], 1.0, (0, 0)),  # all outcomes equal: nothing to test
])
def test_mcnemar_exact_matches_hand_computed_cases(a, b, p, discordant):
    assert mcnemar([bool(x) for x in a], [bool(x) for x in b]) == (pytest.approx(p), discordant)


def test_paired_bootstrap_sees_what_independent_cis_miss():
    """Every item moves up by 0.1 with a large spread across items: the paired test is decisive, and all-equal
    outcomes give p = 1 with a zero-width interval."""
    a = [float(i) for i in range(40)]
    b = [x + 0.1 for x in a]
    effect, (lo, hi), p = paired_bootstrap(a, b, n_boot=500)
    assert effect == pytest.approx(0.1) and lo == pytest.approx(0.1) and hi == pytest.approx(0.1)
    assert p == pytest.approx(2 / 501)  # the smallest p the bootstrap can give: no resample crosses zero
    assert paired_bootstrap(a, a, n_boot=100)[1:] == ((0.0, 0.0), 1.0)
    with pytest.raises(ValueError, match="same items: 3 against 2"):
        paired_bootstrap([1.0, 2.0, 3.0], [1.0, 2.0])


def test_paired_test_picks_mcnemar_for_binary_outcomes():
    t = paired_test([True, False] * 10, [True, True] * 10)
    assert t.test == "mcnemar_exact" and t.discordant == (0, 10) and t.p == pytest.approx(2 / 2 ** 10)
    assert t.effect == pytest.approx(0.5) and t.ci[0] < 0.5 < t.ci[1]
    f = paired_test([0.5, 0.25], [0.5, 0.5])
    assert f.test == "paired_bootstrap" and f.discordant is None
    assert json.loads(json.dumps(t.to_dict()))["discordant"] == [0, 10]


def test_holm_adjusts_in_step_down_order():
    adjusted = holm({"a": 0.01, "b": 0.04, "c": 0.03})
    assert adjusted == pytest.approx({"a": 0.03, "c": 0.06, "b": 0.06})  # 3·0.01; 2·0.03; max(0.06, 1·0.04)
    assert holm({"x": 0.6, "y": 0.5}) == pytest.approx({"y": 1.0, "x": 1.0})  # capped at 1, kept monotone
    assert holm({}) == {}


def _with_items(d: dict, n: int = 40) -> dict:
    """The tiny fixture with per-item refusals: the target refuses 4 of ``n``, CNT 36, every baseline 6."""
    out = json.loads(json.dumps(d))
    out.update(target_score=4 / n, target_ci=[0.03, 0.24], donor_score=0.95, donor_ci=[0.83, 0.99],
               target_per_item={d["metric"]: [i < 4 for i in range(n)], "perplexity": [2.0] * n})
    for name, entries in out["methods"].items():
        for e in entries:
            k = 36 if name.startswith("cnt") else 6
            e.update(score=k / n, per_item={d["metric"]: [i < k for i in range(n)], "perplexity": [2.0] * n})
    return out


def test_the_report_decides_baselines_by_paired_tests_and_refuses_a_verdict_without_one(tmp_path):
    d = json.loads(FIXTURE.read_text())
    for e in d["methods"]["cnt"]:  # utility held at every budget: the headline is the budget that moved furthest
        e["side"] = dict(d["target_side"])
    rows = report.compare_baselines(ApplicationResult.from_dict(d))
    assert rows and all(x["test"] is None and x["significant"] is None for x in rows)  # no per-item outcomes
    rows = report.compare_baselines(ApplicationResult.from_dict(_with_items(d)))
    assert all(x["test"].test == "mcnemar_exact" and x["test"].discordant == (0, 30) for x in rows)
    p = 2 / 2 ** 30
    assert [x["p_holm"] for x in rows] == pytest.approx([min(1.0, len(rows) * p)] * len(rows))
    assert all(x["significant"] for x in rows)
    assert all(x["utility_test"].p == 1.0 and x["utility_p_holm"] == 1.0 for x in rows)  # perplexity unchanged
    for blob, expect in ((d, "no paired test for"), (_with_items(d), "significantly (paired test, Holm-adjusted")):
        folder = tmp_path / expect.split()[0]
        (folder / "results").mkdir(parents=True)
        (folder / "results" / "alignment_enhancement.json").write_text(json.dumps(blob))
        summary, rep = report.write(folder / "results", folder / "REPORT.md")
        text = rep.read_text()
        assert expect in next(line for line in text.splitlines() if line.startswith("| baselines:"))
        effect = next(line for line in text.splitlines() if line.startswith("| effect:"))
        assert ("no paired test" in effect) == (blob is d)
        comparisons = json.loads(summary.read_text())["applications"]["alignment_enhancement"]["comparisons"]
        assert all((c["test"] is None) == (blob is d) for c in comparisons)
        if blob is not d:
            assert all(math.isclose(c["test"]["p"], p) for c in comparisons)
    folder = tmp_path / "untested"  # the gap is clear but no per-item outcomes: the baselines' verdict says untested
    (folder / "results").mkdir(parents=True)
    (folder / "results" / "alignment_enhancement.json").write_text(
        json.dumps({**d, "donor_score": 0.9, "donor_ci": [0.7, 0.97]}))
    _, rep = report.write(folder / "results", folder / "REPORT.md")
    row = next(line for line in rep.read_text().splitlines() if line.startswith("| baselines:"))
    assert row.split(" | ")[-1].startswith(report.UNTESTED)


def test_the_per_budget_verdict_against_random_and_weight_delta_comes_from_paired_tests():
    """Each budget's 'CNT beats both' is a paired test against random and weight-delta measured at *that* budget
    (matched by the recorded budget, not by MLP neurons, which heads make differ), Holm-adjusted across the table:
    yes only when every test is significant in CNT's favour; no verdict without per-item outcomes or a baseline."""
    d = _with_items(json.loads(FIXTURE.read_text()))
    n = len(d["target_per_item"][d["metric"]])
    cnt = d["methods"]["cnt"]
    for e in cnt:  # CNT chose heads: fewer MLP neurons than random's at the same budget
        e["neuron_fraction"] = e["budget"] * 0.8
    for name in outcomes.PER_BUDGET:
        d["methods"][name] = [{**json.loads(json.dumps(e)), "setting": {"budget": e["budget"]},
                               "neuron_fraction": e["budget"]} for e in cnt]
        for e in d["methods"][name]:  # the baselines refuse 6 of n: CNT (36 of n) beats them by 30 discordant items
            e.update(score=6 / n, per_item={d["metric"]: [i < 6 for i in range(n)], "perplexity": [2.0] * n})
    close = d["methods"]["random"][0]  # at the first budget random refuses 35: one discordant item, no verdict of "yes"
    close.update(score=35 / n, per_item={d["metric"]: [i < 35 for i in range(n)], "perplexity": [2.0] * n})
    rows = report.neuron_level_table(ApplicationResult.from_dict(d))
    assert [r["random"].setting["budget"] for r in rows] == [e["budget"] for e in cnt]  # matched by budget
    m = 2 * len(rows)
    assert rows[1]["random_p_holm"] == pytest.approx(m * 2 / 2 ** 30, rel=1e-6)  # five equal p: each m·p (monotone)
    assert rows[0]["random_p_holm"] == 1.0 and rows[0]["beats"] is False  # better on the point, not significant
    assert all(r["beats"] is True for r in rows[1:])
    assert report.beats_cell(rows[0]).startswith("no (Holm p: random 1") and report.beats_summary(rows).startswith("no (")
    for e in d["methods"]["weight_delta"][:1]:  # weight-delta's first budget without per-item outcomes: no verdict
        e.pop("per_item")                        # there; the others still count
    rows = report.neuron_level_table(ApplicationResult.from_dict(d))
    assert [r["beats"] for r in rows] == [None] + [True] * (len(rows) - 1)
    assert report.beats_summary(rows) == f"yes; 1 of {len(rows)} budgets without a paired test"
    for e in d["methods"]["weight_delta"][1:]:  # weight-delta without per-item outcomes: no verdict at any budget
        e.pop("per_item")
    rows = report.neuron_level_table(ApplicationResult.from_dict(d))
    assert all(r["beats"] is None for r in rows) and report.beats_summary(rows) == "– (no per-item outcomes: no paired test)"
    del d["methods"]["random"], d["methods"]["weight_delta"]
    rows = report.neuron_level_table(ApplicationResult.from_dict(d))
    assert all(r["beats"] is None for r in rows) and report.beats_cell(rows[0]) == "– (not measured at this budget)"
    assert report.beats_summary(rows) == "– (random and weight-delta not run)"
