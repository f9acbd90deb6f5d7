"""The refusal direction (Arditi et al. 2024, "Refusal in language models is mediated by a single direction").

The difference of mean residual-stream activations on harmful vs benign prompts, at one layer and one post-instruction
token position, is a direction ``r``. Projecting ``r`` out of every residual-stream write (directional ablation; baked
into the weights as *orthogonalization*: ``W ← W − r rᵀ W``) removes refusal — the common community "abliteration"
recipe — and adding ``α·r`` at its layer induces it. As in the paper, the means are taken over the harmful prompts the
model refuses and the benign prompts it does not (by the first-token refusal proxy): on Qwen2.5-Coder-0.5B, which
refuses about half of the harmful train prompts, the unfiltered difference of means removed no refusal at any candidate
(measured: 38–69% generation refusal on 32 validation prompts against 53% unablated), the filtered one brings it to 6%.
The candidate (layer, position) is chosen on the *validation* split: the one whose ablation lowers the first-token
refusal score on harmful prompts most, while keeping the next-token distribution on benign prompts close (KL below a
threshold), as in the paper's selection rule.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from typing import Sequence

import torch

from .arch import MLPNeurons
from .evaluate import refusal_logodds
from .models import chat_texts, encode, fast_dtype, model_device, position_ids


@torch.no_grad()
def mean_activations(model, tokenizer, prompts: Sequence[str], positions: Sequence[int] = (-1, -2, -3, -4, -5),
                     batch_size: int = 16) -> torch.Tensor:
    """Mean residual stream over prompts: ``[n_layers + 1, len(positions), hidden]`` (float32; index 0 = embeddings)
    at the given (negative) token positions of the chat-formatted prompt (left padding aligns them)."""
    device = model_device(model)
    texts = chat_texts(tokenizer, prompts)
    total = None
    for s in range(0, len(texts), batch_size):
        enc = encode(tokenizer, texts[s:s + batch_size], device=device)
        hs = model(**enc, position_ids=position_ids(enc["attention_mask"]), output_hidden_states=True).hidden_states
        stacked = torch.stack([h[:, list(positions)].float().sum(0) for h in hs])  # [L+1, P, H]
        total = stacked if total is None else total + stacked
    return total / len(texts)


@contextlib.contextmanager
def ablation_hooks(model, direction: torch.Tensor):
    """Directional ablation at inference: remove the ``direction`` component from every residual-stream write."""
    r = (direction / direction.norm()).float()
    handles = []

    def hook(module, args, output):
        out = output[0] if isinstance(output, tuple) else output
        rr = r.to(out.device, out.dtype)
        new = out - (out @ rr)[..., None] * rr
        return (new, *output[1:]) if isinstance(output, tuple) else new

    for _, mod, _ in MLPNeurons(model).residual_writers():
        handles.append(mod.register_forward_hook(hook))
    try:
        yield model
    finally:
        for h in handles:
            h.remove()


@contextlib.contextmanager
def addition_hooks(model, direction: torch.Tensor, layer: int, alpha: float = 1.0):
    """Activation addition at inference: add ``alpha * direction`` to the residual stream entering ``layer``."""
    v = (alpha * direction).float()
    block = MLPNeurons(model).layers[layer]

    def pre_hook(module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        hidden = hidden + v.to(hidden.device, hidden.dtype)
        if args:
            return (hidden, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": hidden}

    h = block.register_forward_pre_hook(pre_hook, with_kwargs=True)
    try:
        yield model
    finally:
        h.remove()


@torch.no_grad()
def orthogonalize(model, direction: torch.Tensor) -> int:
    """Bake directional ablation into the weights (in place). Returns the number of parameters changed."""
    r = (direction / direction.norm()).float()
    changed = 0
    seen = set()
    for _, mod, axis in MLPNeurons(model).residual_writers():
        w = mod.weight
        if id(w) in seen:
            continue
        seen.add(id(w))
        rr = r.to(w.device)
        wf = w.float()
        if axis == 0:  # [hidden, in]: W <- W - r (r^T W)
            new = wf - torch.outer(rr, rr @ wf)
        else:  # [*, hidden]: rows are residual vectors
            new = wf - torch.outer(wf @ rr, rr)
        w.copy_(new.to(w.dtype))
        changed += w.numel()
        b = getattr(mod, "bias", None)
        if b is not None and axis == 0:
            b.copy_((b.float() - (b.float() @ rr) * rr).to(b.dtype))
            changed += b.numel()
    return changed


@torch.no_grad()
def next_token_kl(model, tokenizer, prompts: Sequence[str], reference: torch.Tensor, batch_size: int = 16) -> float:
    """Mean KL(reference ‖ model) of the first response token's distribution over ``prompts``."""
    from .models import last_token_logits

    logp = torch.log_softmax(last_token_logits(model, tokenizer, chat_texts(tokenizer, prompts), batch_size), -1)
    ref = torch.log_softmax(reference, -1)
    return float((ref.exp() * (ref - logp)).sum(-1).mean())


