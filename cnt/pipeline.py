"""CNT for one donor/target pair, step by step: task -> scores -> (search) -> patch.

:class:`Pipeline` is the kit's one implementation of those steps. :func:`transfer_function` (what ``cnt transfer``
runs), the application runner (:func:`cnt.experiment.run_application`), the frontier, the walkthrough notebook and the
cost benchmark (``benchmarks/run.py cnt``) all call it. The task is built once and each scorer's scores computed once,
so several budgets, amplifications or a search share them. A ``stage`` hook — a context-manager factory called with each
step's name (:data:`STAGES`) — lets a caller time or measure a step (the benchmark resets the memory peak around
``"locate"``); each step's wall time is also kept in :attr:`Pipeline.timings`.
"""

from __future__ import annotations

import dataclasses
import time
from contextlib import contextmanager, nullcontext
from typing import Callable, ContextManager, Sequence

from .arch import IncompatibleModelsError, check_compatible, check_distinct
from .functions import Proxy, Validator, build_task, choose_alpha, default_scorer, default_units, rule_limits
from .locate import NeuronScores, Task, check_units, kind_scorers, locate
from .models import model_device, release_freed_memory
from .scores import check_budget, neurons_for
from .search import ALPHAS, SearchResult, SearchStep, minimal_subset, step_of
from .transfer import NeuronPatch, PatchError, check_alpha

STAGES = ("task", "locate", "search", "transfer")
ITERATIVE_BUDGET = 0.01  # the iterative scorer re-measures its objective up to this fraction of MLP neurons


def check_alphas(alpha: float | Sequence[float]) -> list[float]:
    """One amplification or several (each checked); several are chosen among on validation."""
    alphas = [alpha] if isinstance(alpha, (int, float)) and not isinstance(alpha, bool) else list(alpha)
    if not alphas:
        raise PatchError("alpha: give at least one amplification")
    return [check_alpha(a) for a in alphas]


def locate_key(scorer: str, kinds: Sequence[str]) -> str:
    """The name a locate's time goes under in :attr:`Pipeline.timings` (and a run's results): ``locate_<scorer>``,
    with ``:<kind>+<kind>`` for units other than MLP neurons alone."""
    return f"locate_{scorer}" + ("" if tuple(kinds) == ("mlp",) else ":" + "+".join(kinds))


