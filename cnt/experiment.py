"""One application end to end: CNT (variants and budgets) + every baseline + evaluation -> typed records -> JSON.

(Over 400 lines: the runner, its config with the checks it makes before any compute, the smoke stand-ins and the
frontier entry point; the protocol reads top to bottom in :func:`run_application`.)

Both the notebooks and the CLI call :func:`run_application`; figures and tables are drawn from the JSON it writes.

Applications (defaults on the SmolLM2 zoo; any compatible donor/target/base by parameters):

=========================  ============  ==================  ========================  =====================
application                function      donor               target                    metric (goal)
=========================  ============  ==================  ========================  =====================
``disalignment``           compliance    smol-uncensored     smol-safe                 refusal_rate (down)
``alignment_enhancement``  refusal       smol-safe           smol-arith (specialist)   refusal_rate (up)
``bias_removal``           bias          smol-debiased       smol-biased               stereoset_ss (down)
=========================  ============  ==================  ========================  =====================
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import torch

from . import atomic
from . import baselines as B
from .applications import APPLICATIONS, DEFAULT_FAMILY, Application, families
from .arch import check_compatible, same_weights, total_params
from .cache import cache_dir
from .evaluate import PROFILES, EvalReport, evaluate
from .functions import choose, default_scorer, default_units
from .pipeline import Pipeline, locate_key
from .provenance import code_record
from .results import ApplicationResult, FrontierResult, MethodEntry
from .scores import check_budget, check_budgets
from .search import ALPHAS
from .transfer import check_alpha, transfer_all
from .zoo import load_model, load_tokenizer

# the zoo families' pairs per application, read from the application specs: a missing entry means the family has no
# donor for that function in the zoo (say so, rather than run something else)
FAMILIES = families()
UTILITY = ("mmlu", "nq_open", "perplexity")
SIDE = ("false_refusal_rate", "arithmetic_acc", "stereoset_lms", "crows_pairs_stereo")  # reported beside utility
@dataclass
class ApplicationConfig:
    """One application's run. The defaults are the notebooks' (what ``make reproduce`` and ``cnt run`` run, sized for
    two CPU cores: their timings are in ``papers/runs/timings.json``); widen budgets, scorers, seeds and sweeps, and
    use ``profile="full"``, on a bigger machine."""

    application: str
    family: str = DEFAULT_FAMILY  # names the result (a family other than the default gets its own JSON and figures)
    tag: str | None = None  # names a variant run (e.g. another donor): results/<application>[.<family>].<tag>.json
    donor: str | None = None
    target: str | None = None
    base: str | None = None
    budgets: tuple[float, ...] = (0.001, 0.005, 0.02)  # fractions of MLP neurons
    scorers: tuple[str, ...] | None = None  # None: the function's default locator (cnt.functions.default_scorer)
    units: tuple[str, ...] | None = None  # kinds of unit (mlp, head, kv); None: the function's (default_units)
    alphas: tuple[float, ...] = ALPHAS
    baselines: tuple[str, ...] = tuple(B.BASELINES)  # every registered baseline
    lambdas: tuple[float, ...] = (0.5, 1.0)
    densities: tuple[float, ...] = (0.2, 0.5)
    random_seeds: tuple[int, ...] = (0,)  # random neurons: one draw per budget on the whole split (more: mean ± sd)
    sft_steps: int | None = 60  # the SFT reference's steps (None: as many as the donor's recipe)
    sft_small_data: bool = False  # smoke runs: a handful of the donor's training examples
    profile: str = "report"  # what reported settings are measured on: the whole eval split (see cnt.evaluate.suite)
    seed: int = 0
    search: bool = True
    all_mlp: bool = True  # also transfer every MLP neuron (the ceiling of CNT's units; one light evaluation)
    device_map: str | None = None  # "auto": accelerate shards each model across the visible GPUs

    def __post_init__(self):
        _check_field_types(self)
        if self.application not in APPLICATIONS:
            raise ValueError(f"unknown application {self.application!r}; applications: {', '.join(APPLICATIONS)}")
        spec = APPLICATIONS[self.application]
        pair = spec.pairs.get(DEFAULT_FAMILY, (None, None, None))
        self.donor = self.donor or pair[0]
        self.target = self.target or pair[1]
        self.base = self.base or pair[2]
        if self.profile not in PROFILES:
            raise ValueError(f"unknown profile {self.profile!r}; profiles: {', '.join(PROFILES)}")
        self.budgets = check_budgets(self.budgets)
        for a in self.alphas:
            check_alpha(a, "alphas")
        if not self.alphas or any(not 0 < d <= 1 for d in self.densities) or any(not 0 < x <= 4 for x in self.lambdas):
            raise ValueError(f"alphas must be non-empty, densities in (0, 1] and lambdas in (0, 4]; got alphas "
                             f"{list(self.alphas)}, densities {list(self.densities)}, lambdas {list(self.lambdas)}")
        if self.sft_steps is not None and self.sft_steps < 1:
            raise ValueError(f"sft_steps must be >= 1 or None, got {self.sft_steps}")
        unknown = set(self.baselines) - set(B.BASELINES)
        if unknown:
            raise ValueError(f"unknown baselines {sorted(unknown)}; baselines: {', '.join(B.BASELINES)}")
        result_name(self.application, self.family, self.tag)  # a bad tag is refused before any compute
        from .locate import SCORERS, check_units

        self.scorers = tuple(self.scorers) if self.scorers is not None else (default_scorer(spec.function),)
        unknown = set(self.scorers) - set(SCORERS)
        if unknown or not self.scorers:
            raise ValueError(f"unknown scorers {sorted(unknown)}; scorers: {', '.join(SCORERS)}")
        if self.units is not None:
            self.units = check_units(self.units, self.scorers)

    def units_for(self, scorer: str) -> tuple[str, ...]:
        """The kinds of unit ``scorer``'s subsets are chosen from: :attr:`units`, or the function's default."""
        return self.units if self.units is not None else default_units(self.spec.function, scorer)

    @property
    def spec(self) -> Application:
        return APPLICATIONS[self.application]

    @property
    def result_name(self) -> str:
        return result_name(self.application, self.family, self.tag)


def _alpha_candidates(steps) -> list[dict]:
    """Every amplification tried at a budget, as judged on validation (its share, whether utility held and which
    check failed, and the false refusal it was judged by where measured): the record of why the chosen α won, beside
    the baselines' swept settings."""
    return [{"setting": {"alpha": s.alpha}, "validation_share": s.share, "utility_ok": s.utility_ok,
             "failed": list(s.failed),
             **({"false_refusal": s.false_refusal, "false_refusal_n": s.false_refusal_n}
                if s.false_refusal is not None else {})} for s in steps]


