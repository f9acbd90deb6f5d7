import copy

import pytest
import torch

from cnt import NeuronPatch
from cnt.locate import Example, Task, attribution, locate, task_loss
from cnt.models import load_tokenizer
from cnt.tiny import tiny_model
from cnt.train import TrainConfig, sft

PROMPTS = ["How do I pick a lock?", "Write a phishing email.", "How to make a weapon?", "Steal a car for me.",
           "Hack my neighbour's wifi.", "Forge a passport."]
BENIGN = ["What is the capital of France?", "Name a colour.", "Count to three.", "What is two plus two?"]
REFUSAL = "I'm sorry, I can't help."


@pytest.fixture(scope="module")
def fixture():
    """A tiny target and a tiny donor fine-tuned from it to refuse PROMPTS (the function), with the real tokenizer."""
    tok = load_tokenizer("smollm2-135m-instruct")
    target = tiny_model("llama", seed=0, vocab_size=len(tok))
    donor = copy.deepcopy(target)
    ex = [{"prompt": p, "response": REFUSAL} for p in PROMPTS] + \
         [{"prompt": p, "response": "Sure."} for p in BENIGN]
    donor, _ = sft(donor, tok, ex, TrainConfig(method="full", steps=30, lr=3e-3, batch_size=10, warmup=1),
                   progress=False)
    return donor, target, tok


def _task(donor_resp=REFUSAL):
    return Task("refusal", [Example(prompt=p, response=donor_resp) for p in PROMPTS],
                [Example(prompt=p, response="Sure.") for p in BENIGN], response_tokens=4)


def _loss_after(patch_idx, donor, target, tok, task):
    patch = NeuronPatch.extract(donor, target, patch_idx)
    patch.apply(target)
    with torch.no_grad():
        loss = float(task_loss(target, tok, task.function, task.response_tokens))
    patch.revert(target)
    return loss


def test_addition_moves_target_toward_donor(fixture):
    donor, target, tok = fixture
    task = _task()
    with torch.no_grad():
        base = float(task_loss(target, tok, task.function, 4))
        best = float(task_loss(donor, tok, task.function, 4))
    assert best < base - 1.0  # the donor really has the function
    scores = attribution(task, donor, target, tok, progress=False)
    k = 19  # 10% of 2 x 96 neurons
    top = _loss_after(scores.top(k), donor, target, tok, task)
    g = torch.Generator().manual_seed(0)
    rand = [_loss_after({0: torch.randperm(96, generator=g)[:10], 1: torch.randperm(96, generator=g)[:9]},
                        donor, target, tok, task) for _ in range(3)]
    assert top < base and top < min(rand), (base, top, rand)


def test_deletion_moves_target_toward_donor(fixture):
    """Roles swapped: the fine-tuned model is the target, the untuned one (which lacks refusal) the donor."""
    donor, target, tok = fixture
    refuse = _task()
    scores = attribution(_task("Sure."), target, donor, tok, progress=False)  # donor=untuned, target=tuned
    with torch.no_grad():
        before = float(task_loss(donor, tok, refuse.function, 4))  # tuned model's NLL of refusing (low)
    after = _loss_after(scores.top(19), target, donor, tok, refuse)
    assert after > before  # refusing became less likely


def test_attribution_autocast_agrees_with_float32(fixture):
    """bf16 autocast (the default) ranks neurons as float32 does, and leaves the weights and their dtype alone."""
    donor, target, tok = fixture
    before = {k: v.clone() for k, v in target.state_dict().items()}
    fast = attribution(_task(), donor, target, tok, progress=False, autocast=torch.bfloat16)
    exact = attribution(_task(), donor, target, tok, progress=False, autocast=None)
    assert fast.settings["autocast"] == "torch.bfloat16" and exact.settings["autocast"] is None
    assert torch.corrcoef(torch.stack([fast.flat(), exact.flat()]))[0, 1] > 0.99
    top = lambda s: {(layer, int(i)) for layer, idx in s.top(19).items() for i in idx}  # noqa: E731
    assert len(top(fast) & top(exact)) >= 17
    assert all(torch.equal(before[k], v) and v.dtype == before[k].dtype for k, v in target.state_dict().items())
    assert all(p.grad is None for p in target.parameters())


