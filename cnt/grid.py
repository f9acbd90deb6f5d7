"""A grid of notebook runs, read from a YAML file: the cross product of applications × (families or named model
pairs) × seeds × profiles × tags, less exclusions, each with its resources and papermill parameters.

A grid file::

    runs:                          # the axes of the cross product (a single value is one value)
      application: [disalignment, alignment_enhancement]
      family: smollm2              # or `models:` a list of {name, donor, target, base} (any name load_model takes)
      seed: [0, 1]
      profile: sweep
      tag: null
    exclude:                       # combinations left out (each a partial match on the axes)
      - {application: alignment_enhancement, seed: 1}
    parameters: {budgets: [0.001, 0.005]}    # papermill parameters for every run
    resources: {cpus: 1, gpus: 0, memory_gb: 8}
    overrides:                     # per-run resources or parameters, for the runs that match
      - {match: {family: qwen2.5-coder-0.5b}, resources: {memory_gb: 16}}

Everything is checked before any run starts — an unknown key, application, family or parameter, a value
:class:`cnt.experiment.ApplicationConfig` rejects, two runs with the same name — and refused with the file and line
(:class:`GridError`). A run's results keep their own file: seed, profile and model pair enter its ``tag`` whenever they
differ from the notebook's defaults (``disalignment.seed1``), so no run overwrites another.
"""

from __future__ import annotations

import hashlib
import itertools
import json
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .applications import APPLICATIONS, DEFAULT_FAMILY

AXES = ("application", "family", "models", "seed", "profile", "tag")
TOP = ("runs", "exclude", "parameters", "resources", "overrides")
RESOURCES = {"cpus": 1, "gpus": 0, "memory_gb": None}
MODEL_KEYS = ("name", "donor", "target", "base")
RESERVED = ("family", "donor", "target", "base", "seed", "profile", "tag", "output_dir")  # set by the axes


class GridError(ValueError):
    """A grid file that cannot run; the message names the file and line."""


@dataclass(frozen=True)
class Run:
    """One papermill execution of an application's notebook."""

    name: str
    application: str
    notebook: str  # the notebook's file name
    parameters: dict  # papermill parameters (output_dir is added by the backend)
    resources: dict = field(default_factory=lambda: dict(RESOURCES))
    line: int = 0  # the grid line the run came from (its axes' start)

    @property
    def result_name(self) -> str:
        from .experiment import result_name

        return result_name(self.application, self.parameters.get("family", DEFAULT_FAMILY), self.parameters.get("tag"))

    def digest(self) -> str:
        """What the run computes: its notebook and parameters (not its resources)."""
        blob = json.dumps({"notebook": self.notebook, "parameters": self.parameters}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


# ---------------------------------------------------------------------------------------------------------------------
# YAML with line numbers
# ---------------------------------------------------------------------------------------------------------------------

class _Mapping(dict):
    line: int = 0
    lines: dict


class _Sequence(list):
    line: int = 0
    lines: list


class _Loader(yaml.SafeLoader):
    pass


def _mapping(loader, node):
    out = _Mapping()
    out.line, out.lines = node.start_mark.line + 1, {}
    for k_node, v_node in node.value:
        key = loader.construct_object(k_node, deep=True)
        if key in out:
            raise GridError(f"line {k_node.start_mark.line + 1}: key {key!r} given twice")
        out[key] = loader.construct_object(v_node, deep=True)
        out.lines[key] = k_node.start_mark.line + 1
    return out


def _sequence(loader, node):
    out = _Sequence(loader.construct_object(n, deep=True) for n in node.value)
    out.line, out.lines = node.start_mark.line + 1, [n.start_mark.line + 1 for n in node.value]
    return out


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping)
_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_SEQUENCE_TAG, _sequence)


def _line(obj, key=None) -> int:
    if key is not None and isinstance(obj, _Mapping):
        return obj.lines.get(key, obj.line)
    return getattr(obj, "line", 0)


# ---------------------------------------------------------------------------------------------------------------------
# reading and expanding
# ---------------------------------------------------------------------------------------------------------------------

