"""Results as typed records: an application run (what :func:`cnt.experiment.run_application` writes as
``papers/results/<name>.json``) and a sparsity frontier (what :func:`cnt.frontier.measure` returns and
:func:`cnt.experiment.run_frontier` writes as ``<name>.frontier.json``), read back by :mod:`cnt.report` and
:mod:`cnt.plots`. One schema each, in one place: ``to_dict`` and ``from_dict`` are inverses, and a file with a field
the schema does not know is refused by name (rather than half read)."""

from __future__ import annotations

import json
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path


def _check_fields(cls, d: dict, where: str) -> None:
    """Refuse a record with a field ``cls`` does not have, or without one it requires, naming them and ``where``."""
    unknown = sorted(set(d) - {f.name for f in fields(cls)})
    if unknown:
        raise ValueError(f"{where}: unknown fields {unknown}")
    missing = [f.name for f in fields(cls) if f.name not in d and f.default is MISSING and f.default_factory is MISSING]
    if missing:
        raise ValueError(f"{where}: missing fields {missing}")


class _FlatRecord:
    """A record of plain fields: from a dict with exactly its fields (see :func:`_check_fields`)."""

    @classmethod
    def from_dict(cls, d: dict, where: str | None = None):
        _check_fields(cls, d, where or cls.__name__)
        return cls(**d)


@dataclass
class MethodEntry(_FlatRecord):
    """One method at one setting, measured on the eval split: the function's metric with its 95% CI, the share of
    MLP neurons and of the weights it changed, utility and side metrics, and what chose the setting."""

    score: float
    ci: list[float]
    param_fraction: float
    neuron_fraction: float | None = None
    utility: dict[str, float] = field(default_factory=dict)
    utility_ci: dict[str, list[float]] = field(default_factory=dict)
    side: dict[str, float] = field(default_factory=dict)
    details: dict = field(default_factory=dict)  # per-category breakdowns of the metric (bias types)
    alpha: float | None = None
    budget: float | None = None
    validation_share: float | None = None  # the share of the gap on the validation proxies
    per_layer: dict | None = None  # CNT: transferred neurons per layer
    units: dict | None = None  # CNT: the selected units, {kind: {layer: [index, ...]}} (stability across seeds)
    variant: str | None = None  # CNT: the scorer chosen on validation
    setting: dict | None = None  # a baseline's setting
    seconds: float | None = None
    chosen_on_validation: bool | None = None
    validation: list | None = None  # every setting tried on validation (a baseline's sweep; CNT's α per budget)
    score_sd: float | None = None  # random neurons: spread over seeds
    seeds: list[float] | None = None
    seed_cis: list | None = None
    per_item: dict[str, list] | None = None  # each eval item's outcome (the metric's, perplexity's): paired tests

    ALWAYS = ("neuron_fraction", "param_fraction", "score", "ci", "utility", "utility_ci", "side")

    def to_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k in self.ALWAYS or (v is not None and v != {})}


@dataclass
class ApplicationResult:
    """One application run: the pair, the metric, target and donor measured on eval, every method's entries, the
    search, timings and the configuration that made it."""

    application: str
    function: str
    target: str
    donor: str
    metric: str
    higher_is_goal: bool
    target_score: float
    target_ci: list[float]
    donor_score: float
    donor_ci: list[float]
    methods: dict[str, list[MethodEntry]]
    base: str | None = None
    family: str | None = None  # None: read from the config, else the default family
    tag: str | None = None
    name: str = ""  # the results file's stem
    target_utility: dict[str, float] = field(default_factory=dict)
    donor_utility: dict[str, float] = field(default_factory=dict)
    target_side: dict[str, float] = field(default_factory=dict)
    donor_side: dict[str, float] = field(default_factory=dict)
    target_details: dict = field(default_factory=dict)
    donor_details: dict = field(default_factory=dict)
    target_report: dict = field(default_factory=dict)
    target_per_item: dict[str, list] | None = None  # the target's outcome on each eval item (paired tests)
    timings: dict[str, float] = field(default_factory=dict)
    validation: dict = field(default_factory=dict)  # the target's and donor's validation proxies
    search: dict | None = None  # the minimal-subset search (None: not run)
    config: dict = field(default_factory=dict)
    fingerprint: dict = field(default_factory=dict)
    n_params: int = 0
    seconds: float = 0.0
    when: str = ""
    torch_threads: int | None = None
    code: dict | None = None  # the kit's version and sources digest (cnt.provenance; None: written before it was kept)

    def to_dict(self) -> dict:
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["methods"] = {name: [e.to_dict() for e in entries] for name, entries in self.methods.items()}
        return out

    @classmethod
    def from_dict(cls, d: dict, where: str = "result") -> "ApplicationResult":
        _check_fields(cls, d, where)
        methods = {name: [MethodEntry.from_dict(e, f"{where}: methods[{name!r}]") for e in entries]
                   for name, entries in d["methods"].items()}
        return cls(**{**d, "methods": methods})

    @classmethod
    def load(cls, path: str | Path) -> "ApplicationResult":
        return cls.from_dict(json.loads(Path(path).read_text()), str(path))

    def entries(self, method: str) -> list[MethodEntry]:
        """A method's entries (empty when it was not run)."""
        return self.methods.get(method) or []


