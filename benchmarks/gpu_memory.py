"""Locate's peak GPU memory and time at real model shapes, on a CUDA device: whether a pair fits on one GPU.

The memory a locator needs depends on the models' shapes and the task's tokens, not on the weights' values, so each
pair is two models of a published configuration (SmolLM2-135M, Qwen2.5-0.5B, Llama-3.1-8B) with random bf16 weights
built on the GPU (nothing to download), and the task is the SmolLM2 addition pair's locate task (48 harmful prompts
with the donor's answers, 32 benign answers, 32 Wikipedia passages: the texts `benchmarks/run.py memory` locates on).
Per locator: the peak of the memory allocated through locate over the two models' weights (the 1.5x goal of issue
#20), the reserved peak, and the wall time. Then a patch of the mask's 0.25%-of-the-weights subset is applied and
reverted on the 8B-shaped target (bit-exact).

    python benchmarks/gpu_memory.py --save-task task.json      # here: the task's texts (needs the zoo models)
    python benchmarks/gpu_memory.py --task task.json --tokenizer DIR --out gpu.json   # on the GPU machine

Without ``--task`` the task is built here from the zoo; ``--tokenizer`` defaults to the embedded SmolLM2's (both
need the kit's models: a bare GPU machine gets them as files). Results: papers/results/bench_gpu.json by default.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from cnt import NeuronPatch, atomic
from cnt.arch import total_params
from cnt.locate import Example, Task, locate

ROOT = Path(__file__).resolve().parents[1]

# the published configurations (config.json of each hub repository), the fields that set the shapes
SHAPES = {
    "smollm2-135m": ("LlamaConfig", dict(vocab_size=49152, hidden_size=576, intermediate_size=1536,
                                         num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                                         tie_word_embeddings=True, rope_theta=100000.0, rms_norm_eps=1e-5,
                                         max_position_embeddings=8192)),
    "qwen2.5-0.5b": ("Qwen2Config", dict(vocab_size=151936, hidden_size=896, intermediate_size=4864,
                                         num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                                         tie_word_embeddings=True, rope_theta=1000000.0, rms_norm_eps=1e-6,
                                         max_position_embeddings=32768)),
    "llama-3.1-8b": ("LlamaConfig", dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                                         num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                                         tie_word_embeddings=False, rope_theta=500000.0, rms_norm_eps=1e-5,
                                         max_position_embeddings=131072)),
}
# (locator, kinds): the refusal function's default (the learned mask on MLP neurons), attribution beside it, and the
# mask over MLP neurons and attention heads (every unit kind the kit has)
RUNS = (("learned_mask", ("mlp",), {}), ("attribution", ("mlp",), {}), ("learned_mask", ("mlp", "head", "kv"), {}))
MIB = 2 ** 20


def build_pair(shape: str, device: str = "cuda"):
    import transformers

    cls, fields = SHAPES[shape]
    config = getattr(transformers, cls)(**fields, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    models = []
    for seed in (1, 0):  # donor, target
        torch.manual_seed(seed)
        with torch.device(device):
            models.append(transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).eval())
    return models


def task_from_json(path: Path) -> Task:
    d = json.loads(path.read_text())
    return Task(d["name"], [Example(**e) for e in d["function"]], [Example(**e) for e in d["utility"]],
                d["response_tokens"], d["utility_weight"])


def zoo_task() -> Task:
    """The SmolLM2 addition pair's locate task, as `benchmarks/run.py memory` builds it (needs the zoo models)."""
    from cnt.functions import build_task
    from cnt.zoo import load_model

    donor, tok = load_model("smol-safe")
    target, _ = load_model("smol-arith")
    return build_task("refusal", donor, target, tok)


def save_task(path: Path, task: Task) -> None:
    """``task`` as JSON (what :func:`task_from_json` reads), for a machine without the zoo."""
    atomic.write_json(path, {"name": task.name, "function": [e.__dict__ for e in task.function],
                             "utility": [e.__dict__ for e in task.utility], "response_tokens": task.response_tokens,
                             "utility_weight": task.utility_weight, "built_from": ["smol-safe", "smol-arith"]})


