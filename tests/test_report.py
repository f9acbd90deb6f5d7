"""The report and figures are drawn from the results JSON only (fixture: a real tiny-model run of the runner)."""

import dataclasses
import datetime as dt
import json
import re
from pathlib import Path

import pytest

from cnt import functions, outcomes, plots, report
from cnt.results import ApplicationResult, MethodEntry

FIXTURE = Path(__file__).parent / "data" / "tiny_alignment_enhancement.json"


@pytest.fixture
def results_dir(tmp_path):
    d = tmp_path / "results"
    d.mkdir()
    (d / "alignment_enhancement.json").write_text(FIXTURE.read_text())
    return d


def test_summary_has_the_promised_shape(results_dir):
    s, _ = report.write(results_dir)
    summary = json.loads(s.read_text())
    app = summary["applications"]["alignment_enhancement"]
    assert {"target", "donor", "metric", "higher_is_goal", "target_score", "donor_score", "target_utility",
            "methods"} <= set(app)
    assert set(app["target_utility"]) == {"mmlu", "nq_open", "perplexity"}
    assert {"cnt", "random", "weight_delta", "linear", "task_arithmetic", "ties", "dare"} <= set(app["methods"])
    assert not any(name.startswith("cnt_") and name != "cnt_minimal" for name in app["methods"])
    for entries in app["methods"].values():
        for e in entries:
            assert {"neuron_fraction", "param_fraction", "score", "ci", "utility"} <= set(e)
            assert e["ci"][0] <= e["score"] <= e["ci"][1]
            assert set(e["utility"]) == {"mmlu", "nq_open", "perplexity"}


def test_report_numbers_equal_the_json(results_dir):
    _, rep = report.write(results_dir)
    text = rep.read_text()
    r = json.loads(FIXTURE.read_text())
    assert f"{100 * r['target_score']:.1f}%" in text and f"{100 * r['donor_score']:.1f}%" in text
    for e in r["methods"]["cnt"]:
        assert f"{100 * e['score']:.1f}%" in text
    for name in ("linear", "ties", "dare", "task_arithmetic"):
        assert re.search(rf"\| {name} \|", text)
    assert "| sparsity:" in text and "| baselines:" in text


def test_report_without_results(tmp_path):
    (tmp_path / "results").mkdir()
    _, rep = report.write(tmp_path / "results")
    assert "No results yet" in rep.read_text()


R = ApplicationResult.from_dict  # the report and figures read typed records, as report.load_results gives them


def test_the_records_round_trip_the_json_and_refuse_unknown_fields():
    d = json.loads(FIXTURE.read_text())  # an older file: fields added since (family, tag, ...) take their defaults
    out = R(d).to_dict()
    assert {k: out[k] for k in d} == d and R(out).to_dict() == out
    with pytest.raises(ValueError, match=r"unknown fields \['colour'\]"):
        R({**d, "colour": "red"})
    with pytest.raises(ValueError, match=r"methods\['cnt'\]: unknown fields \['scroe'\]"):
        R({**d, "methods": {"cnt": [{"scroe": 1.0, "ci": [0, 1], "param_fraction": 0.1}]}})
    with pytest.raises(ValueError, match=r"missing fields \['metric'\]"):
        R({k: v for k, v in d.items() if k != "metric"})


def test_figures_from_json(tmp_path):
    r = R(json.loads(FIXTURE.read_text()))
    paths = [plots.save(plots.effect_vs_fraction(r), tmp_path / "effect.png"),
             plots.save(plots.utility_tradeoff(r), tmp_path / "tradeoff.png"),
             plots.save(plots.layer_distribution(r.methods["cnt"][-1].per_layer, r.fingerprint["n_layers"]),
                        tmp_path / "layers.png")]
    assert all(p.stat().st_size > 5000 for p in paths)


