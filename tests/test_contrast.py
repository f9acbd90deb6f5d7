"""A task's contrast: benign prompts paired with refusals, which the function must not make likelier (floored at the
target's own NLL). Scored by attribution (a penalty on the first-order rise) and by the learned mask (in its loss)."""
import dataclasses
import hashlib
import json
import math

import pytest
import torch

from cnt import functions
from cnt.locate import Example, Task, attribution, learned_mask, task_loss
from cnt.mixing import gamma_gradient
from cnt.tasks import floor_hinge, pair_nll
from cnt.transfer import NeuronPatch

from .test_locate import BENIGN, PROMPTS, REFUSAL, fixture  # noqa: F401  (tiny donor/target pair, real tokenizer)


def _task(target, tok, weight: float) -> Task:
    pairs = [Example(prompt=p, response=REFUSAL) for p in BENIGN]
    floors = pair_nll(target, tok, pairs, 4)
    return Task("refusal", [Example(prompt=p, response=REFUSAL) for p in PROMPTS],
                [Example(prompt=p, response="Sure.") for p in BENIGN], response_tokens=4,
                contrast=[dataclasses.replace(e, floor=f) for e, f in zip(pairs, floors)], contrast_weight=weight)


def _contrast_rise(patch_idx, donor, target, tok, task) -> float:
    """How much likelier the refusals of benign prompts became (mean NLL fall) under the patch of ``patch_idx``."""
    patch = NeuronPatch.extract(donor, target, patch_idx)
    patch.apply(target)
    try:
        after = pair_nll(target, tok, task.contrast, task.response_tokens)
    finally:
        patch.revert(target)
    return sum(e.floor - a for e, a in zip(task.contrast, after)) / len(after)


def test_floor_hinge_is_zero_at_the_floor_and_charges_a_likelier_response():
    nll = torch.tensor([2.0, 1.0, 10.0], requires_grad=True)
    loss = floor_hinge(nll, torch.tensor([2.0, 2.0, 2.0]))
    assert loss[0].item() == pytest.approx(0.0, abs=1e-7)
    assert loss[1].item() == pytest.approx(math.log1p(math.e) - math.log(2))  # 1 nat likelier than the floor
    assert -math.log(2) < loss[2].item() < -math.log(2) + 1e-3  # far rarer: hardly credited
    loss.sum().backward()
    assert nll.grad[0].item() == pytest.approx(-0.5)  # half the NLL's gradient, negated, at the floor


def test_a_contrast_pair_at_its_floor_costs_nothing_and_rises_as_the_refusal_grows_likelier(fixture):  # noqa: F811
    donor, target, tok = fixture
    task = _task(target, tok, 1.0)
    with torch.no_grad():
        at_target = float(task_loss(target, tok, task.contrast, 4))
        at_donor = float(task_loss(donor, tok, task.contrast, 4))
        plain = [dataclasses.replace(e, floor=None) for e in task.contrast]
        rise = float(task_loss(target, tok, plain, 4) - task_loss(donor, tok, plain, 4))
    assert at_target == pytest.approx(0.0, abs=1e-4)
    assert (at_donor > 0) == (rise > 0)  # charged exactly when the donor makes the refusals likelier on average


def test_attribution_charges_each_unit_its_first_order_rise_of_benign_refusals(fixture):  # noqa: F811
    donor, target, tok = fixture
    with_c, weight = _task(target, tok, 8.0), 8.0
    without = dataclasses.replace(with_c, contrast_weight=0.0)
    a, b = attribution(with_c, donor, target, tok, progress=False), attribution(without, donor, target, tok,
                                                                                progress=False)
    zero = {"mlp": [torch.zeros(96), torch.zeros(96)]}
    harm = gamma_gradient(with_c.contrast, donor, target, tok, zero, response_tokens=4, batch_size=2,
                          autocast=torch.bfloat16)["mlp"]
    for x, y, h in zip(a.scores, b.scores, harm):
        torch.testing.assert_close(x, y - weight * h.clamp(min=0), rtol=1e-4, atol=1e-6)
    assert a.settings["n_contrast"] == len(BENIGN) and a.settings["contrast_weight"] == weight
    # its top units make refusing benign prompts less likely than the top units of attribution without it
    assert _contrast_rise(a.top(19), donor, target, tok, with_c) < _contrast_rise(b.top(19), donor, target, tok,
                                                                                   with_c)


