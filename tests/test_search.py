import pytest
import torch

from cnt import search
from cnt.tiny import tiny_model
from cnt.transfer import PatchError

from .test_locate import fixture  # noqa: F401  (tiny donor/target pair with the real tokenizer)


def test_fixed_budget_transfer(fixture):  # noqa: F811
    donor, target, tok = fixture
    before = {k: v.clone() for k, v in target.state_dict().items()}
    patch, info = search.transfer(donor, target, tok, "refusal", budget=0.1,
                                  task_kwargs={"n_function": 6, "n_utility": 4}, progress=False)
    assert patch.n_neurons == round(0.1 * 192)
    assert patch.provenance["scorer"] == "attribution" and patch.provenance["split"] == "locate"
    assert all(torch.equal(before[k], v) for k, v in target.state_dict().items())  # target untouched


def test_auto_budget_runs_the_search(fixture):  # noqa: F811
    donor, target, tok = fixture
    patch, info = search.transfer(donor, target, tok, "compliance", budget="auto",
                                  task_kwargs={"n_function": 6, "n_utility": 4},
                                  search_kwargs={"max_ppl_increase": 10.0}, progress=False)
    res = info["search"]
    ks = [s["k"] for s in res["steps"]]
    assert ks[0] == max(1, 192 // 2000) and len(ks) >= 2
    if res["reached"]:
        assert patch.n_neurons == res["k"]
        assert all(not s["ok"] for s in res["steps"] if s["k"] < res["k"])


@pytest.mark.parametrize("budget", [0, 1.5, -0.1, "lots"])
def test_bad_budget_refused(fixture, budget):  # noqa: F811
    donor, target, tok = fixture
    with pytest.raises(PatchError, match=r"\(0, 1\]"):
        search.transfer(donor, target, tok, "refusal", budget=budget)


def test_incompatible_refused_before_compute(fixture, monkeypatch):  # noqa: F811
    donor, _, tok = fixture
    other = tiny_model("llama", num_hidden_layers=3, vocab_size=len(tok))

    def boom(*a, **k):
        raise AssertionError("no compute may happen")

    monkeypatch.setattr(search, "build_task", boom)
    from cnt.arch import IncompatibleModelsError

    with pytest.raises(IncompatibleModelsError):
        search.transfer(donor, other, tok, "refusal", budget=0.1)


def test_unknown_function(fixture):  # noqa: F811
    with pytest.raises(ValueError, match="functions: refusal"):
        search.build_task("honesty", *fixture)