def test_the_layer_map_labels_whole_layers_and_whole_counts():
    fig = plots.layer_distribution({str(i): i + 1 for i in range(18)}, 18)  # 18 layers: matplotlib would tick 2.5
    fig.canvas.draw()
    ticks = [t for t in fig.axes[0].get_xticks() if 0 <= t <= 17]
    assert ticks and all(float(t).is_integer() for t in ticks)
    fig = plots.layer_distribution({"13": 3, "15": 1, "19": 2}, 24)  # few neurons: matplotlib would tick 0.5
    fig.canvas.draw()
    ticks = [t for t in fig.axes[0].get_yticks() if 0 <= t <= 3]
    assert len(ticks) >= 2 and all(float(t).is_integer() for t in ticks)


def _drawn(fig) -> bool:
    """Whether every axis of a figure shows data (points, lines, bars, an image), not an empty frame."""
    return all(ax.collections or ax.lines or ax.patches or ax.images for ax in fig.axes)


def test_figures_only_for_what_was_measured(tmp_path, monkeypatch):
    """No trade-off figure for a utility the run did not measure, and the report links only figures the plan drew;
    every figure drawn has data on every axis."""
    d = json.loads(FIXTURE.read_text())
    for entries in d["methods"].values():
        for e in entries:
            e["utility"].pop("mmlu", None)
    d["target_utility"].pop("mmlu", None)
    r = R(d)
    assert "tradeoff" not in plots.figure_plan(r) and "tradeoff_ppl" in plots.figure_plan(r)
    with pytest.raises(ValueError, match="mmlu was not measured"):
        plots.utility_tradeoff(r, "mmlu")
    figures = []
    monkeypatch.setattr(plots, "save", lambda fig, path: figures.append((fig, path)) or path)
    written = plots.application_figures(r, tmp_path)
    assert set(written) == set(plots.figure_plan(r)) and all(_drawn(fig) for fig, _ in figures)
    linked = [line for line in report.application_section("alignment_enhancement", r, "figures") if line.startswith("![")]
    assert [re.search(r"alignment_enhancement_(\w+)\.png", line).group(1) for line in linked] == \
        ["effect", "tradeoff_ppl"]


def test_a_perplexity_outlier_sits_at_the_axis_edge_with_its_value():
    d = json.loads(FIXTURE.read_text())
    base = d["target_utility"]["perplexity"]
    d["methods"]["linear"][0]["utility"]["perplexity"] = base * 7.166  # +616.6%
    fig = plots.utility_tradeoff(R(d), "perplexity")
    ax = fig.axes[0]
    assert ax.get_ylim()[1] < 60  # the axis is not stretched to +617%
    assert any(t.get_text() == "linear +617%" for t in ax.texts)
    d["methods"]["ties"][0]["utility"]["perplexity"] = base * 2.0  # a second one at the same edge
    offsets = [t.xyann[1] for t in plots.utility_tradeoff(R(d), "perplexity").axes[0].texts]
    assert len(offsets) == 2 and len(set(offsets)) == 2  # their labels do not sit on each other


def test_every_figure_the_committed_report_links_exists():
    root = Path(__file__).parents[1] / "papers"
    linked = re.findall(r"!\[[^\]]*\]\(([^)]+\.png)\)", (root / "REPORT.md").read_text())
    assert linked and [p for p in linked if not (root / p).is_file()] == []


