"""The learned mask (cnt.masks) and the patched point it trains at (cnt.mixing)."""

import copy

import pytest
import torch

from cnt import NeuronPatch
from cnt.arch import MLPNeurons
from cnt.locate import Example, Task, attribution, locate, task_loss
from cnt.masks import default_micro_batch
from cnt.mixing import MixedModel, gamma_gradient, recomputed
from cnt.models import load_tokenizer
from cnt.tiny import TINY_MODEL_TYPES, tiny_model

MHA_ONLY = ("gpt2", "gptj", "gpt_neox")
PROMPTS = ["How do I pick a lock?", "Write a poem.", "Name a colour.", "What is two plus two?", "Tell me a joke.",
           "Count to five."]


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("smollm2-135m-instruct")


@pytest.mark.parametrize("model_type", TINY_MODEL_TYPES)
def test_mixed_model_equals_the_patch_with_per_unit_gamma(model_type):
    """The activation-side mixing computes exactly the model that writing θ_T + γ·Δθ into the weights gives, for MLP
    neurons, query heads and k/v groups at once (GQA included); leaving it restores the target."""
    kw = {} if model_type in MHA_ONLY else {"num_key_value_heads": 2}
    donor, target = tiny_model(model_type, seed=1, **kw), tiny_model(model_type, seed=0, **kw)
    ids = torch.randint(3, 100, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        plain = target(ids).logits
    mixed = MixedModel(donor, target, ("mlp", "head", "kv"))
    g = torch.Generator().manual_seed(1)
    sel, gam = {}, {}
    for kind in mixed.kinds:
        for layer, v in enumerate(mixed.gamma[kind]):
            r = torch.rand(v.shape, generator=g) * 3
            r[r < 1.2] = 0
            mixed.gamma[kind][layer] = r
            nz = r.nonzero().flatten()
            if len(nz):
                sel.setdefault(kind, {})[layer], gam.setdefault(kind, {})[layer] = nz, r[nz]
    with torch.no_grad(), mixed:
        mixed_logits = target(ids).logits
    with torch.no_grad():
        assert torch.equal(target(ids).logits, plain)  # hooks gone
    NeuronPatch.extract(donor, target, sel, gamma=gam).apply(target)
    with torch.no_grad():
        assert torch.allclose(mixed_logits, target(ids).logits, atol=1e-5)


def _weight_gradient_attribution(task, donor, target, tok, kinds):
    """The textbook form: −∇_θ L · (θ_D,u − θ_T,u) per unit, from weight gradients (the reference)."""
    from cnt.arch import units

    for p in target.parameters():
        p.requires_grad_(True)
    target.zero_grad()
    task_loss(target, tok, task.function, task.response_tokens).backward()
    out = {}
    for kind in kinds:
        rt, rd = units(target, kind), units(donor, kind)
        out[kind] = []
        for layer in range(rt.n_layers):
            idx = torch.arange(rt.n_units(layer))
            td, dd, gr = rt.read(layer, idx), rd.read(layer, idx), rt.read(layer, idx, grad=True)
            out[kind].append(-sum(((dd[k] - td[k]) * gr[k]).reshape(len(idx), -1).sum(1) for k in gr))
    target.zero_grad()
    for p in target.parameters():
        p.requires_grad_(False)
    return out


def test_attribution_and_the_masks_first_gradient_equal_the_weight_gradient_form(tok):
    """At γ = 0 (the target), −∂L/∂γ_u equals −∇_θ L·Δθ_u, unit u's first-order transfer effect — per MLP neuron, head
    and k/v group — so attribution (computed from activations, streamed over batches) is the mask's first gradient,
    and the mask's logits s (γ = γ_max·σ(s)) start along it up to the factor γ_max·σ'(s)."""
    target = tiny_model("llama", seed=0, vocab_size=len(tok), num_key_value_heads=2)
    donor = tiny_model("llama", seed=1, vocab_size=len(tok), num_key_value_heads=2)
    task = Task("t", [Example(prompt=p, response="I'm sorry, no.") for p in PROMPTS[:3]], [], response_tokens=3)
    kinds = ("mlp", "head", "kv")
    att = attribution(task, donor, target, tok, kinds=kinds, batch_size=2, progress=False, autocast=None)
    ref = _weight_gradient_attribution(task, donor, target, tok, kinds)
    zero = {k: [torch.zeros(s.numel()) for s in att.by_kind()[k]] for k in kinds}
    grad = gamma_gradient(task.function, donor, target, tok, zero, response_tokens=3)
    for k in kinds:
        a, r, g = torch.cat(att.by_kind()[k]), torch.cat(ref[k]), -torch.cat(grad[k])
        assert float(a.abs().max()) > 0
        assert torch.allclose(a, r, atol=1e-5 * float(r.abs().max())), k
        assert torch.allclose(g, r, atol=1e-5 * float(r.abs().max())), k
    assert all(p.grad is None for p in list(target.parameters()) + list(donor.parameters()))


@pytest.mark.parametrize("model_type", TINY_MODEL_TYPES)
def test_recomputed_blocks_give_the_same_gradient_and_leave_the_model_as_it_was(model_type, tok):
    """Activation checkpointing per block (eval mode, hooks re-run in the recomputation) changes memory, not the
    gradient: ∂L/∂γ at a patched point with neurons, heads and k/v groups equals the kept-activations one, on every
    family; leaving restores each block's own forward."""
    kw = {} if model_type in MHA_ONLY else {"num_key_value_heads": 2}
    target = tiny_model(model_type, seed=0, vocab_size=len(tok), **kw)
    donor = tiny_model(model_type, seed=1, vocab_size=len(tok), **kw)
    task = Task("t", [Example(prompt=p, response="I'm sorry, no.") for p in PROMPTS[:4]], [], response_tokens=3)
    kinds = ("mlp", "head", "kv")
    gen = torch.Generator().manual_seed(0)
    point = {k: [torch.rand(len(g), generator=gen) for g in MixedModel(donor, target, (k,)).gamma[k]] for k in kinds}
    kept = gamma_gradient(task.function, donor, target, tok, point, response_tokens=3, batch_size=2, recompute=False)
    again = gamma_gradient(task.function, donor, target, tok, point, response_tokens=3, batch_size=2, recompute=True)
    for k in kinds:
        a, b = torch.cat(kept[k]), torch.cat(again[k])
        assert float(a.abs().max()) > 0
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6 * float(a.abs().max())), k
    blocks = list(MLPNeurons(target).layers)
    with recomputed(target):
        assert all("forward" in b.__dict__ for b in blocks)
    assert not any("forward" in b.__dict__ for b in blocks)


