"""The sparsity frontier (cnt.frontier) on tiny stand-in models, and selection by a budget in weights."""

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from cnt.results import FrontierResult
from cnt.scores import NeuronScores


def test_select_fits_a_weight_budget_across_kinds_and_carries_gamma():
    s = NeuronScores("x", [torch.tensor([3.0, 1.0]), torch.tensor([2.0, 0.5])],
                     units={"head": [torch.tensor([10.0]), torch.tensor([0.1])]},
                     costs={"mlp": [1, 1], "head": [4, 4]})
    # per weight: mlp 3, 2, 1, 0.5 ; heads 2.5, 0.025
    sel, gamma = s.select(6)
    assert gamma is None
    assert {k: {l: v.tolist() for l, v in d.items()} for k, d in sel.items()} == \
        {"mlp": {0: [0, 1], 1: [0]}, "head": {0: [0]}} or s.n_params_of(sel) <= 6
    assert s.n_params_of(sel) <= 6
    sel, _ = s.select(3)  # the head does not fit: smaller units after it still do
    assert "head" not in sel and s.n_params_of(sel) == 3
    learned = NeuronScores("m", [torch.tensor([2.0, 1.0])], costs={"mlp": [1]}, per_weight=False,
                           gamma={"mlp": [torch.tensor([0.5, 0.7])]},
                           snapshots=[{"n_params": 1, "gamma": {"mlp": [torch.tensor([3.0, 0.0])]}}])
    sel, gamma = learned.select(1)
    assert sel == {"mlp": {0: torch.tensor([0])}} or sel["mlp"][0].tolist() == [0]
    assert gamma["mlp"][0].tolist() == [3.0]  # the snapshot of that size
    sel, gamma = learned.select(2)
    assert gamma["mlp"][0].tolist() == pytest.approx([0.5, 0.7])  # larger than every snapshot: the path's own


def test_pick_keeps_the_neuron_budget_for_plain_scores():
    s = NeuronScores("x", [torch.tensor([3.0, 1.0]), torch.tensor([2.0, 0.5])])
    sel, gamma = s.pick(2)
    assert gamma is None and {l: v.tolist() for l, v in sel.items()} == {0: [0], 1: [0]}


def test_frontier_on_tiny_models(tmp_path):
    from cnt import plots
    from cnt.experiment import smoke_models
    from cnt.frontier import measure
    from cnt.models import load_model, load_tokenizer

    d, t, _ = smoke_models("disalignment")
    donor, _ = load_model(d)
    target, _ = load_model(t)
    tok = load_tokenizer(t)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    res = measure("compliance", donor, target, tok, budgets=(0.002, 0.01),
                  locators=(("attribution", ("mlp",)), ("learned_mask", ("mlp", "head", "kv"))), profile="smoke",
                  alphas=(1.0,), locator_kwargs={"learned_mask": dict(levels=(0.01, 0.002), warmup_steps=1,
                                                                     descent_steps=1, steps_per_level=1)},
                  proxy_size=8, progress=False)
    assert all(torch.equal(before[k], v) for k, v in target.state_dict().items())
    pts = res.points
    located = [p for p in pts if p.method in ("attribution", "learned_mask")]
    assert len(located) == 4 and all(p.param_fraction <= p.budget + 1e-12 for p in located)
    assert {p.method for p in pts if p.budget is None} == {"every MLP neuron", "attention only", "every unit"}
    assert {p.method for p in pts} >= {"random", "weight_delta"}
    for p in pts:  # the share is the eval metric mapped through the target -> donor gap
        gap = res.donor_score - res.target_score
        if gap:
            assert p.share == pytest.approx((p.score - res.target_score) / gap)
    heads = [p for p in located if p.method == "learned_mask"]
    assert all(set(p.units) <= {"mlp", "head", "kv"} for p in heads)
    for p in pts:  # utility on eval: each goal's change from the target, and whether all held
        assert set(p.utility) >= {"perplexity", "false_refusal_rate", "degenerate_rate"}
        assert p.utility_held == all(u["held"] for u in p.utility.values())
        assert p.utility["perplexity"]["change"] == pytest.approx(p.perplexity / res.target_perplexity - 1)
    blob = json.loads(json.dumps(res.to_dict()))  # plain JSON, read back as the same record
    assert FrontierResult.from_dict(blob) == res
    with pytest.raises(ValueError, match=r"points\[0\]: unknown fields \['colour'\]"):
        FrontierResult.from_dict({**blob, "points": [{**blob["points"][0], "colour": "red"}]})
    fig = plots.frontier(dataclasses.replace(res, name="tiny"))
    assert fig.axes[0].get_lines() and fig.axes[0].get_xscale() == "log"
    with pytest.raises(ValueError, match=r"\['randm'\] unknown"):  # refused before any compute
        measure("compliance", donor, target, tok, baselines=("randm",))


