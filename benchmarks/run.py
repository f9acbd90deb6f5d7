"""Speed goals of the kit, measured (not asserted in tests). Run with `make bench` (or `python benchmarks/run.py load`).

load: the embedded SmolLM2 from the converted cache in a fresh process (goal: <= 5 s on 2 CPU cores).
eval: the whole evaluation suite on SmolLM2-135M (goals: quick profile <= 60 s, full profile <= 300 s).
cnt: locate + search + transfer for a zoo pair (goal for SmolLM2: <= 60 s on 2 CPU cores), each baseline and the SFT
     reference, wall time, CPU time (all threads; what the cost goal is judged on, since it does not grow when
     other jobs share the cores) and peak memory, with ratios to one forward pass over the same prompts.
scaling: locate's time against the number of function prompts (32 -> 512), with a linear fit.
memory: locate alone with each locator (48 prompts), its peak over the donor's + target's weights (goal <= 1.5x).
generate: the report profile's generations (every harmful eval prompt, 200 benign + every over-refusal one, 200
     additions) on the alignment target, one torch thread, bf16, with the prompts' shared opening run once and
     without: CPU time of each and how many answers and judge verdicts stay the same (what ``make reproduce`` spends
     most of its time on; the 60-minute goal of issue #24).

`cnt --reuse-reference` measures CNT again and keeps the baselines and the SFT reference from bench.json (same pair).

Every measurement runs in a fresh subprocess (peak RSS is that process's own). `python benchmarks/run.py cnt scaling
--family qwen --sizes 32,64,128` measures the Qwen pair (needs `make setup-extra` and the qwen-abliterated zoo model).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from cnt import atomic
from cnt.functions import default_scorer

ROOT = Path(__file__).resolve().parents[1]


def time_fresh_load(name: str, repeats: int = 3) -> dict:
    code = ("import time; t=time.time(); from cnt.models import load_model; load_model(%r, device='cpu'); "
            "print(time.time()-t)" % name)
    subprocess.run([sys.executable, "-c", "from cnt.models import convert_embedded; convert_embedded(%r)" % name],
                   check=True, capture_output=True)  # conversion (first use) is not part of the goal
    times = []
    for _ in range(repeats):
        t0 = time.time()
        out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
        times.append({"in_process_s": float(out.stdout.strip().splitlines()[-1]),
                      "process_s": time.time() - t0})
    best = min(t["in_process_s"] for t in times)
    return {"model": name, "runs": times, "best_in_process_s": round(best, 2), "goal_s": 5.0, "meets_goal": best <= 5.0}


def time_eval(name: str, profile: str, goal_s: float) -> dict:
    code = ("import json; from cnt.models import load_model; from cnt.evaluate import evaluate; "
            "m, t = load_model(%r); r = evaluate(m, t, %r, name=%r, progress=False); "
            "print(json.dumps({'seconds': r.seconds, 'per_metric': {k: v.seconds for k, v in r.metrics.items()}}))"
            % (name, profile, name))
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    res = json.loads(out.stdout.strip().splitlines()[-1])
    return {"model": name, "profile": profile, "seconds": round(res["seconds"], 1), "goal_s": goal_s,
            "meets_goal": res["seconds"] <= goal_s, "per_metric_s": res["per_metric"]}


_GENERATE_CODE = r"""
import json, sys, time
import torch
torch.set_num_threads(1)
from cnt import data
from cnt.evaluate import PROFILES
from cnt.models import fast_dtype, generate, inference_dtype
from cnt.zoo import load_model
name, share = json.loads(sys.argv[1])
p = PROFILES["report"]
model, tok = load_model(name)
sets = {"harmful": (data.texts(data.load("harmful", "eval", limit=p.harmful)), p.max_new_tokens),
        "benign": (data.texts(data.load("benign", "eval", limit=p.benign))
                   + data.texts(data.load("overrefusal", "eval", limit=p.overrefusal)), p.max_new_tokens),
        "arithmetic": ([r["prompt"] for r in data.load("arithmetic", "eval", limit=p.arithmetic)], 24)}
