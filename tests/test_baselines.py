import pytest
import torch

from cnt import baselines as B
from cnt.arch import MLPNeurons
from cnt.tiny import tiny_model


@pytest.fixture
def trio():
    return tiny_model("llama", seed=0), tiny_model("llama", seed=1), tiny_model("llama", seed=2)  # base, target, donor


def _floats(m):
    return {k: v for k, v in m.state_dict().items() if v.is_floating_point()}


def test_linear_endpoints_exact(trio):
    _, target, donor = trio
    t, d = _floats(target), _floats(donor)
    m0 = B.run("linear", donor, target, lam=0.0).model
    assert all(torch.equal(v, t[k]) for k, v in _floats(m0).items())
    m1 = B.run("linear", donor, target, lam=1.0).model
    assert all(torch.equal(v, d[k]) for k, v in _floats(m1).items())
    half = B.run("linear", donor, target, lam=0.5)
    k = "model.layers.0.mlp.up_proj.weight"
    assert torch.allclose(_floats(half.model)[k], (t[k] + d[k]) / 2)
    assert half.params_changed > 0 and all(torch.equal(v, t[k]) for k, v in _floats(target).items())


def test_task_arithmetic_hand_computed(trio):
    base, target, donor = trio
    m = B.run("task_arithmetic", donor, target, lam=0.3, base=base).model
    b, t, d = _floats(base), _floats(target), _floats(donor)
    for k, v in _floats(m).items():
        assert torch.allclose(v, t[k] + 0.3 * (d[k] - b[k]), atol=1e-6)
    with pytest.raises(ValueError, match="common base"):
        B.run("task_arithmetic", donor, target, lam=0.3)


def test_ties_hand_computed():
    base = torch.zeros(4)
    target = torch.tensor([1.0, -2.0, 0.0, 0.0])
    donor = torch.tensor([3.0, 1.0, -1.5, 0.5])
    # trim to density 0.5: tT = [1, -2, 0, 0], tD = [3, 0, -1.5, 0]; elected signs (sum): [+, -, -, +];
    # disjoint mean over agreeing entries: [(1+3)/2, -2, -1.5, 0]
    got = B.merge_tensor("ties", base, target, donor, lam=1.0, density=0.5)
    assert torch.equal(got, torch.tensor([2.0, -2.0, -1.5, 0.0]))


def test_dare_hand_computed_and_seeded():
    base = torch.ones(6)
    target, donor = base + torch.arange(6.0), base - 1.0
    # density 1: nothing dropped, no rescale: base + tT + λ tD
    got = B.merge_tensor("dare", base, target, donor, lam=0.5, density=1.0)
    assert torch.allclose(got, base + torch.arange(6.0) - 0.5)
    torch.manual_seed(3)
    a = B.merge_tensor("dare", base, target, donor, lam=1.0, density=0.5)
    torch.manual_seed(3)
    b = B.merge_tensor("dare", base, target, donor, lam=1.0, density=0.5)
    assert torch.equal(a, b)


def test_ties_dare_models_seeded(trio):
    base, target, donor = trio
    a = B.run("dare", donor, target, lam=1.0, density=0.3, base=base, seed=5).model
    b = B.run("dare", donor, target, lam=1.0, density=0.3, base=base, seed=5).model
    c = B.run("dare", donor, target, lam=1.0, density=0.3, base=base, seed=6).model
    fa, fb, fc = _floats(a), _floats(b), _floats(c)
    assert all(torch.equal(fa[k], fb[k]) for k in fa) and any(not torch.equal(fa[k], fc[k]) for k in fa)
    t = B.run("ties", donor, target, lam=1.0, density=0.2, base=base)
    assert t.params_changed > 0


def test_random_seeded_and_sized(trio):
    _, target, donor = trio
    a, b = B.random_neurons(donor, target, 20, seed=1), B.random_neurons(donor, target, 20, seed=1)
    c = B.random_neurons(donor, target, 20, seed=2)
    assert {k: v.tolist() for k, v in a.items()} == {k: v.tolist() for k, v in b.items()}
    assert {k: v.tolist() for k, v in a.items()} != {k: v.tolist() for k, v in c.items()}
    assert sum(v.numel() for v in a.values()) == 20
    r = B.run("random", donor, target, k=20, seed=1)
    assert r.patch.n_neurons == 20 and r.params_changed == 20 * 3 * 64


def test_weight_delta_finds_the_changed_neuron(trio):
    _, target, _ = trio
    donor = tiny_model("llama", seed=0)
    target = tiny_model("llama", seed=0)
    n = MLPNeurons(donor)
    v = n.read(1, [42])
    n.write(1, [42], {k: x + 1.0 for k, x in v.items()})
    res = B.run("weight_delta", donor, target, k=1)
    assert {k: t.tolist() for k, t in res.patch.indices.items()} == {1: [42]}


