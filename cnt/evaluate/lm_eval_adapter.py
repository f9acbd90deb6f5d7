"""Utility through lm-eval: local task files over the kit's splits (offline), run on the in-memory model."""

from __future__ import annotations

import contextlib
import json
import logging
import time
from pathlib import Path
from typing import Sequence

from .. import atomic, data
from ..cache import cache_dir
from .records import Metric, proportion



_LM_EVAL_TASKS = {
    "mmlu": {
        "output_type": "multiple_choice",
        "doc_to_text": "{{question.strip()}}\nA. {{choices[0]}}\nB. {{choices[1]}}\nC. {{choices[2]}}\n"
                       "D. {{choices[3]}}\nAnswer:",
        "doc_to_choice": ["A", "B", "C", "D"],
        "doc_to_target": "label",
        "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
    },
    "piqa": {
        "output_type": "multiple_choice",
        "doc_to_text": "Question: {{question}}\nAnswer:",
        "doc_to_choice": "{{choices}}",
        "doc_to_target": "label",
        "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True},
                        {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True}],
    },
    "nq_open": {
        "output_type": "generate_until",
        "description": "Answer these questions:\n\n",
        "doc_to_text": "Q: {{question}}?\nA:",
        "doc_to_target": "{{answers}}",
        "target_delimiter": " ",
        "fewshot_delimiter": "\n",
        "generation_kwargs": {"until": ["\n", ".", ","], "do_sample": False, "max_gen_toks": 16},
        "filter_list": [{"name": "remove_whitespace",
                         "filter": [{"function": "remove_whitespace"}, {"function": "take_first"}]}],
        "metric_list": [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True,
                         "ignore_case": True, "ignore_punctuation": True,
                         "regexes_to_ignore": ["\\b(?:The |the |An |A |The |a |an )"]}],
    },
}
_PRIMARY = {"mmlu": "acc", "piqa": "acc", "nq_open": "exact_match"}


def _write_task(task: str, records: Sequence[dict], fewshot: Sequence[dict] | None) -> Path:
    import yaml

    payload = [{k: v for k, v in r.items() if k != "source"} for r in records]
    key = data.records_hash(payload)[:16] + (data.records_hash(fewshot)[:8] if fewshot else "")
    folder = cache_dir("lm_eval", f"{task}-{key}")
    files = {"test": str(folder / "test.jsonl")}
    atomic.write_text(folder / "test.jsonl", "".join(json.dumps(r) + "\n" for r in payload))
    if fewshot:
        files["train"] = str(folder / "train.jsonl")
        atomic.write_text(folder / "train.jsonl", "".join(json.dumps({k: v for k, v in r.items() if k != "source"})
                                                          + "\n" for r in fewshot))
    cfg = {"task": f"cnt_{task}", "dataset_path": "json", "dataset_kwargs": {"data_files": files},
           "test_split": "test", **_LM_EVAL_TASKS[task], "metadata": {"version": 1.0}}
    if fewshot:
        cfg.update(training_split="train", fewshot_split="train", fewshot_config={"sampler": "first_n"})
    atomic.write_text(folder / f"cnt_{task}.yaml", yaml.safe_dump(cfg, sort_keys=False))
    return folder


def _silent_tqdm(cls, *args, **kwargs):
    kwargs["disable"] = True
    return cls(*args, **kwargs)


@contextlib.contextmanager
def _quiet_lm_eval():
    """lm-eval's logs and progress bars (its own tqdm bars and datasets' "Generating split") off for one call."""
    import datasets

    loggers = [logging.getLogger(n) for n in ("lm-eval", "lm_eval", "datasets")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    import functools
    import sys

    import tqdm as _tqdm

    bars = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    patched = []  # lm-eval's modules import tqdm by name: swap in a silent one while we run
    for mod in [m for n, m in sys.modules.items() if n.startswith("lm_eval") and m is not None]:
        if getattr(mod, "tqdm", None) in (_tqdm.tqdm, _tqdm.auto.tqdm):
            patched.append((mod, mod.tqdm))
            mod.tqdm = functools.partial(_silent_tqdm, mod.tqdm)
    try:
        yield
    finally:
        for lg, lv in zip(loggers, levels):
            lg.setLevel(lv)
        if bars:
            datasets.enable_progress_bars()
        for mod, orig in patched:
            mod.tqdm = orig


def lm_eval_tasks(model, tokenizer, tasks: dict[str, Sequence[dict]], *, batch_size: int = 16,
                  num_fewshot: dict[str, int] | None = None, fewshot_records: dict[str, Sequence[dict]] | None = None,
                  max_length: int = 1024, settings: dict | None = None) -> dict[str, Metric]:
    """Run lm-eval tasks (``mmlu``, ``nq_open``, ``piqa``) over the given records; one :class:`Metric` per task."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    num_fewshot = num_fewshot or {}
    fewshot_records = fewshot_records or {}
    out = {}
    with _quiet_lm_eval():
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, max_length=max_length)
        for task, records in tasks.items():
            if task not in _LM_EVAL_TASKS:
                raise ValueError(f"unknown lm-eval task {task!r}; known: {', '.join(_LM_EVAL_TASKS)}")
            t0 = time.time()
            k = num_fewshot.get(task, 0)
            folder = _write_task(task, records, fewshot_records.get(task) if k else None)
            manager = TaskManager(include_path=str(folder), include_defaults=False)  # indexing lm-eval's own: ~6 s
            res = lm_eval.simple_evaluate(model=lm, tasks=[f"cnt_{task}"], task_manager=manager, num_fewshot=k,
                                          log_samples=True, verbosity="ERROR", random_seed=0, numpy_random_seed=0,
                                          torch_random_seed=0, fewshot_random_seed=0)
            metric = _PRIMARY[task]
            flags = [float(s[metric]) for s in res["samples"][f"cnt_{task}"]]
            m = proportion(task, [f > 0.5 for f in flags], True,
                           {"harness": "lm-eval " + lm_eval.__version__, "num_fewshot": k, "metric": metric,
                            **(settings or {})}, t0)
            extra = {key.split(",")[0]: v for key, v in res["results"][f"cnt_{task}"].items()
                     if "," in key and "stderr" not in key}
            m.details = {"lm_eval": extra}
            out[task] = m
    return out