out = {}
with inference_dtype(model, fast_dtype(None)) as fast:
    for key, (prompts, tokens) in sets.items():
        cpu = time.process_time()
        answers = generate(fast, tok, prompts, max_new_tokens=tokens, batch_size=p.batch_size, progress=False,
                           share_prefix=share)
        out[key] = {"cpu_s": round(time.process_time() - cpu, 1), "n": len(prompts), "answers": answers}
print(json.dumps(out))
"""


def time_generate(name: str = "smol-arith") -> dict:
    """The report profile's generations with and without the shared prefix (each in a fresh process, one thread)."""
    from cnt.evaluate.judge import is_degenerate, is_refusal

    runs = {}
    for share in (False, True):
        out = subprocess.run([sys.executable, "-c", _GENERATE_CODE, json.dumps([name, share])], check=True,
                             capture_output=True, text=True, cwd=ROOT)
        runs[share] = json.loads(out.stdout.strip().splitlines()[-1])
    res = {"model": name, "profile": "report", "torch_threads": 1, "sets": {}}
    for key in runs[False]:
        plain, shared = runs[False][key], runs[True][key]
        pairs = list(zip(plain["answers"], shared["answers"]))
        res["sets"][key] = {"n": plain["n"], "plain_cpu_s": plain["cpu_s"], "shared_prefix_cpu_s": shared["cpu_s"],
                            "same_answer": sum(a == b for a, b in pairs),
                            "same_refusal_verdict": sum(is_refusal(a) == is_refusal(b) for a, b in pairs),
                            "same_degenerate_verdict": sum(is_degenerate(a) == is_degenerate(b) for a, b in pairs)}
    total = {k: round(sum(v[k] for v in res["sets"].values()), 1) for k in ("plain_cpu_s", "shared_prefix_cpu_s")}
    res.update(total, saved=round(1 - total["shared_prefix_cpu_s"] / total["plain_cpu_s"], 3))
    return res


PAIRS = {"smollm2": ("smol-safe", "smol-arith", "smollm2-135m-instruct"),
         "qwen": ("qwen2.5-coder-0.5b-instruct", "qwen-abliterated", "qwen2.5-coder-0.5b-instruct")}