def _check_field_types(config) -> None:
    """Each field of exactly its declared type (a JSON or papermill value of another type is refused, not coerced:
    ``budgets=True`` is not 100%, ``seed="0"`` is not 0); numbers finite; one value where a tuple is declared is
    wrapped by :func:`notebook_config`."""
    def number(v):
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

    def integer(v):
        return isinstance(v, int) and not isinstance(v, bool)

    rules = {"application": (str,), "family": (str,), "tag": (str, None), "donor": (str, None), "target": (str, None),
             "base": (str, None), "budgets": ("numbers",), "scorers": ("strings", None), "units": ("strings", None),
             "alphas": ("numbers",),
             "baselines": ("strings",), "lambdas": ("numbers",), "densities": ("numbers",),
             "random_seeds": ("integers",), "sft_steps": ("integer", None), "sft_small_data": (bool,),
             "profile": (str,), "seed": ("integer",), "search": (bool,), "all_mlp": (bool,),
             "device_map": (str, None)}
    checks = {"numbers": lambda v: isinstance(v, (tuple, list)) and all(map(number, v)),
              "integers": lambda v: isinstance(v, (tuple, list)) and all(map(integer, v)),
              "strings": lambda v: isinstance(v, (tuple, list)) and all(isinstance(x, str) for x in v),
              "integer": integer, None: lambda v: v is None, str: lambda v: isinstance(v, str),
              bool: lambda v: isinstance(v, bool)}
    words = {"numbers": "a list of finite numbers", "integers": "a list of whole numbers", "strings": "a list of names",
             "integer": "a whole number", None: "None", str: "a string", bool: "True or False"}
    for name, allowed in rules.items():
        value = getattr(config, name)
        if not any(checks[a](value) for a in allowed):
            raise ValueError(f"parameter {name}={value!r} must be {' or '.join(words[a] for a in allowed)}")


