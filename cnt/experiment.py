"""One application end to end: CNT (variants and budgets) + every baseline + evaluation -> typed records -> JSON.

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

import json
import os
import shutil
import tempfile
import time
from copy import deepcopy
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from . import baselines as B
from .arch import check_compatible, total_params
from .evaluate import PROFILES, EvalReport, evaluate
from .locate import locate
from .models import load_model, load_tokenizer
from .search import Proxy, build_task, minimal_subset
from .transfer import NeuronPatch

APPLICATIONS = {
    "disalignment": {"function": "compliance", "donor": "smol-uncensored", "target": "smol-safe",
                     "base": "smollm2-135m-instruct", "metric": "refusal_rate", "higher_is_goal": False},
    "alignment_enhancement": {"function": "refusal", "donor": "smol-safe", "target": "smol-arith",
                              "base": "smollm2-135m-instruct", "metric": "refusal_rate", "higher_is_goal": True},
    "bias_removal": {"function": "bias", "donor": "smol-debiased", "target": "smol-biased",
                     "base": "smollm2-135m-instruct", "metric": "stereoset_ss", "higher_is_goal": False},
}
UTILITY = ("mmlu", "nq_open", "perplexity")
GROUPS = {"refusal_rate": ("safety", "utility", "perplexity", "skill"),
          "stereoset_ss": ("bias", "utility", "perplexity", "skill")}


@dataclass
class ApplicationConfig:
    application: str
    donor: str | None = None
    target: str | None = None
    base: str | None = None
    budgets: tuple[float, ...] = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.05)
    scorers: tuple[str, ...] = ("attribution", "activation_contrast")
    alphas: tuple[float, ...] = (1.0, 2.0)
    baselines: tuple[str, ...] = ("random", "weight_delta", "linear", "task_arithmetic", "ties", "dare",
                                  "refusal_direction", "sft")
    lambdas: tuple[float, ...] = (0.25, 0.5, 1.0)
    densities: tuple[float, ...] = (0.1, 0.5)
    random_seeds: tuple[int, ...] = (0, 1, 2)
    profile: str = "quick"
    seed: int = 0
    search: bool = True

    def __post_init__(self):
        if self.application not in APPLICATIONS:
            raise ValueError(f"unknown application {self.application!r}; applications: {', '.join(APPLICATIONS)}")
        spec = APPLICATIONS[self.application]
        self.donor = self.donor or spec["donor"]
        self.target = self.target or spec["target"]
        self.base = self.base or spec["base"]
        if self.profile not in PROFILES:
            raise ValueError(f"unknown profile {self.profile!r}; profiles: {', '.join(PROFILES)}")
        bad = [b for b in self.budgets if not 0 < b <= 1]
        if bad:
            raise ValueError(f"budgets must be fractions in (0, 1], got {bad}")
        unknown = set(self.baselines) - set(B.BASELINES)
        if unknown:
            raise ValueError(f"unknown baselines {sorted(unknown)}; baselines: {', '.join(B.BASELINES)}")

    @property
    def spec(self) -> dict:
        return APPLICATIONS[self.application]


def _entry(report: EvalReport, metric: str, neuron_fraction: float | None, param_fraction: float, **extra) -> dict:
    m = report[metric]
    return {"neuron_fraction": neuron_fraction, "param_fraction": param_fraction, "score": m.value,
            "ci": [m.ci[0], m.ci[1]], "utility": {u: report[u].value for u in UTILITY if u in report.metrics},
            "utility_ci": {u: list(report[u].ci) for u in UTILITY if u in report.metrics}, **extra}


def run_application(config: ApplicationConfig, out_dir: str | Path, *, progress: bool = True) -> dict:
    """Run one application and write ``<out_dir>/<application>.json`` (atomically: a failed run never overwrites the
    previous good result). Returns the result dict."""
    t_start = time.time()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if not os.access(out_dir, os.W_OK):
        raise PermissionError(f"output folder {out_dir} is not writable")
    spec = config.spec
    metric, function = spec["metric"], spec["function"]
    groups = GROUPS[metric]
    donor, _ = load_model(config.donor, dtype="float32")
    target, _ = load_model(config.target, dtype="float32")
    base, _ = load_model(config.base, dtype="float32")
    tok = load_tokenizer(config.target)
    fp = check_compatible(donor, target)
    check_compatible(base, target)
    n_params = total_params(target)

    def ev(model, name):
        return evaluate(model, tok, config.profile, groups=groups, name=name, seed=config.seed, progress=False)

    target_rep, donor_rep = ev(target, config.target), ev(donor, config.donor)
    methods: dict[str, list[dict]] = {}
    timings: dict[str, float] = {}

    # -- CNT: every scorer at every budget (alpha chosen on validation by the proxy), then the searched subset ------
    task = build_task(function, donor, target, tok, seed=config.seed, progress=progress)
    proxy = Proxy.for_function(function, config.seed)
    variants: dict[str, list[dict]] = {}
    ranked = {}
    work = deepcopy(target).to(torch.bfloat16)  # validation proxies run on a bf16 copy
    t_proxy = proxy.measure(work, tok)["score"]
    with torch.no_grad():
        d_proxy = proxy.measure(deepcopy(donor).to(torch.bfloat16), tok)["score"]
    direction = 1.0 if d_proxy >= t_proxy else -1.0
    for scorer in config.scorers:
        extra = {"budget": max(1, int(max(config.budgets) * fp.n_neurons))} if scorer == "iterative" else {}
        scores = locate(scorer, task, donor, target, tok, progress=progress, **extra)
        ranked[scorer] = scores
        timings[f"locate_{scorer}"] = scores.seconds
        for b in config.budgets:
            k = max(1, round(b * fp.n_neurons))
            best_alpha, best_proxy = config.alphas[0], None
            if len(config.alphas) > 1:  # choose alpha on validation (proxy), never on eval
                for a in config.alphas:
                    p = NeuronPatch.extract(donor, target, scores.top(k), alpha=a)
                    p.apply(work)
                    moved = direction * (proxy.measure(work, tok)["score"] - t_proxy)
                    p.revert(work)
                    if best_proxy is None or moved > best_proxy:
                        best_alpha, best_proxy = a, moved
            patch = NeuronPatch.extract(donor, target, scores.top(k), alpha=best_alpha)
            patch.apply(target)
            rep = ev(target, f"cnt-{scorer}@{b}")
            patch.revert(target)
            variants.setdefault(f"cnt_{scorer}", []).append(
                _entry(rep, metric, patch.neuron_fraction, patch.n_params / n_params, alpha=best_alpha,
                       per_layer=patch.per_layer()))
    del work
    # the best variant: the one whose mean score moves furthest toward the donor
    sign = 1 if spec["higher_is_goal"] else -1
    best = max(variants, key=lambda v: sign * sum(e["score"] for e in variants[v]))
    methods["cnt"] = [{**e, "variant": best} for e in variants[best]]
    for v, entries in variants.items():
        methods[v] = entries
    if config.search:
        res = minimal_subset(ranked[best.removeprefix("cnt_")], donor, target, tok, proxy, alphas=config.alphas,
                             progress=progress)
        timings["search"] = res.seconds
        if res.reached:
            patch = NeuronPatch.extract(donor, target, ranked[best.removeprefix("cnt_")].top(res.k), alpha=res.alpha)
            patch.apply(target)
            rep = ev(target, "cnt-minimal")
            patch.revert(target)
            methods["cnt_minimal"] = [_entry(rep, metric, patch.neuron_fraction, patch.n_params / n_params,
                                             alpha=res.alpha, validation_share=res.share)]
        else:
            methods["cnt_minimal"] = []

    # -- baselines -------------------------------------------------------------------------------------------------
    for name in config.baselines:
        t0 = time.time()
        settings: list[dict] = []
        if name in ("random", "weight_delta"):
            for b in config.budgets:
                k = max(1, round(b * fp.n_neurons))
                seeds = config.random_seeds if name == "random" else (0,)
                settings += [{"k": k, "seed": s, "budget": b} for s in seeds]
        elif name in ("linear", "task_arithmetic"):
            settings = [{"lam": lam, "base": base} for lam in config.lambdas]
        elif name in ("ties", "dare"):
            settings = [{"lam": lam, "density": d, "base": base, "seed": config.seed}
                        for lam in config.lambdas for d in config.densities]
        elif name == "refusal_direction":
            if function == "bias":
                continue
            settings = [{"seed": config.seed}]
        elif name == "sft":
            from . import zoo

            if config.donor not in zoo.RECIPES or zoo.recipe(config.donor).method != "sft":
                continue
            r = zoo.recipe(config.donor)
            parts = r.data(zoo.BuildContext(r, target, tok, progress=False))
            settings = [{"examples": [e for v in parts.values() for e in v], "config": r.train}]
        entries = []
        for s in settings:
            mod = B.run(name, donor, target, tok, function, **s)
            model = mod.materialize(target)
            rep = ev(model, f"{name}")
            public = {k: v for k, v in s.items() if k not in ("base", "examples", "config")}
            entries.append(_entry(rep, metric, mod.patch.neuron_fraction if mod.patch else None,
                                  mod.params_changed / n_params, setting={**mod.setting, **public},
                                  seconds=mod.seconds))
            del model
        if name == "random":  # mean and spread over seeds per budget
            merged = []
            for b in config.budgets:
                group = [e for e in entries if e["setting"]["budget"] == b]
                scores = torch.tensor([e["score"] for e in group])
                merged.append({**group[0], "score": float(scores.mean()), "score_sd": float(scores.std()) if len(
                    group) > 1 else 0.0, "seeds": [e["score"] for e in group]})
            entries = merged
        methods[name] = entries
        timings[name] = round(time.time() - t0, 1)

    result = {
        "application": config.application, "function": function, "target": config.target, "donor": config.donor,
        "base": config.base, "metric": metric, "higher_is_goal": spec["higher_is_goal"],
        "target_score": target_rep[metric].value, "target_ci": list(target_rep[metric].ci),
        "donor_score": donor_rep[metric].value, "donor_ci": list(donor_rep[metric].ci),
        "target_utility": {u: target_rep[u].value for u in UTILITY if u in target_rep.metrics},
        "donor_utility": {u: donor_rep[u].value for u in UTILITY if u in donor_rep.metrics},
        "target_report": target_rep.to_dict(), "methods": methods, "timings": timings,
        "config": {k: v for k, v in asdict(config).items()}, "fingerprint": fp.to_dict(),
        "seconds": round(time.time() - t_start, 1), "when": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    final = out_dir / f"{config.application}.json"
    fd, tmp = tempfile.mkstemp(dir=out_dir, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(result, f, indent=1, default=str)
    shutil.move(tmp, final)
    return result
