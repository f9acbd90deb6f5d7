"""Bias removal: does the validation rule's perplexity (16 Wikipedia passages) reject settings that hold perplexity on
eval? Per seed: attribution (the default for bias) at ~1% of the weights; at each alpha the validation proxy (SS,
perplexity on its 16 passages), perplexity on every validation passage (290), and eval (report profile: StereoSet,
perplexity on 200 passages)."""
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

seed, budget = int(sys.argv[1]), float(sys.argv[2])
alphas = [float(a) for a in sys.argv[3].split(",")]
tok = load_tokenizer("smol-biased")
donor, _ = load_model("smol-debiased"); target, _ = load_model("smol-biased")
pipe = Pipeline("bias", donor, target, tok, seed=seed, progress=False)
t0 = time.process_time()
scores = pipe.scores(default_scorer("bias"), ("mlp",))  # MLP neurons, as measured (bias now defaults to heads too)
val = pipe.validator()
wiki_all = data.texts(data.load("wiki", "validation", seed=seed), "text")
whole = lambda m: perplexity(m, tok, wiki_all, max_tokens=128, progress=False).value
out = {"seed": seed, "budget": budget, "locate_cpu": round(time.process_time() - t0, 1), "target": val.target,
       "donor": val.donor, "n_wiki_whole": len(wiki_all), "target_whole_ppl": whole(target), "settings": []}
rep = evaluate(target, tok, "report", groups=("bias", "perplexity"), seed=seed, progress=False)
out["target_eval"] = {k: round(m.value, 4) for k, m in rep.metrics.items()}
print(json.dumps({k: out[k] for k in ("locate_cpu", "target", "donor", "target_whole_ppl", "target_eval")}), flush=True)
base = pipe.patch(scores, neurons_for(budget, pipe.n_neurons), 1.0)
out["param_fraction"] = base.param_fraction
for a in alphas:
    rec = measure_alpha(base, a, val, target, tok, whole, seed=seed, target_whole_ppl=out["target_whole_ppl"],
                        target_eval_ppl=out["target_eval"]["perplexity"])
    rec["proxy_ppl_change"] = rec["proxy"]["ppl"] / val.target["ppl"] - 1
    out["settings"].append(rec)
    print(json.dumps({k: rec[k] for k in ("alpha", "share", "proxy_ppl_change", "whole_ppl_change", "eval_ppl_change",
                                          "eval", "cpu")}), flush=True)
    json.dump(out, open(f"{HERE}/biasppl_s{seed}.json", "w"), indent=1)