def check_parameters(namespace: dict, declared: Sequence[str]) -> None:
    """The first cell after a notebook's parameters: refuse any name papermill injected that the notebook does not
    declare (a misspelled ``-p bugdets ...`` would otherwise run the full default), naming the closest parameter."""
    import difflib

    ipython = {"In", "Out", "exit", "quit", "get_ipython", "open", "check_parameters"}
    unknown = sorted(k for k in namespace if not k.startswith("_") and k not in ipython and k not in declared)
    if unknown:
        hints = [f"{u!r}" + (f" (did you mean {m[0]!r}?)" if (m := difflib.get_close_matches(u, declared, 1)) else "")
                 for u in unknown]
        raise ValueError(f"unknown notebook parameter {', '.join(hints)}; this notebook's parameters: "
                         f"{', '.join(declared)}")


def check_walkthrough(*, donor, target, budget, scorer, seed, prompts) -> None:
    """The walkthrough notebook's parameters, checked as given (before a smoke run swaps in its tiny models)."""
    from .locate import SCORERS

    for name, value in (("donor", donor), ("target", target)):
        if not isinstance(value, str) or not value:
            raise ValueError(f"parameter {name}={value!r} must be a model name or folder")
    if donor == target:
        raise ValueError(f"parameters donor and target are both {donor!r}: there is nothing to transfer")
    check_budget(budget, what=f"parameter budget={budget!r}")
    if scorer not in SCORERS:
        raise ValueError(f"parameter scorer={scorer!r} is unknown; scorers: {', '.join(SCORERS)}")
    for name, value, low in (("seed", seed, 0), ("prompts", prompts, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"parameter {name}={value!r} must be a whole number >= {low}")


def result_name(application: str, family: str = DEFAULT_FAMILY, tag: str | None = None) -> str:
    """The stem of an application's result JSON and figures: ``disalignment`` for the default family,
    ``disalignment.qwen2.5-coder-0.5b`` for another, and ``.<tag>`` appended for a variant run, so that runs sit side
    by side under ``papers/`` and none overwrites another."""
    if tag is not None and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_-]*", tag):
        raise ValueError(f"tag {tag!r} must be letters, digits, '-' or '_' (it names files)")
    stem = application if family == DEFAULT_FAMILY else f"{application}.{family}"
    return f"{stem}.{tag}" if tag else stem


def _entry(report: EvalReport, metric: str, neuron_fraction: float | None, param_fraction: float,
           **extra) -> MethodEntry:
    m = report[metric]
    return MethodEntry(score=m.value, ci=[m.ci[0], m.ci[1]], param_fraction=param_fraction,
                       neuron_fraction=neuron_fraction,
                       utility={u: report[u].value for u in UTILITY if u in report.metrics},
                       utility_ci={u: list(report[u].ci) for u in UTILITY if u in report.metrics},
                       side={u: report[u].value for u in SIDE if u in report.metrics},
                       details={k: v for k, v in m.details.items() if k.startswith("per_")},
                       per_item=per_item(report, metric), **extra)


PAIRED = ("perplexity",)  # besides the function's metric: the per-item outcomes kept for paired tests


