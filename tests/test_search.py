import numpy as np
import pytest
import torch

from cnt import functions, pipeline, search
from cnt.tiny import tiny_model
from cnt.transfer import NeuronPatch, PatchError

from .test_locate import fixture  # noqa: F401  (tiny donor/target pair with the real tokenizer)


def test_fixed_budget_transfer(fixture):  # noqa: F811
    donor, target, tok = fixture
    before = {k: v.clone() for k, v in target.state_dict().items()}
    patch, info = pipeline.transfer_function(donor, target, tok, "refusal", budget=0.1,
                                             task_kwargs={"n_function": 6, "n_utility": 4}, progress=False)
    per_neuron = NeuronPatch.extract(donor, target, {0: [0]}).n_params
    assert 0 < patch.n_params <= round(0.1 * 192) * per_neuron  # the weight of 10% of the MLP neurons
    assert patch.provenance["scorer"] == "learned_mask" and patch.provenance["split"] == "locate"
    tried = [s["alpha"] for s in info["alpha_choice"]]  # chosen on validation: the grid, and one halfway step where
    assert set(search.ALPHAS) <= set(tried) and len(tried) <= len(search.ALPHAS) + 1 and patch.alpha in tried  # due
    plain, _ = pipeline.transfer_function(donor, target, tok, "refusal", budget=0.1, scorer="attribution", alpha=1.0,
                                          task_kwargs={"n_function": 6, "n_utility": 4}, progress=False)
    assert plain.n_neurons == round(0.1 * 192) and plain.alpha == 1.0 and not plain.gamma
    assert all(torch.equal(before[k], v) for k, v in target.state_dict().items())  # target untouched