def load(path: str | Path, notebooks: str | Path = "notebooks") -> list[Run]:
    """The runs a grid file names, every one checked against the applications, :class:`ApplicationConfig` and the
    parameters the notebooks in ``notebooks`` declare (:class:`GridError` naming the file and line otherwise)."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise GridError(f"{path}: cannot be read ({e.strerror})") from None
    try:
        return parse(text, notebooks)
    except GridError as e:
        msg = str(e)
        raise GridError(msg if msg.startswith(str(path)) else f"{path}:{msg.removeprefix('line ')}") from None


def parse(text: str, notebooks: str | Path = "notebooks") -> list[Run]:
    """:func:`load` on the text of a grid file (errors say ``line N: ...``)."""
    try:
        doc = yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        raise GridError(f"line {mark.line + 1 if mark else 0}: not YAML ({getattr(e, 'problem', e)})") from None
    if not isinstance(doc, dict):
        raise GridError("line 1: a grid is a mapping with `runs:` (and optionally exclude, parameters, resources, "
                        "overrides)")
    for key in doc:
        if key not in TOP:
            raise GridError(f"line {_line(doc, key)}: unknown key {key!r}; a grid has {', '.join(TOP)}")
    if "runs" not in doc or not isinstance(doc["runs"], dict):
        raise GridError(f"line {_line(doc)}: `runs:` (a mapping of axes: {', '.join(AXES)}) is required")
    axes = doc["runs"]
    for key in axes:
        if key not in AXES:
            raise GridError(f"line {_line(axes, key)}: unknown axis {key!r}; axes: {', '.join(AXES)}")
    if "application" not in axes:
        raise GridError(f"line {_line(axes)}: `runs:` needs `application:` ({', '.join(APPLICATIONS)})")
    if "family" in axes and "models" in axes:
        raise GridError(f"line {_line(axes, 'models')}: give `family:` or `models:`, not both")
    values = {k: (list(v) if isinstance(v, list) else [v]) for k, v in axes.items()}
    for key, vals in values.items():
        if not vals:
            raise GridError(f"line {_line(axes, key)}: axis {key!r} has no values")
    _check_axes(axes, values)
    params = doc.get("parameters") or {}
    if not isinstance(params, dict):
        raise GridError(f"line {_line(doc, 'parameters')}: `parameters:` is a mapping of papermill parameters")
    resources = _resources(doc.get("resources") or {}, _line(doc, "resources"))
    excludes = _list_of_maps(doc, "exclude")
    overrides = _list_of_maps(doc, "overrides")
    for ex in excludes:
        for key in ex:
            if key not in AXES or key == "models":
                raise GridError(f"line {_line(ex, key)}: exclude on unknown axis {key!r}; axes: "
                                f"{', '.join(a for a in AXES if a != 'models')}")
    for ov in overrides:
        for key in ov:
            if key not in ("match", "resources", "parameters"):
                raise GridError(f"line {_line(ov, key)}: an override has match, resources, parameters; not {key!r}")

    defaults = _notebook_defaults()
    declared: dict[str, list[str]] = {}
    for app in values["application"]:
        book = Path(notebooks) / f"{APPLICATIONS[app].notebook}.ipynb"
        if not book.is_file():
            raise GridError(f"line {_line(axes, 'application')}: {app}'s notebook {book} is missing (--notebooks)")
        import papermill as pm

        declared[app] = list(pm.inspect_notebook(str(book)))
    for source in [params] + [ov.get("parameters") or {} for ov in overrides]:
        for key in source:
            unknown = [app for app in values["application"] if key not in declared[app]]
            if unknown:
                raise GridError(f"line {_line(source, key)}: parameter {key!r} is not one the notebook of "
                                f"{unknown[0]} declares ({', '.join(declared[unknown[0]])})")
    from .experiment import check_config

    for source in [params] + [ov.get("parameters") or {} for ov in overrides]:
        for key, value in source.items():  # each value alone, so that a refusal names its own line
            if key in RESERVED:
                raise GridError(f"line {_line(source, key)}: parameter {key!r} is set by the grid's axes (runs:), "
                                f"not by parameters:")
            try:
                check_config(values["application"][0], **{key: value})
            except ValueError as e:
                raise GridError(f"line {_line(source, key)}: parameter {key}={value!r}: {e}") from None
    runs: list[Run] = []
    names: dict[str, int] = {}
    models = values.get("models") or [None]
    for combo in itertools.product(values["application"], values.get("family", [DEFAULT_FAMILY]), models,
                                   values.get("seed", [None]), values.get("profile", [None]),
                                   values.get("tag", [None])):
        app, family, pair, seed, profile, tag = combo
        point = {"application": app, "family": family, "seed": seed, "profile": profile, "tag": tag}
        if any(all(point.get(k) == v for k, v in ex.items()) for ex in excludes):
            continue
        run_params, run_res, line = dict(params), dict(resources), _line(axes)
        for ov in overrides:
            if all(point.get(k) == v for k, v in (ov.get("match") or {}).items()):
                run_params.update(ov.get("parameters") or {})
                given = ov.get("resources") or {}
                run_res.update({k: v for k, v in _resources(given, _line(ov, "resources")).items() if k in given})
        run = _make_run(app, family, pair, seed, profile, tag, run_params, run_res, line, defaults)
        if run.name in names:
            raise GridError(f"line {line}: two runs are named {run.name!r} (the grid repeats a combination, or two "
                            f"models entries share a name)")
        names[run.name] = line
        runs.append(run)
    if not runs:
        raise GridError(f"line {_line(axes)}: every combination is excluded: nothing to run")
    return runs


def _list_of_maps(doc, key) -> list:
    items = doc.get(key) or []
    if not isinstance(items, list) or not all(isinstance(i, dict) for i in items):
        raise GridError(f"line {_line(doc, key)}: `{key}:` is a list of mappings")
    return items


def _resources(res, line: int) -> dict:
    if not isinstance(res, dict):
        raise GridError(f"line {line}: resources are a mapping of {', '.join(RESOURCES)}")
    for key, value in res.items():
        if key not in RESOURCES:
            raise GridError(f"line {_line(res, key)}: unknown resource {key!r}; resources: {', '.join(RESOURCES)}")
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0
                                  or (key == "cpus" and value < 1)):
            raise GridError(f"line {_line(res, key)}: resource {key}={value!r} must be a number"
                            + (" >= 1" if key == "cpus" else " >= 0"))
    return {**RESOURCES, **res}


def _check_axes(axes, values) -> None:
    from .evaluate import PROFILES
    from .experiment import FAMILIES, result_name

    for app in values["application"]:
        if app not in APPLICATIONS:
            raise GridError(f"line {_line(axes, 'application')}: unknown application {app!r}; applications: "
                            f"{', '.join(APPLICATIONS)}")
    for fam in values.get("family", []):
        if fam not in FAMILIES:
            raise GridError(f"line {_line(axes, 'family')}: unknown family {fam!r}; families: {', '.join(FAMILIES)}")
    for seed in values.get("seed", []):
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise GridError(f"line {_line(axes, 'seed')}: seed {seed!r} must be a whole number >= 0")
    for profile in values.get("profile", []):
        if profile not in PROFILES:
            raise GridError(f"line {_line(axes, 'profile')}: unknown profile {profile!r}; profiles: "
                            f"{', '.join(PROFILES)}")
    for tag in values.get("tag", []):
        try:  # the rule that names result files (the run's tag joins it)
            if tag is not None and not isinstance(tag, str):
                raise ValueError(f"tag {tag!r} must be letters, digits, '-' or '_' (it names files)")
            result_name(values["application"][0], tag=tag)
        except ValueError as e:
            raise GridError(f"line {_line(axes, 'tag')}: {e}") from None
    seen = set()
    for i, pair in enumerate(values.get("models", [])):
        line = pair.line if isinstance(pair, _Mapping) else _line(axes, "models")
        if not isinstance(pair, dict) or set(pair) != set(MODEL_KEYS):
            raise GridError(f"line {line}: each models entry is a mapping of exactly {', '.join(MODEL_KEYS)}")
        if pair["name"] in seen:
            raise GridError(f"line {line}: two models entries are named {pair['name']!r}")
        seen.add(pair["name"])


def _notebook_defaults() -> dict:
    from .experiment import ApplicationConfig

    d = ApplicationConfig("disalignment")
    return {"seed": d.seed, "profile": d.profile}


def _make_run(app, family, pair, seed, profile, tag, params, resources, line, defaults) -> Run:
    from .experiment import check_config

    spec = APPLICATIONS[app]
    parts = [tag] if tag else []
    if pair is not None:
        parts.append(pair["name"])
    if seed is not None and seed != defaults["seed"]:
        parts.append(f"seed{seed}")
    if profile is not None and profile != defaults["profile"]:
        parts.append(profile)
    run_tag = "-".join(parts) or None
    p: dict = {"family": family} if pair is None else {"donor": pair["donor"], "target": pair["target"],
                                                       "base": pair["base"]}
    if seed is not None:
        p["seed"] = seed
    if profile is not None:
        p["profile"] = profile
    if run_tag:
        p["tag"] = run_tag
    p.update(params)
    try:
        check_config(app, **p)
    except ValueError as e:
        raise GridError(f"line {line}: {app} with {json.dumps(p, default=str)}: {e}") from None
    stem = ".".join([app] + ([family] if family != DEFAULT_FAMILY else []) + ([run_tag] if run_tag else []))
    return Run(stem, app, f"{spec.notebook}.ipynb", p, resources, line)


def plan(runs: list[Run], done: set[str] = frozenset()) -> str:
    """The runs as a table: name, notebook, parameters, resources, and whether it will run or be skipped."""
    rows = [f"{'run':<44} {'notebook':<30} {'resources':<22} {'state':<5} parameters"]
    for r in runs:
        res = ", ".join(f"{k}={v}" for k, v in r.resources.items() if v)
        rows.append(f"{r.name:<44} {r.notebook:<30} {res:<22} {'skip' if r.name in done else 'run':<5} "
                    f"{json.dumps(r.parameters)}")
    return "\n".join(rows)