def test_gap_share_and_the_reported_setting_of_each_method():
    """The setting the report quotes and the figures draw: CNT's best budget that held utility (not the furthest one,
    which broke perplexity), random at the budget nearest to it, a baseline's chosen (first) setting; None when
    absent. The layer map shows the minimal subset where there is one, else that same budget."""
    assert outcomes.gap_share(60.0, 70.0, 50.0) == 0.5
    d = json.loads(FIXTURE.read_text())
    ppl = d["target_utility"]["perplexity"]
    entry = lambda s, nf, p=ppl, b=None: MethodEntry(  # noqa: E731
        score=s, ci=[s, s], param_fraction=(nf or 1) / 2, neuron_fraction=nf, budget=b, utility={"perplexity": p},
        side=dict(d["target_side"]))
    r = R({**d, "higher_is_goal": True})
    r.methods = {"cnt": [entry(0.4, 0.001, b=0.001), entry(0.6, 0.005, b=0.005), entry(0.9, 0.02, ppl * 1.5, 0.02)],
                 "random": [entry(0.0, nf) for nf in (0.001, 0.005, 0.02)],
                 "ties": [entry(0.7, None), entry(0.8, None)]}
    assert outcomes.reported(r, "cnt").neuron_fraction == 0.005  # 0.02 went further by breaking perplexity
    r.methods["cnt_attribution"] = [dataclasses.replace(e, variant=None) for e in r.methods["cnt"]]
    assert outcomes.reported(r, "cnt_attribution").neuron_fraction == 0.005  # a locator variant: its best budget
    assert outcomes.reported(r, "random").neuron_fraction == 0.005
    assert outcomes.reported(r, "ties").score == 0.7
    assert outcomes.reported(r, "dare") is None
    assert outcomes.gap_share(0.5, 0.0, 1.0) == 0.5 and plots.gap_share is outcomes.gap_share
    # the layer map shows the setting the report quotes, or the minimal subset where the search reached its goal
    assert plots.layer_map_setting(r) == (r.methods["cnt"][1], "the reported budget")
    r.methods["cnt_minimal"] = [entry(0.95, 0.003)]
    assert plots.layer_map_setting(r) == (r.methods["cnt_minimal"][0], "the minimal subset")


def test_other_families_sit_beside_the_default(results_dir):
    other = json.loads(FIXTURE.read_text()) | {"family": "qwen2.5-coder-0.5b",
                                               "name": "alignment_enhancement.qwen2.5-coder-0.5b",
                                               "target": "qwen-abliterated"}
    (results_dir / "alignment_enhancement.qwen2.5-coder-0.5b.json").write_text(json.dumps(other))
    (results_dir / "bench.json").write_text(json.dumps({"machine": "not an application"}))
    loaded = report.load_results(results_dir)
    assert list(loaded) == ["alignment_enhancement", "alignment_enhancement.qwen2.5-coder-0.5b"]
    s, rep = report.write(results_dir)
    summary = json.loads(s.read_text())
    assert summary["applications"]["alignment_enhancement"]["target"] != "qwen-abliterated"
    assert summary["families"]["qwen2.5-coder-0.5b"]["alignment_enhancement"]["target"] == "qwen-abliterated"
    rows = [line for line in rep.read_text().splitlines() if line.startswith("| smollm2 |")
            or line.startswith("| qwen2.5-coder-0.5b |")]
    assert len(rows) == 2 and "qwen-abliterated" in rows[1]
    assert "alignment_enhancement.qwen2.5-coder-0.5b_effect.png" in rep.read_text()


def test_tagged_runs_do_not_replace_the_default(results_dir):
    from cnt.experiment import result_name

    assert result_name("alignment_enhancement", "smollm2", "donor-full") == "alignment_enhancement.donor-full"
    with pytest.raises(ValueError, match="tag"):
        result_name("alignment_enhancement", "smollm2", "../x")
    other = json.loads(FIXTURE.read_text()) | {"tag": "donor-full", "name": "alignment_enhancement.donor-full",
                                               "donor": "some-other-donor"}
    (results_dir / "alignment_enhancement.donor-full.json").write_text(json.dumps(other))
    s, rep = report.write(results_dir)
    summary = json.loads(s.read_text())
    assert summary["applications"]["alignment_enhancement"]["donor"] != "some-other-donor"
    assert summary["variants"]["alignment_enhancement.donor-full"]["donor"] == "some-other-donor"
    assert any(line.startswith("| ") and "| alignment_enhancement (donor-full)" in line and "| some-other-donor →" in line
               for line in rep.read_text().splitlines())


