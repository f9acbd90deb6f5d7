"""Stability across seeds: overlaps against hand-computed cases, the chance level, which runs count as seeds of one
configuration, and the report's section and summary from three seed runs."""

import json
from pathlib import Path

import pytest

from cnt import report
from cnt.results import ApplicationResult
from cnt.stability import chance_jaccard, containment, jaccard, layer_overlap, seed_groups, stability, unit_set

FIXTURE = Path(__file__).parent / "data" / "tiny_alignment_enhancement.json"


def test_overlaps_by_hand():
    assert jaccard({1, 2, 3}, {2, 3, 4}) == pytest.approx(2 / 4)
    assert jaccard(set(), set()) == 1.0 and jaccard({1}, set()) == 0.0
    assert containment({1, 2}, {1, 2, 3, 4, 5}) == 1.0 and jaccard({1, 2}, {1, 2, 3, 4, 5}) == pytest.approx(0.4)
    assert containment({1, 9}, {1, 2, 3}) == 0.5 and containment(set(), {1}) == 1.0
    assert unit_set({"mlp": {"0": [1, 5], "1": [5]}, "head": {"3": [0]}}) == {("mlp", 0, 1), ("mlp", 0, 5),
                                                                              ("mlp", 1, 5), ("head", 3, 0)}
    assert layer_overlap([2, 0, 1], [1, 1, 1]) == pytest.approx(2 / 4)  # Σ min 2, Σ max 4
    assert layer_overlap([0, 0], [0, 0]) == 1.0
    with pytest.raises(ValueError, match="different depth"):
        layer_overlap([1, 2], [1, 2, 3])


def test_chance_overlap_of_random_subsets():
    assert chance_jaccard(1, 1, 2) == pytest.approx(0.5 / 1.5)  # E|∩| = 1/2, E|∪| = 3/2
    assert chance_jaccard(10, 10, 10) == 1.0
    assert chance_jaccard(46, 46, 46080) == pytest.approx(46 / (2 * 46080 - 46), rel=1e-9)  # k / (2n - k)
    with pytest.raises(ValueError, match=r"\[0, n = 10\]"):
        chance_jaccard(11, 1, 10)


def _run(seed: int, shares: tuple[float, float], units: tuple[dict, dict], **config) -> dict:
    """The fixture as the run of ``seed``: a gap of 0.2 → 0.8, CNT at its two budgets going ``shares`` of it with
    ``units``; a minimal subset for seeds 0 and 2."""
    d = json.loads(FIXTURE.read_text())
    d["target_score"], d["donor_score"] = 0.2, 0.8
    d["config"] = {**d["config"], "seed": seed, "tag": f"seed{seed}" if seed else None, **config}
    d["tag"] = d["config"]["tag"]
    for e, share, u in zip(d["methods"]["cnt"], shares, units):
        e["score"], e["units"] = 0.2 + 0.6 * share, u
        e["per_layer"] = [len(u["mlp"].get(str(layer), [])) for layer in range(2)]
    d["methods"]["cnt_minimal"] = [] if seed == 1 else [dict(d["methods"]["cnt"][1], units=units[1])]
    return d


SMALL = ({"mlp": {"0": [1, 2], "1": [3, 4]}}, {"mlp": {"0": [1, 2], "1": [4]}}, {"mlp": {"0": [7, 8], "1": [3, 9]}})
LARGE = ({"mlp": {"0": list(range(10))}}, {"mlp": {"0": list(range(5, 15))}}, {"mlp": {"0": list(range(10))}})


@pytest.fixture
def seeds(tmp_path):
    d = tmp_path / "results"
    d.mkdir()
    for seed, shares in zip((0, 1, 2), ((0.5, 1.0), (0.3, 0.9), (0.4, 0.8))):
        run = _run(seed, shares, (SMALL[seed], LARGE[seed]), **({"baselines": []} if seed == 2 else {}))  # CNT alone
        name = "alignment_enhancement" + (f".seed{seed}" if seed else "")
        (d / f"{name}.json").write_text(json.dumps(run | {"name": name}))
    other = _run(5, (0.1, 0.2), (SMALL[0], LARGE[0]), budgets=[0.05, 0.5])  # another configuration: not a seed
    (d / "alignment_enhancement.wide.json").write_text(json.dumps(other | {"name": "alignment_enhancement.wide",
                                                                           "tag": "wide"}))
    return d


