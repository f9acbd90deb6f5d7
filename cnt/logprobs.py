"""Log-probabilities of chosen tokens without the ``[positions, vocabulary]`` logits.

A causal LM's logits are its output head applied to its decoder's last hidden states; for a 262k-token vocabulary
(Gemma 3) a batch of eight 256-token passages makes 2 GiB of them before any log-softmax. Here the head is applied
only to the positions that are scored, a slice of the vocabulary at a time, with an online log-sum-exp; the
backward pass recomputes each slice. One function serves every reader of token log-probabilities: the task losses
that locate neurons (:mod:`cnt.tasks`), perplexity and the sentence scores of StereoSet and CrowS-Pairs
(:mod:`cnt.evaluate`), and the SFT reference's losses (:mod:`cnt.train`).
"""

from __future__ import annotations

import functools
import inspect

import torch
from torch.utils.checkpoint import checkpoint

from .arch import output_head

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
