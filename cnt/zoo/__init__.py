"""The model zoo: sibling fine-tunes of one real base that differ in a safety function — the donors and targets.

Offline there are three real small models and no fine-tunes of them, so the kit builds the ecosystem CNT assumes from
recipes (``name -> base, data, method, hyper-parameters, seed``). ``cnt zoo build NAME`` (or ``make zoo``) builds a
recipe from scratch, measures it with the evaluation suite on the eval splits and writes a manifest. Small artifacts —
LoRA adapters (bf16) and refusal directions — are committed under ``cnt/zoo/artifacts/<name>/`` so that a fresh
checkout reconstructs a zoo model in seconds instead of retraining; the build itself merges the same bf16-rounded
adapter, so a rebuild and a reconstruction are the same weights. Zoo models load by name through
:func:`cnt.zoo.load_model`, which trains a model only when asked (``allow_build=True``).

One concept per module: ``recipe_data`` (what each recipe trains on), ``recipes`` (the registry), ``store`` (build,
reconstruct, cache, load), ``tuning`` (variants tried on the tuning splits), ``card_table`` (``papers/zoo.md``).
"""

from .card_table import card
from .recipe_data import BuildContext, assert_disjoint_from_eval, refusal_pairs
from .recipes import BIAS_LORA, GEMMA, LORA, QWEN, RECIPES, SMOL, Recipe, card_profile, recipe
from .store import (ARTIFACTS, base_behaviour, build, check_expectations, compare_with_committed, ensure, has_artifact,
                    is_cached, load_model, load_tokenizer, measure, model_dir, artifact_dir, reconstruct, resolve)
from .tuning import measure_for_tuning, trial, variant

__all__ = ["ARTIFACTS", "BIAS_LORA", "GEMMA", "LORA", "QWEN", "RECIPES", "SMOL", "BuildContext", "Recipe",
           "artifact_dir", "assert_disjoint_from_eval", "base_behaviour", "build", "card", "card_profile",
           "check_expectations", "compare_with_committed", "ensure", "has_artifact", "is_cached", "load_model",
           "load_tokenizer", "measure", "measure_for_tuning", "model_dir", "reconstruct", "recipe", "refusal_pairs",
           "resolve", "trial", "variant"]
