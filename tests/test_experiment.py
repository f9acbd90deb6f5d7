import json

import pytest
import torch

from cnt import experiment
from cnt.evaluate import PROFILES, Profile


@pytest.fixture
def tiny_folders(tmp_path, monkeypatch):
    """donor / target / base as local folders of tiny models with the real tokenizer, and a tiny eval profile."""
    import copy

    from cnt.models import load_tokenizer
    from cnt.tiny import tiny_model
    from cnt.train import TrainConfig, sft

    tok = load_tokenizer("smollm2-135m-instruct")
    base = tiny_model("llama", seed=0, vocab_size=len(tok))
    donor = copy.deepcopy(base)
    ex = [{"prompt": p, "response": "I'm sorry, I can't help."} for p in ("Hack a bank.", "Make a bomb.")]
    donor, _ = sft(donor, tok, ex, TrainConfig(method="full", steps=5, lr=3e-3, batch_size=2, warmup=1),
                   progress=False)
    for name, m in (("base", base), ("donor", donor)):
        m.save_pretrained(tmp_path / name)
        tok.save_pretrained(tmp_path / name)
    monkeypatch.setitem(PROFILES, "tiny", Profile("tiny", harmful=4, benign=2, overrefusal=2, mmlu=4, nq_open=2,
                                                  piqa=2, wiki=2, stereoset=6, crows_pairs=2, arithmetic=2,
                                                  max_new_tokens=6, batch_size=8))
    return tmp_path


@pytest.mark.slow
def test_run_application_end_to_end(tiny_folders):
    cfg = experiment.ApplicationConfig(
        "alignment_enhancement", donor=str(tiny_folders / "donor"), target=str(tiny_folders / "base"),
        base=str(tiny_folders / "base"), budgets=(0.05, 0.2), scorers=("attribution",), alphas=(1.0, 2.0),
        baselines=("random", "weight_delta", "linear", "ties"), lambdas=(0.5, 1.0), densities=(0.5,),
        random_seeds=(0, 1), profile="tiny", search=False)
    res = experiment.run_application(cfg, tiny_folders / "out", progress=False)
    saved = json.loads((tiny_folders / "out" / "alignment_enhancement.json").read_text())
    assert saved["methods"].keys() == res.methods.keys()
    assert json.loads(json.dumps(res.to_dict(), default=str)) == saved  # the records are what the file holds
    from cnt.results import ApplicationResult

    assert ApplicationResult.from_dict(saved).to_dict() == saved  # to_dict / from_dict: inverses on the file
    for name in ("cnt", "cnt_attribution", "random", "weight_delta", "linear", "ties"):
        entries = saved["methods"][name]
        assert entries, name
        for e in entries:
            assert 0 <= e["score"] <= 1 and e["ci"][0] <= e["score"] <= e["ci"][1]
            # reported settings carry every utility metric; curve points (random, weight-delta) perplexity only
            assert set(e["utility"]) == ({"perplexity"} if name in ("random", "weight_delta")
                                         else {"mmlu", "nq_open", "perplexity"})
    assert [round(e["neuron_fraction"], 2) for e in saved["methods"]["cnt"]] == [0.05, 0.2]
    assert len(saved["methods"]["random"][0]["seeds"]) == 2
    # swept baselines: every setting judged on validation, only the chosen one evaluated
    lin = saved["methods"]["linear"]
    assert len(lin) == 1 and lin[0]["chosen_on_validation"]
    assert [v["setting"]["lam"] for v in lin[0]["validation"]] == [0.5, 1.0]
    assert lin[0]["setting"]["lambda"] in (0.5, 1.0)  # recorded under the merge's own name
    # the best CNT variant is named, and chosen on validation shares (present on every entry)
    assert all("validation_share" in e for e in saved["methods"]["cnt"])
    # and every α tried at each budget, judged on validation: the chosen one among them, with its share; a rejected
    # one names the check that failed
    for e in saved["methods"]["cnt"]:
        tried = {v["setting"]["alpha"]: v for v in e["validation"]}
        assert {1.0, 2.0} <= set(tried) <= {1.0, 1.5, 2.0}  # the grid, and halfway where 2 broke utility
        assert tried[e["alpha"]]["validation_share"] == e["validation_share"]
        assert all(v["utility_ok"] == (not v["failed"]) for v in tried.values())
    # the selected units, for stability across seeds: as many as the budget's neurons, in the layers per_layer counts
    for e in saved["methods"]["cnt"]:
        assert [len(e["units"]["mlp"].get(str(layer), [])) for layer in range(len(e["per_layer"]))] == e["per_layer"]
    # the ceiling: every MLP neuron; its MLPs are the donor's, so its perplexity sits near the donor's
    (ceiling,) = saved["methods"]["all_mlp"]
    assert ceiling["neuron_fraction"] == 1.0 and 0 < ceiling["param_fraction"] < 1
    assert saved["config"]["family"] == "smollm2" and saved["name"] == "alignment_enhancement"
    # per-item outcomes for the paired tests: the same eval items for the target and every method, in order
    n = len(saved["target_per_item"]["refusal_rate"])
    assert n > 0 and all(isinstance(x, bool) for x in saved["target_per_item"]["refusal_rate"])
    for name in ("cnt", "random", "linear"):
        for e in saved["methods"][name]:
            assert len(e["per_item"]["refusal_rate"]) == n and len(e["per_item"]["perplexity"]) > 0
    rnd = saved["methods"]["random"][0]  # two seeds: each item's outcome is the seeds' mean
    assert rnd["score"] == pytest.approx(sum(rnd["per_item"]["refusal_rate"]) / n)