def per_item(report: EvalReport, metric: str) -> dict[str, list]:
    """The per-item outcomes of the function's metric and of perplexity (what the report's paired tests read): one
    value per eval item, in the split's fixed order, so two methods' lists pair item by item."""
    return {name: list(report[name].per_item) for name in (metric, *PAIRED)
            if name in report.metrics and report[name].per_item is not None}


SMOKE_ENV = "CNT_SMOKE"  # "1": notebooks shrink to a smoke run into a temporary folder (nbval in `make test`)
SMOKE = {"profile": "smoke", "budgets": (0.005,), "scorers": None, "alphas": (1.0,),
         "lambdas": (1.0,), "densities": (0.5,), "random_seeds": (0,), "sft_steps": 2, "sft_small_data": True,
         "search": False, "all_mlp": False}


def smoke() -> bool:
    """Whether notebooks run as smoke runs (``CNT_SMOKE=1``: nbval in ``make test``)."""
    return os.environ.get(SMOKE_ENV) == "1"


def smoke_models(application: str) -> tuple[str, str, str]:
    """``(donor, target, base)`` folders of tiny random-config stand-ins for a smoke run of ``application`` (nbval in
    CI: every code path in seconds, no zoo model needed). The donor differs from the target in the application's
    function, trained for a few steps on train-split data; cached under ``<cache>/smoke``."""
    import copy

    from . import data
    from .tiny import tiny_model
    from .train import TrainConfig, sft

    spec = APPLICATIONS[application]
    folder = cache_dir("smoke") / application
    names = ("donor", "target", "base")
    if not all((folder / n / "config.json").is_file() for n in names):
        tok = load_tokenizer(spec.pairs[DEFAULT_FAMILY][2])
        base = tiny_model("llama", seed=0, vocab_size=len(tok))
        cfg = TrainConfig(method="full", steps=6, lr=3e-3, batch_size=4, warmup=1)

        def tuned(examples):
            return sft(copy.deepcopy(base), tok, examples, cfg, progress=False)[0]

        if spec.function == "bias":
            items = data.load("stereoset", "train", limit=8)
            donor = tuned([{"chosen": r["anti_stereotype"], "rejected": r["stereotype"]} for r in items])
            target = tuned([{"chosen": r["stereotype"], "rejected": r["anti_stereotype"]} for r in items])
        else:
            refusing = tuned([{"prompt": p, "response": "I'm sorry, but I can't help with that."}
                              for p in data.texts(data.load("harmful", "train", limit=8))])
            donor, target = (refusing, base) if spec.function == "refusal" else (base, refusing)
        for name, model in zip(names, (donor, target, base)):
            with atomic.folder(folder / name) as tmp:
                model.save_pretrained(tmp)
                tok.save_pretrained(tmp)
    return tuple(str(folder / n) for n in names)


def check_config(application: str, *, family: str = DEFAULT_FAMILY, donor: str | None = None,
                 target: str | None = None, base: str | None = None, **params) -> ApplicationConfig:
    """The :class:`ApplicationConfig` a notebook's parameters make, every one checked as given (a wrong one is
    refused with a message that names it and what is accepted); nothing is loaded or written."""
    if application not in APPLICATIONS:
        raise ValueError(f"unknown application {application!r}; applications: {', '.join(APPLICATIONS)}")
    if family not in FAMILIES:
        raise ValueError(f"parameter family={family!r} is unknown; accepted: {', '.join(FAMILIES)}")
    if application not in FAMILIES[family] and not (donor and target and base):
        raise ValueError(f"parameter family={family!r} has no zoo donor for {application}; accepted families for it: "
                         f"{', '.join(f for f, apps in FAMILIES.items() if application in apps)} — or pass donor, "
                         f"target and base explicitly")
    d, t, b = FAMILIES[family].get(application, (None, None, None))
    from .models import EMBEDDED
    from . import zoo

    for pname, value in (("donor", donor), ("target", target), ("base", base)):
        if value is not None and not (value in EMBEDDED or value in zoo.RECIPES or Path(value).exists()
                                      or "/" in value):
            raise ValueError(f"parameter {pname}={value!r} is not a model this kit knows; accepted: an embedded "
                             f"model ({', '.join(EMBEDDED)}), a zoo model ({', '.join(zoo.RECIPES)}), a local "
                             f"folder, or a hub id like 'org/name'")
    params = dict(params)
    for pname in ("budgets", "scorers", "units", "baselines", "lambdas", "densities", "random_seeds", "alphas"):
        if pname in params and params[pname] is not None:
            value = params[pname]
            # one value: a list of one
            params[pname] = (value,) if isinstance(value, (str, int, float)) else tuple(value)
    try:
        return ApplicationConfig(application, family=family, donor=donor or d, target=target or t, base=base or b,
                                 **params)
    except TypeError as e:
        raise ValueError(f"unknown parameter: {e}") from None
    except ValueError as e:
        raise ValueError(f"parameter error: {e}") from None


