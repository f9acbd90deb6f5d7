"""The minimal-subset search (CNT end to end, task -> scores -> search -> patch, is :mod:`cnt.pipeline`).

The search finds the smallest k on the ranked list whose transfer reaches ``goal`` (default 90%) of the donor–target
gap on the validation proxies with utility held (:func:`cnt.functions.judge`): galloping (k, 4k, 16k, …) then
bisection, for each amplification α. The algorithm itself (:func:`search_k`) sees only a ``(k, alpha) -> step``
function; :class:`Trials` makes one from scores, models and a :class:`~cnt.functions.Validator`.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Sequence

from .functions import FALSE_REFUSAL_CONFIDENCE, Proxy, Validator, choose
from .scores import NeuronScores
from .transfer import NeuronPatch

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
    false_refusal: float | None = None  # the rate measured on validation (where the function watches it), and
    false_refusal_n: int | None = None  # on how many benign prompts: how close to its limit a setting passed
    degenerate: float | None = None
    ppl_n: int | None = None  # the Wikipedia passages its perplexity was read on (the sample, or more of the split)


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
    closest_k: int = 0  # the subset to use: the minimal one, or when the goal was out of reach the trial furthest
                        # toward the donor with utility held (functions.choose), at ``alpha``
    rule: dict = field(default_factory=dict)  # every limit the trials were judged by (functions.full_rule)

    def to_dict(self) -> dict:
        return {**asdict(self), "steps": [asdict(s) for s in self.steps]}


def step_of(k: int, patch: NeuronPatch, verdict: dict) -> SearchStep:
    """One trial as a record: the budget ``k``, the patch and the validator's ``verdict`` on it."""
    m = verdict["proxy"]
    return SearchStep(k, patch.alpha, m["score"], verdict["share"], m["ppl"], m.get("drift"), verdict["ok"],
                      verdict["utility_ok"], patch.param_fraction, verdict["failed"], m.get("false_refusal"),
                      m.get("false_refusal_n"), m.get("degenerate"), m.get("ppl_n"))


class Trials:
    """Subsets tried on validation: each ``(k, alpha)`` is read from ``scores`` (:meth:`NeuronScores.pick`), extracted
    from the two models and judged by ``validator``; every trial is kept in ``steps``."""

    def __init__(self, scores: NeuronScores, donor, target, validator: Validator):
        self.scores, self.donor, self.target, self.validator = scores, donor, target, validator
        self.steps: list[SearchStep] = []

    def __call__(self, k: int, alpha: float) -> SearchStep:
        sel, gamma = self.scores.pick(k)
        patch = NeuronPatch.extract(self.donor, self.target, sel, alpha=alpha, gamma=gamma)
        step = step_of(k, patch, self.validator.assess(patch))
        self.steps.append(step)
        return step


def search_k(trial: Callable[[int, float], SearchStep], *, k_min: int, k_max: int, goal: float = 0.9,
             alphas: Sequence[float] = ALPHAS, growth: int = 4) -> SearchStep | None:
    """The search algorithm on any ``trial(k, alpha) -> step`` (a step says whether it reached the goal with utility
    held, ``ok``, and with utility held at all, ``utility_ok``, and its ``share`` of the gap): the accepted step with
    the smallest k, or None.

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


def minimal_subset(scores: NeuronScores, donor, target, tokenizer, proxy: Proxy | None = None, *,
                   validator: Validator | None = None, goal: float = 0.9, max_ppl_increase: float = 0.02,
                   max_false_refusal_increase: float = 0.05, max_degenerate_increase: float = 0.05,
                   false_refusal_confidence: float | None = FALSE_REFUSAL_CONFIDENCE, k_min: int | None = None,
                   max_fraction: float = 0.25,
                   alphas: Sequence[float] = ALPHAS, growth: int = 4, progress: bool = True,
                   measured: tuple[dict, dict] | None = None) -> SearchResult:
    """Smallest k (and alpha, chosen on validation) whose transfer reaches ``goal`` of the donor–target proxy gap
    with perplexity within ``max_ppl_increase`` (relative), answers broken at most ``max_degenerate_increase`` more
    often and, for added refusal, benign prompts refused at most ``max_false_refusal_increase`` more often at
    ``false_refusal_confidence`` (:func:`cnt.functions.judge`) — :func:`search_k` on :class:`Trials`, k from
    ``k_min`` (default 0.05% of the neurons) to ``max_fraction`` of them. Judged on ``proxy``, or by a ready
    ``validator`` (its proxies and measurements; built with the same limits). ``measured`` passes the target's and
    donor's proxy values when the caller already has them (same proxy, same dtype)."""
    from tqdm.auto import tqdm

    t0 = time.time()
    rule = dict(goal=goal, max_ppl_increase=max_ppl_increase, max_false_refusal_increase=max_false_refusal_increase,
                max_degenerate_increase=max_degenerate_increase,
                false_refusal_confidence=false_refusal_confidence)  # functions.judge's limits
    if validator is None:
        if proxy is None:
            raise ValueError("minimal_subset: give the validation proxy or a validator")
        validator = Validator(donor, target, tokenizer, proxy, measured=measured, **rule)
    else:
        validator = validator.with_rule(**rule)
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
    if best is None:  # out of reach: the trial a researcher would pick instead, as at a fixed budget (utility held)
        top = steps[choose([{"share": s.share, "utility_ok": s.utility_ok} for s in steps])]
        return SearchResult(0, top.alpha, False, top.share, base, don, steps, round(time.time() - t0, 1), goal,
                            max_ppl_increase, closest_k=top.k, rule=validator.limits)
    return SearchResult(best.k, best.alpha, True, best.share, base, don, steps, round(time.time() - t0, 1), goal,
                        max_ppl_increase, closest_k=best.k, rule=validator.limits)