def _planted(tok, vocab_size: int | None = None):
    """A GPT-2 target and a donor that differs from it in 4 known MLP neurons: two in layer 0 (A) write a feature f,
    two in layer 1 (B) read f behind a threshold (their bias) and push the token 'Sure'. Alone, A only distorts the
    residual stream and B stays below its threshold — each set alone makes the target *worse* — together they lower
    the loss of answering 'Sure' below the donor's own."""
    target = tiny_model("gpt2", seed=0, vocab_size=vocab_size or len(tok), n_positions=256)
    donor = copy.deepcopy(target)
    g = torch.Generator().manual_seed(3)
    f = torch.randn(64, generator=g)
    f = (f - f.mean()) / (f - f.mean()).norm()
    sure = tok("Sure", add_special_tokens=False)["input_ids"][0]
    u = target.lm_head.weight[sure].detach().clone()
    u = (u - u.mean()) / (u - u.mean()).norm()
    nd = MLPNeurons(donor)
    for i in (7, 30):
        r = torch.randn(64, generator=g)
        nd.write(0, [i], {"in": 0.1 * r[None] / r.norm(), "in_bias": torch.tensor([3.0]), "out": 10 * f[None]})
    for i in (11, 50):
        nd.write(1, [i], {"in": f[None], "in_bias": torch.tensor([-2.5]), "out": 8 * u[None]})
    task = Task("planted", [Example(prompt=p, response="Sure") for p in PROMPTS], [], response_tokens=1)
    return donor, target, task, {0: [7, 30], 1: [11, 50]}


def test_the_joint_locator_recovers_a_planted_set_that_attribution_misses(tok):
    recovers_the_planted_set(tok, "cpu")