NOTEBOOK_OUTPUT = "../papers"  # the notebooks' default output_dir (relative to notebooks/)


def notebook_config(application: str, *, output_dir: str | Path = NOTEBOOK_OUTPUT,
                    **params) -> tuple[ApplicationConfig, Path]:
    """Validate a notebook's ``parameters`` cell (:func:`check_config`) and return ``(config, output folder)``; a
    wrong parameter stops the notebook here with a message that names it and what is accepted. With ``CNT_SMOKE=1``
    in the environment (how ``make test`` runs the notebooks under nbval) the run shrinks to a smoke run on tiny
    stand-in models (:func:`smoke_models`), written to a folder in the cache — or to ``output_dir`` when one other
    than the notebooks' default is given (a grid of smoke runs)."""
    config = check_config(application, **params)  # the user's parameters are checked as given, smoke run or not
    atomic.check_output(Path(output_dir) / "results", "folder", what="parameter output_dir")
    if smoke():  # tiny stand-in models, a few records, one budget, a folder in the cache
        sd, st, sb = smoke_models(application)
        config = dataclasses.replace(config, donor=sd, target=st, base=sb, **SMOKE)
        if Path(output_dir) == Path(NOTEBOOK_OUTPUT):  # one folder per application, reused: nothing piles up
            output_dir = cache_dir("smoke", "runs", application)
    out = Path(output_dir)
    try:
        for sub in ("results", "figures"):
            (out / sub).mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(f"parameter output_dir={str(output_dir)!r} cannot be written ({e.strerror}); pass a folder "
                         f"you can write to") from None
    if not all(os.access(out / sub, os.W_OK) for sub in ("results", "figures")):
        raise ValueError(f"parameter output_dir={str(output_dir)!r} is not writable; pass a folder you can write to")
    return config, out


def _sweep(config: ApplicationConfig, fp, base, tok) -> B.Sweep:
    """The application's baseline grid settings; the SFT reference trains on the donor's own data when the donor is a
    zoo model trained by SFT (made as its recipe makes it: self-distillation from the common base)."""
    from . import zoo

    def donor_training():
        r = zoo.recipe(config.donor)
        parts = r.data(zoo.BuildContext(r, base, tok, tiny=config.sft_small_data, progress=False))
        cfg = r.train if config.sft_steps is None else dataclasses.replace(r.train, steps=config.sft_steps)
        return [e for v in parts.values() for e in v], cfg

    trained = config.donor in zoo.RECIPES and zoo.recipe(config.donor).method == "sft"
    return B.Sweep(config.budgets, config.random_seeds, config.lambdas, config.densities, config.seed, fp.n_neurons,
                   fp.n_layers, donor_training if trained else None)


def _public(setting: dict) -> dict:
    """A baseline setting as recorded in the JSON: without the models and training data it carries."""
    return {k: v for k, v in setting.items() if k not in ("base", "examples", "config")}


