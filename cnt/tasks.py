"""What "the function" is, as differentiable losses on a model: chat pairs (NLL of the first response tokens), margins
between two texts, plain texts. Every locator scores units against a :class:`Task`."""

from __future__ import annotations

import hashlib
import json
import math
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
    text (loss: mean token NLL). A chat pair with a ``floor`` is one the function must *not* make likelier (a benign
    prompt and a refusal): its loss is :func:`floor_hinge` of its NLL against ``floor`` (the target's own NLL), zero
    at the target, rising as the response grows likelier than there."""

    prompt: str | None = None
    response: str | None = None
    text_pos: str | None = None  # for margins: log p(text_pos) − log p(text_neg)
    text_neg: str | None = None
    text: str | None = None
    floor: float | None = None


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
    # pairs the function must not make likelier (``Example.floor`` set: benign prompts and the donor's refusals),
    # weighted ``contrast_weight`` against the function: off-target behaviour, scored apart from the utility
    contrast: list[Example] = field(default_factory=list)
    contrast_weight: float = 0.0

    def digest(self) -> str:
        def plain(examples):  # an example's fields as before the floor existed, so older digests stay equal
            return [{k: v for k, v in e.__dict__.items() if k != "floor" or v is not None} for e in examples]

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


def floor_hinge(nll: torch.Tensor, floor: torch.Tensor) -> torch.Tensor:
    """``softplus(floor − nll) − log 2``: 0 where the NLL equals its floor, rising about linearly as the response grows
    likelier than there and flattening toward −log 2 as it grows less likely, so a change is charged for making an
    off-target response likelier, hardly credited for making it rarer; its gradient at the floor is half the
    NLL's, negated (attribution's first-order reading of it)."""
    return torch.nn.functional.softplus(floor - nll) - math.log(2.0)


def pair_nll(model, tokenizer, examples: Sequence[Example], k: int, *, batch_size: int = 8) -> list[float]:
    """Each chat pair's NLL of its first ``k`` response tokens (mean per token), without gradients: the floors of
    contrast pairs (:class:`Example`)."""
    device = model_device(model)
    out: list[float] = []
    with torch.no_grad():
        for chunk in batches(list(examples), batch_size):
            lp, m = token_logprobs(model, *pair_batch(tokenizer, chunk, k, device))
            out += (-(lp.sum(1) / m.sum(1).clamp(min=1))).float().tolist()
    return out


def task_loss(model, tokenizer, examples: Sequence[Example], k: int) -> torch.Tensor:
    """Mean loss over ``examples`` (differentiable): NLL of the first ``k`` response tokens (or, with a ``floor``,
    :func:`floor_hinge` of it), or −margin."""
    device = model_device(model)
    pairs = [e for e in examples if e.prompt is not None]
    margins = [e for e in examples if e.text_pos is not None]
    plain = [e for e in examples if e.text is not None]
    total = torch.zeros((), device=device)
    if plain:
        lp, m = token_logprobs(model, *text_batch(tokenizer, [e.text for e in plain], device))
        total = total - (lp.sum(1) / m.sum(1).clamp(min=1)).sum()
    if pairs:
        lp, m = token_logprobs(model, *pair_batch(tokenizer, pairs, k, device))
        nll = -(lp.sum(1) / m.sum(1).clamp(min=1))
        floored = torch.tensor([e.floor is not None for e in pairs], device=device)
        if bool(floored.any()):
            floors = torch.tensor([e.floor if e.floor is not None else 0.0 for e in pairs], device=device)
            nll = torch.where(floored, floor_hinge(nll.float(), floors), nll)
        total = total + nll.sum()
    if margins:
        texts = [e.text_pos for e in margins] + [e.text_neg for e in margins]
        lp, m = token_logprobs(model, *text_batch(tokenizer, texts, device))
        avg = lp.sum(1) / m.sum(1).clamp(min=1)
        n = len(margins)
        total = total - (avg[:n] - avg[n:]).sum()
    return total / max(1, len(examples))


# ---------------------------------------------------------------------------------------------------------------------
# scores
# ---------------------------------------------------------------------------------------------------------------------


def batches(items: Sequence, size: int):
    for s in range(0, len(items), size):
        yield items[s:s + size]