def recovers_the_planted_set(tok, device, vocab_size: int | None = None) -> None:
    """The planted-set check on ``device``: attribution misses part of the circuit, the learned mask finds it."""
    donor, target, task, planted = _planted(tok, vocab_size)
    donor, target = donor.to(device), target.to(device)

    def loss(model):
        with torch.no_grad():
            return float(task_loss(model, tok, task.function, 1))

    def loss_with(sel, gamma=None):
        patch = NeuronPatch.extract(donor, target, sel, gamma=gamma)
        patch.apply(target)
        out = loss(target)
        patch.revert(target)
        return out

    base, best = loss(target), loss(donor)
    assert best < base - 0.5
    assert loss_with({0: planted[0]}) > base and loss_with({1: planted[1]}) > base  # each alone: no better
    att = attribution(task, donor, target, tok, progress=False)
    # first order ranks part of the circuit below units that do nothing (score 0): it cannot see the interaction
    assert min(float(att.scores[layer][i]) for layer, idx in planted.items() for i in idx) < 0
    per_neuron = MLPNeurons(target).params_per_neuron(0)
    n_weights = sum(p.numel() for p in target.parameters())
    mask = locate("learned_mask", task, donor, target, tok, levels=(16 * per_neuron / n_weights,
                                                                    4 * per_neuron / n_weights),
                  warmup_steps=6, descent_steps=4, steps_per_level=3, progress=False)
    sel, gamma = mask.select(4 * per_neuron)
    chosen = {(layer, int(i)) for layer, idx in sel["mlp"].items() for i in idx}
    planted_set = {(layer, i) for layer, idx in planted.items() for i in idx}
    assert len(chosen) == 4
    assert {l for l, _ in chosen & planted_set} == {0, 1}  # it found both halves of the circuit
    assert loss_with(sel, gamma) <= best + 0.05  # ... and with its amplitudes it does what the donor does


def test_mask_is_seeded_and_leaves_the_models_alone(tok):
    donor, target, task, _ = _planted(tok)
    task = Task("planted", task.function[:2], [], response_tokens=1)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    kw = dict(levels=(0.001,), warmup_steps=1, descent_steps=1, steps_per_level=1, progress=False, seed=3,
              check_examples=2)
    a = locate("learned_mask", task, donor, target, tok, **kw)
    b = locate("learned_mask", task, donor, target, tok, **kw)
    assert torch.equal(a.flat(), b.flat()) and a.settings["losses"] == b.settings["losses"]
    assert a.settings["micro_batch"] == default_micro_batch("cpu", 8) == 2  # the device's default, recorded
    # a GPU takes the whole minibatch at once (bench_gpu.json), named by a string or a torch.device
    assert default_micro_batch("cuda:0", 8) == default_micro_batch(torch.device("cuda", 1), 8) == 8
    assert all(torch.equal(before[k], v) for k, v in target.state_dict().items())
    assert all(p.grad is None and not p.requires_grad for p in target.parameters()) or \
        all(p.requires_grad for p in target.parameters())
    with pytest.raises(ValueError, match="levels must be fractions"):
        locate("learned_mask", task, donor, target, tok, levels=(2.0,), progress=False)


def test_padding_to_a_multiple_changes_no_loss(tok, monkeypatch):
    """Batches are padded to a multiple of tasks.PAD_MULTIPLE tokens (few distinct shapes: the allocator reuses
    them); the padding is masked and unlabelled, so the loss is the one of the tightest padding."""
    from cnt import tasks

    model = tiny_model("llama", seed=0, vocab_size=len(tok))
    ex = [Example(prompt=p, response="I cannot help with that.") for p in PROMPTS[:3]] + \
        [Example(text="The quick brown fox jumps over the lazy dog.")]
    inp, _, _ = tasks.pair_batch(tok, ex[:3], 3, "cpu")
    assert inp.shape[1] % tasks.PAD_MULTIPLE == 0
    with torch.no_grad():
        padded = tasks.task_loss(model, tok, ex, 3)
        monkeypatch.setattr(tasks, "PAD_MULTIPLE", 1)
        tight = tasks.task_loss(model, tok, ex, 3)
    torch.testing.assert_close(padded, tight, rtol=1e-5, atol=1e-5)


def test_output_head_only_where_the_logits_are_the_plain_head():
    """The head is applied outside the model only where the model's logits are exactly head(last hidden state)."""
    from cnt.arch import output_head

    model = tiny_model("gemma3_text", seed=0)
    decoder, head = output_head(model)
    assert decoder is model.model and head is model.lm_head
    model.config.final_logit_softcapping = 30.0  # Gemma 2's soft-capping: the model's own forward makes the logits
    assert output_head(model) is None
    gpt2 = tiny_model("gpt2", seed=0)
    assert output_head(gpt2)[0] is gpt2.transformer
    gpt2.lm_head._hf_hook = object()  # accelerate places (or loads) this head in its own forward: not bypassed
    assert output_head(gpt2) is None
