"""What "the function" is, as differentiable losses on a model: chat pairs (NLL of the first response tokens), margins
between two texts, plain texts. Every locator scores units against a :class:`Task`."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Sequence

import torch

from .logprobs import token_logprobs
from .models import chat_texts, model_device, pad_right, release_freed_memory


# ---------------------------------------------------------------------------------------------------------------------
# tasks: what "the function" is, as differentiable losses on the target
# ---------------------------------------------------------------------------------------------------------------------

@dataclass
class Example:
    """A chat pair (loss: NLL of the first ``k`` response tokens), a contrast of two texts (loss: −margin), or a plain
    text (loss: mean token NLL). A chat pair with an ``answer`` is one whose ``response`` (a refusal) the function must
    not make preferred over ``answer`` (the target's own, to a benign prompt): its loss is :func:`margin_hinge` of
    how far the answer leads (the refusal's NLL minus the answer's), small while the answer leads by more than
    :data:`CONTRAST_MARGIN`, about linear once it leads by less or trails."""

    prompt: str | None = None
    response: str | None = None
    text_pos: str | None = None  # for margins: log p(text_pos) − log p(text_neg)
    text_neg: str | None = None
    text: str | None = None
    answer: str | None = None


# nats per response token by which a benign prompt's own answer should lead a refusal (the contrast's hinge point):
# measured on SmolLM2 (smol-arith, 195 validation prompts) the target's answers lead by 2.9 at the median, 0.3 at the
# least, and every prompt its donor refuses has its answer trailing (METHOD.md)
CONTRAST_MARGIN = 1.0


@dataclass
class Task:
    """The function to transfer, as examples on which the target should behave like the donor.

    ``function``: minimizing the loss on these moves the target toward the donor's behaviour (e.g. the donor's own
    responses to harmful prompts). ``utility``: the loss on these must not rise (e.g. the target's own benign answers).
    """

    name: str
    function: list[Example]
    utility: list[Example]
    response_tokens: int = 3  # chat pairs: score only the first tokens of the response, where refusal is decided
    utility_weight: float = 1.0
    meta: dict = field(default_factory=dict)
    # pairs whose refusal the function must not make preferred (``Example.answer`` set: benign prompts, the donor's
    # refusals, the target's answers), weighted ``contrast_weight`` against the function: off-target behaviour
    contrast: list[Example] = field(default_factory=list)
    contrast_weight: float = 0.0

    def digest(self) -> str:
        def plain(examples):  # an example's fields as before the answer existed, so older digests stay equal
            return [{k: v for k, v in e.__dict__.items() if k != "answer" or v is not None} for e in examples]

        parts = [plain(self.function), plain(self.utility), self.response_tokens]
        if self.contrast and self.contrast_weight:
            parts += [plain(self.contrast), self.contrast_weight]
        blob = json.dumps(parts, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


PAD_MULTIPLE = 32  # batches padded to a multiple of 32 tokens (see pair_batch)


def pair_batch(tokenizer, examples: Sequence[Example], k: int, device):
    ids, labels = [], []
    for ex in examples:
        p = tokenizer(chat_texts(tokenizer, [ex.prompt])[0],
                      add_special_tokens=not tokenizer.chat_template)["input_ids"]
        r = tokenizer(ex.response, add_special_tokens=False)["input_ids"][:k] or [tokenizer.eos_token_id]
        ids.append(p + r)
        labels.append([-100] * len(p) + r)
    return pad_right(ids, tokenizer.pad_token_id, labels, device, PAD_MULTIPLE)


def text_batch(tokenizer, texts: Sequence[str], device, max_tokens: int = 128):
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    ids = [[bos] + tokenizer(t, add_special_tokens=False)["input_ids"][:max_tokens] for t in texts]
    return pad_right(ids, tokenizer.pad_token_id, [[-100] + i[1:] for i in ids], device, PAD_MULTIPLE)


def streamed_loss(model, tokenizer, examples: Sequence[Example], k: int, *, batch_size: int, weight: float = 1.0,
                  autocast: torch.dtype | None = None, backward: bool = False, progress: str | None = None) -> float:
    """``weight`` × the mean :func:`task_loss` over ``examples``, computed ``batch_size`` examples at a time, each
    batch weighted by its share, so the value and (with ``backward``) the gradients accumulated into the graph's
    leaves equal the whole set's, with one batch's activations in memory. ``autocast``: the matmuls' precision, casting
    per op (no model-wide copy of the weights cached for the pass). ``progress``: a progress bar's label."""
    from tqdm.auto import tqdm

    device = model_device(model)
    examples = list(examples)
    total = 0.0
    for chunk in tqdm(list(batches(examples, batch_size)), desc=progress, disable=progress is None, leave=False):
        with torch.autocast(device.type, dtype=autocast or torch.float32, enabled=autocast is not None,
                            cache_enabled=False):
            loss = task_loss(model, tokenizer, chunk, k).float() * (weight * len(chunk) / len(examples))
        if backward:
            loss.backward()
        total += loss.item()
        del loss
        release_freed_memory(device)  # one batch's activations back to the OS before the next batch's
    return total


def margin_hinge(nll_response: torch.Tensor, nll_answer: torch.Tensor,
                 margin: float = CONTRAST_MARGIN) -> torch.Tensor:
    """``softplus(margin − (nll_response − nll_answer))``: how far a response (a refusal) has come toward being
    preferred over the answer, smoothly — about ``exp(−lead)`` while the answer leads by more than ``margin``, about
    linear in the lead once it is less, so the loss (and its gradient) sits on the prompts close to being refused."""
    return torch.nn.functional.softplus(margin - (nll_response - nll_answer))


def per_example(lp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Each row's mean log-probability over its labelled tokens (:func:`cnt.logprobs.token_logprobs`' output)."""
    return lp.sum(1) / mask.sum(1).clamp(min=1)


def task_loss(model, tokenizer, examples: Sequence[Example], k: int) -> torch.Tensor:
    """Mean loss over ``examples`` (differentiable): NLL of the first ``k`` response tokens (or, with an ``answer``,
    :func:`margin_hinge` of it against the answer's), or −margin."""
    device = model_device(model)
    pairs = [e for e in examples if e.prompt is not None]
    margins = [e for e in examples if e.text_pos is not None]
    plain = [e for e in examples if e.text is not None]
    total = torch.zeros((), device=device)
    if plain:
        lp, m = token_logprobs(model, *text_batch(tokenizer, [e.text for e in plain], device))
        total = total - per_example(lp, m).sum()
    if pairs:
        lp, m = token_logprobs(model, *pair_batch(tokenizer, pairs, k, device))
        nll = -per_example(lp, m)
        versus = [i for i, e in enumerate(pairs) if e.answer is not None]
        if versus:
            answers = [Example(prompt=pairs[i].prompt, response=pairs[i].answer) for i in versus]
            lp, m = token_logprobs(model, *pair_batch(tokenizer, answers, k, device))
            hinge = margin_hinge(nll[versus].float(), -per_example(lp, m).float())
            nll = nll.float().index_put((torch.tensor(versus, device=device),), hinge)
        total = total + nll.sum()
    if margins:
        texts = [e.text_pos for e in margins] + [e.text_neg for e in margins]
        lp, m = token_logprobs(model, *text_batch(tokenizer, texts, device))
        avg = per_example(lp, m)
        n = len(margins)
        total = total - (avg[:n] - avg[n:]).sum()
    return total / max(1, len(examples))


# ---------------------------------------------------------------------------------------------------------------------
# scores
# ---------------------------------------------------------------------------------------------------------------------


def batches(items: Sequence, size: int):
    for s in range(0, len(items), size):
        yield items[s:s + size]