@dataclass
class DirectionChoice:
    direction: torch.Tensor
    layer: int  # residual stream index: 0 = embeddings, i = output of block i-1
    position: int
    harmful_score: float  # mean refusal log-odds on harmful validation prompts after ablation
    benign_kl: float
    baseline_score: float
    candidates: list[dict] = field(default_factory=list)
    n_means: dict = field(default_factory=dict)  # prompts behind each mean, after the refusal filter
    seconds: float = 0.0


def select_direction(model, tokenizer, harmful_train: Sequence[str], benign_train: Sequence[str],
                     harmful_val: Sequence[str], benign_val: Sequence[str], positions: Sequence[int] = (-1, -2, -3, -4,
                                                                                                          -5),
                     layer_range: tuple[float, float] = (0.2, 0.8), layer_stride: int = 1, max_kl: float = 0.1,
                     dtype: torch.dtype | str | None = "auto", filter_refusals: bool = True,
                     min_prompts: int = 8, progress: bool = True) -> DirectionChoice:
    """Difference-of-means candidates on the train prompts; pick one on the validation prompts (see module doc).
    ``filter_refusals``: keep only the harmful train prompts with refusal log-odds > 0 and the benign ones with ≤ 0
    (a side left with fewer than ``min_prompts`` is kept whole). ``dtype``: the precision of every forward pass here (on
    a copy; bf16 is ~2x faster on CPU, as the evaluation suite runs); the direction is returned in float32."""
    from .models import inference_dtype

    if dtype == "auto":
        dtype = fast_dtype(model_device(model))
    with inference_dtype(model, dtype) as fast:
        return _select_direction(fast, tokenizer, harmful_train, benign_train, harmful_val, benign_val, positions,
                                 layer_range, layer_stride, max_kl, filter_refusals, min_prompts, progress)


def filter_by_refusal(model, tokenizer, harmful: Sequence[str], benign: Sequence[str],
                      min_prompts: int = 8) -> tuple[list[str], list[str]]:
    """The harmful prompts the model refuses and the benign ones it answers (first-token proxy); a side with fewer
    than ``min_prompts`` left is returned whole."""
    lo_h, lo_b = refusal_logodds(model, tokenizer, harmful), refusal_logodds(model, tokenizer, benign)
    h = [p for p, lo in zip(harmful, lo_h) if lo > 0]
    b = [p for p, lo in zip(benign, lo_b) if lo <= 0]
    return (h if len(h) >= min_prompts else list(harmful)), (b if len(b) >= min_prompts else list(benign))


def _select_direction(model, tokenizer, harmful_train, benign_train, harmful_val, benign_val, positions, layer_range,
                      layer_stride, max_kl, filter_refusals, min_prompts, progress) -> DirectionChoice:
    from tqdm.auto import tqdm

    from .models import last_token_logits

    t0 = time.time()
    if filter_refusals:
        harmful_train, benign_train = filter_by_refusal(model, tokenizer, harmful_train, benign_train, min_prompts)
    mu_h = mean_activations(model, tokenizer, harmful_train, positions)
    mu_b = mean_activations(model, tokenizer, benign_train, positions)
    diffs = mu_h - mu_b  # [L+1, P, H]
    n_layers = diffs.shape[0] - 1
    layers = list(range(max(1, int(layer_range[0] * n_layers)), int(layer_range[1] * n_layers) + 1, layer_stride))
    base_score = float(refusal_logodds(model, tokenizer, harmful_val).mean())
    ref_logits = last_token_logits(model, tokenizer, chat_texts(tokenizer, benign_val))
    cands = []
    grid = [(layer, pi) for layer in layers for pi in range(len(positions))]
    for layer, pi in tqdm(grid, desc="refusal direction", disable=not progress, leave=False):
        r = diffs[layer, pi]
        with ablation_hooks(model, r):
            score = float(refusal_logodds(model, tokenizer, harmful_val).mean())
            kl = next_token_kl(model, tokenizer, benign_val, ref_logits)
        cands.append({"layer": layer, "position": positions[pi], "harmful_score": score, "benign_kl": kl})
    ok = [c for c in cands if c["benign_kl"] <= max_kl] or cands
    best = min(ok, key=lambda c: c["harmful_score"])
    r = diffs[best["layer"], list(positions).index(best["position"])]
    return DirectionChoice(r, best["layer"], best["position"], best["harmful_score"], best["benign_kl"], base_score,
                           cands, n_means={"harmful": len(harmful_train), "benign": len(benign_train)},
                           seconds=round(time.time() - t0, 1))