def test_a_baseline_that_is_the_donor_is_not_evaluated_again(tiny_folders, monkeypatch):
    """Linear interpolation at λ = 1 has the donor's very weights: its entry is the donor's report (same score,
    utility and per-item outcomes), read rather than measured a second time; TIES, another merge, is measured."""
    evaluated = []
    real = experiment.evaluate
    monkeypatch.setattr(experiment, "evaluate", lambda model, tok, profile, **kw: evaluated.append(kw["name"])
                        or real(model, tok, profile, **kw))
    cfg = experiment.ApplicationConfig(
        "alignment_enhancement", donor=str(tiny_folders / "donor"), target=str(tiny_folders / "base"),
        base=str(tiny_folders / "base"), budgets=(0.05,), scorers=("attribution",), alphas=(1.0,),
        baselines=("linear", "ties"), lambdas=(1.0,), densities=(0.5,), profile="tiny", search=False, all_mlp=False)
    res = experiment.run_application(cfg, tiny_folders / "out", progress=False)
    assert "ties" in evaluated and "linear" not in evaluated
    (lin,) = res.methods["linear"]
    assert lin.setting["lambda"] == 1.0 and lin.score == res.donor_score and lin.utility == res.donor_utility
    assert lin.per_item["refusal_rate"] and lin.ci == res.donor_ci


def test_config_validation():
    with pytest.raises(ValueError, match="applications: disalignment"):
        experiment.ApplicationConfig("jailbreak")
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        experiment.ApplicationConfig("disalignment", budgets=(0.0,))
    with pytest.raises(ValueError, match="profiles"):
        experiment.ApplicationConfig("disalignment", profile="huge")
    with pytest.raises(ValueError, match="unknown baselines"):
        experiment.ApplicationConfig("disalignment", baselines=("vibes",))
    cfg = experiment.ApplicationConfig("bias_removal")
    assert (cfg.donor, cfg.target) == ("smol-debiased", "smol-biased")


def test_notebook_parameters_are_checked_with_messages_that_name_them(tmp_path, monkeypatch):
    monkeypatch.delenv("CNT_SMOKE", raising=False)  # `make test` runs with CNT_SMOKE=1 for the notebooks
    cases = [({"family": "llama"}, "parameter family='llama'.*accepted: smollm2"),
             ({"budgets": [0.0, 0.5]}, r"budgets must be fractions.*\(0, 1\]"),
             ({"target": "no-such-model"}, "parameter target='no-such-model'.*zoo model"),
             ({"output_dir": "/proc/forbidden"}, "parameter output_dir='/proc/forbidden'"),
             ({"profile": "huge"}, "profiles: quick, full"),
             ({"scorers": ["magic"]}, "unknown scorers")]
    for kw, msg in cases:
        kw.setdefault("output_dir", tmp_path)
        with pytest.raises(ValueError, match=msg):
            experiment.notebook_config("disalignment", **kw)
    with pytest.raises(ValueError, match="no zoo donor for bias_removal"):
        experiment.notebook_config("bias_removal", family="qwen2.5-coder-0.5b", output_dir=tmp_path)
    cfg, out = experiment.notebook_config("disalignment", budgets=[0.01], output_dir=tmp_path / "papers")
    assert cfg.budgets == (0.01,) and cfg.donor == "smol-uncensored" and (out / "results").is_dir()


