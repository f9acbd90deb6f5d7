"""What "the function" is, as differentiable losses on a model: chat pairs (NLL of the first response tokens), margins
between two texts, plain texts. Every locator scores units against a :class:`Task`."""

from __future__ import annotations

import functools
import hashlib
import inspect
import json
from dataclasses import dataclass, field
from typing import Sequence

import torch
from torch.utils.checkpoint import checkpoint

from .arch import output_head
from .models import chat_texts, model_device, pad_right, release_freed_memory


# ---------------------------------------------------------------------------------------------------------------------
# tasks: what "the function" is, as differentiable losses on the target
# ---------------------------------------------------------------------------------------------------------------------

@dataclass
class Example:
    """A chat pair (loss: NLL of the first ``k`` response tokens), a contrast of two texts (loss: −margin), or a plain
    text (loss: mean token NLL)."""

    prompt: str | None = None
    response: str | None = None
    text_pos: str | None = None  # for margins: log p(text_pos) − log p(text_neg)
    text_neg: str | None = None
    text: str | None = None


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

    def digest(self) -> str:
        blob = json.dumps([[e.__dict__ for e in self.function], [e.__dict__ for e in self.utility],
                           self.response_tokens], sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


PAD_MULTIPLE = 32  # batches padded to a multiple of 32 tokens (see pair_batch)


def pair_batch(tokenizer, examples: Sequence[Example], k: int, device):
    ids, labels = [], []
    for ex in examples:
        p = tokenizer(chat_texts(tokenizer, [ex.prompt])[0], add_special_tokens=not tokenizer.chat_template)["input_ids"]
        r = tokenizer(ex.response, add_special_tokens=False)["input_ids"][:k] or [tokenizer.eos_token_id]
        ids.append(p + r)
        labels.append([-100] * len(p) + r)
    return pad_right(ids, tokenizer.pad_token_id, labels, device, PAD_MULTIPLE)


def text_batch(tokenizer, texts: Sequence[str], device, max_tokens: int = 128):
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    ids = [[bos] + tokenizer(t, add_special_tokens=False)["input_ids"][:max_tokens] for t in texts]
    return pad_right(ids, tokenizer.pad_token_id, [[-100] + i[1:] for i in ids], device, PAD_MULTIPLE)


LOGSOFTMAX_ROWS = 64  # labelled positions per float32 log-softmax chunk (recomputed in the backward pass)
VOCAB_CHUNK = 2048  # rows of the output head per matrix product in head_logprobs: its transient (papers/METHOD.md)


def _label_logprob(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return torch.log_softmax(logits.float(), -1).gather(-1, labels[:, None]).squeeze(-1)


@functools.cache
def _takes_logits_to_keep(model_class) -> bool:
    """Whether this model class's forward can return logits for chosen positions only (read once per class)."""
    return "logits_to_keep" in inspect.signature(model_class.forward).parameters


def _vocab_slices(weight: torch.Tensor, labels: torch.Tensor, dtype: torch.dtype):
    """Each ``VOCAB_CHUNK``-row slice of the head: its first row, its rows in ``dtype``, which labels fall in it, and
    their columns within it."""
    for s in range(0, len(weight), VOCAB_CHUNK):
        w = weight[s:s + VOCAB_CHUNK].to(dtype)
        inside = (labels >= s) & (labels < s + len(w))
        yield s, w, inside, labels[inside] - s


class _HeadLogprob(torch.autograd.Function):
    """``log softmax(hidden @ weightᵀ)[label]`` per row, the vocabulary ``VOCAB_CHUNK`` rows of ``weight`` at a time
    (an online log-sum-exp), the products in ``dtype``; the backward pass recomputes each slice's logits. Neither pass
    holds ``rows × vocabulary`` logits or a ``dtype`` copy of the whole head."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, dtype):
        h = hidden.to(dtype)
        lse = torch.full((len(h),), -float("inf"), device=h.device)
        picked = torch.zeros(len(h), device=h.device)
        for _, w, inside, cols in _vocab_slices(weight, labels, dtype):
            z = (h @ w.T).float()
            lse = torch.logaddexp(lse, torch.logsumexp(z, -1))
            picked[inside] = z[inside, cols]
        ctx.save_for_backward(hidden, weight, labels, lse)
        ctx.dtype = dtype
        return picked - lse

    @staticmethod
    def backward(ctx, grad):
        hidden, weight, labels, lse = ctx.saved_tensors
        need_h, need_w = ctx.needs_input_grad[:2]
        h = hidden.to(ctx.dtype)
        grad_h = torch.zeros(hidden.shape, device=hidden.device) if need_h else None
        grad_w = torch.zeros_like(weight) if need_w else None
        for s, w, inside, cols in _vocab_slices(weight, labels, ctx.dtype):
            dz = -((h @ w.T).float() - lse[:, None]).exp() * grad[:, None]  # d(picked − lse)/dz = onehot − softmax
            dz[inside, cols] += grad[inside]
            dz = dz.to(ctx.dtype)
            if need_h:
                grad_h += (dz @ w).float()
            if need_w:
                grad_w[s:s + len(w)] = (dz.T @ h).to(weight.dtype)
        return grad_h.to(hidden.dtype) if need_h else None, grad_w, None, None


def head_logprobs(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``log softmax(hidden @ weightᵀ)[label]`` for each row of ``hidden`` (``[n, d]``; ``weight`` the output head,
    ``[vocabulary, d]``), in float32, the products in autocast's precision where it is on (as the model's own head
    would be) — without ever holding the ``[n, vocabulary]`` logits (:class:`_HeadLogprob`). Differentiable in
    ``hidden`` and ``weight``; equal to the whole log-softmax up to float rounding (tested)."""
    device = hidden.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else hidden.dtype
    with torch.autocast(device, enabled=False):
        return _HeadLogprob.apply(hidden, weight, labels, dtype)


def token_logprobs(model, inp, lab, mask):
    """Log-probability of each labelled next token (0 elsewhere) and the label mask, ``[batch, positions - 1]``.

    Only the labelled positions reach the vocabulary (a chat pair's few response tokens, not its whole prompt). Where
    the model's logits are its output head applied to its decoder's last hidden states (:func:`cnt.arch.output_head`),
    the head is applied here to those positions a slice of the vocabulary at a time (:func:`head_logprobs`), so
    neither pass holds ``positions × vocabulary`` logits or a bf16 copy of the head (SmolLM2's is 49k × 576). Else the
    model is asked for those positions' logits (``logits_to_keep`` as a boolean mask, where its forward takes it) and
    the float32 log-softmax runs ``LOGSOFTMAX_ROWS`` positions at a time under activation checkpointing. Both equal
    the whole softmax at once (tested)."""
    tgt = lab[:, 1:]
    keep = tgt != -100
    labels = tgt[keep]
    found = output_head(model)
    if found is not None:
        decoder, head = found
        hidden = decoder(input_ids=inp, attention_mask=mask, use_cache=False).last_hidden_state[:, :-1][keep]
        picked = head_logprobs(hidden, head.weight, labels)
    else:
        if _takes_logits_to_keep(type(model)):
            rows = torch.zeros_like(lab, dtype=torch.bool)
            rows[:, :-1] = keep  # position p predicts token p + 1
            logits = model(input_ids=inp, attention_mask=mask, use_cache=False, logits_to_keep=rows).logits
        else:
            logits = model(input_ids=inp, attention_mask=mask, use_cache=False).logits[:, :-1][keep]
        chunks = list(zip(logits.split(LOGSOFTMAX_ROWS), labels.split(LOGSOFTMAX_ROWS)))  # one backward node
        if torch.is_grad_enabled() and logits.requires_grad:
            parts = [checkpoint(_label_logprob, x, y, use_reentrant=False) for x, y in chunks]
        else:
            parts = [_label_logprob(x, y) for x, y in chunks]
        picked = torch.cat(parts) if parts else logits.new_zeros(0, dtype=torch.float32)
    lp = torch.zeros(tgt.shape, dtype=picked.dtype, device=picked.device).index_put((keep,), picked)
    return lp, keep


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


def task_loss(model, tokenizer, examples: Sequence[Example], k: int) -> torch.Tensor:
    """Mean loss over ``examples`` (differentiable): NLL of the first ``k`` response tokens, or −margin."""
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
        total = total - (lp.sum(1) / m.sum(1).clamp(min=1)).sum()
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