_CNT_CODE = r"""
import json, resource, sys, time, dataclasses
from contextlib import contextmanager
import torch
from cnt.zoo import load_model
from cnt import baselines as B, data, zoo
from cnt.arch import fingerprint
from cnt.models import chat_texts, encode
from cnt.functions import function_prompts
from cnt.pipeline import Pipeline, transfer_function
from cnt.scores import neurons_for
donor_name, target_name, base_name, what, n, sft_steps, locator = json.loads(sys.argv[1])


def status(key):  # MiB, from /proc/self/status (VmHWM: the peak resident set since the last reset)
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024


def reset_peak():  # Linux: writing 5 to clear_refs sets VmHWM to the current resident set
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


rss = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # MiB


@contextmanager
def timed(key):  # wall time as <key>_s and the process's CPU time (all threads) as <key>_cpu_s: the CPU time does
    if key == "locate":  # not grow when other jobs share the cores, so a loaded machine still gives a fair ratio
        reset_peak()  # locate's own peak: the models, what it allocates, nothing left from the task's generation
    wall, cpu = time.time(), time.process_time()
    yield
    out[key + "_s"] = out.get(key + "_s", 0.0) + time.time() - wall
    out[key + "_cpu_s"] = out.get(key + "_cpu_s", 0.0) + time.process_time() - cpu
    if key == "locate":
        out["peak_locate_mib"] = status("VmHWM")
        out["rss_after_locate_mib"] = out["peak_locate_mib"]
        out["locate_peak_over_weights"] = (out["peak_locate_mib"] - out["rss_kit_mib"]) / weights


reset_peak()
out = {"locator": locator, "rss_kit_mib": status("VmRSS")}  # the interpreter with torch and the kit imported
donor, tok = load_model(donor_name); target, _ = load_model(target_name)
out["rss_models_mib"] = rss()
out["param_mib_each"] = sum(p.numel() * p.element_size() for p in target.parameters()) / 2**20
weights = 2 * out["param_mib_each"]
# the scaling runs need up to 512 prompts: more than the locate split holds (243), so they draw from train
task_kwargs = {"n_function": n, "split": "locate" if what == "cnt" else "train"}


def forward_reference(prompts):
    # one no-grad forward pass over the same prompts, in locate's batches of 8 (the unit every ratio is in)
    with torch.no_grad(), timed("forward"):
        for i in range(0, len(prompts), 8):
            target(**encode(tok, chat_texts(tok, prompts[i:i + 8])))


if what == "cnt":  # CNT as `cnt transfer --budget auto` runs it, each step timed through the pipeline's stage hook
    patch, info = transfer_function(donor, target, tok, "refusal", budget="auto", scorer=locator,
                                    task_kwargs=task_kwargs, progress=False, stage=timed)
    out["search_reached"] = info["search"]["reached"]; out["search_k"] = info["search"]["k"]
    patch.apply(target); patch.revert(target)
    for unit in ("_s", "_cpu_s"):
        out["cnt_total" + unit] = sum(out[step + unit] for step in ("task", "locate", "search", "transfer"))
elif what == "baselines":
    base, _ = load_model(base_name)
    k = neurons_for(0.005, fingerprint(target).n_neurons)
    for name, setting in [("random", {"k": k}), ("weight_delta", {"k": k}), ("linear", {"lam": 0.5}),
                          ("task_arithmetic", {"lam": 0.5, "base": base}), ("ties", {"lam": 1.0, "density": 0.2, "base": base}),
                          ("dare", {"lam": 1.0, "density": 0.2, "base": base}), ("refusal_direction", {})]:
        with timed(name):
            m = B.run(name, donor, target, tok, "refusal", **setting)
        del m
    if donor_name in zoo.RECIPES and zoo.recipe(donor_name).method == "sft":
        r = zoo.recipe(donor_name)
        with timed("sft"):
            parts = r.data(zoo.BuildContext(r, base, tok, progress=False))
            m = B.run("sft", donor, target, tok, "refusal", examples=[e for v in parts.values() for e in v], config=r.train)
        out["sft_steps"] = r.train.steps
    else:  # a donor the kit did not train (e.g. a maker-aligned model): time the zoo's LoRA recipe for a few steps
        import random
        examples = zoo.refusal_pairs(data.texts(data.load("harmful", "train")), random.Random(0))
        cfg = dataclasses.replace(zoo.LORA, steps=sft_steps)
        with timed("sft"):
            m = B.run("sft", donor, target, tok, "refusal", examples=examples, config=cfg)
        out["sft_steps"] = sft_steps; out["sft_s_per_step"] = out["sft_s"] / sft_steps
        out["sft_cpu_s_per_step"] = out["sft_cpu_s"] / sft_steps
        out["sft_note"] = (f"{sft_steps} steps of the zoo's LoRA config on harmful->refusal pairs (the donor has no "
                           "recipe here; a SmolLM2 recipe is 120-440 steps)")
else:
    Pipeline("refusal", donor, target, tok, task_kwargs=task_kwargs, progress=False, stage=timed).scores(locator)
prompts = function_prompts("refusal", n, split=task_kwargs["split"])  # the task's own prompts (build_task's)
forward_reference(prompts)
out["peak_rss_mib"] = rss()
out["n_prompts"] = len(prompts)
print(json.dumps(out))
"""


SIZES = (32, 64, 128, 256, 512)


LOCATORS = tuple(dict.fromkeys((default_scorer("refusal"), "attribution")))  # the function's default locator first


def _run(family: str, what: str, n: int = 48, sft_steps: int = 20, locator: str = LOCATORS[0]) -> dict:
    d, t, b = PAIRS[family]
    out = subprocess.run([sys.executable, "-c", _CNT_CODE, json.dumps([d, t, b, what, n, sft_steps, locator])],
                         check=True, capture_output=True, text=True, cwd=ROOT)
    res = json.loads(out.stdout.strip().splitlines()[-1])
    # the memory ratio keeps 4 digits: the goal (<= 1.5) is judged on it, and 1.5001 is not within it
    res = {k: round(v, 4 if k.endswith("_over_weights") else 2) if isinstance(v, float) else v for k, v in res.items()}
    res.update(family=family, donor=d, target=t)
    for k in [k for k in res if k.endswith("_s") and k not in ("forward_s", "forward_cpu_s")]:
        cpu = k.endswith("_cpu_s")  # CPU time against the forward pass's CPU time, wall against wall
        res[k.removesuffix("_s") + "_over_forward"] = round(res[k] / res["forward_cpu_s" if cpu else "forward_s"], 1)
    return res