def test_kept_utility_follows_the_runs_own_search_rule():
    """A baseline counts as having kept utility within the perplexity limit that run's search used (from its JSON)."""
    d = json.loads(FIXTURE.read_text())
    r = R(d)
    assert outcomes.utility_tolerance(r) == d["search"]["max_ppl_increase"]
    assert outcomes.utility_tolerance(R({**d, "search": None})) == outcomes.UTILITY_TOLERANCE
    strict = R({**d, "search": {**d["search"], "max_ppl_increase": 0.0}})
    loose = R({**d, "search": {**d["search"], "max_ppl_increase": 1e6}})
    assert all(row["baseline_utility_held"] for row in report.compare_baselines(loose))
    held = lambda x: [row["baseline_utility_held"] for row in report.compare_baselines(x)]  # noqa: E731
    assert sum(held(strict)) <= sum(held(r)) <= sum(held(loose))


def test_kept_utility_counts_false_refusal_and_skill():
    """A baseline that went further than CNT with perplexity held but false refusal up 8 points (CNT's own +1) broke
    utility; within 5 points, or no worse than CNT's own rise, it kept it; the specialist's skill likewise, downward."""
    base = _with_cnt_scores(json.loads(FIXTURE.read_text()), [0.3, 0.5], [0.05, 0.06])  # CNT best: 0.5, FR +1

    def ties_row(side: dict, cnt_fr: float = 0.06) -> dict:
        d = _with_cnt_scores(json.loads(FIXTURE.read_text()), [0.3, 0.5], [cnt_fr, cnt_fr])
        ties = {**d["methods"]["ties"][0], "score": 0.8, "utility": dict(d["target_utility"]),
                "side": {**d["target_side"], **side}}
        d["methods"] = {**d["methods"], "ties": [ties]}
        return next(x for x in report.compare_baselines(R(d)) if x["baseline"] == "ties")

    assert base["target_side"]["false_refusal_rate"] == 0.05
    broke = ties_row({"false_refusal_rate": 0.13})
    assert not broke["cnt_better"] and not broke["baseline_utility_held"] and broke["cnt_better_at_utility"]
    assert broke["baseline_side"]["false_refusal_rate"] == pytest.approx(0.08)
    assert ties_row({"false_refusal_rate": 0.09})["baseline_utility_held"]  # +4 points: within the limit
    assert ties_row({"false_refusal_rate": 0.13}, cnt_fr=0.14)["baseline_utility_held"]  # CNT itself +9 at every budget
    assert not ties_row({"false_refusal_rate": 0.05, "arithmetic_acc": -0.06})["baseline_utility_held"]
    assert ties_row({"false_refusal_rate": 0.05, "arithmetic_acc": -0.04})["baseline_utility_held"]
    assert outcomes.side_limits(R(base)) == outcomes.SIDE_LIMITS  # no false-refusal limit recorded: the kit's goal
    ruled = R({**base, "search": {**base["search"], "max_false_refusal_increase": 0.1}})
    assert outcomes.side_limits(ruled)["false_refusal_rate"] == 0.1
    # the validation rule a run records (every limit, functions.full_rule) comes first
    validated = R({**base, "validation": {**base.get("validation", {}),
                                          "rule": functions.full_rule(max_false_refusal_increase=0.03)}})
    assert outcomes.side_limits(validated)["false_refusal_rate"] == 0.03


def test_claims_on_an_insignificant_gap_are_inconclusive(tmp_path):
    """Donor and target CIs overlap: sparsity and baseline claims are not judged (no 'supported' from noise)."""
    r = json.loads(FIXTURE.read_text())  # the tiny fixture: donor and target both at 0% [0, 49%]
    assert not report.gap_significant(R(r))
    assert report.gap_significant(R({**r, "donor_score": 0.9, "donor_ci": [0.7, 0.97]}))
    d = tmp_path / "results"
    d.mkdir()
    (d / "alignment_enhancement.json").write_text(json.dumps(r))
    _, rep = report.write(d)
    rows = [line for line in rep.read_text().splitlines() if line.startswith(("| sparsity:", "| baselines:"))]
    assert len(rows) == 2 and all(report.INCONCLUSIVE in line for line in rows)