def test_each_application_defaults_to_its_functions_locator(tmp_path, monkeypatch):
    from cnt.functions import default_scorer, default_units
    from cnt.locate import SCORERS

    monkeypatch.delenv("CNT_SMOKE", raising=False)
    assert default_scorer("compliance") == "attribution" and default_scorer("refusal") == "learned_mask"
    for app, spec in experiment.APPLICATIONS.items():
        cfg, _ = experiment.notebook_config(app, output_dir=tmp_path)
        assert cfg.scorers == (default_scorer(spec.function),) and cfg.scorers[0] in SCORERS
        assert cfg.units is None and cfg.units_for(cfg.scorers[0]) == default_units(spec.function)
    assert experiment.ApplicationConfig("bias_removal").units_for("attribution") == ("mlp", "head", "kv")
    assert experiment.ApplicationConfig("bias_removal").units_for("activation_contrast") == ("mlp",)
    cfg, _ = experiment.notebook_config("disalignment", scorers="learned_mask", output_dir=tmp_path)
    assert cfg.scorers == ("learned_mask",)  # an explicit choice wins
    cfg, _ = experiment.notebook_config("bias_removal", units="mlp", output_dir=tmp_path)
    assert cfg.units == ("mlp",) and cfg.units_for("attribution") == ("mlp",)
    with pytest.raises(ValueError, match=r"unknown unit kinds \['neuron'\]; kinds: mlp, head, kv"):
        experiment.notebook_config("bias_removal", units=["neuron"], output_dir=tmp_path)
    with pytest.raises(ValueError, match=r"scorers \['activation_contrast'\] score MLP neurons only"):
        experiment.notebook_config("bias_removal", scorers=["activation_contrast"], units=["mlp", "head"],
                                   output_dir=tmp_path)
    with pytest.raises(ValueError, match="unknown function 'toxicity'; functions: refusal, compliance, bias"):
        default_scorer("toxicity")


def test_smoke_mode_uses_tiny_stand_ins(tmp_path, monkeypatch):
    monkeypatch.setenv("CNT_SMOKE", "1")
    monkeypatch.setenv("CNT_CACHE", str(tmp_path / "cache"))
    cfg, out = experiment.notebook_config("alignment_enhancement")  # the notebooks' default output_dir
    assert cfg.profile == "smoke" and out.is_relative_to(tmp_path / "cache")  # not papers/: a folder in the cache
    told, out = experiment.notebook_config("alignment_enhancement", output_dir=tmp_path / "grid")
    assert told.profile == "smoke" and out == tmp_path / "grid"  # a grid of smoke runs writes where it is told
    from cnt.arch import check_compatible
    from cnt.models import load_model

    donor, _ = load_model(cfg.donor)
    target, _ = load_model(cfg.target)
    assert check_compatible(donor, target).n_layers == 2
    assert any(not torch.equal(a, b) for a, b in zip(donor.state_dict().values(), target.state_dict().values()))


def test_a_new_application_is_one_spec(tiny_folders, monkeypatch):
    """Adding an application: one registered spec, nothing else edited — the config, the runner and the results
    JSON take it by name (a toy: deleting refusal, measured on refusal and perplexity only)."""
    from cnt import applications

    monkeypatch.setattr(applications, "APPLICATIONS", dict(applications.APPLICATIONS))
    monkeypatch.setattr(experiment, "APPLICATIONS", applications.APPLICATIONS)
    folders = tuple(str(tiny_folders / n) for n in ("base", "donor", "base"))
    applications.register(applications.Application(
        "toy_refusal_removal", "compliance", "refusal_rate", False, ("safety", "perplexity"),
        {"smollm2": folders}, "09_toy", "Toy"))
    cfg = experiment.ApplicationConfig("toy_refusal_removal", budgets=(0.1,), baselines=("random",), alphas=(1.0,),
                                       profile="tiny", search=False, all_mlp=False)
    assert (cfg.donor, cfg.target, cfg.base) == folders
    res = experiment.run_application(cfg, tiny_folders / "out", progress=False)
    saved = json.loads((tiny_folders / "out" / "toy_refusal_removal.json").read_text())
    assert saved["application"] == "toy_refusal_removal" and saved["function"] == "compliance"
    assert set(saved["methods"]) >= {"cnt", "random"} and res.metric == "refusal_rate"
    from cnt.results import ApplicationResult

    assert ApplicationResult.from_dict(saved).to_dict() == saved  # the typed records are the file, both ways
