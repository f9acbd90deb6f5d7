"""Scoring every MLP neuron (layer × intermediate unit) by how much transferring it moves the target toward the donor.

All scorers share one interface — ``score(task, donor, target) -> NeuronScores`` — and stream statistics over batches
(per-neuron running sums; never ``[prompts × tokens × neurons]`` for all layers).

* ``activation_contrast`` — how differently donor and target write to the residual stream through neuron *i*:
  mean over tokens of ``‖a_D,i·w_D,i − a_T,i·w_T,i‖`` (``a``: the neuron's activation, ``w``: its output column) on
  function prompts, minus the same on utility prompts.
* ``attribution`` — the first-order effect of transferring neuron *i*: ``−∇_θ L_f(target)·(θ_D,i − θ_T,i)``, where
  ``L_f`` is the task's function loss on the target (NLL of the donor's own responses, or a bias margin), minus
  ``λ·max(0, ∇_θ L_u·(θ_D,i − θ_T,i))`` for the utility loss ``L_u`` (NLL of the target's own benign answers).
  Forward and backward run under bf16 autocast (weights and gradients stay in the model's dtype): measured on
  smol-safe -> smol-arith, 48 prompts, the top 0.1 / 0.5 / 2% of neurons agree with float32 on 100 / 99.1 / 99.1%
  (score correlation 0.9999) at 1.6x the speed on 2 CPU cores.
* ``iterative`` — attribution, re-scored on the patched target after each transferred chunk.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from .arch import MLPNeurons, check_compatible
from .models import chat_texts, model_device, pad_right


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


def _pair_batch(tokenizer, examples: Sequence[Example], k: int, device):
    ids, labels = [], []
    for ex in examples:
        p = tokenizer(chat_texts(tokenizer, [ex.prompt])[0], add_special_tokens=not tokenizer.chat_template)["input_ids"]
        r = tokenizer(ex.response, add_special_tokens=False)["input_ids"][:k] or [tokenizer.eos_token_id]
        ids.append(p + r)
        labels.append([-100] * len(p) + r)
    return pad_right(ids, tokenizer.pad_token_id, labels, device)


def _text_batch(tokenizer, texts: Sequence[str], device, max_tokens: int = 128):
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    ids = [[bos] + tokenizer(t, add_special_tokens=False)["input_ids"][:max_tokens] for t in texts]
    return pad_right(ids, tokenizer.pad_token_id, [[-100] + i[1:] for i in ids], device)


def _token_logprobs(model, inp, lab, mask):
    logits = model(input_ids=inp, attention_mask=mask).logits[:, :-1].float()
    tgt = lab[:, 1:]
    lp = torch.log_softmax(logits, -1).gather(-1, tgt.clamp(min=0)[..., None]).squeeze(-1)
    return lp * (tgt != -100), (tgt != -100)


def task_loss(model, tokenizer, examples: Sequence[Example], k: int) -> torch.Tensor:
    """Mean loss over ``examples`` (differentiable): NLL of the first ``k`` response tokens, or −margin."""
    device = model_device(model)
    pairs = [e for e in examples if e.prompt is not None]
    margins = [e for e in examples if e.text_pos is not None]
    plain = [e for e in examples if e.text is not None]
    total = torch.zeros((), device=device)
    if plain:
        lp, m = _token_logprobs(model, *_text_batch(tokenizer, [e.text for e in plain], device))
        total = total - (lp.sum(1) / m.sum(1).clamp(min=1)).sum()
    if pairs:
        lp, m = _token_logprobs(model, *_pair_batch(tokenizer, pairs, k, device))
        total = total - (lp.sum(1) / m.sum(1).clamp(min=1)).sum()
    if margins:
        texts = [e.text_pos for e in margins] + [e.text_neg for e in margins]
        lp, m = _token_logprobs(model, *_text_batch(tokenizer, texts, device))
        avg = lp.sum(1) / m.sum(1).clamp(min=1)
        n = len(margins)
        total = total - (avg[:n] - avg[n:]).sum()
    return total / max(1, len(examples))


# ---------------------------------------------------------------------------------------------------------------------
# scores
# ---------------------------------------------------------------------------------------------------------------------

@dataclass
class NeuronScores:
    """Per-neuron scores (higher = transfer first), ``scores[layer]`` of shape ``[intermediate]``."""

    scorer: str
    scores: list[torch.Tensor]
    settings: dict = field(default_factory=dict)
    seconds: float = 0.0

    def flat(self) -> torch.Tensor:
        return torch.cat(self.scores)

    def top(self, k: int, exclude: dict[int, torch.Tensor] | None = None) -> dict[int, torch.Tensor]:
        """The ``k`` best neurons as ``{layer: sorted indices}`` (global ranking across layers; ``exclude`` skipped)."""
        flat = self.flat().clone()
        offsets = [0]
        for s in self.scores:
            offsets.append(offsets[-1] + s.numel())
        if exclude:
            for layer, idx in exclude.items():
                flat[offsets[layer] + idx] = -float("inf")
        k = min(k, int(torch.isfinite(flat).sum()))
        best = torch.topk(flat, k).indices  # topk, not quantile: fine above 2^24 elements
        out: dict[int, list] = {}
        for b in best.tolist():
            layer = next(i for i in range(len(self.scores)) if b < offsets[i + 1])
            out.setdefault(layer, []).append(b - offsets[layer])
        return {layer: torch.tensor(sorted(v)) for layer, v in sorted(out.items())}


def _batches(items: Sequence, size: int):
    for s in range(0, len(items), size):
        yield items[s:s + size]


def _neuron_delta_dot(target_neurons: MLPNeurons, donor_neurons: MLPNeurons, layer: int) -> Callable:
    """Returns f(grads: dict[key, Tensor[I, ...]]) -> Tensor[I]: per-neuron (θ_D − θ_T)·grad."""
    idx = torch.arange(target_neurons.intermediate_size(layer))
    td, dd = target_neurons.read(layer, idx), donor_neurons.read(layer, idx)
    delta = {k: (dd[k].float() - td[k].float()) for k in td}

    def dot(grads):
        return sum((delta[k].to(grads[k].device) * grads[k].float()).reshape(len(idx), -1).sum(1) for k in delta)
    return dot


def _neuron_grads(model, neurons: MLPNeurons, layer: int) -> dict[str, torch.Tensor]:
    idx = torch.arange(neurons.intermediate_size(layer))
    out = {}
    for slot in neurons.slots():
        p = neurons._param(layer, slot)
        if p is None or p.grad is None:
            continue
        off = slot.offset_blocks * neurons.intermediate_size(layer)
        out[slot.key] = p.grad.index_select(slot.dim, idx.to(p.device) + off).movedim(slot.dim, 0)
    return out


def attribution(task: Task, donor, target, tokenizer, *, batch_size: int = 8, progress: bool = True,
                autocast: torch.dtype | None = torch.bfloat16) -> NeuronScores:
    """First-order gain of transferring each neuron, minus a penalty for first-order utility harm (see module doc).
    ``autocast``: the precision of the forward/backward matmuls (``None``: the model's own)."""
    from tqdm.auto import tqdm

    t0 = time.time()
    check_compatible(donor, target)
    nt, nd = MLPNeurons(target), MLPNeurons(donor)
    params = [nt._param(layer, s) for layer in range(nt.n_layers) for s in nt.slots()]
    params = [p for p in params if p is not None]
    req = [p.requires_grad for p in target.parameters()]
    device = model_device(target)
    for p in target.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    try:
        def first_order(examples) -> list[torch.Tensor]:
            """Per layer, per neuron: (θ_D − θ_T)·∇L over ``examples``. Gradients accumulate over batches in the
            parameters' own .grad (one buffer the size of the MLP weights, whatever the number of prompts); each
            layer's slices are reduced to a vector of neuron scores before the next layer is read."""
            for p in params:
                p.grad = None
            chunks = list(_batches(examples, batch_size))
            for chunk in tqdm(chunks, desc=f"attribution ({task.name})", disable=not progress, leave=False):
                with torch.autocast(device.type, dtype=autocast or torch.float32, enabled=autocast is not None):
                    loss = task_loss(target, tokenizer, chunk, task.response_tokens).float() * len(chunk) / len(examples)
                loss.backward()
            return [_neuron_delta_dot(nt, nd, layer)(_neuron_grads(target, nt, layer)) for layer in range(nt.n_layers)]

        gain = [-g for g in first_order(task.function)]
        scores = gain
        if task.utility and task.utility_weight:
            harm = first_order(task.utility)
            scores = [g - task.utility_weight * h.clamp(min=0) for g, h in zip(gain, harm)]
    finally:
        for p in params:
            p.grad = None
        for p, r in zip(target.parameters(), req):
            p.requires_grad_(r)
    return NeuronScores("attribution", [s.detach().cpu() for s in scores],
                        {"task": task.name, "task_digest": task.digest(), "response_tokens": task.response_tokens,
                         "utility_weight": task.utility_weight, "autocast": str(autocast) if autocast else None},
                        round(time.time() - t0, 2))


@torch.no_grad()
def activation_contrast(task: Task, donor, target, tokenizer, *, batch_size: int = 8,
                        progress: bool = True) -> NeuronScores:
    """Mean per-token norm of the difference between donor's and target's writes through each neuron."""
    from tqdm.auto import tqdm

    t0 = time.time()
    check_compatible(donor, target)
    nt, nd = MLPNeurons(target), MLPNeurons(donor)
    L = nt.n_layers
    geo = []
    for layer in range(L):
        idx = torch.arange(nt.intermediate_size(layer))
        wt = nt.read(layer, idx)[nt.slots()[-1].key].float()  # [I, H] output columns
        wd = nd.read(layer, idx)[nd.slots()[-1].key].float()
        geo.append(((wd * wd).sum(1), (wt * wt).sum(1), (wd * wt).sum(1)))

    def mean_contrast(examples) -> list[torch.Tensor]:
        acts: dict[str, dict[int, torch.Tensor]] = {"d": {}, "t": {}}
        sums = [torch.zeros(nt.intermediate_size(i)) for i in range(L)]
        count = 0

        def hook(which, layer):
            def f(module, args):
                acts[which][layer] = args[0].detach().float()
            return f

        handles = [n.mlp_output_module(layer).register_forward_pre_hook(hook(w, layer))
                   for w, n in (("d", nd), ("t", nt)) for layer in range(L)]
        try:
            for chunk in tqdm(list(_batches(examples, batch_size)), desc=f"contrast ({task.name})",
                              disable=not progress, leave=False):
                device = model_device(target)
                pairs = [e for e in chunk if e.prompt is not None]
                texts = [t for e in chunk if e.text_pos is not None for t in (e.text_pos, e.text_neg)]
                texts += [e.text for e in chunk if e.text is not None]
                batches = []
                if pairs:
                    batches.append(_pair_batch(tokenizer, pairs, task.response_tokens, device))
                if texts:
                    batches.append(_text_batch(tokenizer, texts, device))
                for inp, _, mask in batches:
                    donor(input_ids=inp.to(model_device(donor)), attention_mask=mask.to(model_device(donor)))
                    target(input_ids=inp, attention_mask=mask)
                    m = mask.bool()
                    for layer in range(L):
                        a_d, a_t = acts["d"][layer][m], acts["t"][layer][m]  # [tokens, I]
                        dd, tt, dt = (g.to(a_d.device) for g in geo[layer])
                        sq = a_d ** 2 * dd + a_t ** 2 * tt - 2 * a_d * a_t * dt
                        sums[layer] += sq.clamp(min=0).sqrt().sum(0).cpu()
                    count += int(m.sum())
        finally:
            for h in handles:
                h.remove()
        return [s / max(count, 1) for s in sums]

    f = mean_contrast(task.function)
    u = mean_contrast(task.utility) if task.utility else [torch.zeros_like(x) for x in f]
    scores = [a - task.utility_weight * b for a, b in zip(f, u)]
    return NeuronScores("activation_contrast", scores, {"task": task.name, "task_digest": task.digest(),
                                                        "utility_weight": task.utility_weight},
                        round(time.time() - t0, 2))


def iterative(task: Task, donor, target, tokenizer, *, budget: int, rounds: int = 4, batch_size: int = 8,
              progress: bool = True) -> NeuronScores:
    """Attribution re-scored on the patched target: ``rounds`` chunks of ``budget/rounds`` neurons each. The
    returned scores rank chosen neurons first (by round), then the rest by the last round's attribution."""
    from .transfer import NeuronPatch

    t0 = time.time()
    chosen: dict[int, torch.Tensor] = {}
    rank_bonus: list[torch.Tensor] | None = None
    patches = []
    last = None
    per_round = max(1, budget // rounds)
    try:
        for r in range(rounds):
            last = attribution(task, donor, target, tokenizer, batch_size=batch_size, progress=progress)
            pick = last.top(per_round, exclude=chosen)
            patch = NeuronPatch.extract(donor, target, pick)
            patch.apply(target)
            patches.append(patch)
            if rank_bonus is None:
                rank_bonus = [torch.zeros_like(s) for s in last.scores]
            for layer, idx in pick.items():
                rank_bonus[layer][idx] = float(rounds - r)
                chosen[layer] = torch.cat([chosen.get(layer, torch.empty(0, dtype=torch.long)), idx])
    finally:
        for p in reversed(patches):
            p.revert(target)
    span = max(float(torch.cat([s.abs() for s in last.scores]).max()), 1.0)
    scores = [s / (2 * span) + b for s, b in zip(last.scores, rank_bonus)]  # chosen (bonus >= 1) rank above the rest
    return NeuronScores("iterative", scores, {**last.settings, "rounds": rounds, "budget": budget},
                        round(time.time() - t0, 2))


SCORERS: dict[str, Callable[..., NeuronScores]] = {
    "attribution": attribution,
    "activation_contrast": activation_contrast,
    "iterative": iterative,
}


def locate(scorer: str, task: Task, donor, target, tokenizer, **kwargs) -> NeuronScores:
    """Score every MLP neuron with the named scorer (one of :data:`SCORERS`)."""
    try:
        fn = SCORERS[scorer]
    except KeyError:
        raise ValueError(f"unknown scorer {scorer!r}; scorers: {', '.join(SCORERS)}") from None
    return fn(task, donor, target, tokenizer, **kwargs)