class Pipeline:
    """The steps of CNT for ``function`` (``"refusal"``, ``"compliance"``, ``"bias"``) from ``donor`` into ``target``.

    ``task_kwargs``: :func:`cnt.functions.build_task`'s settings; ``proxy``: the validation proxies (default: the
    function's, :meth:`cnt.functions.Proxy.for_function`). Models are checked compatible (same architecture and
    shapes) here, before any compute; neither model is modified by any step."""

    def __init__(self, function: str, donor, target, tokenizer, *, seed: int = 0, task_kwargs: dict | None = None,
                 proxy: Proxy | None = None, progress: bool = True,
                 stage: Callable[[str], ContextManager] | None = None):
        self.fingerprint = check_compatible(donor, target)
        self.function, self.donor, self.target, self.tokenizer = function, donor, target, tokenizer
        self.seed, self.task_kwargs, self.progress = seed, dict(task_kwargs or {}), progress
        self._proxy, self._hook = proxy, stage
        self._task: Task | None = None
        self._scores: dict[tuple, NeuronScores] = {}
        self._validators: dict[tuple, Validator] = {}
        self.timings: dict[str, float] = {}

    @contextmanager
    def stage(self, name: str, key: str | None = None):
        """One step, timed into ``timings[key or name]`` and wrapped in the caller's hook."""
        t0 = time.time()
        with self._hook(name) if self._hook is not None else nullcontext():
            yield
        self.timings[key or name] = round(self.timings.get(key or name, 0.0) + time.time() - t0, 1)

    @property
    def n_neurons(self) -> int:
        return self.fingerprint.n_neurons

    @property
    def task(self) -> Task:
        """The function as a differentiable task on the locate split (built on first use)."""
        if self._task is None:
            with self.stage("task"):
                self._task = build_task(self.function, self.donor, self.target, self.tokenizer, seed=self.seed,
                                        progress=self.progress, **self.task_kwargs)
                # what generating the answers freed goes back to the system before locate starts (measured on
                # SmolLM2: the resident set before locate 1.62x the two models' weights without this, 1.22x with it)
                release_freed_memory(model_device(self.target))
        return self._task

    def scores(self, scorer: str | None = None, kinds: Sequence[str] | None = None, *,
               iterative_budget: float = ITERATIVE_BUDGET, **settings) -> NeuronScores:
        """Every unit of ``kinds`` scored by ``scorer`` (None: the function's default locator and its default units,
        :func:`cnt.functions.default_units`), computed on first use. ``settings``: the scorer's own (e.g. a learned
        mask's steps)."""
        scorer = scorer or default_scorer(self.function)
        kinds = tuple(kinds) if kinds is not None else default_units(self.function, scorer)
        check_units(kinds, [scorer])
        key = (scorer, kinds, tuple(sorted(settings.items())))
        if key not in self._scores:
            task = self.task
            extra = dict(settings)
            if scorer == "iterative":
                extra.setdefault("budget", neurons_for(iterative_budget, self.n_neurons))
            if scorer in kind_scorers():
                extra["kinds"] = kinds
            with self.stage("locate", key=locate_key(scorer, kinds)):
                self._scores[key] = locate(scorer, task, self.donor, self.target, self.tokenizer,
                                           progress=self.progress, **extra)
        return self._scores[key]

    @property
    def proxy(self) -> Proxy:
        if self._proxy is None:
            self._proxy = Proxy.for_function(self.function, self.seed)
        return self._proxy

    def validator(self, **rule) -> Validator:
        """The validation proxies judged by ``rule`` (:func:`cnt.functions.judge`'s limits; default the kit's): one
        working copy of the target and one measurement of target and donor, shared by every rule."""
        key = tuple(sorted(rule.items()))
        if key not in self._validators:
            if self._validators:
                self._validators[key] = next(iter(self._validators.values())).with_rule(**rule)
            else:
                self._validators[key] = Validator(self.donor, self.target, self.tokenizer, self.proxy, **rule)
        return self._validators[key]

    def at_budget(self, scores: NeuronScores, budget: float, alphas: Sequence[float] = ALPHAS, *,
                  refine: bool = True, **rule) -> tuple[NeuronPatch, list[SearchStep]]:
        """The subset a fixed ``budget`` (a fraction of MLP neurons; with other kinds of unit, the weights of that
        many neurons) buys, at the amplification chosen on validation among ``alphas`` by the kit's rule
        (:func:`cnt.functions.choose_alpha`: utility held, furthest toward the donor; reaching it is enough, so the
        smaller α wins; with ``refine``, the α halfway to the next one when that one broke utility). Every α shares
        one extracted patch. Returns the chosen patch and one step per α tried, mildest first."""
        k = neurons_for(check_budget(budget), self.n_neurons)
        alphas = check_alphas(alphas)
        base = self.patch(scores, k, min(alphas))
        validator = self.validator(**rule)
        steps: dict[float, SearchStep] = {}

        def assess(alpha: float) -> dict:
            patch = dataclasses.replace(base, alpha=alpha)
            verdict = validator.assess(patch)
            steps[alpha] = step_of(k, patch, verdict)
            return verdict

        tried, _, i = choose_alpha(alphas, assess, refine=refine)
        return dataclasses.replace(base, alpha=tried[i]), [steps[a] for a in tried]

    def search(self, scores: NeuronScores, alphas: Sequence[float] = ALPHAS, **search_kwargs) -> SearchResult:
        """The minimal subset on ``scores`` (:func:`cnt.search.minimal_subset`, judged by this pipeline's validator);
        ``search_kwargs``: its settings, the rule's limits among them."""
        with self.stage("search"):
            return minimal_subset(scores, self.donor, self.target, self.tokenizer, validator=self.validator(),
                                  alphas=check_alphas(alphas), progress=self.progress, **search_kwargs)

    def patch(self, scores: NeuronScores, k: int, alpha: float = 1.0, **names) -> NeuronPatch:
        """The patch of the units a budget of ``k`` MLP neurons buys (:meth:`NeuronScores.pick`) at ``alpha``.
        ``names``: :meth:`NeuronPatch.extract`'s ``donor_name``, ``target_name``, ``provenance``."""
        sel, gamma = scores.pick(k)
        with self.stage("transfer"):
            return NeuronPatch.extract(self.donor, self.target, sel, alpha=alpha, gamma=gamma, **names)

    def transfer(self, budget: float | str = "auto", *, scorer: str | None = None, kinds: Sequence[str] | None = None,
                 alpha: float | Sequence[float] = ALPHAS, donor_name: str = "donor", target_name: str = "target",
                 search_kwargs: dict | None = None) -> tuple[NeuronPatch, dict]:
        """Score units (``kinds``: MLP neurons, and ``"head"``/``"kv"`` for attention heads and k/v groups), pick the
        subset (``budget``: a fraction of MLP neurons — with other kinds, the weights of that many neurons — or
        ``"auto"`` for the minimal-subset search) and return ``(patch, info)``. Several ``alpha`` values are chosen
        among on the validation split (by the search, or by :meth:`at_budget` at a fixed budget). ``scorer``: the
        locator (None: the function's default, :func:`cnt.functions.default_scorer`); ``kinds`` None: its default
        units (:func:`cnt.functions.default_units`). Arguments are checked before any compute."""
        scorer = scorer or default_scorer(self.function)
        kinds = tuple(kinds) if kinds is not None else default_units(self.function, scorer)
        budget = check_budget(budget, auto=True, error=PatchError)
        alphas = check_alphas(alpha)
        try:
            check_distinct(self.donor, self.target)
        except IncompatibleModelsError as e:
            raise PatchError(str(e)) from None
        t0 = time.time()
        scores = self.scores(scorer, kinds)
        info: dict = {"function": self.function, "scorer": scorer, "kinds": list(kinds),
                      "locate_seconds": scores.seconds, "task": self.task.meta}
        if budget == "auto":
            res = self.search(scores, alphas, **(search_kwargs or {}))
            info["search"] = res.to_dict()
            k = res.closest_k  # the minimal subset, or the trial furthest toward the donor with utility held
            chosen_alpha = res.alpha
        else:
            k = neurons_for(budget, self.n_neurons)
            chosen_alpha = alphas[0]
            if len(alphas) > 1:  # several amplifications: the one the search rule prefers on validation
                chosen, steps = self.at_budget(scores, budget, alphas, **rule_limits(search_kwargs or {}))
                chosen_alpha = chosen.alpha
                info["alpha_choice"] = [dataclasses.asdict(s) for s in steps]
        provenance = {"scorer": scorer, "kinds": list(kinds), "function": self.function,
                      "task_digest": self.task.digest(), "seed": self.seed, "budget": budget, "split": "locate"}
        patch = self.patch(scores, k, chosen_alpha, donor_name=donor_name, target_name=target_name,
                           provenance=provenance)
        info["seconds"] = round(time.time() - t0, 1)
        info["timings"] = dict(self.timings)
        return patch, info


def transfer_function(donor, target, tokenizer, function: str, *, budget: float | str = "auto",
                      scorer: str | None = None, kinds: Sequence[str] | None = None,
                      alpha: float | Sequence[float] = ALPHAS, seed: int = 0, donor_name: str = "donor",
                      target_name: str = "target", task_kwargs: dict | None = None, search_kwargs: dict | None = None,
                      progress: bool = True,
                      stage: Callable[[str], ContextManager] | None = None) -> tuple[NeuronPatch, dict]:
    """CNT for one pair, end to end (:meth:`Pipeline.transfer` on a new pipeline): build the task, score units, pick
    the subset and return ``(patch, info)``. Every argument is checked before any compute; the target is not
    modified."""
    pipe = Pipeline(function, donor, target, tokenizer, seed=seed, task_kwargs=task_kwargs, progress=progress,
                    stage=stage)
    return pipe.transfer(budget, scorer=scorer, kinds=kinds, alpha=alpha, donor_name=donor_name,
                         target_name=target_name, search_kwargs=search_kwargs)
