"""The evaluation suite: refusal, over-refusal, utility and bias, as typed records with 95% confidence intervals.

Every function takes an in-memory ``model`` and ``tokenizer`` and returns :class:`Metric` records (value, n, CI,
settings, seconds) that serialize to JSON. :func:`evaluate` runs a whole :class:`Profile` and returns an
:class:`EvalReport`.

* Safety — :func:`refusal_rate` (batched greedy generation judged by :func:`is_refusal`, Wilson CI) on harmful prompts,
  the same on benign and over-refusal prompts (false refusal); :func:`refusal_score`, a one-forward-pass proxy: the
  log-odds that the first response token opens a refusal.
* Utility — MMLU (0-shot log-likelihood over the letters), NQ-Open (greedy short answers, exact match) and PIQA
  (log-likelihood) through **lm-eval** with local task files over the kit's splits; perplexity on held-out Wikipedia
  passages; the specialist's skill (three-digit addition, exact match).
* Bias — StereoSet intrasentence SS / LMS / ICAT with bias-bench's definitions (per-target averaging, BOS-conditioned
  average log-probability of the whole sentence); CrowS-Pairs: share of pairs whose more-stereotyping sentence has the
  higher BOS-conditioned log-probability.

One concept per module: ``records`` (metrics, reports, confidence intervals), ``judge`` (refusal and broken-text
judges), ``metrics`` (log-probability metrics: the refusal proxy, perplexity, bias, skill), ``lm_eval_adapter``
(utility through lm-eval), ``suite`` (profiles and :func:`evaluate`), ``paired`` (two methods compared item by item:
McNemar, paired bootstrap, Holm).
"""

from .records import EvalReport, Metric, Z95, bootstrap_ci, proportion, wilson
from .judge import JUDGE_WINDOW, is_degenerate, is_refusal, refusal_rate
from .metrics import (REFUSAL_OPENINGS, arithmetic_accuracy, arithmetic_answer, crows_pairs, perplexity,
                      proxy_agreement, refusal_logodds, refusal_score, refusal_token_ids, sequence_logprobs, stereoset,
                      stereoset_scores)
from .lm_eval_adapter import lm_eval_tasks
from .paired import PairedTest, holm, mcnemar, paired_bootstrap, paired_test
from .suite import METRIC_GROUPS, PROFILES, Profile, evaluate, get_profile, item_sources

__all__ = ["EvalReport", "JUDGE_WINDOW", "METRIC_GROUPS", "Metric", "PROFILES", "PairedTest", "Profile",
           "REFUSAL_OPENINGS", "Z95", "arithmetic_accuracy", "arithmetic_answer", "bootstrap_ci", "crows_pairs",
           "evaluate", "get_profile", "holm", "is_degenerate", "is_refusal", "item_sources", "lm_eval_tasks",
           "mcnemar", "paired_bootstrap", "paired_test", "perplexity", "proportion", "proxy_agreement",
           "refusal_logodds", "refusal_rate", "refusal_score", "refusal_token_ids", "sequence_logprobs", "stereoset",
           "stereoset_scores", "wilson"]