def measure(shape: str, task: Task, tok, runs=RUNS) -> dict:
    donor, target = build_pair(shape)
    weights = sum(p.numel() * p.element_size() for m in (donor, target) for p in m.parameters())
    out = {"shape": shape, "params_each": total_params(target),
           "weights_mib": round(weights / MIB, 1), "runs": []}
    first = None  # the first run's 0.25% subset: later variants' overlap with it
    for scorer, kinds, settings in runs:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
        t0 = time.time()
        scores = locate(scorer, task, donor, target, tok, kinds=kinds, progress=False, **settings)
        torch.cuda.synchronize()
        run = {"locator": scorer, "kinds": list(kinds), "settings": settings, "seconds": round(time.time() - t0, 1),
               "peak_allocated_mib": round(torch.cuda.max_memory_allocated() / MIB, 1),
               "peak_reserved_mib": round(torch.cuda.max_memory_reserved() / MIB, 1),
               "allocated_before_mib": round(start / MIB, 1)}
        run["peak_over_weights"] = round(torch.cuda.max_memory_allocated() / weights, 4)
        run["meets_memory_goal"] = run["peak_over_weights"] <= 1.5
        subset = selected_units(scores, target)
        first = subset if first is None else first
        run["jaccard_to_first_run"] = round(len(subset & first) / max(len(subset | first), 1), 4)
        out["runs"].append(run)
        print(json.dumps({"shape": shape, **run}), flush=True)
        if scorer == "learned_mask" and kinds == ("mlp",) and "patch" not in out:
            out["patch"] = patch_round_trip(scores, donor, target)
            print(json.dumps({"shape": shape, "patch": out["patch"]}), flush=True)
        del scores
    del donor, target
    torch.cuda.empty_cache()
    return out


def quarter_percent(scores, target):
    """The subset of 0.25% of the target's weights, as :meth:`cnt.scores.NeuronScores.select` returns it."""
    return scores.select(int(0.0025 * total_params(target)))


def selected_units(scores, target) -> set:
    """The units of the 0.25%-of-the-weights subset, as hashable (kind, layer, index) triples."""
    sel, _ = quarter_percent(scores, target)
    return {(kind, layer, int(i)) for kind, layers in sel.items() for layer, idx in layers.items()
            for i in idx.tolist()}


def patch_round_trip(scores, donor, target) -> dict:
    """The subset at 0.25% of the weights, as a patch: applied, the target changes; reverted, bit-exact."""
    before = {k: v.clone() for k, v in target.state_dict().items()}
    n_weights = total_params(target)
    sel, gamma = quarter_percent(scores, target)
    patch = NeuronPatch.extract(donor, target, sel, gamma=gamma)
    patch.apply(target)
    changed = sum(not torch.equal(before[k], v) for k, v in target.state_dict().items())
    patch.revert(target)
    exact = all(torch.equal(before[k], v) for k, v in target.state_dict().items())
    return {"n_params": patch.n_params, "param_fraction": round(patch.n_params / n_weights, 6),
            "tensors_changed": changed, "revert_bit_exact": exact}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--task", type=Path, help="a task JSON written by --save-task (default: built from the zoo)")
    ap.add_argument("--tokenizer", default="smollm2-135m-instruct", help="a tokenizer folder or embedded name")
    ap.add_argument("--shapes", default=",".join(SHAPES), help=f"comma-separated, of {', '.join(SHAPES)}")
    ap.add_argument("--out", type=Path, default=ROOT / "papers" / "results" / "bench_gpu.json")
    ap.add_argument("--runs", type=int, default=len(RUNS), help=f"the first N of the {len(RUNS)} (locator, units) runs")
    ap.add_argument("--variants", help="a JSON list of learned-mask settings (e.g. '[{}, {\"micro_batch\": 8}]'): "
                    "one MLP mask run per entry instead of the default runs (speed levers at equal memory goal)")
    ap.add_argument("--save-task", type=Path, help="write the task JSON and stop")
    args = ap.parse_args(argv)
    if args.save_task:
        return save_task(args.save_task, zoo_task())
    shapes = args.shapes.split(",")
    unknown = [s for s in shapes if s not in SHAPES]
    if unknown:
        raise SystemExit(f"unknown shape(s) {', '.join(unknown)}; shapes: {', '.join(SHAPES)}")
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device: this benchmark measures GPU memory (CPU memory: benchmarks/run.py memory)")
    from cnt.models import load_tokenizer

    tok = load_tokenizer(args.tokenizer)
    task = task_from_json(args.task) if args.task is not None else zoo_task()
    result = {"when": time.strftime("%Y-%m-%dT%H:%M:%S"), "device": torch.cuda.get_device_name(),
              "torch": torch.__version__, "n_function": len(task.function), "n_utility": len(task.utility),
              "pairs": []}
    runs = [("learned_mask", ("mlp",), v) for v in json.loads(args.variants)] if args.variants else RUNS[:args.runs]
    for shape in shapes:
        result["pairs"].append(measure(shape, task, tok, runs))
        atomic.write_json(args.out, result)  # each pair as it is measured: a run cut short keeps what it measured
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main(sys.argv[1:])