def test_seed_runs_are_grouped_and_summarised(seeds):
    results = report.load_results(seeds)
    (group,) = seed_groups(results)
    assert [name for name, _ in group] == ["alignment_enhancement", "alignment_enhancement.seed1",
                                           "alignment_enhancement.seed2"]
    s = stability(group)
    small, large = s["budgets"]
    assert small["shares"] == pytest.approx([0.5, 0.3, 0.4])
    assert small["share_mean"] == pytest.approx(0.4) and small["share_sd"] == pytest.approx(0.1)
    # pairs (0,1): {1,2,3,4} vs {1,2,4} -> 3/4; (0,2): {1,2,3,4} vs {7,8,3,9} -> 1/7; (1,2): disjoint -> 0
    assert small["jaccard_mean"] == pytest.approx((3 / 4 + 1 / 7 + 0) / 3)
    assert (small["jaccard_min"], small["jaccard_max"]) == (0.0, pytest.approx(0.75))
    # layer maps [2,2], [2,1], [2,2]: 3/4, 1, 3/4
    assert small["layer_overlap_mean"] == pytest.approx((0.75 + 1 + 0.75) / 3)
    n = 2 * 96  # the fixture's MLP neurons
    chance = [chance_jaccard(4, 3, n), chance_jaccard(4, 4, n), chance_jaccard(3, 4, n)]
    assert small["jaccard_chance"] == pytest.approx(sum(chance) / 3)
    # against the best-scored seed (seed 0, share 0.5): seed 1 3/4, seed 2 1/7; layer maps 3/4 and 1
    assert small["best_seed"] == 0 and small["jaccard_vs_best"] == pytest.approx((3 / 4 + 1 / 7) / 2)
    assert small["layer_overlap_vs_best"] == pytest.approx((0.75 + 1) / 2)
    assert large["jaccard_mean"] == pytest.approx((5 / 15 + 1 + 5 / 15) / 3)
    assert large["best_seed"] == 0 and large["jaccard_vs_best"] == pytest.approx((5 / 15 + 1) / 2)
    m = s["minimal"]
    assert m["neuron_fractions"][1] is None and m["neuron_fractions"][0] is not None
    assert m["jaccard_mean"] == pytest.approx(1.0) and m["containment_mean"] == 1.0  # seeds 0, 2: the same ten


def test_the_report_prints_the_seeds_and_summary_holds_them(seeds):
    s, rep = report.write(seeds)
    text = rep.read_text()
    assert "## Seeds" in text
    row = next(line for line in text.splitlines() if line.startswith("| alignment_enhancement") and "| 5.00% |" in line)
    assert "40% ± 10%" in row and "50%, 30%, 40%" in row and "0.30 [0.00, 0.75]" in row and "seed 0: 0.45; 0.88" in row
    assert "minimal subset per seed" in text and "not reached" in text
    assert "share of the smaller subset's units in the larger 1.00" in text
    summary = json.loads(s.read_text())
    assert [g["seeds"] for g in summary["stability"]] == [[0, 1, 2]]


def test_seeds_measured_by_different_code_are_named(seeds):
    """A seed group whose runs record different sources says so beside its spread; one measured by one code does
    not; one with a run that recorded none says that it is not known."""
    def rewrite(codes):
        for name, code in zip(("alignment_enhancement", "alignment_enhancement.seed1", "alignment_enhancement.seed2"),
                              codes):
            path = seeds / f"{name}.json"
            path.write_text(json.dumps({**json.loads(path.read_text()), "code": code}))
        return report.write(seeds)[1].read_text()

    same = {"version": "0.1.0", "sources_sha256": "a" * 64}
    text = rewrite([same, same, same])
    assert "different versions of the kit's code" not in text and "not all recorded" not in text
    assert stability(seed_groups(report.load_results(seeds))[0])["same_code"] is True
    text = rewrite([same, {**same, "sources_sha256": "b" * 64}, same])
    assert "different versions of the kit's code" in text
    assert "not all recorded" in rewrite([same, None, same])


def test_units_round_trip_and_a_single_run_has_no_seed_section(tmp_path):
    run = _run(0, (0.5, 1.0), (SMALL[0], LARGE[0]))
    r = ApplicationResult.from_dict(json.loads(json.dumps(run)))
    assert r.methods["cnt"][0].units == SMALL[0] and ApplicationResult.from_dict(r.to_dict()).to_dict() == r.to_dict()
    (tmp_path / "alignment_enhancement.json").write_text(json.dumps(run))
    s, rep = report.write(tmp_path)
    assert "## Seeds" not in rep.read_text() and "stability" not in json.loads(s.read_text())
