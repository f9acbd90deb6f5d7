"""Evaluation profiles (how many items of what, which split) and the one-call suite :func:`evaluate`."""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import Sequence

import torch

from .. import data
from ..models import fast_dtype, inference_dtype, model_device
from .judge import is_degenerate, refusal_rate
from .lm_eval_adapter import lm_eval_tasks
from .metrics import arithmetic_accuracy, crows_pairs, perplexity, proxy_agreement, refusal_score, stereoset
from .records import EvalReport, Metric, proportion


@dataclass(frozen=True)
class Profile:
    """Sizes of each evaluation (records taken from the ``split`` of each dataset in fixed hash order; ``None``: every
    record of the split)."""

    name: str
    harmful: int | None
    benign: int | None
    overrefusal: int | None
    mmlu: int
    nq_open: int
    piqa: int
    wiki: int | None
    stereoset: int | None
    crows_pairs: int | None
    arithmetic: int | None
    split: str = "eval"
    max_new_tokens: int = 48
    batch_size: int = 32
    ppl_max_tokens: int = 256
    nq_fewshot: int = 0


PROFILES = {
    # experiments' sweeps (dozens of evaluations per application): short generations (the keyword judge decides within
    # the first sentence), no PIQA, 3-shot NQ-Open (0-shot exact match is 0% for a 135M model: no signal)
    "quick": Profile("quick", harmful=48, benign=24, overrefusal=8, mmlu=32, nq_open=32, piqa=0, wiki=24,
                     stereoset=160, crows_pairs=48, arithmetic=32, max_new_tokens=20, ppl_max_tokens=128,
                     nq_fewshot=3, batch_size=48),
    # the zoo card and headline numbers
    "full": Profile("full", harmful=200, benign=120, overrefusal=43, mmlu=700, nq_open=447, piqa=381, wiki=200,
                    stereoset=507, crows_pairs=273, arithmetic=200),
    # tuning a zoo recipe on the validation + locate splits (`cnt zoo try`): every safety prompt of the split — the
    # full profile's 120 benign prompts leave a ±5-point CI on false refusal, too coarse to choose between recipes
    "tune": Profile("tune", harmful=None, benign=None, overrefusal=None, mmlu=700, nq_open=447, piqa=381, wiki=200,
                    stereoset=507, crows_pairs=273, arithmetic=200),
    # a batch of sweeps on 2 CPU cores: the function metric at its quick size, perplexity as the only utility metric
    "sweep": Profile("sweep", harmful=48, benign=16, overrefusal=8, mmlu=0, nq_open=0, piqa=0, wiki=24,
                     stereoset=160, crows_pairs=0, arithmetic=24, max_new_tokens=20, ppl_max_tokens=128,
                     batch_size=48),
    # the sparsity frontier (dozens of points): the sweep's function metric, with enough benign prompts (120, a fifth
    # over-refusal probes) and additions (48) that one answer moves false refusal or the skill by under 1 / 2 points
    # — the sweep's 24 prompts resolve 4 points, too coarse for the +5-point goal
    "frontier": Profile("frontier", harmful=48, benign=96, overrefusal=24, mmlu=0, nq_open=0, piqa=0, wiki=24,
                        stereoset=160, crows_pairs=0, arithmetic=48, max_new_tokens=20, ppl_max_tokens=128,
                        batch_size=48),
    # the second stage of an application run: every *reported* setting (chosen on the validation proxies) on the whole
    # eval split of its function — every harmful and over-refusal prompt, 200 benign ones, every StereoSet item, 200
    # Wikipedia passages, 200 additions — with 32-token answers (the judge's window is read within them). Refusal CIs
    # at the split's 412 harmful prompts: at most ±4.8 points
    "report": Profile("report", harmful=None, benign=200, overrefusal=None, mmlu=0, nq_open=0, piqa=0, wiki=200,
                      stereoset=None, crows_pairs=0, arithmetic=200, max_new_tokens=32, ppl_max_tokens=128,
                      batch_size=48),
    # notebooks under nbval / CI: every code path, a few records each
    "smoke": Profile("smoke", harmful=12, benign=8, overrefusal=4, mmlu=12, nq_open=8, piqa=0, wiki=6,
                     stereoset=24, crows_pairs=12, arithmetic=6, max_new_tokens=12, ppl_max_tokens=64),
}

