"""A task's contrast: benign prompts whose refusal the function must not make preferred over the target's own answer
(a smooth hinge on the answer's lead). Scored by attribution (a penalty on the first-order rise of the hinge) and by
the learned mask (in its loss)."""
import dataclasses
import hashlib
import json
import math

import pytest
import torch

from cnt import functions
from cnt.locate import Example, Task, attribution, learned_mask, task_loss
from cnt.mixing import gamma_gradient
from cnt.tasks import CONTRAST_MARGIN, margin_hinge
from cnt.transfer import NeuronPatch

from .test_locate import BENIGN, PROMPTS, REFUSAL, fixture  # noqa: F401  (tiny donor/target pair, real tokenizer)


ANSWER = "Sure."


def _task(weight: float) -> Task:
    return Task("refusal", [Example(prompt=p, response=REFUSAL) for p in PROMPTS],
                [Example(prompt=p, response=ANSWER) for p in BENIGN], response_tokens=4,
                contrast=[Example(prompt=p, response=REFUSAL, answer=ANSWER) for p in BENIGN], contrast_weight=weight)


def _nll(model, tok, examples) -> torch.Tensor:
    with torch.no_grad():
        return torch.tensor([float(task_loss(model, tok, [e], 4)) for e in examples])


def _lead(model, tok, task) -> torch.Tensor:
    """How far each benign prompt's answer leads the refusal (NLL of the refusal minus the answer's)."""
    refusals = [Example(prompt=e.prompt, response=e.response) for e in task.contrast]
    answers = [Example(prompt=e.prompt, response=e.answer) for e in task.contrast]
    return _nll(model, tok, refusals) - _nll(model, tok, answers)


def _lead_after(patch_idx, donor, target, tok, task) -> float:
    patch = NeuronPatch.extract(donor, target, patch_idx)
    patch.apply(target)
    try:
        return float(_lead(target, tok, task).mean())
    finally:
        patch.revert(target)


def test_margin_hinge_sits_on_the_prompts_close_to_being_refused():
    nll_response = torch.tensor([11.0, 1.0 + CONTRAST_MARGIN, -2.0])  # leads of 10, the margin, -3
    nll_answer = torch.tensor([1.0, 1.0, 1.0], requires_grad=True)
    loss = margin_hinge(nll_response, nll_answer)
    assert loss[0].item() < 1e-3  # an answer far ahead: almost nothing
    assert loss[1].item() == pytest.approx(math.log(2))  # at the margin
    assert loss[2].item() == pytest.approx(CONTRAST_MARGIN + 3.0, rel=0.02)  # refused: about linear in the lead
    loss.sum().backward()  # the answer's NLL enters with the sign that raises the loss as the answer grows rarer
    assert nll_answer.grad[0].item() == pytest.approx(0.0, abs=1e-3) and nll_answer.grad[2].item() > 0.9


def test_a_contrast_pair_costs_its_hinge_of_the_answers_lead(fixture):  # noqa: F811
    donor, target, tok = fixture
    task = _task(1.0)
    for model in (target, donor):
        with torch.no_grad():
            loss = float(task_loss(model, tok, task.contrast, 4))
        expected = float(margin_hinge(_lead(model, tok, task) + 0.0, torch.zeros(len(BENIGN))).mean())
        assert loss == pytest.approx(expected, rel=1e-3)


def test_attribution_charges_each_unit_its_first_order_rise_of_the_hinge(fixture):  # noqa: F811
    donor, target, tok = fixture
    with_c, weight = _task(8.0), 8.0
    without = dataclasses.replace(with_c, contrast_weight=0.0)
    a, b = attribution(with_c, donor, target, tok, progress=False), attribution(without, donor, target, tok,
                                                                                progress=False)
    zero = {"mlp": [torch.zeros(96), torch.zeros(96)]}
    harm = gamma_gradient(with_c.contrast, donor, target, tok, zero, response_tokens=4, batch_size=2,
                          autocast=torch.bfloat16)["mlp"]
    for x, y, h in zip(a.scores, b.scores, harm):
        torch.testing.assert_close(x, y - weight * h.clamp(min=0), rtol=1e-4, atol=1e-6)
    assert any(bool((h > 0).any()) for h in harm)  # some unit does bring a refusal closer, and is charged for it
    assert a.settings["n_contrast"] == len(BENIGN) and a.settings["contrast_weight"] == weight
    # its top units leave the benign answers further ahead than the top units of attribution without it
    assert _lead_after(a.top(19), donor, target, tok, with_c) > _lead_after(b.top(19), donor, target, tok, with_c)


def test_the_mask_without_a_contrast_weight_is_the_mask_without_a_contrast(fixture):  # noqa: F811
    """A contrast at weight 0 draws nothing from the seeded generator and adds nothing to the loss: bit-exact."""
    donor, target, tok = fixture
    task = _task(0.0)
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
    more = dataclasses.replace(task, contrast=[Example(prompt="q", response="r", answer="a")], contrast_weight=2.0)
    assert more.digest() != task.digest()


def test_a_contrast_is_refused_for_a_function_that_does_not_add_refusal(fixture, monkeypatch):  # noqa: F811
    monkeypatch.setattr(functions, "generate", lambda *a, **k: pytest.fail("no compute may happen"))
    for function in ("compliance", "bias"):
        with pytest.raises(ValueError, match="n_contrast=0"):
            functions.build_task(function, *fixture, n_contrast=4)


def test_build_task_pairs_further_benign_prompts_with_the_donors_refusals(fixture, monkeypatch):  # noqa: F811
    """The contrast's prompts follow the utility's in the split's seeded order (disjoint from them); each holds one of
    the donor's refusals in turn, against the target's own answer."""
    from cnt import data

    donor, target, tok = fixture
    answers = iter([["I'm sorry, I can't help with that.", "Sure, here it is.", "I cannot do that."],
                    ["Paris.", "Blue.", "One, two.", "Four.", "Red."]])
    monkeypatch.setattr(functions, "generate", lambda *a, **k: next(answers))
    task = functions.build_task("refusal", donor, target, tok, n_function=3, n_utility=2, n_wiki=0, n_contrast=3)
    benign = data.texts(data.load("benign", "locate", seed=0, limit=5))
    assert [e.prompt for e in task.utility] == benign[:2] and [e.response for e in task.utility] == ["Paris.", "Blue."]
    assert [e.prompt for e in task.contrast] == benign[2:]
    assert [e.response for e in task.contrast] == ["I'm sorry, I can't help with that.", "I cannot do that.",
                                                   "I'm sorry, I can't help with that."]
    assert [e.answer for e in task.contrast] == ["One, two.", "Four.", "Red."]
    assert task.contrast_weight == functions.CONTRAST_WEIGHT and task.meta["n_contrast"] == 3


def test_a_default_contrast_is_left_out_with_a_warning_if_the_donor_refuses_nothing(fixture, monkeypatch):  # noqa: F811
    donor, target, tok = fixture
    monkeypatch.setattr(functions, "generate", lambda m, t, prompts, **k: ["Sure, here it is."] * len(prompts))
    with pytest.warns(UserWarning, match="refused none"):
        task = functions.build_task("refusal", donor, target, tok, n_function=3, n_utility=2, n_wiki=0)
    assert task.contrast == [] and task.contrast_weight == 0.0 and task.meta["n_contrast"] == 0
    with pytest.raises(ValueError, match="refused none"):  # asked for, it cannot be had
        functions.build_task("refusal", donor, target, tok, n_function=3, n_utility=2, n_wiki=0, n_contrast=3)