@dataclass
class FrontierPoint(_FlatRecord):
    """One point of a frontier: a method (a locator, ``random``, ``weight_delta``, a ceiling's name, ``donor``) at one
    budget, its amplitude chosen on validation, measured on eval (the metric, its share of the gap with 95% CIs,
    utility against the kit's goals)."""

    method: str
    kinds: list[str]
    budget: float | None  # the requested fraction of weights (None: a ceiling or the donor)
    param_fraction: float  # what the patch moves
    units: dict[str, int]
    alpha: float
    validation_share: float
    utility_ok: bool
    score: float
    ci: list[float]
    share: float
    share_ci: list[float]
    perplexity: float | None
    utility: dict = field(default_factory=dict)  # eval: each utility metric's change from the target, and held or not
    utility_held: bool | None = None  # every utility goal met on eval (perplexity, false refusal, broken text, skill)
    extra: dict = field(default_factory=dict)  # the candidates' validation proxies, a random point's seed

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class FrontierResult:
    """The sparsity frontier of one pair: target and donor on eval, every point, and what made them (budgets,
    amplitudes, the task, the validation proxies, timings). ``partial``: points still being added (a checkpoint);
    ``runs``: where a frontier was measured in parts with the same target/donor/validation measurements, each part."""

    function: str
    metric: str
    target_score: float
    target_ci: list[float]
    donor_score: float
    donor_ci: list[float]
    target_perplexity: float | None
    donor_perplexity: float | None
    points: list[FrontierPoint]
    target_metrics: dict[str, float] = field(default_factory=dict)
    donor_metrics: dict[str, float] = field(default_factory=dict)
    donor_utility: dict = field(default_factory=dict)
    groups: list[str] = field(default_factory=list)
    task: dict = field(default_factory=dict)
    validation: dict = field(default_factory=dict)
    budgets: list[float] = field(default_factory=list)
    alphas: list[float] = field(default_factory=list)
    baselines: list[str] | None = None  # the neuron-level baselines measured (None: not recorded)
    profile: str = ""
    seed: int = 0
    n_params: int = 0
    timings: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0
    when: str = ""
    partial: bool = False
    application: str | None = None  # the pair, as the runner names it
    family: str | None = None
    name: str = ""  # the results file's stem
    donor: str | None = None
    target: str | None = None
    torch_threads: int | None = None
    runs: list[dict] | None = None
    code: dict | None = None  # the kit's version and sources digest (cnt.provenance)

    def to_dict(self) -> dict:
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["points"] = [p.to_dict() for p in self.points]
        return out

    @classmethod
    def from_dict(cls, d: dict, where: str = "frontier") -> "FrontierResult":
        _check_fields(cls, d, where)
        points = [FrontierPoint.from_dict(p, f"{where}: points[{i}]") for i, p in enumerate(d["points"])]
        return cls(**{**d, "points": points})

    @classmethod
    def load(cls, path: str | Path) -> "FrontierResult":
        return cls.from_dict(json.loads(Path(path).read_text()), str(path))