METRIC_GROUPS = ("safety", "proxy", "utility", "perplexity", "bias", "skill")


def get_profile(profile: str | Profile) -> Profile:
    if isinstance(profile, Profile):
        return profile
    try:
        return PROFILES[profile]
    except KeyError:
        raise ValueError(f"unknown evaluation profile {profile!r}; profiles: {', '.join(PROFILES)}") from None


# which datasets each generated safety metric reads, in the order of its per-item values
_SAFETY_ITEMS = {"refusal_rate": ("harmful",), "false_refusal_benign": ("benign",),
                 "false_refusal_overrefusal": ("overrefusal",), "false_refusal_rate": ("benign", "overrefusal")}


def item_sources(profile: str | Profile, metric: str, *, seed: int = 0) -> list[str]:
    """The source dataset of each item of ``metric``'s ``per_item`` list, in order, as :func:`evaluate` draws them
    (e.g. ``refusal_rate``: advbench / harmbench / donotanswer; ``false_refusal_rate``: nq_questions / rho_benign /
    overrefusal). Only the prompts' origin is read, no outcome: it lets a tuning measurement be re-weighted to another
    split's composition."""
    p = get_profile(profile)
    if metric not in _SAFETY_ITEMS:
        raise ValueError(f"no per-item sources for {metric!r}; known: {', '.join(_SAFETY_ITEMS)}")
    return [r.get("source", ds) for ds in _SAFETY_ITEMS[metric]
            for r in data.load(ds, p.split, seed=seed, limit=getattr(p, ds))]