def test_the_mask_without_a_contrast_weight_is_the_mask_without_a_contrast(fixture):  # noqa: F811
    """A contrast at weight 0 draws nothing from the seeded generator and adds nothing to the loss: bit-exact."""
    donor, target, tok = fixture
    task = _task(target, tok, 0.0)
    kw = dict(levels=(0.05,), warmup_steps=1, descent_steps=1, steps_per_level=1, batch_size=4, progress=False)
    a = learned_mask(task, donor, target, tok, **kw)
    b = learned_mask(dataclasses.replace(task, contrast=[]), donor, target, tok, **kw)
    assert all(torch.equal(x, y) for x, y in zip(a.scores, b.scores))
    assert a.settings["n_contrast"] == 0
    c = learned_mask(dataclasses.replace(task, contrast_weight=8.0), donor, target, tok, **kw)
    assert c.settings["n_contrast"] == len(BENIGN) and c.settings["losses"] != a.settings["losses"]


def test_a_task_without_a_contrast_keeps_its_digest():
    """Digests identify the task a committed result was located on: the new field leaves older tasks' alone."""
    task = Task("refusal", [Example(prompt="p", response="r")], [Example(text="t")], response_tokens=3)
    old = [[{"prompt": "p", "response": "r", "text_pos": None, "text_neg": None, "text": None}],
           [{"prompt": None, "response": None, "text_pos": None, "text_neg": None, "text": "t"}], 3]
    assert task.digest() == hashlib.sha256(json.dumps(old, sort_keys=True).encode()).hexdigest()[:16]
    more = dataclasses.replace(task, contrast=[Example(prompt="q", response="r", floor=1.0)], contrast_weight=2.0)
    assert more.digest() != task.digest()


def test_a_contrast_is_refused_for_a_function_that_does_not_add_refusal(fixture, monkeypatch):  # noqa: F811
    monkeypatch.setattr(functions, "generate", lambda *a, **k: pytest.fail("no compute may happen"))
    for function in ("compliance", "bias"):
        with pytest.raises(ValueError, match="n_contrast=0"):
            functions.build_task(function, *fixture, n_contrast=4)


def test_build_task_pairs_further_benign_prompts_with_the_donors_refusals(fixture, monkeypatch):  # noqa: F811
    """The contrast's prompts follow the utility's in the split's seeded order (disjoint from them); each holds one of
    the donor's refusals in turn, floored at the target's NLL of it."""
    from cnt import data

    donor, target, tok = fixture
    answers = iter([["I'm sorry, I can't help with that.", "Sure, here it is.", "I cannot do that."],
                    ["Paris.", "Blue."]])
    monkeypatch.setattr(functions, "generate", lambda *a, **k: next(answers))
    task = functions.build_task("refusal", donor, target, tok, n_function=3, n_utility=2, n_wiki=0, n_contrast=3)
    benign = data.texts(data.load("benign", "locate", seed=0, limit=5))
    assert [e.prompt for e in task.utility] == benign[:2] and [e.prompt for e in task.contrast] == benign[2:]
    assert [e.response for e in task.contrast] == ["I'm sorry, I can't help with that.", "I cannot do that.",
                                                   "I'm sorry, I can't help with that."]
    floors = pair_nll(target, tok, [dataclasses.replace(e, floor=None) for e in task.contrast], 3)
    assert [e.floor for e in task.contrast] == pytest.approx(floors, rel=0.05)
    assert task.contrast_weight == functions.CONTRAST_WEIGHT and task.meta["n_contrast"] == 3
