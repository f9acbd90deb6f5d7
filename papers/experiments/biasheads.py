"""Bias removal with attention heads and k/v groups as units (#20's untried lever for bias): does attribution over MLP
neurons + heads + k/v groups move more of the gap than over MLP neurons alone, at held perplexity, on eval?
Per seed and budget (a fraction of MLP neurons; with heads, the weights of that many neurons): attribution with the
given kinds; at each alpha the validator's verdict by the kit's rule (perplexity on the whole validation split where the
16-passage sample cannot decide), perplexity on every validation passage, and eval (report profile: StereoSet,
perplexity on 200 passages). Usage: biasheads.py SEED BUDGETS ALPHAS KINDS [UTILITY_WEIGHT] (e.g. 0 0.0042,0.0168
1.5,2,2.5 mlp+head+kv; UTILITY_WEIGHT: the locate objective's utility weight, default the kit's 8)."""
import json, os, sys, time, torch
torch.set_num_threads(1)
HERE = os.path.dirname(os.path.abspath(__file__))
from cnt import data
from cnt.pipeline import Pipeline
from cnt.zoo import load_model, load_tokenizer
from cnt.evaluate import evaluate, perplexity
from cnt.functions import default_scorer
from cnt.scores import neurons_for
from bias_alpha import measure_alpha  # beside this script

seed = int(sys.argv[1])
budgets = [float(b) for b in sys.argv[2].split(",")]
alphas = [float(a) for a in sys.argv[3].split(",")]
kinds = tuple(sys.argv[4].split("+"))
uw = float(sys.argv[5]) if len(sys.argv) > 5 else None
tag = "_".join(kinds) + (f"_uw{uw:g}" if uw is not None else "")
tok = load_tokenizer("smol-biased")
donor, _ = load_model("smol-debiased"); target, _ = load_model("smol-biased")
pipe = Pipeline("bias", donor, target, tok, seed=seed, progress=False,
                task_kwargs={"utility_weight": uw} if uw is not None else None)
t0 = time.process_time()
scores = pipe.scores(default_scorer("bias"), kinds)
val = pipe.validator()
wiki_all = data.texts(data.load("wiki", "validation", seed=seed), "text")
whole = lambda m: perplexity(m, tok, wiki_all, max_tokens=128, progress=False).value
out = {"seed": seed, "kinds": list(kinds), "scorer": default_scorer("bias"), "utility_weight": uw,
       "locate_cpu": round(time.process_time() - t0, 1), "target": val.target, "donor": val.donor,
       "n_wiki_whole": len(wiki_all), "target_whole_ppl": whole(target), "budgets": []}
rep = evaluate(target, tok, "report", groups=("bias", "perplexity"), seed=seed, progress=False)
out["target_eval"] = {k: round(m.value, 4) for k, m in rep.metrics.items()}
print(json.dumps({k: out[k] for k in ("locate_cpu", "target", "donor", "target_whole_ppl", "target_eval")}), flush=True)
path = f"{HERE}/biasheads_{tag}_s{seed}.json"
for budget in budgets:
    base = pipe.patch(scores, neurons_for(budget, pipe.n_neurons), 1.0)
    b = {"budget": budget, **base.sizes(), "selected": base.unit_lists(), "settings": []}
    out["budgets"].append(b)
    for a in alphas:
        rec = measure_alpha(base, a, val, target, tok, whole, seed=seed, target_whole_ppl=out["target_whole_ppl"],
                            target_eval_ppl=out["target_eval"]["perplexity"])
        b["settings"].append(rec)
        print(json.dumps({"budget": budget, **{k: rec[k] for k in ("alpha", "share", "utility_ok", "whole_ppl_change",
                                                                   "eval_ppl_change", "eval", "cpu")}}), flush=True)
        json.dump(out, open(path, "w"), indent=1)
