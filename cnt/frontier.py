"""The sparsity frontier of one donor/target pair: the share of the donor–target gap reached on the eval split against
the share of the model's weights moved, for each locator (with and without attention units), beside random neurons
and weight-delta, and the ceilings — every MLP neuron, attention only, every unit, each at its best amplitude — and
the donor itself.

Protocol (nothing tuned on eval): each point's amplitude (α; a learned mask also brings its own per-unit γ, scaled by
α) is chosen on the validation proxies by the kit's rule (:func:`cnt.functions.choose`: the furthest toward the donor
with utility held, else the furthest), then that one setting is evaluated on the eval split. The share of the gap and
its 95% interval come from the metric and its Wilson / bootstrap interval mapped through the same affine map.
The result is a :class:`cnt.results.FrontierResult` (written as JSON); :func:`cnt.plots.frontier` draws it.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Callable, Sequence

from . import baselines as B
from .arch import check_compatible, total_params
from .evaluate import evaluate
from .functions import Proxy, choose_alpha, function_spec
from .outcomes import gap_share
from .pipeline import Pipeline
from .results import FrontierPoint, FrontierResult
from .search import ALPHAS
from .transfer import NeuronPatch, check_alpha, transfer_all

BUDGETS = (0.001, 0.0025, 0.005, 0.01)  # fractions of the target's weights
LOCATORS = (("attribution", ("mlp",)), ("attribution", ("mlp", "head", "kv")),
            ("learned_mask", ("mlp",)), ("learned_mask", ("mlp", "head", "kv")))
CEILINGS = {"every MLP neuron": ("mlp",), "attention only": ("head", "kv"), "every unit": ("mlp", "head", "kv")}


# the kit's utility goals, checked on eval for every point: (metric, largest allowed change from the target, relative?)
UTILITY_GOALS = (("perplexity", 0.02, True), ("false_refusal_rate", 0.05, False), ("degenerate_rate", 0.05, False),
                 ("degenerate_rate_benign", 0.05, False), ("arithmetic_acc", -0.05, False))


def utility_change(rep, target_rep) -> tuple[dict, bool]:
    """Each utility metric's change from the target on eval (relative for perplexity, points otherwise) and whether
    it stays within the kit's goal (:data:`UTILITY_GOALS`; a negative limit bounds a drop)."""
    out, held = {}, True
    for name, limit, relative in UTILITY_GOALS:
        if name not in rep.metrics or name not in target_rep.metrics:
            continue
        v, t = rep[name].value, target_rep[name].value
        change = v / t - 1 if relative else v - t
        ok = change >= limit - 1e-9 if limit < 0 else change <= limit + 1e-9
        out[name] = {"value": v, "change": change, "limit": limit, "held": bool(ok)}
        held = held and ok
    return out, held