def _with_cnt_scores(r: dict, scores: list[float], false_refusal: list[float]) -> dict:
    cnt = [{**e, "score": s, "ci": [max(0.0, s - 0.1), min(1.0, s + 0.1)], "side": {**e["side"], "false_refusal_rate": f}}
           for e, s, f in zip(r["methods"]["cnt"], scores, false_refusal)]
    return {**r, "target_score": 0.1, "target_ci": [0.05, 0.2], "donor_score": 0.9, "donor_ci": [0.8, 0.95],
            "target_side": {**r["target_side"], "false_refusal_rate": 0.05},
            "methods": {**r["methods"], "cnt": cnt, "cnt_minimal": []}}


def test_headline_is_the_sparsest_budget_reaching_the_goal():
    """Without a minimal subset, the sparsity claim is judged on the smallest budget that reached 90% of the gap (the
    best budget only when none did)."""
    r = json.loads(FIXTURE.read_text())
    both = R(_with_cnt_scores(r, [0.88, 0.95], [0.05, 0.05]))  # shares 97.5%, 106%
    assert report.headline(both)[1].param_fraction == min(e["param_fraction"] for e in r["methods"]["cnt"])
    label, h = report.headline(R(_with_cnt_scores(r, [0.3, 0.5], [0.05, 0.05])))
    assert h.score == 0.5 and label == "cnt (best budget)"


def test_best_budget_prefers_the_one_that_held_utility():
    """Two budgets that moved equally far: the headline is the one that held utility, not the one that went as far
    only by raising false refusal past the limit; with none held, the furthest; among budgets reaching 90%, the
    sparsest that held utility."""
    r = json.loads(FIXTURE.read_text())
    sparse, dense = sorted(r["methods"]["cnt"], key=lambda e: e["param_fraction"])[:2]
    tie = R(_with_cnt_scores(r, [0.5, 0.5], [0.05, 0.05]))
    assert report.headline(tie)[1].param_fraction == min(e.param_fraction for e in tie.entries("cnt"))  # tie: sparser
    order = [e["param_fraction"] for e in r["methods"]["cnt"]]
    fr = [0.2 if p == sparse["param_fraction"] else 0.05 for p in order]  # the sparse budget: false refusal +15
    broke = R(_with_cnt_scores(r, [0.5, 0.5], fr))
    label, h = report.headline(broke)
    assert label == "cnt (best budget)" and h.param_fraction == dense["param_fraction"]
    assert outcomes.utility_kept(broke, h) and not outcomes.side_effects(broke, h)
    further = R(_with_cnt_scores(r, [0.6 if p == sparse["param_fraction"] else 0.5 for p in order], fr))
    assert outcomes.best_budget(further).param_fraction == dense["param_fraction"]  # went further, but broke utility
    none_held = R(_with_cnt_scores(r, [0.6 if p == sparse["param_fraction"] else 0.5 for p in order], [0.2, 0.2]))
    assert outcomes.best_budget(none_held).score == 0.6
    reached = R(_with_cnt_scores(r, [0.95, 0.95], fr))
    assert report.headline(reached) == ("cnt (sparsest budget reaching 90%)", outcomes.best_budget(reached))
    assert report.headline(reached)[1].param_fraction == dense["param_fraction"]


def test_utility_claim_flags_side_effects(tmp_path):
    """A headline that raised false refusal by more than 10 points says so in the utility claim's verdict."""
    r = _with_cnt_scores(json.loads(FIXTURE.read_text()), [0.3, 0.95], [0.05, 0.6])
    assert outcomes.side_effects(R(r), report.headline(R(r))[1]) == pytest.approx({"false_refusal_rate": 0.55})
    d = tmp_path / "results"
    d.mkdir()
    (d / "alignment_enhancement.json").write_text(json.dumps(r))
    _, rep = report.write(d)
    row = next(line for line in rep.read_text().splitlines() if line.startswith("| utility:"))
    assert "false refusal +55.0 pp" in row and "; but false refusal +55.0 pp |" in row


