"""The minimal-subset search, and CNT end to end for one pair (:func:`transfer`: task -> scores -> search -> patch).

The search finds the smallest k on the ranked list whose transfer reaches ``goal`` (default 90%) of the donor–target
gap on the validation proxies with utility held (:func:`cnt.functions.judge`): galloping (k, 4k, 16k, …) then
bisection, for each amplification α. The algorithm itself (:func:`search_k`) sees only a ``(k, alpha) -> step``
function; :class:`Trials` makes one from scores, models and a :class:`~cnt.functions.Validator`.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Sequence

import numpy as np

from .arch import IncompatibleModelsError, check_compatible, check_distinct
from .functions import Proxy, Validator, build_task, choose
from .locate import NeuronScores, default_scorer, locate
from .transfer import NeuronPatch, PatchError, check_alpha

KIND_SCORERS = ("attribution", "iterative", "learned_mask")  # the scorers that also score heads and k/v groups
# the amplifications tried by default, each judged on validation (utility held, answers still language): on SmolLM2
# the proxy's share of the gap grows about linearly in alpha up to 4, and alpha 8-16 starts to break the text
ALPHAS = (1.0, 2.0, 4.0, 8.0)


@dataclass
class SearchStep:
    k: int  # the budget, in MLP neurons (or their weight, in units of every kind)
    alpha: float
    score: float
    share: float
    ppl: float
    drift: float | None
    ok: bool
    utility_ok: bool = True
    param_fraction: float | None = None  # the patch's share of the model's weights
    failed: list[str] = field(default_factory=list)  # the utility checks that did not hold (judge's words)


@dataclass
class SearchResult:
    k: int  # neurons in the minimal subset (0 if none reached the goal)
    alpha: float
    reached: bool
    share: float
    target: dict
    donor: dict
    steps: list[SearchStep]
    seconds: float
    goal: float
    max_ppl_increase: float

    def to_dict(self) -> dict:
        return {**asdict(self), "steps": [asdict(s) for s in self.steps]}


def pick(scores: NeuronScores, k: int) -> tuple[dict, dict | None]:
    """The units a budget of ``k`` MLP neurons buys: the top ``k`` neurons, or — when the scores also cover heads and
    k/v groups, or carry learned amplitudes — the best units of every kind within the weights of ``k`` neurons.
    Returns ``(selection, gamma)`` for :meth:`NeuronPatch.extract` (``gamma`` ``None``: one global α)."""
    if not scores.units and not scores.gamma:
        return scores.top(k), None
    return scores.select(k * scores.costs["mlp"][0])


class Trials:
    """Subsets tried on validation: each ``(k, alpha)`` is read from ``scores`` (:func:`pick`), extracted from the two
    models and judged by ``validator``; every trial is kept in ``steps``."""

    def __init__(self, scores: NeuronScores, donor, target, validator: Validator):
        self.scores, self.donor, self.target, self.validator = scores, donor, target, validator
        self.steps: list[SearchStep] = []

    def __call__(self, k: int, alpha: float) -> SearchStep:
        sel, gamma = pick(self.scores, k)
        patch = NeuronPatch.extract(self.donor, self.target, sel, alpha=alpha, gamma=gamma)
        v = self.validator.assess(patch)
        m = v["proxy"]
        step = SearchStep(k, alpha, m["score"], v["share"], m["ppl"], m.get("drift"), v["ok"], v["utility_ok"],
                          patch.param_fraction, v["failed"])
        self.steps.append(step)
        return step


def best_alpha(scores: NeuronScores, k: int, donor, target, tokenizer, proxy: Proxy,
               alphas: Sequence[float] = ALPHAS, **rule) -> tuple[float, list[SearchStep]]:
    """The amplification for a fixed subset (the best ``k``), chosen on validation by :func:`choose`: utility held,
    furthest toward the donor (reaching it is enough: the smaller alpha wins). Returns ``(alpha, trials)``."""
    trials = Trials(scores, donor, target, Validator(donor, target, tokenizer, proxy, **rule))
    alphas = sorted(alphas)
    for a in alphas:
        trials(k, a)
    i = choose([{"share": s.share, "utility_ok": s.utility_ok} for s in trials.steps])
    return alphas[i], trials.steps


def search_k(trial: Callable[[int, float], SearchStep], *, k_min: int, k_max: int, goal: float = 0.9,
             alphas: Sequence[float] = ALPHAS, growth: int = 4) -> SearchStep | None:
    """The search algorithm on any ``trial(k, alpha) -> step`` (a step says whether it reached the goal with utility
    held, ``ok``, and with utility held at all, ``utility_ok``, and its ``share`` of the gap): the accepted step with the
    smallest k, or None.

    k gallops up from ``k_min`` (times ``growth``) until a trial is accepted, then bisects to within 10%: growth 4
    takes fewer trials than doubling both when the goal is reached (the longer bisection costs less than the gallop
    saves) and when it is not (the gallop is the whole search: 0.05% -> 25% of neurons in 6 trials instead of 10);
    alphas are tried largest first, and a later alpha only searches below the best k found so far: one trial just
    below it, and bisection under it only if that trial reaches the goal (more neurons are assumed to move the
    function further). Galloping stops early once utility breaks (perplexity or false refusal over the limit):
    transferring *more* neurons moves the target further from itself, so a larger k is not expected to restore it —
    trials stay few. A k that a larger alpha left short of the goal *with utility held* is not tried again at a smaller
    alpha (the share is assumed to grow with alpha as with k: a smaller amplification of the same subset moves the
    function less): when the goal is out of reach within ``k_max``, the largest alpha gallops to the limit and each
    smaller one is then settled without a trial, instead of galloping there again."""
    accepted: dict[tuple[int, float], SearchStep] = {}
    best: SearchStep | None = None
    short = 0  # the largest k a larger alpha left short of the goal with utility held: short here too

    def tried(k: int, alpha: float) -> SearchStep:
        nonlocal short
        s = trial(k, alpha)
        if s.utility_ok and not s.share >= goal:
            short = max(short, k)
        return s

    for alpha in sorted(alphas, reverse=True):  # larger alpha usually needs fewer neurons: it sets the bar early
        lo, hi, k = 0, None, k_min
        limit = k_max if best is None else min(k_max, best.k - 1)  # a later alpha wins only with a smaller k
        if limit <= short:  # a larger alpha fell short at the limit with utility held: this one would too
            continue
        if best is not None and limit >= 1:  # one trial at the limit: short of the goal there, short below it too
            s = tried(limit, alpha)
            if s.ok:
                hi, accepted[limit, alpha] = limit, s
            elif not s.share >= goal:  # (only a utility failure leaves room below: then gallop as usual)
                continue
        while hi is None and lo < limit:  # gallop: k, 4k, 16k, ... (the last try at the limit itself)
            k = min(k, limit)
            if k <= short:  # known short (a larger alpha fell short there): no trial
                lo, k = k, k * growth
                continue
            s = tried(k, alpha)
            if s.ok:
                hi, accepted[k, alpha] = k, s
                break
            if not s.utility_ok:  # utility already broken: more neurons will not mend it
                break
            lo, k = k, k * growth
        if hi is None:
            continue
        while hi - lo > max(1, hi // 10):  # bisect to ~10%
            mid = (lo + hi) // 2
            if mid <= short:
                lo = mid
                continue
            s = tried(mid, alpha)
            if s.ok:
                hi, accepted[mid, alpha] = mid, s
            else:
                lo = mid
        cand = accepted[hi, alpha]
        if best is None or cand.k < best.k:
            best = cand
    return best


def minimal_subset(scores: NeuronScores, donor, target, tokenizer, proxy: Proxy, *, goal: float = 0.9,
                   max_ppl_increase: float = 0.02, max_false_refusal_increase: float = 0.05, k_min: int | None = None,
                   max_fraction: float = 0.25, alphas: Sequence[float] = ALPHAS, growth: int = 4,
                   progress: bool = True, measured: tuple[dict, dict] | None = None) -> SearchResult:
    """Smallest k (and alpha, chosen on validation) whose transfer reaches ``goal`` of the donor–target proxy gap
    with perplexity within ``max_ppl_increase`` (relative), answers still language and, for added refusal, benign
    prompts refused at most ``max_false_refusal_increase`` more often (:func:`search_k` on :class:`Trials`; k from
    ``k_min``, default 0.05% of the neurons, to ``max_fraction`` of them). ``measured`` passes the target's and donor's
    proxy values when the caller already has them (same proxy, same dtype)."""
    from tqdm.auto import tqdm

    t0 = time.time()
    validator = Validator(donor, target, tokenizer, proxy, measured=measured, goal=goal,
                          max_ppl_increase=max_ppl_increase, max_false_refusal_increase=max_false_refusal_increase)
    trials = Trials(scores, donor, target, validator)
    n_total = sum(s.numel() for s in scores.scores)
    bar = tqdm(desc="minimal subset", disable=not progress, leave=False)

    def trial(k: int, alpha: float) -> SearchStep:
        step = trials(k, alpha)
        bar.update()
        return step

    best = search_k(trial, k_min=k_min or max(1, n_total // 2000), k_max=int(max_fraction * n_total), goal=goal,
                    alphas=alphas, growth=growth)
    bar.close()
    base, don, steps = validator.target, validator.donor, trials.steps
    if best is None:
        top = max(steps, key=lambda s: (s.share if np.isfinite(s.share) else -1))
        return SearchResult(0, top.alpha, False, top.share, base, don, steps, round(time.time() - t0, 1), goal,
                            max_ppl_increase)
    return SearchResult(best.k, best.alpha, True, best.share, base, don, steps, round(time.time() - t0, 1), goal,
                        max_ppl_increase)


# ---------------------------------------------------------------------------------------------------------------------
# one call: locate -> (search) -> patch
# ---------------------------------------------------------------------------------------------------------------------

def transfer(donor, target, tokenizer, function: str, *, budget: float | str = "auto", scorer: str | None = None,
             kinds: Sequence[str] = ("mlp",), alpha: float | Sequence[float] = ALPHAS, seed: int = 0,
             donor_name: str = "donor",
             target_name: str = "target", task_kwargs: dict | None = None, search_kwargs: dict | None = None,
             progress: bool = True) -> tuple[NeuronPatch, dict]:
    """CNT for one pair: build the task, score units (``kinds``: MLP neurons, and ``"head"``/``"kv"`` for attention
    heads and k/v groups), pick the subset (``budget``: a fraction of MLP neurons — with other kinds, the weight of
    that many neurons — or ``"auto"`` for the minimal-subset search) and return ``(patch, info)``. Several ``alpha``
    values are chosen among on the validation split (by the search, or by :func:`best_alpha` at a fixed budget).
    ``scorer``: the locator (None: the function's default, :func:`cnt.locate.default_scorer`). The target is not
    modified."""
    fp = check_compatible(donor, target)
    scorer = scorer or default_scorer(function)
    kinds = tuple(kinds)
    if kinds != ("mlp",) and scorer not in KIND_SCORERS:
        raise PatchError(f"scorer {scorer!r} scores MLP neurons only; for units {', '.join(kinds)} use one of "
                         f"{', '.join(KIND_SCORERS)}")
    if budget != "auto":
        if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not 0 < budget <= 1:
            raise PatchError(f"budget must be a fraction of MLP neurons in (0, 1] or 'auto', got {budget!r}")
        budget = float(budget)
    alphas = [alpha] if isinstance(alpha, (int, float)) and not isinstance(alpha, bool) else list(alpha)
    alphas = [check_alpha(a) for a in alphas]
    if not alphas:
        raise PatchError("alpha: give at least one amplification")
    try:
        check_distinct(donor, target)
    except IncompatibleModelsError as e:
        raise PatchError(str(e)) from None
    t0 = time.time()
    task = build_task(function, donor, target, tokenizer, seed=seed, **(task_kwargs or {}))
    extra = {"budget": max(1, int(0.01 * fp.n_neurons))} if scorer == "iterative" else {}
    if scorer in KIND_SCORERS:
        extra["kinds"] = kinds
    scores = locate(scorer, task, donor, target, tokenizer, progress=progress, **extra)
    info: dict = {"function": function, "scorer": scorer, "kinds": list(kinds), "locate_seconds": scores.seconds,
                  "task": task.meta}
    if budget == "auto":
        res = minimal_subset(scores, donor, target, tokenizer, Proxy.for_function(function, seed), alphas=alphas,
                             progress=progress, **(search_kwargs or {}))
        info["search"] = res.to_dict()
        k = res.k if res.reached else max(s.k for s in res.steps if s.alpha == res.alpha)
        chosen_alpha = res.alpha
    else:
        k = max(1, round(budget * fp.n_neurons))
        chosen_alpha = alphas[0]
        if len(alphas) > 1:  # several amplifications: the one the search rule prefers on validation
            chosen_alpha, steps = best_alpha(scores, k, donor, target, tokenizer, Proxy.for_function(function, seed),
                                             alphas, **(search_kwargs or {}))
            info["alpha_choice"] = [asdict(s) for s in steps]
    provenance = {"scorer": scorer, "kinds": list(kinds), "function": function, "task_digest": task.digest(), "seed": seed,
                  "budget": budget, "split": "locate"}
    sel, gamma = pick(scores, k)
    patch = NeuronPatch.extract(donor, target, sel, alpha=chosen_alpha, gamma=gamma, donor_name=donor_name,
                                target_name=target_name, provenance=provenance)
    info["seconds"] = round(time.time() - t0, 1)
    return patch, info