def measure(function: str, donor, target, tokenizer, *, budgets: Sequence[float] = BUDGETS,
            locators: Sequence[tuple[str, Sequence[str]]] = LOCATORS, alphas: Sequence[float] = ALPHAS,
            random_seeds: Sequence[int] = (0,), profile: str = "frontier", seed: int = 0, dtype="auto",
            locator_kwargs: dict | None = None, proxy_size: int = 48, groups: Sequence[str] | None = None,
            task_kwargs: dict | None = None, baselines: Sequence[str] = ("random", "weight_delta"),
            ceilings: bool = True, checkpoint: Callable[[FrontierResult], None] | None = None,
            progress: bool = True) -> FrontierResult:
    """Every point of the frontier (see the module doc), as a :class:`cnt.results.FrontierResult`.
    ``dtype``: the evaluation precision (``"auto"``: bf16 where native, as the proxies; ``None``: the models' own);
    ``proxy_size``: validation prompts per proxy.
    ``locator_kwargs``: per scorer name, its settings (e.g. a learned mask's levels and steps). ``groups``: the
    evaluation's metric groups (default: the function's metric and perplexity; add ``"skill"`` for a specialist).
    ``task_kwargs``: :func:`cnt.functions.build_task`'s settings. ``baselines``: the neuron-level baselines beside
    the locators at every budget (a subset of ``random``, ``weight_delta``; empty for a reduced run). ``ceilings``:
    False leaves out the ceilings (every MLP neuron, attention only, every unit: on a 0.5B model most of a reduced
    run's time), for a part of a frontier whose ceilings another part measured.
    ``checkpoint``: called with the result so far after every point (a killed run keeps what it measured).
    Every α of a point shares one extracted patch (the candidates differ only in their amplitude), so a ceiling of
    every unit costs one copy of the slices, not one per α."""
    from tqdm.auto import tqdm

    t0 = time.time()
    check_compatible(donor, target)
    neuron_level = [n for n, b in B.BASELINES.items() if b.level == "neuron"]
    unknown = sorted(set(baselines) - set(neuron_level))
    if unknown:
        raise ValueError(f"frontier baselines: {unknown} unknown; the neuron-level ones are {', '.join(neuron_level)}")
    spec = function_spec(function)
    metric, default_groups = spec.metric, spec.groups
    groups = tuple(groups or default_groups)
    n_weights = total_params(target)
    pipe = Pipeline(function, donor, target, tokenizer, seed=seed, task_kwargs=task_kwargs, progress=progress,
                   proxy=Proxy.for_function(function, seed, n=proxy_size, n_wiki=min(16, proxy_size)))
    validator = pipe.validator()
    v_target, v_donor = validator.target, validator.donor
    bar = tqdm(desc=f"frontier ({function})", unit="eval", disable=not progress)

    def ev(model):
        rep = evaluate(model, tokenizer, profile, groups=groups, seed=seed, dtype=dtype, progress=False)
        bar.update()
        return rep

    r_target, r_donor = ev(target), ev(donor)
    t_score, d_score = r_target[metric].value, r_donor[metric].value
    points: list[FrontierPoint] = []

    def add(method, kinds, budget, slices: NeuronPatch, **extra):
        """One point: the same ``slices`` at each α (tensors shared, not copied), the α chosen on validation
        (:func:`cnt.functions.choose_alpha`) evaluated on eval. ``extra``: recorded with the point."""
        tried, assessed, i = choose_alpha(alphas, lambda a: validator.assess(
            dataclasses.replace(slices, alpha=check_alpha(a))))
        alpha = tried[i]
        patch = dataclasses.replace(slices, alpha=alpha)
        patch.apply(target)
        rep = ev(target)
        patch.revert(target)
        m = rep[metric]
        lo, hi = sorted((gap_share(m.ci[0], t_score, d_score), gap_share(m.ci[1], t_score, d_score)))
        utility, held = utility_change(rep, r_target)
        points.append(FrontierPoint(method, list(kinds), budget, patch.param_fraction,
                                    {k: patch.n_units(k) for k in patch.units}, alpha, assessed[i]["share"],
                                    assessed[i]["utility_ok"], m.value, list(m.ci),
                                    gap_share(m.value, t_score, d_score), [lo, hi],
                                    rep["perplexity"].value if "perplexity" in rep.metrics else None, utility, held,
                                    {"candidates": [{"alpha": a, "validation_share": x["share"],
                                                     "utility_ok": x["utility_ok"], "proxy": x["proxy"]}
                                                    for a, x in zip(tried, assessed)], **extra}))
        if checkpoint is not None:
            checkpoint(result(partial=True))

    def result(partial: bool) -> FrontierResult:
        """The frontier so far (``partial``) or whole."""
        return FrontierResult(
            function=function, metric=metric, target_score=t_score, target_ci=list(r_target[metric].ci),
            donor_score=d_score, donor_ci=list(r_donor[metric].ci),
            target_perplexity=r_target["perplexity"].value, donor_perplexity=r_donor["perplexity"].value,
            points=list(points), target_metrics={k: v.value for k, v in r_target.metrics.items()},
            donor_metrics={k: v.value for k, v in r_donor.metrics.items()},
            donor_utility=utility_change(r_donor, r_target)[0], groups=list(groups),
            task={"settings": task.meta, "utility_weight": task.utility_weight, "n_function": len(task.function),
                  "n_utility": len(task.utility)},
            validation={"target": v_target, "donor": v_donor}, budgets=list(budgets), alphas=list(alphas),
            baselines=list(baselines), profile=profile, seed=seed, n_params=n_weights, timings=dict(timings),
            seconds=round(time.time() - t0, 1), when=time.strftime("%Y-%m-%dT%H:%M:%S"), partial=partial)

    task = pipe.task
    timings = {"task": pipe.timings["task"]}
    for name, kinds in locators:
        scores = pipe.scores(name, kinds, **dict(locator_kwargs or {}).get(name, {}))
        timings[f"{name}:{'+'.join(kinds)}"] = scores.seconds
        for b in budgets:
            sel, gamma = scores.select(int(b * n_weights))
            add(name, kinds, b, NeuronPatch.extract(donor, target, sel, gamma=gamma))
    per_neuron = NeuronPatch.extract(donor, target, {0: [0]}).n_params  # weights of one MLP neuron
    for b in budgets:  # neuron-level baselines at the same weights
        k = max(1, int(b * n_weights) // per_neuron)
        for s in random_seeds if "random" in baselines else ():
            mod = B.run("random", donor, target, tokenizer, function, k=k, seed=s)
            add("random", ["mlp"], b, mod.patch, seed=s)
        if "weight_delta" in baselines:
            mod = B.run("weight_delta", donor, target, tokenizer, function, k=k)
            add("weight_delta", ["mlp"], b, mod.patch)
    for name, kinds in CEILINGS.items() if ceilings else ():
        add(name, kinds, None, transfer_all(donor, target, kinds))
    bar.close()
    return result(partial=False)