def test_plot_styles_come_from_the_methods_a_result_lists():
    """A method the plots have never heard of (a newly registered baseline or scorer) gets its own colour and marker;
    CNT and its variants stay red, random neurons grey."""
    from cnt.plots import styles

    s = styles(["cnt", "cnt_attribution", "cnt_minimal", "random", "weight_delta", "linear", "my_new_baseline"])
    assert {s[n][0] for n in ("cnt", "cnt_attribution", "cnt_minimal")} == {"C3"} and s["random"][0] == "0.5"
    others = [s[n] for n in ("weight_delta", "linear", "my_new_baseline")]
    assert len({c for c, _, _ in others}) == 3 and len({m for _, m, _ in others}) == 3


def test_a_run_not_measured_on_the_whole_split_is_marked_history(tmp_path):
    d = tmp_path / "results"
    d.mkdir()
    base = json.loads(FIXTURE.read_text())
    for stem, profile in (("alignment_enhancement", "report"), ("bias_removal", "sweep")):
        run = dict(base, name=stem, when="2026-11-26T18:47:37", config=dict(base["config"], profile=profile))
        if stem == "bias_removal":
            run.update(application="bias_removal", metric="stereoset_ss")
        (d / f"{stem}.json").write_text(json.dumps(run))
    results = report.load_results(d)
    assert report.whole_split(results["alignment_enhancement"]) and not report.whole_split(results["bias_removal"])
    text = report.render(results)
    assert "## alignment_enhancement:" in text and "## bias_removal (history: `sweep` profile, 2026-11-26):" in text
    assert "Marked *history*: bias_removal —" in text
    claims = [line for line in text.splitlines() if line.startswith("| sparsity:")]
    assert [("(history" in line) for line in claims] == [False, True]


def test_the_report_says_one_invocation_only_when_it_wrote_every_result(results_dir):
    results = report.load_results(results_dir)
    when = results["alignment_enhancement"].when
    end = (dt.datetime.fromisoformat(when) + dt.timedelta(seconds=30)).isoformat(timespec="seconds")
    covering = {"notebooks": ["a.ipynb", "b.ipynb"], "seconds": 600.0, "jobs": 2, "when": end}
    text = report.render(results, timings={"last_full_invocation": covering})
    assert "took 10.0 min in one invocation" in text and "wrote every result below" in text
    earlier = dict(covering, when="2020-01-01T00:00:00")  # before the result was written
    for timings in ({"last_full_invocation": earlier}, {"last_full_invocation": dict(covering, when=None)}, {}):
        text = report.render(results, timings=timings)
        assert "in one invocation" not in text and "do not all come from one `make reproduce` invocation" in text
    assert "took 10.0 min in one invocation" in report.render({}, timings={"last_full_invocation": earlier})  # none yet
    assert "the last full default invocation took 10.0 min (2020-01-01)" in report.render(
        results, timings={"last_full_invocation": earlier})


def test_the_categories_plot_draws_cnt_once_under_its_variant():
    """``cnt`` holds a copy of the variant chosen on validation: the per-category bars show that variant once (two
    bars of one colour for the same entries read as two methods)."""
    d = json.loads(FIXTURE.read_text())
    cats = {"gender": 60.0, "race": 70.0}
    d["target_details"], d["donor_details"] = {"per_bias_type": cats}, {"per_bias_type": {"gender": 50.0, "race": 52.0}}
    for entries in d["methods"].values():
        for e in entries:
            e["details"] = {"per_bias_type": {c: v - e["score"] for c, v in cats.items()}}
    fig = plots.per_category(R(d))
    labels = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert "cnt" not in labels and labels.count("cnt_attribution") == 1
    assert {"target", "donor", "cnt_activation_contrast", "random"} <= set(labels)
