"""Supervised fine-tuning on CPU or GPU: LoRA (peft, merged afterwards) or full fine-tuning.

Used to build the zoo's donors and targets and by the SFT reference baseline. Examples are chat pairs
(``{"prompt", "response"}``: loss on the response tokens only, prompt in the tokenizer's chat template), plain text
(``{"text"}``: loss on every token after BOS) or preferences (``{"chosen", "rejected"}``: a pairwise logistic loss
``-log sigmoid(beta * (lp(chosen) - lp(rejected)))`` on mean token log-probabilities — of BOS-conditioned sentences, the
very quantity StereoSet and CrowS-Pairs compare, or, with a ``"prompt"``, of two responses to it in the chat template:
a reference-free, length-normalized preference loss in the manner of SimPO, Meng et al. 2024). A batch may mix kinds;
each kind's mean loss is weighted by its share of the batch. Training is seeded and deterministic on CPU.
"""

from __future__ import annotations

import random
import time
from dataclasses import asdict, dataclass, field
from typing import Sequence

import torch

from .logprobs import token_logprobs
from .models import chat_texts, model_device, pad_right

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class TrainConfig:
    method: str = "lora"  # "lora" (merged into the weights afterwards) or "full"
    steps: int = 150
    batch_size: int = 8
    lr: float = 2e-4
    max_tokens: int = 96  # prompt + response, truncated
    lora_r: int = 8
    lora_alpha: int = 16
    lora_targets: tuple[str, ...] = LORA_TARGETS
    weight_decay: float = 0.0
    warmup: int = 10
    seed: int = 0
    train_embeddings: bool = False  # full fine-tuning: also the (tied) embeddings
    beta: float = 5.0  # preference pairs: logistic scale on the mean-token log-probability difference
    # "bf16": forward passes under torch.autocast in bfloat16 (weights, gradients and optimizer state stay fp32; losses
    # are computed from fp32 logits; about twice as fast where bf16 is native, see README). None: fp32 throughout.
    autocast: str | None = None

    def to_dict(self) -> dict:
        d = asdict(self)
        if d["autocast"] is None:  # recipes written before the option keep their keys (and cached builds)
            del d["autocast"]
        return d


@dataclass
class TrainResult:
    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0
    trainable_params: int = 0
    adapter: dict | None = None  # LoRA: the adapter's state dict (before merging), for small artifacts