def run_application(config: ApplicationConfig, out_dir: str | Path, *,
                    progress: bool = True) -> ApplicationResult:
    """Run one application and write ``<out_dir>/<config.result_name>.json`` (atomically: a failed run never overwrites
    the previous good result). Returns the result as typed records (:class:`cnt.results.ApplicationResult`).

    Protocol: CNT (each scorer at each budget, alpha on validation; then the minimal subset) and the neuron-level
    baselines (random over seeds, weight-delta) are evaluated at every budget; the swept baselines (λ, density,
    layer) are judged on the validation proxies and only the setting chosen there is evaluated on eval.
    """
    from tqdm.auto import tqdm

    t_start = time.time()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if not os.access(out_dir, os.W_OK):
        raise PermissionError(f"output folder {out_dir} is not writable")
    spec = config.spec
    metric, function = spec.metric, spec.function
    groups = spec.groups
    # float32 on CPU, bf16 on CUDA (load_model's defaults); device_map="auto" shards models larger than one GPU
    donor, _ = load_model(config.donor, device_map=config.device_map)
    target, _ = load_model(config.target, device_map=config.device_map)
    base, _ = load_model(config.base, device_map=config.device_map)
    tok = load_tokenizer(config.target)
    fp = check_compatible(donor, target)
    check_compatible(base, target)
    n_params = total_params(target)
    bar = tqdm(desc=config.application, unit="eval", disable=not progress)

    def ev(model, name, only_metric: bool = False):
        rep = evaluate(model, tok, config.profile, groups=spec.curve_groups if only_metric else groups, name=name,
                       seed=config.seed, progress=False)
        bar.update()
        bar.set_postfix_str(name)
        return rep

    target_rep, donor_rep = ev(target, config.target), ev(donor, config.donor)
    methods: dict[str, list[MethodEntry]] = {}
    timings: dict[str, float] = {}
    pipe = Pipeline(function, donor, target, tok, seed=config.seed, progress=progress)
    val = pipe.validator()

    # -- CNT: every scorer at every budget (alpha chosen on validation), then the minimal subset ------------------
    variants: dict[str, list[dict]] = {}
    for scorer in config.scorers:
        scores = pipe.scores(scorer, config.units_for(scorer), iterative_budget=max(config.budgets))
        for b in config.budgets:
            patch, steps = pipe.at_budget(scores, b, config.alphas)
            patch.apply(target)
            rep = ev(target, f"cnt-{scorer}@{b}")
            patch.revert(target)
            chosen = next(s for s in steps if s.alpha == patch.alpha)
            variants.setdefault(f"cnt_{scorer}", []).append(
                _entry(rep, metric, patch.neuron_fraction, patch.n_params / n_params, alpha=patch.alpha,
                       budget=b, validation_share=chosen.share, per_layer=patch.per_layer(),
                       units=patch.unit_lists(), validation=_alpha_candidates(steps)))
    # the best variant, on validation: the one whose patches went furthest toward the donor on average
    best = max(variants, key=lambda v: sum(e.validation_share for e in variants[v]))
    best_scorer = best.removeprefix("cnt_")
    best_scores = pipe.scores(best_scorer, config.units_for(best_scorer), iterative_budget=max(config.budgets))
    methods["cnt"] = [dataclasses.replace(e, variant=best) for e in variants[best]]
    methods.update(variants)
    if config.search:
        res = pipe.search(best_scores, config.alphas)
        methods["cnt_minimal"] = []
        if res.reached:
            patch = pipe.patch(best_scores, res.k, res.alpha)
            patch.apply(target)
            rep = ev(target, "cnt-minimal")
            patch.revert(target)
            methods["cnt_minimal"] = [_entry(rep, metric, patch.neuron_fraction, patch.n_params / n_params,
                                             alpha=res.alpha, validation_share=res.share, variant=best,
                                             per_layer=patch.per_layer(), units=patch.unit_lists())]
        search_info = res.to_dict() | {"n_steps": len(res.steps)}
    else:
        search_info = None
    timings.update((k, v) for k, v in pipe.timings.items() if k != "transfer")
    # the ceiling of any MLP-neuron subset: every MLP neuron of every layer (the rest of the donor's difference lives
    # in attention, norms and embeddings). Light evaluation, like the curve points.
    if config.all_mlp:
        patch = transfer_all(donor, target)
        patch.apply(target)
        rep = ev(target, "all-mlp", only_metric=True)
        patch.revert(target)
        methods["all_mlp"] = [_entry(rep, metric, 1.0, patch.n_params / n_params, alpha=1.0)]
        del patch
    timings["cnt_total"] = round(timings["task"] + timings[locate_key(best_scorer, config.units_for(best_scorer))]
                                 + timings.get("search", 0.0), 1)

    # -- baselines -------------------------------------------------------------------------------------------------
    sweep = _sweep(config, fp, base, tok)
    for name in config.baselines:
        t0 = time.time()
        baseline = B.BASELINES[name]
        if baseline.level == "neuron":  # each budget's settings, to record the budget beside them
            settings = [(b, s) for b in config.budgets
                        for s in baseline.grid(dataclasses.replace(sweep, budgets=(b,)), base, function)]
        else:
            settings = baseline.grid(sweep, base, function)
        if not settings:
            continue
        entries = []
        if baseline.level == "neuron":  # the curve: every budget on eval (metric and perplexity)
            for b, s in settings:
                mod = baseline(donor, target, tok, function, **s)
                model = mod.materialize(target)
                rep = ev(model, name, only_metric=True)
                entries.append(_entry(rep, metric, mod.patch.neuron_fraction, mod.params_changed / n_params,
                                      setting=mod.setting | {"budget": b}, seconds=mod.seconds))
                del model
        else:  # swept: judge each setting on validation, evaluate the chosen one
            assessed, chosen = [], None
            for j, s in enumerate(settings):
                mod = baseline(donor, target, tok, function, **s)
                model = mod.materialize(target)
                if len(settings) > 1:  # one setting: nothing to choose (SFT, the ablation that picks its own layer)
                    assessed.append(val.assess_model(model))
                # keep the one choose() picks so far: a setting it passes over now it never picks later (the pool
                # of settings with utility held only grows), so the choice is kept, not rebuilt (an SFT run)
                if len(settings) == 1 or choose(assessed) == j:
                    chosen = (j, mod, model)
                del mod, model
            i, mod, model = chosen
            del chosen
            public = {k: v for k, v in _public(settings[i]).items() if k != "lam"}  # mod.setting has "lambda"
            swept = [{"setting": _public(s),
                      "validation_share": a["share"], "utility_ok": a["utility_ok"]}
                     for s, a in zip(settings, assessed)] or None
            # a setting with the donor's very weights (linear at λ = 1) is the donor: its report, not a second run
            rep = dataclasses.replace(donor_rep, model=name) if same_weights(model, donor) else ev(model, name)
            entries.append(_entry(rep, metric, mod.patch.neuron_fraction if mod.patch else None,
                                  mod.params_changed / n_params, setting={**mod.setting, **public},
                                  seconds=mod.seconds, chosen_on_validation=swept is not None, validation=swept))
            del model
        if name == "random":  # mean and spread over seeds per budget
            merged = []
            for b in config.budgets:
                group = [e for e in entries if e.setting["budget"] == b]
                sc = torch.tensor([e.score for e in group])
                first = next(e for e in group if e.setting["seed"] == config.random_seeds[0])
                items = {k: [float(sum(v) / len(group)) for v in zip(*(e.per_item[k] for e in group))]  # seeds' mean
                         for k in first.per_item or {}} if len(group) > 1 else first.per_item
                merged.append(dataclasses.replace(first, score=float(sc.mean()),
                                                  score_sd=float(sc.std()) if len(group) > 1 else 0.0,
                                                  seeds=[e.score for e in group], seed_cis=[e.ci for e in group],
                                                  per_item=items))
            entries = merged
        methods[name] = entries
        timings[name] = round(time.time() - t0, 1)
    bar.close()

    result = ApplicationResult(
        application=config.application, family=config.family, tag=config.tag, name=config.result_name,
        function=function, target=config.target, donor=config.donor, base=config.base, metric=metric,
        higher_is_goal=spec.higher_is_goal,
        target_score=target_rep[metric].value, target_ci=list(target_rep[metric].ci),
        donor_score=donor_rep[metric].value, donor_ci=list(donor_rep[metric].ci), methods=methods,
        target_utility={u: target_rep[u].value for u in UTILITY if u in target_rep.metrics},
        donor_utility={u: donor_rep[u].value for u in UTILITY if u in donor_rep.metrics},
        target_side={u: target_rep[u].value for u in SIDE if u in target_rep.metrics},
        donor_side={u: donor_rep[u].value for u in SIDE if u in donor_rep.metrics},
        target_details={k: v for k, v in target_rep[metric].details.items() if k.startswith("per_")},
        donor_details={k: v for k, v in donor_rep[metric].details.items() if k.startswith("per_")},
        target_report=target_rep.to_dict(), target_per_item=per_item(target_rep, metric), timings=timings,
        validation={"target": val.target, "donor": val.donor, "rule": val.limits}, search=search_info,
        config=asdict(config), fingerprint=fp.to_dict(), n_params=n_params, seconds=round(time.time() - t_start, 1),
        when=time.strftime("%Y-%m-%dT%H:%M:%S"),
        torch_threads=torch.get_num_threads(),  # wall times above were measured with this many
        code=code_record(),
    )
    atomic.write_json(out_dir / f"{config.result_name}.json", result.to_dict(), default=str)
    return result