def time_cnt(family: str, sft_steps: int = 20, reference: dict | None = None) -> dict:
    """CNT's whole cost (task + locate + search + transfer) with each locator, its peak memory through locate, and
    the baselines and SFT reference on the same pair (goals: CNT with the default locator <= 1/5 of the SFT
    reference; locate's peak <= 1.5x the donor's + target's weights; SmolLM2 CNT <= 60 s). ``reference``: an earlier
    measurement of the baselines and the SFT reference on the same pair, kept instead of measuring them again (its
    date is recorded beside it)."""
    runs = {loc: _run(family, "cnt", locator=loc) for loc in LOCATORS}
    ref = reference or _run(family, "baselines", sft_steps=sft_steps)
    res = {"family": family, "donor": ref["donor"], "target": ref["target"], "default_locator": LOCATORS[0],
           "locators": runs, "baselines": ref}
    for loc, r in runs.items():  # the goal is judged on CPU time (unchanged when other jobs share the cores)
        for unit in ("_s", "_cpu_s"):
            r["cnt_over_sft" + unit.removesuffix("_s")] = round(r["cnt_total" + unit] / ref["sft" + unit], 3)
            if "sft_s_per_step" in ref:  # a donor without a recipe: 200 steps at the measured rate
                r["cnt_over_sft_200_steps" + unit.removesuffix("_s")] = round(
                    r["cnt_total" + unit] / (200 * ref["sft" + unit] / ref["sft_steps"]), 3)
        r["meets_cost_goal"] = r.get("cnt_over_sft_200_steps_cpu", r["cnt_over_sft_cpu"]) <= 0.2
        r["meets_memory_goal"] = r["locate_peak_over_weights"] <= 1.5
    if family == "smollm2":
        res["goal_s"] = 60.0
        res["meets_goal"] = runs[LOCATORS[0]]["cnt_total_s"] <= 60.0
    return res


def locate_memory(family: str) -> dict:
    """Locate alone with each locator (a fresh process each): the peak through it over the two models' weights."""
    runs = {loc: _run(family, "locate", locator=loc) for loc in LOCATORS}
    keep = ("locate_cpu_s", "peak_locate_mib", "rss_kit_mib", "param_mib_each", "locate_peak_over_weights")
    return {"family": family, "goal_over_weights": 1.5,
            "locators": {loc: {k: r[k] for k in keep} | {"meets_memory_goal": r["locate_peak_over_weights"] <= 1.5}
                         for loc, r in runs.items()}}


def scaling(family: str, sizes=SIZES) -> dict:
    import numpy as np

    runs = [_run(family, "locate", n) for n in sizes]
    x = np.array([r["n_prompts"] for r in runs], float)
    y = np.array([r["locate_s"] for r in runs], float)
    slope, intercept = np.polyfit(x, y, 1)
    pred = slope * x + intercept
    r2 = 1 - ((y - pred) ** 2).sum() / ((y - y.mean()) ** 2).sum()
    return {"family": family, "runs": runs, "fit": {"seconds_per_prompt": round(float(slope), 4),
                                                    "intercept_s": round(float(intercept), 2), "r2": round(float(r2), 4)}}