def _tokenize(tokenizer, ex: dict, max_tokens: int) -> tuple[list[int], list[int]]:
    if "text" in ex:
        bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        ids = [bos] + tokenizer(ex["text"], add_special_tokens=False)["input_ids"]
        ids = ids[:max_tokens]
        return ids, [-100] + ids[1:]
    prompt = chat_texts(tokenizer, [ex["prompt"]])[0]
    p_ids = tokenizer(prompt, add_special_tokens=not tokenizer.chat_template)["input_ids"]
    r_ids = tokenizer(ex["response"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    ids = (p_ids + r_ids)[:max_tokens]
    labels = ([-100] * len(p_ids) + r_ids)[:max_tokens]
    return ids, labels


def _batch(tokenizer, examples: Sequence[dict], max_tokens: int, device) -> dict:
    pairs = [_tokenize(tokenizer, ex, max_tokens) for ex in examples]
    ids, labels, mask = pad_right([i for i, _ in pairs], tokenizer.pad_token_id, [lab for _, lab in pairs], device)
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def _mean_logprob(net, batch: dict) -> torch.Tensor:
    """Per-sequence mean log-probability of the labelled tokens (:func:`cnt.logprobs.token_logprobs`: without the
    batch's ``[positions, vocabulary]`` logits)."""
    lp, keep = token_logprobs(net, batch["input_ids"], batch["labels"], batch["attention_mask"])
    return lp.sum(-1) / keep.sum(-1).clamp(min=1)


def _mean_nll(net, batch: dict) -> torch.Tensor:
    """Mean negative log-probability over every labelled token of the batch (a causal LM's own loss)."""
    lp, keep = token_logprobs(net, batch["input_ids"], batch["labels"], batch["attention_mask"])
    return -lp.sum() / keep.sum().clamp(min=1)


def _sides(prefs: Sequence[dict]) -> list[dict]:
    """The chosen sides, then the rejected ones: sentences, or responses to the pair's prompt."""
    return [{"prompt": ex["prompt"], "response": ex[k]} if "prompt" in ex else {"text": ex[k]}
            for k in ("chosen", "rejected") for ex in prefs]


def _loss(net, tokenizer, examples: Sequence[dict], config: "TrainConfig", device) -> torch.Tensor:
    plain = [ex for ex in examples if "chosen" not in ex]
    prefs = [ex for ex in examples if "chosen" in ex]
    loss = torch.zeros((), device=device)
    if plain:
        loss = loss + _mean_nll(net, _batch(tokenizer, plain, config.max_tokens, device)) * (len(plain) / len(examples))
    if prefs:
        lp = _mean_logprob(net, _batch(tokenizer, _sides(prefs), config.max_tokens, device))
        margin = lp[:len(prefs)] - lp[len(prefs):]
        loss = loss + torch.nn.functional.softplus(-config.beta * margin).mean() * (len(prefs) / len(examples))
    return loss


def sft(model, tokenizer, examples: Sequence[dict], config: TrainConfig = TrainConfig(), progress: bool = True):
    """Fine-tune ``model`` in place on ``examples``; returns ``(model, TrainResult)``.

    LoRA adapters are merged into the weights before returning (the model is a plain model again); the adapter's own
    tensors are kept in ``TrainResult.adapter``.
    """
    from tqdm.auto import tqdm

    if not examples:
        raise ValueError("sft needs at least one example")
    if config.method not in ("lora", "full"):
        raise ValueError(f"unknown training method {config.method!r}; use 'lora' or 'full'")
    if config.autocast not in (None, "bf16"):
        raise ValueError(f"unknown autocast {config.autocast!r}; use 'bf16' or None (fp32)")
    torch.manual_seed(config.seed)
    rng = random.Random(config.seed)
    device = model_device(model)
    t0 = time.time()
    model.train()
    if config.method == "lora":
        from peft import LoraConfig, get_peft_model

        present = {n.split(".")[-1] for n, _ in model.named_modules()}
        targets = [t for t in config.lora_targets if t in present]
        if not targets:
            raise ValueError(f"none of the LoRA targets {config.lora_targets} exist in this model")
        peft_model = get_peft_model(model, LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=0.0,
                                                      target_modules=targets, bias="none"))
        trainable = [p for p in peft_model.parameters() if p.requires_grad]
        net = peft_model.get_base_model()  # the model itself, its adapters injected and active
    else:
        emb = {id(model.get_input_embeddings().weight)}
        if model.get_output_embeddings() is not None:
            emb.add(id(model.get_output_embeddings().weight))
        for p in model.parameters():
            p.requires_grad_(config.train_embeddings or id(p) not in emb)
        trainable = [p for p in model.parameters() if p.requires_grad]
        net = model
    opt = torch.optim.AdamW(trainable, lr=config.lr, weight_decay=config.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / max(1, config.warmup)) * max(0.0, 1 - s / max(1, config.steps)))
    order: list[int] = []
    result = TrainResult(trainable_params=sum(p.numel() for p in trainable))
    for _ in tqdm(range(config.steps), desc=f"sft ({config.method})", disable=not progress, leave=False):
        if len(order) < config.batch_size:
            epoch = list(range(len(examples)))
            rng.shuffle(epoch)
            order += epoch
        idx, order = order[:config.batch_size], order[config.batch_size:]
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=config.autocast == "bf16"):
            loss = _loss(net, tokenizer, [examples[i] for i in idx], config, device)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        result.losses.append(float(loss.detach()))
    if config.method == "lora":
        result.adapter = {k: v.detach().clone() for k, v in peft_model.state_dict().items() if "lora_" in k}
        model = peft_model.merge_and_unload()
    for p in model.parameters():
        p.requires_grad_(False)
    model.eval()
    result.seconds = round(time.time() - t0, 1)
    return model, result
