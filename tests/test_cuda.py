"""The kit on a CUDA device: patches, the activation-side mixing, the locators, the task loss in bf16, loading and
generation. Skipped where no CUDA device is present (CI has none); `make test-cuda` runs them on a GPU machine.

Tiny random models and the in-memory byte tokenizer (:func:`cnt.tiny.tiny_tokenizer`): nothing is read from an
embedded model's package, so the file runs on a bare GPU machine with torch and transformers."""

import json

import pytest
import torch

from cnt import NeuronPatch
from cnt.arch import units
from cnt.locate import Example, Task, locate
from cnt.mixing import MixedModel
from cnt.tiny import tiny_model, tiny_tokenizer

from .helpers import gqa_model, state_copy
from .test_logprobs import reference_logprobs
from .test_masks import PROMPTS, recovers_the_planted_set

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

CUDA = "cuda"
MIXED = {"mlp": {0: [1, 5, 9], 1: [0, 95]}, "head": {1: [0, 3]}, "kv": {0: [1]}}
KINDS = ("mlp", "head", "kv")


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def _gamma(sel, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return {k: {layer: (0.5 + 2 * torch.rand(len(i), generator=gen)).tolist() for layer, i in v.items()}
            for k, v in sel.items()}


def test_a_mixed_patch_applies_saves_loads_and_reverts_bit_exact_on_cuda(tmp_path):
    donor, target = gqa_model(1, CUDA), gqa_model(0, CUDA)
    before = state_copy(target)
    gamma = _gamma(MIXED)
    patch = NeuronPatch.extract(donor, target, MIXED, gamma=gamma)
    patch.apply(target)
    direct = state_copy(target)
    assert all(v.device.type == CUDA for v in direct.values())
    cpu_target = gqa_model(0, "cpu")  # the same patch computed and applied on the CPU: the same weights, to rounding
    NeuronPatch.extract(gqa_model(1, "cpu"), cpu_target, MIXED, gamma=gamma).apply(cpu_target)
    for k, v in cpu_target.state_dict().items():
        torch.testing.assert_close(direct[k].cpu(), v, rtol=1e-6, atol=1e-6)
    loaded = NeuronPatch.load(patch.save(tmp_path / "p"))
    loaded.revert(target)
    assert all(torch.equal(before[k], v) for k, v in target.state_dict().items())  # revert bit-exact
    loaded.apply(target)
    assert all(torch.equal(direct[k], v) for k, v in target.state_dict().items())  # save -> load -> apply = direct
    assert json.loads((tmp_path / "p" / "patch.json").read_text())["units"] == {"mlp": 5, "head": 2, "kv": 1}


def test_the_mixing_on_cuda_computes_the_patched_model():
    donor, target = gqa_model(1, CUDA), gqa_model(0, CUDA)
    ids = torch.randint(3, 100, (2, 7), generator=torch.Generator().manual_seed(0)).to(CUDA)
    gamma = _gamma(MIXED, seed=1)
    mixed = MixedModel(donor, target, KINDS)
    for kind, per_layer in MIXED.items():
        for layer, idx in per_layer.items():
            mixed.gamma[kind][layer][torch.tensor(idx)] = torch.tensor(gamma[kind][layer])
    with torch.no_grad(), mixed:
        mixed_logits = target(ids).logits
    NeuronPatch.extract(donor, target, MIXED, gamma=gamma).apply(target)
    with torch.no_grad():
        torch.testing.assert_close(mixed_logits, target(ids).logits, rtol=1e-4, atol=1e-5)


def _task(n=4):
    return Task("t", [Example(prompt=p, response="I'm sorry, I can't help with that.") for p in PROMPTS[:n]], [],
                response_tokens=3)


@pytest.mark.parametrize("scorer", ["attribution", "learned_mask"])
def test_a_locator_on_cuda_scores_as_on_the_cpu(tok, scorer):
    """float32, no autocast: the CUDA run's scores equal the CPU run's to rounding (the mask: the same schedule, so
    the same pruning, step by step)."""
    kw = dict(kinds=KINDS, progress=False)
    if scorer == "learned_mask":
        kw.update(levels=(0.05, 0.01), warmup_steps=2, descent_steps=2, steps_per_level=1, autocast=None)
    runs = []
    for device in ("cpu", CUDA):
        donor, target = gqa_model(1, device, vocab_size=len(tok)), gqa_model(0, device, vocab_size=len(tok))
        runs.append(locate(scorer, _task(), donor, target, tok, **kw))
    cpu, cuda = runs
    assert set(cpu.by_kind()) == set(cuda.by_kind()) == set(KINDS)
    scale = float(cpu.flat().abs().max())  # near-zero scores differ by the two devices' rounding of their sums
    torch.testing.assert_close(cuda.flat().cpu(), cpu.flat(), rtol=1e-3, atol=5e-3 * scale)


def test_the_learned_mask_on_cuda_recovers_the_planted_set(tok):
    recovers_the_planted_set(tok, CUDA, vocab_size=49_152)  # a real vocabulary's size: flatter logits cost loss


def test_the_task_loss_in_bf16_on_cuda_equals_the_whole_softmax():
    """Under CUDA bf16 autocast the output head applied a slice of the vocabulary at a time gives the model's own
    bf16 logits' log-softmax, values and gradients."""
    from cnt import logprobs

    model = tiny_model("llama", seed=0, vocab_size=5000).to(CUDA)
    assert logprobs.output_head(model) is not None
    gen = torch.Generator().manual_seed(0)
    inp = torch.randint(3, 4000, (3, 9), generator=gen)
    mask = torch.ones_like(inp)
    mask[1, 7:] = 0
    lab = inp.clone()
    lab[mask == 0], lab[:, :3] = -100, -100
    inp, lab, mask = inp.to(CUDA), lab.to(CUDA), mask.to(CUDA)
    values, grads = [], []
    for fn in (logprobs.token_logprobs, reference_logprobs):
        model.zero_grad()
        with torch.autocast(CUDA, dtype=torch.bfloat16):
            lp, _ = fn(model, inp, lab, mask)
        (-lp.sum()).backward()
        values.append(lp.detach().float())
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    torch.testing.assert_close(values[0], values[1], rtol=2e-2, atol=2e-2)
    assert float((grads[0] - grads[1]).norm() / grads[1].norm()) < 2e-2


def test_load_model_places_a_folder_on_cuda_in_bf16_and_generates(tok, tmp_path):
    from cnt.models import default_device, generate, load_model

    assert default_device() == CUDA
    tiny_model("llama", seed=3, vocab_size=len(tok), max_position_embeddings=256).save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    model, tok2 = load_model(str(tmp_path / "m"))
    assert next(model.parameters()).device.type == CUDA and next(model.parameters()).dtype == torch.bfloat16
    system = "You are a careful assistant."  # a shared opening long enough for the prefix cache
    shared = generate(model, tok2, PROMPTS, max_new_tokens=6, system=system, progress=False)
    alone = generate(model, tok2, PROMPTS, max_new_tokens=6, system=system, progress=False, share_prefix=False)
    assert len(shared) == len(PROMPTS) and sum(a == b for a, b in zip(shared, alone)) >= len(PROMPTS) - 1
    donor, _ = load_model(str(tmp_path / "m"))
    units(donor, "mlp").write(0, torch.tensor([2]), {k: v + 1 for k, v in units(donor, "mlp").read(0, [2]).items()})
    before = state_copy(model)
    patch = NeuronPatch.extract(donor, model, {0: [2, 7]})
    patch.apply(model)
    assert not all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    patch.revert(model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_a_model_placed_by_accelerate_keeps_the_logits_path(tok):
    """A model whose modules accelerate's hooks place (what ``device_map=...`` gives over several devices): the task
    loss asks the model for the logits instead of applying the head itself; the attribution scores equal those of
    the same models placed plainly."""
    from accelerate import dispatch_model

    from cnt.arch import output_head

    plain = [gqa_model(s, CUDA, vocab_size=len(tok)) for s in (1, 0)]
    placed = [dispatch_model(gqa_model(s, "cpu", vocab_size=len(tok)), {"": 0}, force_hooks=True) for s in (1, 0)]
    assert output_head(placed[1]) is None and output_head(plain[1]) is not None
    a, b = (locate("attribution", _task(), d, t, tok, kinds=KINDS, progress=False) for d, t in (placed, plain))
    torch.testing.assert_close(a.flat(), b.flat(), rtol=1e-3, atol=1e-3 * float(b.flat().abs().max()))