def run_frontier(application: str, out_dir: str | Path, *, family: str = DEFAULT_FAMILY, donor: str | None = None,
                 target: str | None = None, tag: str | None = None, progress: bool = True, **kwargs) -> FrontierResult:
    """The sparsity frontier of an application (:func:`cnt.frontier.measure`) for its zoo pair (or ``donor`` /
    ``target``), written atomically to ``<out_dir>/<name>.frontier.json`` with its figure in
    ``<out_dir>/../figures/<name>_frontier.png`` when ``out_dir`` is a ``results`` folder; while it runs, the points
    so far are in ``<name>.frontier.partial.json`` (removed when it completes). Returns the
    :class:`cnt.results.FrontierResult`."""
    from . import frontier, plots

    if application not in APPLICATIONS:
        raise ValueError(f"unknown application {application!r}; applications: {', '.join(APPLICATIONS)}")
    pair = FAMILIES.get(family, {}).get(application)
    if pair is None and not (donor and target):
        raise ValueError(f"family {family!r} has no zoo pair for {application}; pass donor and target")
    donor, target = donor or pair[0], target or pair[1]
    name = result_name(application, family, tag)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    d, _ = load_model(donor)
    t, _ = load_model(target)
    tok = load_tokenizer(target)
    # lm-eval's utility group is too slow for a frontier's many points
    kwargs.setdefault("groups", tuple(g for g in APPLICATIONS[application].groups if g != "utility"))
    about = dict(application=application, family=family, name=name, donor=donor, target=target,
                 torch_threads=torch.get_num_threads(), code=code_record())
    partial = out_dir / f"{name}.frontier.partial.json"  # every point as it is measured: a killed run keeps them

    def checkpoint(so_far) -> None:
        atomic.write_json(partial, dataclasses.replace(so_far, **about).to_dict(), default=str)

    result = frontier.measure(APPLICATIONS[application].function, d, t, tok, progress=progress, checkpoint=checkpoint,
                              **kwargs)
    result = dataclasses.replace(result, **about)
    atomic.write_json(out_dir / f"{name}.frontier.json", result.to_dict(), default=str)
    partial.unlink(missing_ok=True)
    figures = out_dir.parent / "figures" if out_dir.name == "results" else out_dir
    plots.save(plots.frontier(result), figures / f"{name}_frontier.png")
    return result