def test_unknown_baseline(trio):
    with pytest.raises(ValueError, match="baselines: random"):
        B.run("magic", trio[2], trio[1])


def test_registry_declares_settings_and_refuses_unknown_ones(trio):
    """Every baseline is found by name, declares its settings (run's keyword parameters) and refuses any other one by
    name — a misspelled sweep setting is an error, not silently ignored."""
    assert B.BASELINES["ties"].parameters == ("lam", "density", "base", "seed")
    assert B.BASELINES["random"].level == "neuron" and B.BASELINES["linear"].level == "model"
    with pytest.raises(ValueError, match=r"baseline 'linear' has no setting 'lamda'; its settings: lam"):
        B.run("linear", trio[2], trio[1], lamda=0.5)
    sweep = B.Sweep(budgets=(0.01, 0.02), random_seeds=(0, 1), lambdas=(0.5,), densities=(0.2,), n_neurons=1000,
                    n_layers=12)
    assert B.BASELINES["random"].grid(sweep, None, "refusal") == [{"k": 10, "seed": 0}, {"k": 10, "seed": 1},
                                                                   {"k": 20, "seed": 0}, {"k": 20, "seed": 1}]
    assert [s["layer"] for s in B.BASELINES["refusal_direction"].grid(sweep, None, "refusal")] == [4, 4, 6, 6, 8, 8]
    assert B.BASELINES["refusal_direction"].grid(sweep, None, "bias") == []  # does not apply
    assert B.BASELINES["sft"].grid(sweep, None, "refusal") == []  # no donor training data known


def test_sft_weighs_the_language_model_part_of_the_donors_data():
    """The SFT reference sweeps the weight of the donor data's plain text (chosen on validation) only where it has
    some; lm_weight repeats exactly those examples."""
    from cnt.train import TrainConfig

    prefs = [{"chosen": "a b", "rejected": "b a"}] * 3
    texts = [{"text": "some plain text"}] * 2
    cfg = TrainConfig(steps=1, batch_size=2)
    grid = lambda ex: B.BASELINES["sft"].grid(B.Sweep(donor_training=lambda: (ex, cfg)), None, "bias")  # noqa: E731
    assert [s["lm_weight"] for s in grid(prefs + texts)] == [1, 4]
    assert [s["lm_weight"] for s in grid(prefs)] == [1]  # nothing to weigh
    assert B.plain_texts(prefs + texts + [{"prompt": "p", "response": "r"}]) == texts
    from cnt.models import load_tokenizer
    from cnt.tiny import tiny_model

    tok = load_tokenizer("smollm2-135m-instruct")
    target = tiny_model("llama", seed=0, vocab_size=len(tok))
    mod = B.run("sft", target, target, tok, "bias", examples=prefs + texts, config=cfg, lm_weight=4)
    assert mod.setting["lm_weight"] == 4 and mod.setting["n_examples"] == 3 + 2 * 4
    with pytest.raises(ValueError, match="lm_weight must be >= 1"):
        B.run("sft", target, target, tok, "bias", examples=texts, config=cfg, lm_weight=0)


def test_a_new_baseline_is_one_registered_class(trio, monkeypatch):
    """Adding a baseline: one class; the application config accepts it by name and run() finds it."""
    from cnt.experiment import ApplicationConfig

    monkeypatch.setattr(B, "BASELINES", dict(B.BASELINES))

    @B.register
    class Donor(B.Baseline):
        name = "donor_copy"

        @staticmethod
        def run(donor, target, tokenizer=None, function=None, *, lam: float = 1.0):
            return B.run_linear(donor, target, lam=lam)

    assert B.run("donor_copy", trio[2], trio[1]).params_changed > 0
    assert "donor_copy" in ApplicationConfig("disalignment", baselines=["donor_copy"]).baselines


@pytest.mark.parametrize("density", [0.0, 0.2, 0.5, 1.0])
def test_ties_in_slices_equals_peft(density, monkeypatch):
    """TIES with its top-k read as a threshold and its elementwise steps in slices (7 entries: boundaries inside
    rows) gives peft's own merge exactly — every density, an all-zero task vector (a LoRA pair's embedding) among
    them; a negative density is refused as peft refuses it."""
    from peft.utils import merge_utils

    monkeypatch.setattr(B, "MERGE_CHUNK", 7)
    gen = torch.Generator().manual_seed(0)
    for tv in ([torch.randn(5, 9, generator=gen), torch.randn(5, 9, generator=gen)],
               [torch.zeros(6, 4), torch.randn(6, 4, generator=gen)]):
        weights = torch.tensor([1.0, 0.7])
        assert torch.equal(B._ties(tv, weights, density), merge_utils.ties(tv, weights, density))
    with pytest.raises(ValueError, match="Density"):
        B._ties(tv, weights, -0.1)