def figure(results: dict, path: Path) -> None:
    """Left: locate time against prompts (with the linear fit). Middle: locate's peak memory against prompts, beside
    the weights of donor + target (what locating must not exceed by more than per-neuron statistics and one gradient
    buffer). Right: CPU time of CNT with each locator against the baselines and the SFT reference (entries recorded
    without CPU times are left out)."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.2))
    for i, sc in enumerate(results.get("scaling", [])):
        runs = [r for r in sc["runs"] if "rss_after_locate_mib" in r] or sc["runs"]
        xs = [r["n_prompts"] for r in sc["runs"]]
        axes[0].plot(xs, [r["locate_s"] for r in sc["runs"]], "o", color=f"C{i}",
                     label=f"{sc['family']}: {sc['fit']['seconds_per_prompt']:.3f} s/prompt (r²={sc['fit']['r2']})")
        axes[0].plot(xs, [sc["fit"]["intercept_s"] + sc["fit"]["seconds_per_prompt"] * x for x in xs], "-",
                     color=f"C{i}", alpha=0.5)
        key = "rss_after_locate_mib" if "rss_after_locate_mib" in runs[0] else "peak_rss_mib"
        axes[1].plot([r["n_prompts"] for r in runs], [r[key] / 1024 for r in runs], "o-", color=f"C{i}",
                     label=f"{sc['family']}: process peak through locate")
        weights = 2 * runs[0]["param_mib_each"] / 1024
        axes[1].axhline(weights, color=f"C{i}", ls="--", lw=1, label="donor + target weights (fp32)")
    axes[0].set_xlabel("function prompts")
    axes[0].set_ylabel("locate (s)")
    axes[0].legend(fontsize=8)
    axes[1].set_xlabel("function prompts")
    axes[1].set_ylabel("peak memory (GiB)")
    axes[1].set_ylim(bottom=0)
    axes[1].legend(fontsize=8)
    for i, c in enumerate(results.get("cnt", [])):  # CPU time: what the cost goal is judged on (load-independent)
        rows = {f"cnt ({loc})": r["cnt_total_cpu_s"] for loc, r in c.get("locators", {}).items()
                if "cnt_total_cpu_s" in r}
        rows.update({k.removesuffix("_cpu_s"): v for k, v in c.get("baselines", {}).items()
                     if k.endswith("_cpu_s") and k not in ("forward_cpu_s", "task_cpu_s")})
        axes[2].barh([f"{c['family']}: {k}" for k in rows], [max(v, 1e-2) for v in rows.values()], color=f"C{i}")
    axes[2].set_xscale("log")
    axes[2].set_xlabel("CPU time (s, all threads)")
    fig.tight_layout()
    with atomic.write_file(path) as f:
        fig.savefig(f, format="png", dpi=110)


def main() -> None:
    args = sys.argv[1:]
    families = ["smollm2"]
    if "--family" in args:
        i = args.index("--family")
        families = [args[i + 1]]
        args = args[:i] + args[i + 2:]
    sizes = SIZES
    if "--sizes" in args:  # e.g. --sizes 32,64,128 for the larger models
        i = args.index("--sizes")
        sizes = tuple(int(x) for x in args[i + 1].split(","))
        args = args[:i] + args[i + 2:]
    reuse = "--reuse-reference" in args  # CNT measured again, the baselines and SFT reference kept from bench.json
    args = [a for a in args if a != "--reuse-reference"]
    which = args or ["load", "eval", "generate", "cnt", "scaling"]
    results: dict = {"when": time.strftime("%Y-%m-%dT%H:%M:%S")}
    out = ROOT / "papers" / "results" / "bench.json"
    previous = json.loads(out.read_text()) if out.is_file() else {}
    if "load" in which:
        results["load"] = [time_fresh_load("smollm2-135m-instruct")]
    if "eval" in which:
        results["eval"] = [time_eval("smollm2-135m-instruct", "quick", 60.0),
                           time_eval("smollm2-135m-instruct", "full", 300.0)]
    if "generate" in which:
        results["generate"] = [time_generate()]
    if "cnt" in which:
        earlier = {c["family"]: c for c in previous.get("cnt", [])}
        if reuse and not all(f in earlier for f in families):
            raise SystemExit(f"--reuse-reference: {out} has no earlier measurement for "
                             f"{', '.join(f for f in families if f not in earlier)}; run without it")
        results["cnt"] = [time_cnt(f, reference=earlier[f]["baselines"] if reuse else None) for f in families]
        if reuse:
            for c in results["cnt"]:
                c["reference_measured"] = earlier[c["family"]].get("reference_measured", previous.get("when"))
    if "memory" in which:
        results["memory"] = [locate_memory(f) for f in families]
    if "scaling" in which:
        results["scaling"] = [scaling(f, sizes) for f in families]
    out.parent.mkdir(parents=True, exist_ok=True)
    for key in ("cnt", "scaling", "memory"):  # keep other families' entries
        if key in results:
            results[key] = [r for r in previous.get(key, []) if r["family"] not in families] + results[key]
    previous.update(results)
    atomic.write_json(out, previous)
    figure(previous, ROOT / "papers" / "figures" / "bench.png")
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