def test_auto_budget_runs_the_search(fixture):  # noqa: F811
    donor, target, tok = fixture
    patch, info = pipeline.transfer_function(donor, target, tok, "compliance", budget="auto",
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
        pipeline.transfer_function(donor, target, tok, "refusal", budget=budget)


def test_incompatible_refused_before_compute(fixture, monkeypatch):  # noqa: F811
    donor, _, tok = fixture
    other = tiny_model("llama", num_hidden_layers=3, vocab_size=len(tok))

    def boom(*a, **k):
        raise AssertionError("no compute may happen")

    monkeypatch.setattr(pipeline, "build_task", boom)
    from cnt.arch import IncompatibleModelsError

    with pytest.raises(IncompatibleModelsError):
        pipeline.transfer_function(donor, other, tok, "refusal", budget=0.1)


def test_unknown_function(fixture):  # noqa: F811
    with pytest.raises(ValueError, match="functions: refusal"):
        functions.build_task("honesty", *fixture)


class _ScriptedProxy(functions.Proxy):
    """A proxy whose share grows with the number of transferred neurons and whose perplexity breaks above ``k_bad``."""

    def __init__(self, k_bad: int, k_goal: int):
        super().__init__("compliance")
        self.k_bad, self.k_goal, self.k = k_bad, k_goal, 0

    def measure(self, model, tokenizer):
        return {"score": min(1.0, self.k / self.k_goal), "drift": 0.0, "ppl": 10.0 * (2 if self.k > self.k_bad else 1)}


def _layer_sizes(model):
    from cnt.arch import fingerprint

    return list(fingerprint(model).intermediate_sizes)


def _scripted_search(fixture, monkeypatch, k_bad, k_goal, growth=4):  # noqa: F811
    donor, target, tok = fixture
    from cnt.locate import NeuronScores

    proxy = _ScriptedProxy(k_bad, k_goal)
    scores = NeuronScores("attribution", [torch.rand(n) for n in _layer_sizes(target)])
    real_extract = search.NeuronPatch.extract

    def extract(d, t, picked, **kw):
        proxy.k = sum(len(v) for v in picked.values())
        return real_extract(d, t, picked, **kw)

    monkeypatch.setattr(search.NeuronPatch, "extract", staticmethod(extract))
    return search.minimal_subset(scores, donor, target, tok, proxy, k_min=2, growth=growth, alphas=(1.0,),
                                 progress=False,
                                 measured=({"score": 0.0, "ppl": 10.0, "drift": 0.0},
                                           {"score": 1.0, "ppl": 10.0, "drift": 0.0}))


@pytest.mark.parametrize("growth", [2, 4])
def test_search_bisects_to_the_smallest_accepted_k(fixture, monkeypatch, growth):  # noqa: F811
    res = _scripted_search(fixture, monkeypatch, k_bad=10_000, k_goal=20, growth=growth)
    assert res.reached and 18 <= res.k <= 20  # 90% of the gap at k=18; bisection to within 10%
    assert all(not s.ok for s in res.steps if s.k < 18)


@pytest.mark.parametrize("growth, ks", [(2, [2, 4, 8]), (4, [2, 8])])
def test_search_stops_galloping_once_utility_breaks(fixture, monkeypatch, growth, ks):  # noqa: F811
    res = _scripted_search(fixture, monkeypatch, k_bad=5, k_goal=40, growth=growth)
    assert not res.reached
    assert [s.k for s in res.steps] == ks  # 8 broke perplexity: no trials beyond it


def _plain_trial(k_goal: float, k_bad: float = float("inf"), gain: dict | None = None):
    """A ``(k, alpha) -> step`` function without any model: the share grows linearly in ``gain[alpha] * k`` and
    perplexity breaks above ``k_bad``."""
    tried = []

    def trial(k, alpha):
        share = min(1.0, (gain or {}).get(alpha, 1.0) * k / k_goal)
        utility_ok = k <= k_bad
        tried.append((k, alpha))
        return search.SearchStep(k, alpha, share, share, 10.0, None, share >= 0.9 and utility_ok, utility_ok)

    return trial, tried


def test_the_search_algorithm_runs_on_a_plain_function():
    """search_k needs no model: on k -> share it finds the smallest accepted k within 10%, stops galloping once
    utility breaks, and a later alpha only searches below the best k found."""
    trial, tried = _plain_trial(k_goal=200)
    best = search.search_k(trial, k_min=2, k_max=10_000, alphas=(1.0,))
    assert 180 <= best.k <= 198 and best.ok and all(k < 180 for k, _ in tried if k < best.k)
    assert [k for k, _ in tried][:4] == [2, 8, 32, 128]  # the gallop, growth 4
    trial, tried = _plain_trial(k_goal=200, k_bad=20)
    assert search.search_k(trial, k_min=2, k_max=10_000, alphas=(1.0,)) is None and tried == [(2, 1.0), (8, 1.0),
                                                                                           (32, 1.0)]
    trial, tried = _plain_trial(k_goal=200, gain={2.0: 2.0})
    best = search.search_k(trial, k_min=2, k_max=10_000, alphas=(1.0, 2.0))
    assert best.alpha == 2.0 and 90 <= best.k <= 99
    assert all(k < best.k for k, a in tried if a == 1.0) and [k for k, a in tried if a == 1.0] == [best.k - 1]


def test_a_smaller_alpha_skips_what_a_larger_one_left_short():
    """Out of reach within k_max: the largest alpha gallops to the limit and the smaller ones are settled without a
    trial; where the larger alpha broke utility instead, the smaller one gallops again, but not through the k values
    the larger one already left short with utility held."""
    trial, tried = _plain_trial(k_goal=1e9, gain={1.0: 1.0, 2.0: 2.0, 4.0: 4.0})
    assert search.search_k(trial, k_min=2, k_max=10_000, alphas=(1.0, 2.0, 4.0)) is None
    assert {a for _, a in tried} == {4.0} and [k for k, _ in tried] == [2, 8, 32, 128, 512, 2048, 8192, 10_000]

    def trial(k, alpha):  # alpha 2 breaks perplexity above k = 100; alpha 1 holds it and reaches the goal at 500
        share = min(1.0, alpha * k / 556)
        ok_util = alpha == 1.0 or k <= 100
        seen.append((k, alpha))
        return search.SearchStep(k, alpha, share, share, 10.0, None, share >= 0.9 and ok_util, ok_util)

    seen = []
    best = search.search_k(trial, k_min=2, k_max=10_000, alphas=(1.0, 2.0))
    assert best.alpha == 1.0 and 501 <= best.k <= 556  # 90% of the gap from k = 501; bisection within 10%
    assert [k for k, a in seen if a == 2.0] == [2, 8, 32, 128]  # 128 broke utility
    assert not [k for k, a in seen if a == 1.0 and k <= 32]  # 2, 8, 32 were short at alpha 2: not tried at alpha 1


def test_task_never_reads_the_eval_split(fixture):  # noqa: F811
    with pytest.raises(ValueError, match="eval split"):
        functions.build_task("refusal", *fixture, split="eval")


def test_task_utility_can_hold_over_refusal_probes(fixture):  # noqa: F811
    """``n_overrefusal``: the split's over-refusal probes join the benign prompts of the utility term, each with the
    target's own answer (measured on SmolLM2: no effect on what is located, METHOD.md)."""
    from cnt import data

    plain = functions.build_task("refusal", *fixture, n_function=2, n_utility=3, n_wiki=0)
    more = functions.build_task("refusal", *fixture, n_function=2, n_utility=3, n_wiki=0, n_overrefusal=2)
    probes = data.texts(data.load("overrefusal", "locate", seed=0, limit=2))
    assert [e.prompt for e in more.utility] == [e.prompt for e in plain.utility] + probes
    assert more.meta["n_overrefusal"] == 2 and more.digest() != plain.digest()


def test_a_later_alpha_only_searches_below_the_best_k(fixture, monkeypatch):  # noqa: F811
    donor, target, tok = fixture
    from cnt.locate import NeuronScores

    proxy = _ScriptedProxy(k_bad=10_000, k_goal=20)
    scores = NeuronScores("attribution", [torch.rand(n) for n in _layer_sizes(target)])
    real_extract = search.NeuronPatch.extract

    def extract(d, t, picked, alpha=1.0, **kw):  # alpha 2 reaches the goal with half the neurons
        proxy.k = alpha * sum(len(v) for v in picked.values())
        return real_extract(d, t, picked, alpha=alpha, **kw)

    monkeypatch.setattr(search.NeuronPatch, "extract", staticmethod(extract))
    res = search.minimal_subset(scores, donor, target, tok, proxy, k_min=2, alphas=(1.0, 2.0), progress=False,
                                measured=({"score": 0.0, "ppl": 10.0, "drift": 0.0},
                                          {"score": 1.0, "ppl": 10.0, "drift": 0.0}))
    assert res.reached and res.alpha == 2.0 and 9 <= res.k <= 10
    assert [s.alpha for s in res.steps][0] == 2.0
    assert all(s.k < res.k for s in res.steps if s.alpha == 1.0)  # alpha 1 never tried at or above alpha 2's k
    # alpha 1 gets no gallop from k_min: one trial just below alpha 2's k, or none where alpha 2's bisection already
    # left that k short with utility held (a smaller alpha moves the function less)
    short = max(s.k for s in res.steps if s.alpha == 2.0 and not s.ok)
    assert [s.k for s in res.steps if s.alpha == 1.0] == ([res.k - 1] if res.k - 1 > short else [])


def test_choose_counts_overshooting_the_donor_as_reaching_it():
    a = [{"share": 0.5, "utility_ok": True}, {"share": 1.05, "utility_ok": True}, {"share": 1.4, "utility_ok": True},
         {"share": 2.0, "utility_ok": False}]
    assert functions.choose(a) == 1  # 1.05 and 1.4 both reach the donor: the milder (first) wins
    assert functions.choose([{**x, "utility_ok": False} for x in a]) == 1  # none held: the furthest, capped the same
    assert functions.choose([{"share": 0.2, "utility_ok": True}, {"share": 0.9, "utility_ok": False}]) == 0


class _AlphaProxy(functions.Proxy):
    """Target and donor first; then the share is alpha x 0.3 and perplexity breaks from alpha 8 on."""

    def __init__(self):
        super().__init__("compliance")
        self.calls, self.alpha = 0, 1.0

    def measure(self, model, tokenizer):
        self.calls += 1
        if self.calls <= 2:
            return {"score": float(self.calls == 2), "ppl": 10.0, "degenerate": 0.0}
        return {"score": 0.3 * self.alpha, "ppl": 10.0 * (1.5 if self.alpha >= 8 else 1.0), "degenerate": 0.0}


def test_choose_never_picks_a_setting_it_passed_over():
    """What lets the experiment keep only the current pick while it assesses settings one by one (not rebuild the
    chosen one afterwards): the final choice was already the choice when it was assessed, and stayed it."""
    import random

    rng = random.Random(0)
    for _ in range(500):
        a = [{"share": rng.choice([0.1, 0.5, 0.9, 1.2, float("nan")]), "utility_ok": rng.random() < 0.5}
             for _ in range(rng.randint(1, 6))]
        final = functions.choose(a)
        assert all(functions.choose(a[:t + 1]) == final for t in range(final, len(a)))


def test_fixed_budget_with_several_alphas_chooses_on_validation(fixture, monkeypatch):  # noqa: F811
    donor, target, tok = fixture
    proxy = _AlphaProxy()
    monkeypatch.setattr(functions.Proxy, "for_function", classmethod(lambda cls, *a, **k: proxy))
    real_assess = functions.Validator.assess

    def assess(self, patch):  # the proxy answers for the amplitude of the patch it is shown
        proxy.alpha = patch.alpha
        return real_assess(self, patch)

    monkeypatch.setattr(functions.Validator, "assess", assess)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    patch, info = pipeline.transfer_function(donor, target, tok, "compliance", budget=0.1, alpha=(8.0, 1.0, 4.0, 2.0),
                                             task_kwargs={"n_function": 6, "n_utility": 4}, progress=False)
    tried = [(s["alpha"], round(s["share"], 2), s["utility_ok"]) for s in info["alpha_choice"]]
    assert tried == [(1.0, 0.3, True), (2.0, 0.6, True), (4.0, 1.2, True), (8.0, 2.4, False)]
    assert patch.alpha == 4.0  # reaches the donor with utility held; 8 broke perplexity
    assert all(torch.equal(before[k], v) for k, v in target.state_dict().items())


def test_a_fixed_budget_takes_the_rules_limits_from_the_search_settings(fixture, monkeypatch):  # noqa: F811
    """``search_kwargs`` carry the rule's limits to the choice of α at a fixed budget (a looser perplexity limit lets
    α 8 hold); the search's other settings (``growth``) do not apply there and are left out."""
    donor, target, tok = fixture
    proxy = _AlphaProxy()
    monkeypatch.setattr(functions.Proxy, "for_function", classmethod(lambda cls, *a, **k: proxy))
    real_assess = functions.Validator.assess

    def assess(self, patch):
        proxy.alpha = patch.alpha
        return real_assess(self, patch)

    monkeypatch.setattr(functions.Validator, "assess", assess)
    kw = dict(budget=0.1, alpha=(8.0, 1.0, 2.0), task_kwargs={"n_function": 6, "n_utility": 4}, progress=False)
    patch, info = pipeline.transfer_function(donor, target, tok, "compliance", **kw)
    # alpha 8 broke perplexity (+50%, limit +2%) where 2 held short of the donor: halfway, 5 is judged too, and holds
    assert [s["alpha"] for s in info["alpha_choice"]] == [1.0, 2.0, 5.0, 8.0] and patch.alpha == 5.0
    proxy.calls = 0
    patch, info = pipeline.transfer_function(donor, target, tok, "compliance", **kw,
                                             search_kwargs={"max_ppl_increase": 0.6, "growth": 2})
    assert patch.alpha == 8.0 and info["alpha_choice"][-1]["utility_ok"]
    assert functions.rule_limits({"goal": 0.8, "growth": 2, "max_degenerate_increase": 0.1}) == \
        {"goal": 0.8, "max_degenerate_increase": 0.1}


def test_judge_names_each_utility_check_that_failed():
    """The rule says which check stopped a setting, with its value and limit, and nothing when utility held."""
    base = {"score": 0.0, "ppl": 20.0, "degenerate": 0.02, "false_refusal": 0.05}
    donor = {"score": 1.0, "ppl": 30.0}
    held = functions.judge({"score": 0.95, "ppl": 20.3, "degenerate": 0.04, "false_refusal": 0.10}, base, donor, "refusal")
    assert held["ok"] and held["utility_ok"] and held["failed"] == []
    broke = functions.judge({"score": 0.95, "ppl": 21.0, "degenerate": 0.02, "false_refusal": 0.1333}, base, donor,
                         "refusal")
    assert not broke["ok"] and not broke["utility_ok"] and broke["share"] == pytest.approx(0.95)
    assert broke["failed"] == ["perplexity +5.0% (limit +2%)", "false refusal +8.3 points (limit +5)"]


class _WikiProxy(functions.Proxy):
    """Bias removal's proxy with scripted perplexities: ``sample`` on its 4 passages, ``whole`` on all 16 of the
    split for a change (the target's: 10 and 20 — different passages, different levels). The whole split's passages
    come 4 at a time, each with its own level (±5%: paired with the target's) and a change-specific wobble (±2%), so
    a change near the limit cannot be decided before the end. Counts how often the whole split is read."""

    def __init__(self):
        super().__init__("bias", wiki=["w"] * 4, wiki_more=["m"] * 12)
        self.sample, self.whole, self.whole_calls, self.patched, self.broken = 10.0, 20.0, 0, None, False

    def measure(self, model, tokenizer):
        return {"score": 70.0, "ppl": self.sample, "degenerate": 0.5 if self.broken and model is self.patched else 0.0}

    def whole_passages(self, model, tokenizer, stop=None):
        self.whole_calls += 1
        change = model is self.patched  # the validator's working copy, or the target
        level = np.log(self.whole if change else 20.0) + np.array([0.05, -0.05] * 8)
        if change:
            level += np.array([0.02, 0.02, -0.02, -0.02] * 4)
        rows = np.stack([10 * level, np.full(16, 10.0)], axis=1)  # [nll, tokens]: 10 tokens a passage
        for n in (4, 8, 12):
            if stop is not None and stop(rows[:n]):
                return rows[:n]
        return rows


def test_perplexity_is_judged_on_every_validation_passage_where_the_sample_cannot_decide(fixture):  # noqa: F811
    """Near the limit (within 3 points of +2%) the rule reads a change's perplexity on the whole validation split's
    Wikipedia passages, against the target's there (the 16-passage sample sat up to 2.8 points from the whole
    split's relative change, which tracked eval's within 1.5); elsewhere the sample decides, and where another check
    already rejects the change. The target's whole-split value is read once, when first needed. The change's read
    stops once the whole split's verdict is decided (:func:`functions.perplexity_change_decided`)."""
    donor, target, tok = fixture
    proxy = _WikiProxy()  # target: 10 on the sample, 20 on the whole split
    val = functions.Validator(donor, target, tok, proxy)
    proxy.patched = val.work
    assert val.target["ppl"] == 10.0 and proxy.whole_calls == 0  # nothing read on the whole split yet
    patch = NeuronPatch.extract(donor, target, {0: [0]})
    proxy.sample = 9.5  # -5%: well within; the sample decides
    low = val.assess(patch)
    assert low["utility_ok"] and proxy.whole_calls == 0 and low["proxy"]["ppl_n"] == 4
    proxy.sample = 12.0  # +20%: far past; the sample decides
    far = val.assess(patch)
    assert far["failed"] == ["perplexity +20.0% (limit +2%)"] and proxy.whole_calls == 0
    proxy.sample, proxy.whole = 10.4, 20.3  # +4% on the sample, +1.5% on the whole split: held, read to the end
    held = val.assess(patch)
    assert held["utility_ok"] and held["proxy"]["ppl_n"] == 16 and held["proxy"]["ppl_sample"] == 10.4
    assert held["proxy"]["ppl"] == pytest.approx(10.15) and proxy.whole_calls == 2  # the target's, then the change's
    assert val.target["ppl_whole"] == pytest.approx(20.0 * np.exp(0.0))  # the ±5% levels average out
    proxy.sample, proxy.whole = 10.1, 20.6  # +1% on the sample, +3% on the whole split: broke
    broke = val.assess(patch)
    assert broke["failed"] == ["perplexity +3.0% (limit +2%)"] and proxy.whole_calls == 3  # the target's read once
    proxy.sample, proxy.whole = 10.1, 21.2  # +6% on the whole split: decided before the end, as a full read would
    early = val.assess(patch)
    assert early["failed"] == ["perplexity +6.0% (limit +2%)"] and early["proxy"]["ppl_n"] == 4, early
    assert search.step_of(1, patch, early).ppl_n == 4  # the search's record says how many passages it read
    proxy.broken = True  # near the limit, but its answers break: rejected on the sample, the whole split not read
    rejected = val.assess(patch)
    assert rejected["failed"] == ["degenerate +50.0 points (limit +5)"] and proxy.whole_calls == 4
    assert rejected["proxy"]["ppl_n"] == 4
    real = functions.Proxy.for_function("bias", seed=0)  # the split: 16 passages, then every other one, disjoint
    assert len(real.wiki) == 16 and len(real.wiki_more) > 200 and not set(real.wiki) & set(real.wiki_more)


def test_the_perplexity_change_is_decided_only_when_the_unread_passages_cannot_turn_it():
    """Hand cases: a change read on a few passages is decided against the limit only when the limit lies more than
    z standard errors (residual spread over the unread passages plus the rate's own error) from the read rate."""
    rng = np.random.default_rng(0)
    tokens = rng.integers(40, 128, 200).astype(float)
    target = np.stack([tokens * 3.0, tokens], axis=1)
    at = lambda rate, wobble: np.stack([tokens * (3.0 + rate + wobble * rng.standard_normal(200)), tokens], axis=1)
    decided = functions.perplexity_change_decided
    clean = at(np.log(1.06), 0.0)  # +6% on every passage: decided as soon as two are read
    assert not decided(clean[:1], target, 0.02) and decided(clean[:2], target, 0.02)
    assert not decided(clean, target, 0.02)  # everything read: nothing to estimate, the caller has the whole value
    near = at(np.log(1.021), 0.02)  # +2.1%, passages spread by ±2%: undecided on half the split
    assert not decided(near[:100], target, 0.02)
    noisy = at(np.log(1.06), 0.05)  # +6%, with a large spread: undecided at first, decided on more
    assert not decided(noisy[:4], target, 0.02, z=3.0) and decided(noisy[:96], target, 0.02, z=3.0)
    # with no spread at all the exact residual is zero: one more z cannot hold a decided change open
    assert decided(clean[:2], target, 0.02, z=100.0)


def test_the_whole_split_is_read_in_chunks_and_stops_when_told(fixture, monkeypatch):  # noqa: F811
    """Proxy.whole_passages reads the passages in order, PPL_CHUNK at a time: the rows equal one full read's, and a
    ``stop`` that says decided leaves the rest unread."""
    _, target, tok = fixture
    texts = ["The river runs north past the old mill.", "Parliament met in the spring of that year.",
             "Its leaves are broad and dark green.", "The station opened in 1901.", "He wrote three novels.",
             "The bridge was rebuilt after the flood."]
    proxy = functions.Proxy("bias", wiki=texts[:2], wiki_more=texts[2:])
    rows = proxy.whole_passages(target, tok)
    whole = functions.perplexity(target, tok, texts, max_tokens=128, progress=False).value
    assert rows.shape == (6, 2) and float(np.exp(rows[:, 0].sum() / rows[:, 1].sum())) == pytest.approx(whole, rel=1e-5)
    monkeypatch.setattr(functions, "PPL_CHUNK", 2)
    seen = []
    part = proxy.whole_passages(target, tok, stop=lambda read: seen.append(len(read)) or len(read) >= 4)
    assert seen == [2, 4] and np.allclose(part, rows[:4], rtol=1e-5)


class _BenignProxy(functions.Proxy):
    """Adding refusal: the 40-prompt sample shows no false refusal, the rest of the split's benign prompts a rate
    ``more_rate``; perplexity breaks when ``broken``. Counts how often the rest is generated."""

    def __init__(self, more_rate: float):
        super().__init__("refusal", benign=["b"] * 40, benign_more=["m"] * 160)
        self.more_rate, self.broken, self.whole_calls = more_rate, False, 0

    def measure(self, model, tokenizer):
        return {"score": 1.0, "ppl": 10.0 * (2 if self.broken else 1), "degenerate": 0.0, "false_refusal": 0.0}

    def whole_false_refusal(self, model, tokenizer, sample_rate, most_refused=None):
        self.whole_calls += 1
        return (sample_rate * len(self.benign) + self.more_rate * len(self.benign_more)) / 200, 200


def test_false_refusal_is_judged_on_every_benign_validation_prompt(fixture):  # noqa: F811
    """The rule's false-refusal check reads the whole validation split's benign prompts, not the 40-prompt sample
    (whose 2.5-point resolution passed settings that refused 7-15 points more on eval); a change that already broke
    another check is rejected without generating the rest."""
    donor, target, tok = fixture
    proxy = _BenignProxy(more_rate=0.0)  # judged on the point estimate here (the bound: the next test)
    val = functions.Validator(donor, target, tok, proxy, measured=None, false_refusal_confidence=None)
    assert proxy.whole_calls == 2 and val.target["false_refusal_n"] == 200  # target and donor on all 200
    patch = NeuronPatch.extract(donor, target, {0: [0]})
    proxy.more_rate = 0.1  # the change refuses 16 of the other 160: 8% over all 200, 0% on the sample
    verdict = val.assess(patch)
    assert not verdict["utility_ok"] and verdict["proxy"]["false_refusal"] == pytest.approx(0.08)
    assert verdict["failed"] == ["false refusal +8.0 points (limit +5)"] and proxy.whole_calls == 3
    proxy.more_rate = 0.05  # 4% over all 200: held
    held = val.assess(patch)
    assert held["utility_ok"] and proxy.whole_calls == 4
    step = search.step_of(1, patch, held)  # the trial's record keeps the rate it passed by, and on how many prompts
    assert step.false_refusal == pytest.approx(0.04) and step.false_refusal_n == 200
    proxy.broken = True  # perplexity broke on the sample's measurement: the rest is not generated
    verdict = val.assess(patch)
    assert not verdict["utility_ok"] and proxy.whole_calls == 4 and verdict["proxy"]["false_refusal_n"] == 40
    # the split: the sample (32 everyday + 8 over-refusal prompts) and every other benign validation prompt, disjoint
    real = functions.Proxy.for_function("refusal", seed=0)
    assert len(real.benign) == 40 and not set(real.benign) & set(real.benign_more) and len(real.benign_more) > 100
    assert not functions.Proxy.for_function("compliance").benign_more  # deleting refusal watches no benign prompts


@pytest.mark.parametrize("confidence", [0.95, None])
@pytest.mark.parametrize("n, base_rate", [(212, 0.0), (212, 0.05), (60, 0.02)])
def test_a_setting_past_the_most_refusals_fails_on_any_part_of_the_split(n, base_rate, confidence):
    """Stopping the read once a setting has refused more than most_refused_passing changes no verdict: with more
    refusals it fails on all n prompts, and fails too on the prompts read so far, however few."""
    most = functions.most_refused_passing(n, base_rate, 0.05, confidence)
    if confidence == 0.95 and (n, base_rate) == (212, 0.0):
        assert most == 5  # 5 of 212 -> 4.77% at the bound, 6 -> 5.38% (the hand-computed bounds below)
    base = {"score": 0.0, "ppl": 20.0, "false_refusal": base_rate}

    def held(refused, read):
        m = {"score": 0.5, "ppl": 20.0, "false_refusal": refused / read, "false_refusal_n": read}
        return functions.judge(m, base, {"score": 1.0, "ppl": 20.0}, "refusal",
                               false_refusal_confidence=confidence)["utility_ok"]

    assert held(most, n) and not held(most + 1, n)
    for refused in range(most + 1, n + 1):
        assert not any(held(refused, read) for read in range(max(refused, 1), n + 1))


class _AnsweringProxy(functions.Proxy):
    """The real whole-split read, with answers by rule: prompts starting 'r' are refused."""

    def __init__(self, benign, benign_more):
        super().__init__("refusal", benign=benign, benign_more=benign_more)

    def measure(self, model, tokenizer):
        return {"score": 1.0, "ppl": 10.0, "degenerate": 0.0,
                "false_refusal": sum(p.startswith("r") for p in self.benign) / len(self.benign)}


def test_the_whole_split_read_stops_once_the_setting_has_failed(monkeypatch):
    batches = []

    def answer(model, tokenizer, prompts, batch_size, stop=None, **kw):  # generate's contract, by rule
        out = [None] * len(prompts)
        for s in range(0, len(prompts), batch_size):
            batch = ["I'm sorry, I can't help with that." if p.startswith("r") else "Sure, here it is."
                     for p in prompts[s:s + batch_size]]
            out[s:s + batch_size] = batch
            batches.append(len(batch))
            if stop is not None and stop(batch):
                break
        return out

    monkeypatch.setattr(functions, "generate", answer)
    benign = ["b"] * 40
    refusing = _AnsweringProxy(benign, ["r"] * 20 + ["b"] * 172)  # 20 refusals in the first batch of 48
    rate, n = refusing.whole_false_refusal(None, None, 0.0)
    assert (rate, n) == (pytest.approx(20 / 232), 232) and batches == [48, 48, 48, 48]  # read whole
    batches.clear()
    rate, n = refusing.whole_false_refusal(None, None, 0.0, most_refused=5)
    assert (rate, n) == (pytest.approx(20 / 88), 88) and batches == [48]  # stopped after the first batch
    batches.clear()
    rate, n = refusing.whole_false_refusal(None, None, 6 / 40, most_refused=5)  # the sample alone has failed
    assert (rate, n) == (pytest.approx(6 / 40), 40) and batches == []
    clean = _AnsweringProxy(benign, ["b"] * 190 + ["r"] * 2)
    assert clean.whole_false_refusal(None, None, 0.0, most_refused=5) == (pytest.approx(2 / 232), 232)


def test_generate_stops_after_the_batch_that_decides(fixture):  # noqa: F811
    from cnt.models import generate

    _, target, tok = fixture
    prompts = ["Name a colour.", "Count to three.", "Say hi.", "Write one word.", "Pick a number."]
    whole = generate(target, tok, prompts, max_new_tokens=4, batch_size=2, progress=False)
    seen = []
    part = generate(target, tok, prompts, max_new_tokens=4, batch_size=2, progress=False,
                    stop=lambda answers: seen.append(answers) or len(seen) == 2)
    assert len(seen) == 2 and sum(a is not None for a in part) == 4
    assert all(a == w for a, w in zip(part, whole) if a is not None)  # the batches that ran answered as in a whole run


def test_false_refusal_must_hold_the_limit_at_its_upper_bound():
    """By default a setting's false refusal passes only when the one-sided 95% upper Wilson bound of its rate, on the
    prompts it was read on, is within the limit of the target's rate: the rule takes the largest α that passes, and
    a point estimate at the limit sat past it on eval. Hand-computed bounds (z = 1.6449): 5 of 212 -> 4.77%, 6 of 212
    -> 5.38%, 0 of 40 -> 6.34%."""
    base = {"score": 0.0, "ppl": 20.0, "false_refusal": 0.0, "false_refusal_n": 212}
    donor = {"score": 1.0, "ppl": 20.0}

    def verdict(refused, n, **rule):
        m = {"score": 0.5, "ppl": 20.0, "false_refusal": refused / n, "false_refusal_n": n}
        return functions.judge(m, base, donor, "refusal", **rule)

    assert functions.false_refusal_bound({"false_refusal": 5 / 212, "false_refusal_n": 212}, 0.95) == \
        pytest.approx(0.04765, abs=5e-5)
    assert verdict(5, 212)["utility_ok"]
    six = verdict(6, 212)
    assert not six["utility_ok"] and six["failed"] == ["false refusal +2.8 points; +5.4 at its 95% upper bound (limit +5)"]
    assert verdict(10, 212, false_refusal_confidence=None)["utility_ok"]  # the point rule: 4.7 points passes
    assert not verdict(11, 212, false_refusal_confidence=None)["utility_ok"]
    assert not verdict(0, 40)["utility_ok"]  # 40 prompts cannot vouch for +5 points at 95%
    assert functions.false_refusal_bound({"false_refusal": 0.0, "false_refusal_n": 40}, 0.95) == \
        pytest.approx(0.0634, abs=5e-4)
    assert functions.full_rule()["false_refusal_confidence"] == 0.95  # the default, as results files record it
    assert functions.full_rule(false_refusal_confidence=None, growth=4)["false_refusal_confidence"] is None
    # without a count (a measurement from before counts were kept) the rate itself is judged
    assert functions.false_refusal_bound({"false_refusal": 0.03}, 0.95) == 0.03
    looser = dict(base, false_refusal=0.02)  # judged against the target's own rate
    m = {"score": 0.5, "ppl": 20.0, "false_refusal": 6 / 212, "false_refusal_n": 212}
    assert functions.judge(m, looser, donor, "refusal")["utility_ok"]


def test_a_merge_with_the_donors_weights_is_judged_on_the_donors_measurement(fixture):  # noqa: F811
    """Linear interpolation at λ = 1 *is* the donor: the validator reuses the donor's measurement (no proxy run) and
    gives the verdict measuring would; any other merge is measured."""
    import copy

    from cnt import baselines

    donor, target, tok = fixture
    proxy = _BenignProxy(more_rate=0.0)
    calls = []
    real_measure = proxy.measure
    proxy.measure = lambda model, tokenizer: calls.append(model) or real_measure(model, tokenizer)
    val = functions.Validator(donor, target, tok, proxy, measured=None)
    assert len(calls) == 2  # the target and the donor
    merged = baselines.run_linear(donor, target, lam=1.0).materialize(target)
    verdict = val.assess_model(merged)
    assert merged is not donor and verdict["proxy"] is val.donor and len(calls) == 2
    half = baselines.run_linear(donor, target, lam=0.5).materialize(target)
    val.assess_model(half)
    assert len(calls) == 3
    other = copy.deepcopy(donor)
    with torch.no_grad():
        next(other.parameters()).view(-1)[0] += 1.0  # one weight off: no longer the donor
    val.assess_model(other)
    assert len(calls) == 4


def test_choose_alpha_bisects_the_boundary_once():
    """The α halfway between the chosen one and the next, which broke utility, is judged and can be chosen; nothing
    is added when the next one held, when the chosen one already reaches the donor, or when none held."""
    def scripted(share_per_alpha, breaks_at):
        seen = []

        def assess(a):
            seen.append(a)
            return {"share": share_per_alpha * a, "utility_ok": a < breaks_at}
        return assess, seen

    assess, seen = scripted(0.25, breaks_at=2.0)  # 1 held (0.25), 2 broke: 1.5 holds (0.375) and wins
    tried, assessed, i = functions.choose_alpha([8.0, 1.0, 4.0, 2.0], assess)
    assert tried == [1.0, 1.5, 2.0, 4.0, 8.0] and tried[i] == 1.5 and seen == [1.0, 2.0, 4.0, 8.0, 1.5]
    assess, _ = scripted(0.25, breaks_at=1.4)  # 1.5 breaks too: 1 stays the choice
    tried, _, i = functions.choose_alpha([1.0, 2.0, 4.0], assess)
    assert tried == [1.0, 1.5, 2.0, 4.0] and tried[i] == 1.0
    assess, seen = scripted(0.6, breaks_at=8.0)  # 2 reaches the donor (1.2): no bisection
    tried, _, i = functions.choose_alpha([1.0, 2.0, 4.0, 8.0], assess)
    assert tried == [1.0, 2.0, 4.0, 8.0] and tried[i] == 2.0
    assess, _ = scripted(0.1, breaks_at=100.0)  # every α held: the largest, nothing above it
    assert functions.choose_alpha([1.0, 2.0], assess)[0] == [1.0, 2.0]
    assess, _ = scripted(0.1, breaks_at=0.5)  # none held: the furthest, no bisection
    tried, _, i = functions.choose_alpha([1.0, 2.0], assess)
    assert tried == [1.0, 2.0] and tried[i] == 2.0
    assess, _ = scripted(0.25, breaks_at=2.0)
    assert functions.choose_alpha([1.0, 2.0], assess, refine=False)[0] == [1.0, 2.0]


def test_a_search_out_of_reach_falls_back_to_a_subset_that_held_utility(fixture, monkeypatch):  # noqa: F811
    """When no subset reaches the goal, the subset it hands back (``closest_k``, what ``cnt transfer --budget auto
    --save-best-effort`` saves) is the trial furthest toward the donor *with utility held* — not the largest or
    furthest one, which broke it."""
    res = _scripted_search(fixture, monkeypatch, k_bad=20, k_goal=10_000)  # perplexity breaks above 20 neurons
    assert not res.reached and [s.k for s in res.steps] == [2, 8, 32] and not res.steps[-1].utility_ok
    assert res.closest_k == 8 and res.share == res.steps[1].share