def evaluate(model, tokenizer, profile: str | Profile = "quick", *, groups: Sequence[str] = METRIC_GROUPS,
             name: str = "model", seed: int = 0, dtype: torch.dtype | str | None = "auto",
             progress: bool = True) -> EvalReport:
    """Run the suite on the ``eval`` split (or the profile's split) and return an :class:`EvalReport`.

    ``groups``: any of ``safety`` (refusal and false refusal by generation), ``proxy`` (first-token refusal score and
    its agreement with the judge), ``utility`` (lm-eval MMLU, NQ-Open, PIQA), ``perplexity``, ``bias`` (StereoSet,
    CrowS-Pairs), ``skill`` (three-digit addition). ``dtype``: inference precision (``"auto"``: bf16 where the
    hardware has it natively, else float32 — :func:`cnt.models.fast_dtype`; ``None`` keeps the model's own).
    """
    p = get_profile(profile)
    unknown = set(groups) - set(METRIC_GROUPS)
    if unknown:
        raise ValueError(f"unknown metric groups {sorted(unknown)}; groups: {', '.join(METRIC_GROUPS)}")
    if isinstance(dtype, str):
        dtype = fast_dtype(model_device(model)) if dtype == "auto" else \
            {"bfloat16": torch.bfloat16, "float32": torch.float32}[dtype]
    t0 = time.time()
    load = lambda ds, n: data.load(ds, p.split, seed=seed, limit=n)  # noqa: E731
    st = {"split": p.split, "seed": seed}
    metrics: dict[str, Metric] = {}
    with inference_dtype(model, dtype) as model:
        if "safety" in groups or "proxy" in groups:
            harmful = data.texts(load("harmful", p.harmful))
            benign = data.texts(load("benign", p.benign))
            over = data.texts(load("overrefusal", p.overrefusal))
        if "safety" in groups:
            kw = dict(max_new_tokens=p.max_new_tokens, batch_size=p.batch_size, progress=progress)
            metrics["refusal_rate"] = refusal_rate(model, tokenizer, harmful, name="refusal_rate",
                                                   settings={**st, "dataset": "harmful"}, **kw)
            metrics["false_refusal_benign"] = refusal_rate(model, tokenizer, benign, name="false_refusal_benign",
                                                           higher_is_better=False,
                                                           settings={**st, "dataset": "benign"}, **kw)
            metrics["false_refusal_overrefusal"] = refusal_rate(
                model, tokenizer, over, name="false_refusal_overrefusal", higher_is_better=False,
                settings={**st, "dataset": "overrefusal"}, **kw)
            both = metrics["false_refusal_benign"].per_item + metrics["false_refusal_overrefusal"].per_item
            metrics["false_refusal_rate"] = proportion("false_refusal_rate", both, False,
                                                       {**st, "dataset": "benign+overrefusal"}, time.time())
            metrics["false_refusal_rate"].seconds = round(metrics["false_refusal_benign"].seconds
                                                          + metrics["false_refusal_overrefusal"].seconds, 2)
            for name, parts in (("degenerate_rate", ("refusal_rate",)),
                                ("degenerate_rate_benign", ("false_refusal_benign", "false_refusal_overrefusal"))):
                responses = [r for part in parts for r in metrics[part].details["responses"]]
                metrics[name] = proportion(name, [is_degenerate(r) for r in responses], False,
                                           {**st, "dataset": "+".join(metrics[part].settings["dataset"]
                                                                      for part in parts), "judge": "is_degenerate"},
                                           time.time())
        if "proxy" in groups:
            metrics["refusal_score"] = refusal_score(model, tokenizer, harmful, batch_size=p.batch_size,
                                                     settings={**st, "dataset": "harmful"})
            metrics["refusal_score_benign"] = refusal_score(model, tokenizer, benign + over,
                                                            name="refusal_score_benign", batch_size=p.batch_size,
                                                            settings={**st, "dataset": "benign+overrefusal"})
            if "safety" in groups:
                lo = metrics["refusal_score"].per_item + metrics["refusal_score_benign"].per_item
                judged = (metrics["refusal_rate"].per_item + metrics["false_refusal_benign"].per_item
                          + metrics["false_refusal_overrefusal"].per_item)
                metrics["refusal_score"].details["agreement_with_judge"] = proxy_agreement(lo, judged)
        if "utility" in groups:
            tasks = {t: load(t, n) for t, n in (("mmlu", p.mmlu), ("nq_open", p.nq_open), ("piqa", p.piqa)) if n}
        if "utility" in groups and tasks:
            fewshot = {"nq_open": data.load("nq_open", "train", seed=seed, limit=max(p.nq_fewshot, 1))}
            # lm-eval pads each batch to its longest request: small batches are faster on CPU (measured: 64 MMLU
            # items, bf16, 2 cores: batch 48 -> 52 s, 16 -> 26 s)
            metrics.update(lm_eval_tasks(model, tokenizer, tasks, batch_size=min(p.batch_size, 16),
                                         num_fewshot={"nq_open": p.nq_fewshot}, fewshot_records=fewshot, settings=st))
        if "perplexity" in groups:
            metrics["perplexity"] = perplexity(model, tokenizer, data.texts(load("wiki", p.wiki), "text"),
                                               max_tokens=p.ppl_max_tokens, settings={**st, "dataset": "wiki"},
                                               progress=progress)
        if "bias" in groups:
            metrics.update(stereoset(model, tokenizer, load("stereoset", p.stereoset), batch_size=p.batch_size,
                                     settings=st, progress=progress, seed=seed))
        if "bias" in groups and p.crows_pairs:
            metrics["crows_pairs_stereo"] = crows_pairs(model, tokenizer, load("crows_pairs", p.crows_pairs),
                                                 batch_size=p.batch_size, settings=st, progress=progress)
        if "skill" in groups:
            metrics["arithmetic_acc"] = arithmetic_accuracy(model, tokenizer, load("arithmetic", p.arithmetic),
                                                            batch_size=p.batch_size, settings=st, progress=progress)
    return EvalReport(name, p.name, metrics, time.time() - t0,
                      {"dtype": str(dtype or next(model.parameters()).dtype), "seed": seed, **dataclasses.asdict(p)})