def test_utility_change_checks_each_goal():
    from cnt.evaluate import EvalReport, Metric
    from cnt.frontier import utility_change

    def report(ppl, fr, skill):
        ms = {n: Metric(n, v, 10, (v, v)) for n, v in
              (("perplexity", ppl), ("false_refusal_rate", fr), ("arithmetic_acc", skill))}
        return EvalReport("m", "p", ms, 0.0)

    target = report(20.0, 0.10, 0.80)
    out, held = utility_change(report(20.3, 0.14, 0.76), target)  # +1.5%, +4 points, -4 points: all within
    assert held and out["perplexity"]["change"] == pytest.approx(0.015) and "degenerate_rate" not in out
    for bad in (report(20.5, 0.10, 0.80), report(20.0, 0.16, 0.80), report(20.0, 0.10, 0.70)):
        out, held = utility_change(bad, target)
        assert not held and sum(not u["held"] for u in out.values()) == 1


def test_a_reduced_frontier_skips_the_baselines(tmp_path):
    """``baselines=()``: the locators and the ceilings only (what a slow pair can afford); recorded in the result."""
    from cnt.experiment import smoke_models
    from cnt.frontier import measure
    from cnt.models import load_model, load_tokenizer

    d, t, _ = smoke_models("disalignment")
    donor, _ = load_model(d)
    target, _ = load_model(t)
    res = measure("compliance", donor, target, load_tokenizer(t), budgets=(0.01,),
                  locators=(("attribution", ("mlp",)),), profile="smoke", alphas=(1.0,), proxy_size=8, baselines=(),
                  progress=False)
    assert {p.method for p in res.points} == {"attribution", "every MLP neuron", "attention only", "every unit"}
    assert res.baselines == [] and res.partial is False
    seen = []  # every point is handed to the checkpoint as it is measured
    measure("compliance", donor, target, load_tokenizer(t), budgets=(0.01,), locators=(("attribution", ("mlp",)),),
            profile="smoke", alphas=(1.0, 2.0), proxy_size=8, baselines=(), progress=False,
            checkpoint=lambda r: seen.append((len(r.points), r.partial)))
    assert seen == [(1, True), (2, True), (3, True), (4, True)]
    part = measure("compliance", donor, target, load_tokenizer(t), budgets=(0.01,), profile="smoke", alphas=(1.0,),
                   locators=(("attribution", ("mlp",)),), proxy_size=8, baselines=("random",), ceilings=False,
                   progress=False)  # a part of a frontier whose ceilings another part measured
    assert [p.method for p in part.points] == ["attribution", "random"]


@pytest.mark.parametrize("path", sorted((Path(__file__).parents[1] / "papers" / "results").glob("*.frontier.json")),
                         ids=lambda p: p.name)
def test_the_committed_frontiers_read_as_records(path):
    """Every committed frontier is a FrontierResult (no field unknown to the schema), and reads back to the same JSON."""
    blob = json.loads(path.read_text())
    res = FrontierResult.load(path)
    again = json.loads(json.dumps(res.to_dict()))
    assert res.points and {k: again[k] for k in blob} == blob