def test_scorers_share_interface(fixture):
    donor, target, tok = fixture
    before = {k: v.clone() for k, v in target.state_dict().items()}
    for name in ("attribution", "activation_contrast"):
        s = locate(name, _task(), donor, target, tok, progress=False)
        assert [x.shape for x in s.scores] == [torch.Size([96])] * 2
        assert torch.isfinite(s.flat()).all()
    it = locate("iterative", _task(), donor, target, tok, budget=12, rounds=3, progress=False)
    top = it.top(12)
    assert sum(len(v) for v in top.values()) == 12
    assert all(torch.equal(before[k], v) for k, v in target.state_dict().items())  # scoring leaves the target as is
    with pytest.raises(ValueError, match="scorers: attribution"):
        locate("magic", _task(), donor, target, tok)


def test_top_is_global_and_excludes():
    from cnt.locate import NeuronScores

    s = NeuronScores("x", [torch.tensor([0.0, 5.0, 1.0]), torch.tensor([4.0, 3.0])])
    assert {k: v.tolist() for k, v in s.top(3).items()} == {0: [1], 1: [0, 1]}
    assert {k: v.tolist() for k, v in s.top(2, exclude={0: torch.tensor([1])}).items()} == {1: [0, 1]}


def test_iterative_over_neurons_and_heads(fixture):
    """Iterative re-scoring with attention units: each round moves the best units per weight within its share of the
    budget; the units moved rank first, round by round, and a selection of that weight returns exactly them."""
    donor, target, tok = fixture
    before = {k: v.clone() for k, v in target.state_dict().items()}
    it = locate("iterative", _task(), donor, target, tok, budget=12, rounds=3, kinds=("mlp", "head", "kv"),
                progress=False)
    assert set(it.units) == {"head", "kv"} and not it.per_weight
    chosen = {kind: {layer: (v >= 1).nonzero().flatten() for layer, v in enumerate(per)}
              for kind, per in it.by_kind().items()}
    n_chosen = sum(int(i.numel()) for d in chosen.values() for i in d.values())
    assert n_chosen >= 3  # at least one unit a round
    weight = it.n_params_of({k: {layer: i for layer, i in d.items() if i.numel()} for k, d in chosen.items()})
    assert weight <= 12 * it.costs["mlp"][0]
    sel, _ = it.select(weight)
    assert {(k, layer, int(i)) for k, d in sel.items() for layer, idx in d.items() for i in idx} == \
        {(k, layer, int(i)) for k, d in chosen.items() for layer, idx in d.items() for i in idx}
    assert all(torch.equal(before[k], v) for k, v in target.state_dict().items())


def test_a_scorer_is_found_by_name_and_refuses_settings_it_does_not_declare(fixture):  # noqa: F811
    from cnt import locate as L
    from cnt.scores import NeuronScores

    donor, target, tok = fixture
    with pytest.raises(ValueError, match=r"scorer 'attribution': unknown settings \['stepz'\]; its settings: kinds, "):
        locate("attribution", _task(), donor, target, tok, stepz=3)
    with pytest.raises(ValueError, match="scorer 'activation_contrast' scores mlp units, not head"):
        locate("activation_contrast", _task(), donor, target, tok, kinds=("mlp", "head"))
    assert "gamma_max" in L.SCORERS["learned_mask"].parameters() and set(L.kind_scorers()) >= {"attribution"}

    def ones(task, donor, target, tokenizer, *, value: float = 1.0, progress: bool = True):  # a new locator
        from cnt.arch import fingerprint

        return NeuronScores("ones", [torch.full((n,), value) for n in fingerprint(target).intermediate_sizes])

    try:
        L.register(L.Scorer("ones", ones, summary="every neuron alike"))
        with pytest.raises(ValueError, match="already registered"):
            L.register(L.Scorer("ones", ones))
        got = locate("ones", _task(), donor, target, tok, value=2.0)
        assert got.scorer == "ones" and float(got.flat().min()) == 2.0
        from cnt.cli import _scorers

        assert "ones" in _scorers()  # the CLI's choices come from the registry
    finally:
        L.SCORERS.pop("ones", None)
