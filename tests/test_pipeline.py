"""The one CNT pipeline: each step once, timed through the caller's hook; budgets checked and turned into units in one
place; one validator (one working copy of the target) for every rule."""

from contextlib import contextmanager

import pytest

from cnt import functions, pipeline
from cnt.scores import check_budget, check_budgets, neurons_for

from .test_locate import fixture  # noqa: F401  (tiny donor/target pair with the real tokenizer)

SMALL = {"n_function": 6, "n_utility": 4}


def test_each_step_runs_once_inside_the_callers_hook(fixture, monkeypatch):  # noqa: F811
    donor, target, tok = fixture
    entered, built = [], []
    real_build = pipeline.build_task

    def build(*a, **k):
        built.append(1)
        return real_build(*a, **k)

    @contextmanager
    def hook(name):
        entered.append(name)
        yield

    monkeypatch.setattr(pipeline, "build_task", build)
    pipe = pipeline.Pipeline("refusal", donor, target, tok, task_kwargs=SMALL, progress=False, stage=hook)
    scores = pipe.scores("attribution")
    assert pipe.scores("attribution") is scores and len(built) == 1  # the task and the scores are computed once
    patch, steps = pipe.at_budget(scores, 0.05, alphas=(2.0, 1.0))
    # mildest first; halfway (1.5) judged too when 2 broke utility and 1 held
    assert [s.alpha for s in steps] in ([1.0, 2.0], [1.0, 1.5, 2.0]) and patch.alpha in [s.alpha for s in steps]
    assert patch.n_neurons == neurons_for(0.05, pipe.n_neurons)
    assert entered == ["task", "locate", "transfer"]
    assert set(pipe.timings) == {"task", "locate_attribution", "transfer"}
    assert all(v >= 0 for v in pipe.timings.values())


def test_one_validator_serves_every_rule(fixture, monkeypatch):  # noqa: F811
    donor, target, tok = fixture
    made = []
    real_init = functions.Validator.__init__

    def init(self, *a, **k):
        made.append(1)
        real_init(self, *a, **k)

    monkeypatch.setattr(functions.Validator, "__init__", init)
    pipe = pipeline.Pipeline("compliance", donor, target, tok, task_kwargs=SMALL, progress=False)
    strict, loose = pipe.validator(), pipe.validator(max_ppl_increase=10.0)
    assert len(made) == 1 and strict.work is loose.work and strict.target is loose.target
    assert strict.rule == {} and loose.rule == {"max_ppl_increase": 10.0}
    res = pipe.search(pipe.scores("attribution"), alphas=(1.0,), max_ppl_increase=10.0, k_min=2)
    assert len(made) == 1 and res.max_ppl_increase == 10.0 and "search" in pipe.timings


@pytest.mark.parametrize("budget", [0, -0.1, 1.5, float("nan"), True, "0.1", None])
def test_budgets_are_checked_in_one_place(budget):
    with pytest.raises(ValueError, match="must be a fraction of MLP neurons in"):
        check_budget(budget)
    with pytest.raises(ValueError, match=r"budgets must be fractions of MLP neurons in \(0, 1\]"):
        check_budgets([0.1, budget])
    assert check_budget("auto", auto=True) == "auto" and check_budget(1) == 1.0
    assert neurons_for(0.001, 100) == 1 and neurons_for(0.5, 3) == 2  # at least one neuron; rounded


def test_scorers_without_heads_are_refused_before_the_task(fixture, monkeypatch):  # noqa: F811
    donor, target, tok = fixture
    monkeypatch.setattr(pipeline, "build_task", lambda *a, **k: pytest.fail("no compute may happen"))
    pipe = pipeline.Pipeline("refusal", donor, target, tok, progress=False)
    with pytest.raises(ValueError, match=r"scorers \[.activation_contrast.\] score MLP neurons only"):
        pipe.scores("activation_contrast", ("mlp", "head"))


def test_the_functions_default_units_are_scored_unless_the_caller_names_others(fixture):  # noqa: F811
    """Bias removal's subsets are chosen among MLP neurons, query heads and k/v groups by default (its frontier's
    validation shares, papers/METHOD.md); refusal and compliance among MLP neurons; a locator that scores only MLP
    neurons gets MLP neurons; an explicit ``kinds`` wins."""
    donor, target, tok = fixture
    assert functions.default_units("bias") == ("mlp", "head", "kv")
    assert functions.default_units("refusal") == functions.default_units("compliance") == ("mlp",)
    assert functions.default_units("bias", "activation_contrast") == ("mlp",)
    pipe = pipeline.Pipeline("bias", donor, target, tok, task_kwargs={"n_function": 6, "n_utility": 4},
                             progress=False)
    scores = pipe.scores()
    assert scores.scorer == "attribution" and set(scores.units) == {"head", "kv"}
    assert set(pipe.timings) >= {"locate_attribution:mlp+head+kv"}
    assert set(pipe.scores(kinds=("mlp",)).units) == set()  # MLP neurons alone when asked
    assert pipe.scores("attribution", ("mlp", "head", "kv")) is scores  # the default is the same computation
    with pytest.raises(Exception, match=r"scorers \[.activation_contrast.\] score MLP neurons only"):
        pipe.scores("activation_contrast", ("mlp", "head"))
