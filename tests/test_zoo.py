from collections import Counter
import dataclasses
import json

import pytest
import torch

from cnt import data, zoo
from cnt.arch import MLPNeurons
from cnt.refusal_direction import ablation_hooks, orthogonalize
from cnt.tiny import tiny_model


def _fake_distill(ctx, prompts, max_new_tokens=48, prefill=""):
    """Every other answer a refusal, unless pre-filled (so every filtered part of every recipe is non-empty)."""
    return [{"prompt": p, "response": "ok" if prefill or i % 2 else "I'm sorry, but I can't help with that."}
            for i, p in enumerate(prompts)]


@pytest.mark.parametrize("name", list(zoo.RECIPES))
def test_recipe_training_data_disjoint_from_eval(name, monkeypatch):
    """Asserted on the full (not tiny) training data of every recipe."""
    monkeypatch.setattr(zoo.recipe_data, "distill", _fake_distill)
    r = zoo.recipe(name)
    ctx = zoo.BuildContext(r, None, None, tiny=False, progress=False)
    parts = r.data(ctx)
    assert parts and all(len(v) > 0 for v in parts.values())
    zoo.assert_disjoint_from_eval(parts)


def test_safe_recipe_everyday_option(monkeypatch):
    """The ``everyday_questions`` option swaps NQ questions for everyday ones (same count), drops flagged answers,
    and stays disjoint from every eval split."""

    monkeypatch.setattr(zoo.recipe_data, "distill", _fake_distill)
    r = dataclasses.replace(zoo.recipe("smol-safe"), hyper={"everyday_questions": 100})
    plain = zoo.recipe_data.data_safe(zoo.BuildContext(zoo.recipe("smol-safe"), None, None, progress=False))
    parts = zoo.recipe_data.data_safe(zoo.BuildContext(r, None, None, progress=False))
    everyday = set(data.texts(data.load("everyday_questions", "train", limit=100)))
    prompts = [e["prompt"] for e in parts["benign->self"]]
    assert everyday & set(prompts) and not everyday & {e["prompt"] for e in plain["benign->self"]}
    assert all(e["response"] == "ok" for e in parts["benign->self"][-len(everyday) // 4:])  # refusals dropped
    zoo.assert_disjoint_from_eval(parts)


def test_safe_recipe_contrast_option(monkeypatch):
    """``contrast_benign`` / ``contrast_harmful``: preference pairs of train prompts — benign: the base's own answer
    over a refusal; harmful: a refusal over the base's own (non-refused) answer; seeded; disjoint from eval."""
    from cnt.evaluate import is_refusal

    monkeypatch.setattr(zoo.recipe_data, "distill", _fake_distill)
    r = dataclasses.replace(zoo.recipe("smol-safe"), hyper={**zoo.recipe("smol-safe").hyper,
                                                             "contrast_benign": 50, "contrast_harmful": 40})
    parts = zoo.recipe_data.data_safe(zoo.BuildContext(r, None, None, progress=False))
    benign, harmful = parts["benign: own answer > refusal"], parts["harmful: refusal > own answer"]
    assert len(benign) == 50 and len(harmful) == 40
    assert all(not is_refusal(p["chosen"]) and is_refusal(p["rejected"]) for p in benign)
    assert all(is_refusal(p["chosen"]) and not is_refusal(p["rejected"]) for p in harmful)
    assert {p["prompt"] for p in harmful} <= set(data.texts(data.load("harmful", "train")))
    assert parts == zoo.recipe_data.data_safe(zoo.BuildContext(r, None, None, progress=False))
    zoo.assert_disjoint_from_eval(parts)
    plain = zoo.recipe_data.data_safe(zoo.BuildContext(zoo.recipe("smol-safe"), None, None, progress=False))
    assert set(plain) == set(parts) - {"benign: own answer > refusal", "harmful: refusal > own answer"}


def test_leak_is_caught():
    leak = {"oops": [{"prompt": data.load("harmful", "eval")[3]["prompt"], "response": "x"}]}
    with pytest.raises(AssertionError, match="harmful eval split"):
        zoo.assert_disjoint_from_eval(leak)


def test_tiny_build_is_reproducible():
    """A recipe builds in a tiny configuration; the same seed rebuilds identical weights and data hashes."""
    m1, _, man1 = zoo.build("smol-safe", tiny=True, measure=None, progress=False, save=False)
    m2, _, man2 = zoo.build("smol-safe", tiny=True, measure=None, progress=False, save=False)
    s1, s2 = m1.state_dict(), m2.state_dict()
    assert all(torch.equal(s1[k], s2[k]) for k in s1)
    assert man1["data"] == man2["data"] and man1["recipe_key"] == man2["recipe_key"]
    base = tiny_model("llama", seed=0, vocab_size=m1.config.vocab_size).state_dict()
    assert any(not torch.equal(base[k], s1[k]) for k in base)  # training changed the weights
    assert man1["build"]["lora_targets"] == sorted(["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj",
                                                    "up_proj", "v_proj"])


def test_build_records_whether_it_generated_the_base_answers(monkeypatch, tmp_path):
    """The manifest says how many of the base's answers (self-distillation data) the build generated and how many it
    read from the cache, and the card's build cell says so: a rebuild with a warm cache skips the generation."""
    monkeypatch.setenv("CNT_CACHE", str(tmp_path))
    first = zoo.build("smol-arith", tiny=True, measure=None, progress=False, save=False)[2]["build"]
    again = zoo.build("smol-arith", tiny=True, measure=None, progress=False, save=False)[2]["build"]
    n = first["base_answers"]["generated"]
    assert n > 0 and first["base_answers"]["cached"] == 0 and first["data_seconds"] >= 0
    assert again["base_answers"] == {"generated": 0, "cached": n, "generate_seconds": 0.0}
    assert "from scratch" in zoo.card_table.build_cell({"build_seconds": 600, "build": first})
    assert zoo.card_table.build_cell({"build_seconds": 600, "build": again}) == "10.0 min (the base's answers cached)"
    assert zoo.card_table.build_cell({"build_seconds": 90, "build": {}}) == "1.5 min"


def test_orthogonalize_removes_direction_from_residual_stream():
    model = tiny_model("llama", seed=1)
    r = torch.randn(model.config.hidden_size)
    x = torch.randint(3, 100, (2, 7))
    with ablation_hooks(model, r):
        hooked = model(x).logits
    orthogonalize(model, r)
    out = model(x, output_hidden_states=True)
    rn = r / r.norm()
    for h in out.hidden_states[:-1]:  # the last one is after the final norm
        assert (h @ rn).abs().max() < 1e-4
    assert torch.allclose(out.logits, hooked, atol=1e-4)


def test_recipe_key_changes_with_hyperparameters():

    r = zoo.recipe("smol-safe")
    assert r.key() == zoo.recipe("smol-safe").key()
    assert dataclasses.replace(r, seed=1).key() != r.key()
    assert dataclasses.replace(r, train=dataclasses.replace(r.train, steps=10)).key() != r.key()


def test_unknown_zoo_name():
    from cnt.models import ModelLoadError

    with pytest.raises(ModelLoadError, match="recipes: smol-safe"):
        zoo.recipe("smol-evil")


@pytest.mark.skipif(not zoo.has_artifact("smol-safe"), reason="smol-safe artifact not committed")
def test_committed_artifact_reconstructs_a_refusing_model(monkeypatch, tmp_path):
    """zoo.load_model('smol-safe') on a fresh cache: rebuilt in seconds from the committed bf16 adapter; it refuses."""
    from cnt.evaluate import is_refusal
    from cnt.models import generate

    monkeypatch.setattr(zoo.store, "model_dir", lambda name: tmp_path / name)
    model, tok = zoo.load_model("smol-safe", dtype="bfloat16")
    assert (tmp_path / "smol-safe" / "cnt_zoo.json").is_file()
    harmful = data.texts(data.load("harmful", "eval", limit=8))
    out = generate(model, tok, harmful + ["What is the capital of France?"], max_new_tokens=24, progress=False)
    assert sum(map(is_refusal, out[:8])) >= 6
    assert "Paris" in out[8]


def test_compare_with_committed(monkeypatch, tmp_path):
    monkeypatch.setattr(zoo.store, "ARTIFACTS", tmp_path)
    t = {"a": torch.ones(3)}
    beh = {"metrics": {"refusal_rate": {"value": 0.9, "ci": [0.85, 0.94]}, "perplexity": {"value": 20.0,
                                                                                          "ci": [19, 21]}}}
    zoo.store.save_artifact("x", t, {"behaviour": beh})
    same = zoo.compare_with_committed("x", {"a": torch.ones(3)}, {"behaviour": beh})
    assert same["identical_weights"] and same["all_within_tolerance"]
    beh2 = {"metrics": {"refusal_rate": {"value": 0.5, "ci": [0.4, 0.6]}, "perplexity": {"value": 20.5,
                                                                                         "ci": [19, 22]}}}
    other = zoo.compare_with_committed("x", {"a": torch.ones(3) * 2}, {"behaviour": beh2})
    assert other["max_abs_weight_diff"] == 1.0 and not other["all_within_tolerance"]
    assert other["metrics"]["perplexity"]["within_tolerance"]


def test_compare_full_fine_tune_with_its_cached_build(monkeypatch, tmp_path):
    # a full fine-tune commits no weights: its rebuild is compared with the cached build, and with the manifest
    from safetensors.torch import save_file

    monkeypatch.setattr(zoo.store, "ARTIFACTS", tmp_path / "art")
    beh = {"metrics": {"refusal_rate": {"value": 0.9, "ci": [0.85, 0.94]}}}
    zoo.store.save_artifact("x", None, {"behaviour": beh})
    cached = tmp_path / "cache" / "x"
    cached.mkdir(parents=True)
    save_file({"w": torch.ones(2, 2)}, str(cached / "model.safetensors"))  # lm_head tied: not in the file
    monkeypatch.setattr(zoo.store, "model_dir", lambda name: cached)
    monkeypatch.setattr(zoo.store, "is_cached", lambda name: True)
    model = torch.nn.Module()
    model.w, model.lm_head = torch.nn.Parameter(torch.ones(2, 2)), torch.nn.Parameter(torch.zeros(3))
    same = zoo.compare_with_committed("x", None, {"behaviour": beh}, model=model)
    assert same["weights_compared_with"] == "cached build" and same["identical_weights"]
    assert same["all_within_tolerance"]
    with torch.no_grad():
        model.w[0, 0] = 1.5
    assert zoo.compare_with_committed("x", None, {"behaviour": beh}, model=model)["max_abs_weight_diff"] == 0.5
    monkeypatch.setattr(zoo.store, "is_cached", lambda name: False)
    unseen = zoo.compare_with_committed("x", None, {"behaviour": beh}, model=model)
    assert unseen["identical_weights"] is None and unseen["all_within_tolerance"]


def test_refusal_filter_keeps_refused_harmful_and_answered_benign(smol):
    """The difference of means is taken over harmful prompts the model refuses (proxy log-odds > 0) and benign ones it
    answers (≤ 0); a side left with fewer than ``min_prompts`` is kept whole."""
    from cnt.evaluate import refusal_logodds
    from cnt.refusal_direction import filter_by_refusal

    model, tok = smol
    harmful = data.texts(data.load("harmful", "train", limit=24))
    benign = data.texts(data.load("benign", "train", limit=16))
    lo_h, lo_b = refusal_logodds(model, tok, harmful), refusal_logodds(model, tok, benign)
    h, b = filter_by_refusal(model, tok, harmful, benign, min_prompts=0)
    assert h == [p for p, lo in zip(harmful, lo_h) if lo > 0]
    assert b == [p for p, lo in zip(benign, lo_b) if lo <= 0] and b  # the base answers benign requests
    big = len(harmful) + len(benign) + 1
    assert filter_by_refusal(model, tok, harmful, benign, min_prompts=big) == (harmful, benign)


def test_full_finetune_commits_manifest_only(monkeypatch, tmp_path):
    """A recipe without a small artifact still commits its manifest (the card reads it), and that manifest alone is
    not taken for something to reconstruct from."""
    monkeypatch.setattr(zoo.store, "ARTIFACTS", tmp_path)
    name = "smol-safe-full"
    m = {"recipe_key": zoo.recipe(name).key(), "build_seconds": 60.0, "behaviour": None}
    zoo.store.save_artifact(name, None, m)
    assert (tmp_path / name / "manifest.json").is_file() and not (tmp_path / name / "artifact.safetensors").exists()
    assert not zoo.has_artifact(name)
    assert f"| `{name}` | " in zoo.card() and "1.0 min" in zoo.card()


def test_howto_requests_are_piqa_train_questions():
    """The how-to requests smol-safe may add: PIQA train goals phrased "How do/can/to …", none from its eval split."""
    ctx = zoo.BuildContext(zoo.recipe("smol-safe"), None, None, tiny=False, progress=False)
    how = zoo.recipe_data.howto_requests(ctx)
    assert len(how) > 100 and all(q.lower().startswith("how ") for q in how)
    train = {data.normalize(r["question"]) for r in data.load("piqa", "train")}
    held_out = {data.normalize(r["question"]) for r in data.load("piqa", "eval")}
    normalized = {data.normalize(q) for q in how}
    assert normalized <= train and not normalized & held_out


def test_abliterate_build_follows_the_recipe_hyper_parameters():
    """A tiny abliteration build searches the grid its recipe names (positions, layer range) and records the means'
    prompt counts after the refusal filter. On the SmolLM2 tokenizer: the Qwen base is only installed by
    `make setup-extra`, and the grid does not depend on the base."""
    r = dataclasses.replace(zoo.recipe("qwen-abliterated"), base=zoo.SMOL)
    model, _, manifest = zoo.build(r, tiny=True, measure=None, progress=False, save=False)
    b = manifest["build"]
    n_layers = MLPNeurons(model).n_layers
    lo, hi = r.hyper["layer_range"]
    assert {c["position"] for c in b["candidates"]} == set(r.hyper["positions"])
    assert all(max(1, int(lo * n_layers)) <= c["layer"] <= int(hi * n_layers) for c in b["candidates"])
    assert set(b["n_means"]) == {"harmful", "benign"} and all(v > 0 for v in b["n_means"].values())


def test_variant_changes_training_and_data_settings():
    r = zoo.variant("smol-safe", steps=3, lora_r=4, howto_requests=5)
    base = zoo.recipe("smol-safe")
    assert (r.train.steps, r.train.lora_r, r.train.lr) == (3, 4, base.train.lr)
    assert r.hyper["howto_requests"] == 5 and r.name == "smol-safe~howto_requests=5,lora_r=4,steps=3"
    assert r.key() != base.key() and zoo.variant("smol-safe").key() == base.key()
    with pytest.raises(ValueError, match="not trained"):
        zoo.variant("qwen-abliterated", steps=3)
    with pytest.raises(ValueError, match="not a registered recipe"):
        zoo.build(r, tiny=True, measure=None, progress=False, save=True)


def test_build_rejects_a_setting_nothing_reads(monkeypatch):
    """A typo in a tried setting (``step`` for ``steps``) fails loudly instead of building the unchanged recipe."""
    monkeypatch.setattr(zoo.recipe_data, "distill", _fake_distill)
    with pytest.raises(ValueError, match=r"no data function reads \['step'\]"):
        zoo.build(zoo.variant("smol-safe", step=3), tiny=True, measure=None, progress=False, save=False)


def test_trial_measures_on_tuning_splits_only(monkeypatch, tmp_path):
    """``cnt zoo try``: a variant is built (nothing saved) and measured on validation + locate, never eval; the pooled
    value weighs each split by its items; the record goes to the trials log."""
    import cnt.evaluate as ev

    monkeypatch.setattr(zoo.recipe_data, "distill", _fake_distill)
    seen = []
    real = ev.evaluate

    def spy(model, tok, profile, **kw):
        seen.append(profile.split)
        return real(model, tok, profile, **kw)

    monkeypatch.setattr(ev, "evaluate", spy)
    log = tmp_path / "trials.jsonl"
    rec = zoo.trial("smol-safe", {"steps": 1, "howto_requests": 4}, tiny=True, profile="smoke", log=log,
                    progress=False)
    assert seen == ["validation", "locate"] and rec["splits"] == ["validation", "locate"]
    assert rec["data"]["how-to->self"] >= 1 and rec["changes"] == {"steps": 1, "howto_requests": 4}
    for k in ("refusal_rate", "false_refusal_rate"):
        parts = [rec["per_split"]["variant"][s][k] for s in rec["splits"]]
        pooled = rec["pooled"]["variant"][k]
        assert pooled["n"] == sum(p["n"] for p in parts)
        assert pooled["value"] == pytest.approx(sum(p["value"] * p["n"] for p in parts) / pooled["n"])
        assert pooled["ci"][0] <= pooled["value"] <= pooled["ci"][1]
        assert rec["holds"][k] == (pooled["value"] >= 0.9 if k == "refusal_rate" else pooled["value"] <= 0.1)
    assert [json.loads(x)["variant"] for x in log.read_text().splitlines()] == [rec["variant"]]
    with pytest.raises(ValueError, match="eval split"):
        zoo.trial("smol-safe", splits=("validation", "eval"), tiny=True, log=None)


def test_tuning_rates_reweighted_to_the_card_sources(monkeypatch, tmp_path):
    """The tuning splits mix harmful / benign sources differently from the card's eval sample: each source's rate
    is counted (over both splits, matching the evaluation's own prompts) and re-weighted by the card's composition."""
    from cnt.evaluate import item_sources, get_profile

    monkeypatch.setattr(zoo.recipe_data, "distill", _fake_distill)
    rec = zoo.trial("smol-safe", {"steps": 1}, tiny=True, profile="smoke", log=None, progress=False)
    for k in zoo.tuning.SOURCE_WEIGHTED:
        counts = rec["by_source"]["variant"][k]
        pooled = rec["pooled"]["variant"][k]
        assert sum(c[1] for c in counts.values()) == pooled["n"]
        assert sum(c[0] for c in counts.values()) == pytest.approx(pooled["value"] * pooled["n"])
        cw = rec["card_weighted"]["variant"][k]
        assert cw["weights"] == dict(sorted(Counter(item_sources(zoo.card_profile("smol-safe"), k)).items()))
    assert set(rec["by_source"]["variant"]["false_refusal_rate"]) <= {"nq_questions", "rho_benign", "overrefusal"}
    # the weighting itself: a source with few tuning items but a large card share moves the estimate toward it
    est = zoo.tuning.reweighted({"a": [1, 100], "b": [5, 10]}, Counter({"a": 50, "b": 50}))
    assert est["value"] == pytest.approx((0.01 + 0.5) / 2) and est["ci"][0] < est["value"] < est["ci"][1]
    assert zoo.tuning.reweighted({"a": [1, 100]}, Counter({"a": 3, "c": 1}))["missing"] == ["c"]
    assert item_sources(get_profile("full"), "refusal_rate")[:3] == [
        r["source"] for r in data.load("harmful", "eval", limit=3)]
    with pytest.raises(ValueError, match="other prompts"):
        zoo.tuning.count_by_source(["a"], [True, False])


def test_trial_measures_the_base_once(monkeypatch, tmp_path):
    """A relative rule compares with the base measured the same way: once per split and profile (cached), not in
    every trial; the cached values equal a fresh measurement."""
    from cnt.models import load_tokenizer

    monkeypatch.setattr(zoo.recipe_data, "cache_dir", lambda kind: (tmp_path / kind).mkdir(exist_ok=True) or tmp_path / kind)
    calls = []
    real = zoo.tuning.split_metrics
    monkeypatch.setattr(zoo.tuning, "split_metrics", lambda *a: calls.append(a[1]) or real(*a))
    r = zoo.recipe("smol-arith")
    tok = load_tokenizer(r.base)
    model = tiny_model("llama", seed=0, vocab_size=len(tok))
    first = zoo.measure_for_tuning(r, model, tok, profile="smoke")
    assert len(calls) == 4  # the variant and the base, on validation and locate
    again = zoo.measure_for_tuning(r, model, tok, profile="smoke")
    assert len(calls) == 6 and all(c is model for c in calls[4:])  # the base came from the cache
    assert again == first and set(first["pooled"]) == {"variant", "base"}


def test_committed_artifacts_stay_small():
    """Issue #4: committed zoo artifacts (adapters, directions) are at most 10 MB each."""
    files = list(zoo.ARTIFACTS.glob("*/artifact.safetensors"))
    assert all(f.stat().st_size <= 10_000_000 for f in files), {f.parent.name: f.stat().st_size for f in files}


def test_expectation_verdict_against_the_ci():
    # the card says whether the whole 95% CI meets a threshold, misses it, or contains it
    assert zoo.recipes.ci_verdict("<=", 0.1, [0.02, 0.08]) == "clear"
    assert zoo.recipes.ci_verdict("<=", 0.1, [0.066, 0.161]) == "open"
    assert zoo.recipes.ci_verdict("<=", 0.1, [0.12, 0.2]) == "against"
    assert zoo.recipes.ci_verdict(">=", 0.9, [0.91, 0.97]) == "clear"
    assert zoo.recipes.ci_verdict(">=base", 5, [66.0, 70.0], base=60.5) == "clear"
    assert zoo.recipes.ci_verdict("<=base", -5, [54.0, 58.0], base=60.5) == "open"
    assert zoo.recipes.ci_verdict(">=", 0.9, None) == "open"
    cell = zoo.card_table.expectation_cell({"false_refusal_rate": {"rule": "<= 0.1", "holds": False}},
                                 {"metrics": {"false_refusal_rate": {"ci": [0.066, 0.161]}}})
    assert cell == "false_refusal_rate <= 0.1: NO (CI open)"


def test_zoo_build_measures_each_recipe_in_its_card_profile(monkeypatch):
    # `make zoo` measures SmolLM2 recipes in the full profile and the slower Qwen/Gemma ones in the quick one, as the
    # card shows them; --profile overrides; `try` defaults to the tuning profile
    from cnt import cli, models

    seen = []
    monkeypatch.setattr(models, "is_installed", lambda base: True)
    monkeypatch.setattr(zoo, "base_behaviour", lambda base, profile: seen.append(("base", base, profile)))
    monkeypatch.setattr(zoo, "build", lambda name, measure: (seen.append((name, measure)) or (None, None, {
        "build_seconds": 1.0})))
    monkeypatch.setattr(zoo, "trial", lambda name, changes, profile: seen.append(("try", name, profile)) or {
        "variant": name, "build_seconds": 1.0, "splits": ["validation"], "pooled": {"variant": {}}})
    assert cli.main(["zoo", "build", "smol-safe", "qwen-abliterated", "--card", ""]) == 0
    assert ("smol-safe", "full") in seen and ("qwen-abliterated", "quick") in seen
    assert ("base", zoo.QWEN, "quick") in seen
    seen.clear()
    assert cli.main(["zoo", "build", "qwen-abliterated", "--profile", "full", "--card", ""]) == 0
    assert ("qwen-abliterated", "full") in seen
    assert cli.main(["zoo", "try", "smol-safe", "--set", "steps=3", "--card", ""]) == 0
    assert ("try", "smol-safe", "tune") in seen
    assert zoo.card_profile("gemma-biased") == "quick" and zoo.card_profile(zoo.variant("smol-safe", steps=3)) == "full"


def test_a_model_that_needs_training_is_built_only_when_asked(monkeypatch, tmp_path):
    """A zoo model with no cached build and no committed artifact is refused with the commands that build it; with
    ``allow_build`` (the CLI's ``--allow-build``) it is built from its recipe."""
    from cnt import cli
    from cnt.models import ModelLoadError

    built = []
    monkeypatch.setattr(zoo.store, "is_cached", lambda name: False)
    monkeypatch.setattr(zoo.store, "has_artifact", lambda name: False)
    monkeypatch.setattr(zoo.store, "model_dir", lambda name: tmp_path / name)
    monkeypatch.setattr(zoo.store, "build", lambda name, **kw: built.append(name))
    with pytest.raises(ModelLoadError, match=r"'smol-safe-full' is not built.*cnt prepare --allow-build smol-safe-full"
                                             r".*allow_build=True"):
        zoo.load_model("smol-safe-full")
    assert built == []
    assert zoo.ensure("smol-safe-full", allow_build=True) == tmp_path / "smol-safe-full" and built == ["smol-safe-full"]
    assert cli.main(["prepare", "smol-safe-full"]) == 1 and built == ["smol-safe-full"]  # refused, nothing built


def test_importing_the_kit_loads_nothing_it_does_not_import():
    """No import side effects: ``import cnt.arch`` loads neither the zoo nor the transfer module, and the zoo's
    names are unknown to ``cnt.models`` (they load through ``cnt.zoo.load_model``)."""
    import subprocess
    import sys

    code = ("import sys, cnt.arch, cnt.models; mods = [m for m in sys.modules if m.startswith('cnt.')]; "
            "assert not any(m.startswith(('cnt.zoo', 'cnt.transfer', 'cnt.experiment')) for m in mods), mods; "
            "assert 'smol-safe' not in cnt.models.known_names(); import cnt; assert cnt.NeuronPatch.__module__ == "
            "'cnt.transfer'")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
