"""Attribution minus lam x each unit's first-order rise of log p(refusal | benign prompt) (benign locate prompts
paired with the donor's refusals), clamped at 0 ("clamp") or not ("diff"); validation only, SmolLM2 adding refusal,
seed 0, at 0.25 / 1% of the weights, alpha chosen by the kit's rule. Run on the code at e71a18d as
`contrast_rise.py 0 smol-arith OUT 0,1 0.0025,0.01` (contrast_rise_s0.json) and with DIFF=0 `... 0.5,2 ...`
(contrast_rise_s0_lambda.json). METHOD: "A contrast in the objective"."""
import json, os, sys, time, torch
torch.set_num_threads(int(os.environ.get("THREADS", "1")))
from cnt import data
from cnt.pipeline import Pipeline
from cnt.zoo import load_model, load_tokenizer
from cnt.mixing import gamma_gradient
from cnt.models import autocast_dtype, model_device
from cnt.tasks import Example
from cnt.evaluate import is_refusal
from cnt.arch import units, check_compatible
import dataclasses

seed = int(sys.argv[1]); target_name = sys.argv[2]; out_path = sys.argv[3]
lams = [float(x) for x in sys.argv[4].split(",")]; budgets = [float(x) for x in sys.argv[5].split(",")]
n_benign = int(os.environ.get("NB", "96"))
tok = load_tokenizer(target_name)
donor, _ = load_model("smol-safe"); target, _ = load_model(target_name)
pipe = Pipeline("refusal", donor, target, tok, seed=seed, progress=False)
t0 = time.process_time()
base = pipe.scores("attribution", ("mlp",))
out = {"seed": seed, "target": target_name, "n_benign": n_benign, "locate_cpu": round(time.process_time() - t0, 1),
       "runs": []}
refusals = [e.response for e in pipe.task.function if is_refusal(e.response)]
benign = data.texts(data.load("benign", "locate", seed=seed, limit=n_benign))
contrast = [Example(prompt=p, response=refusals[i % len(refusals)]) for i, p in enumerate(benign)]
out["n_refusals"] = len(refusals)
t1 = time.process_time()
fp = check_compatible(donor, target)
zero = {"mlp": [torch.zeros(units(target, "mlp").n_units(l)) for l in range(fp.n_layers)]}
g = gamma_gradient(contrast, donor, target, tok, zero, response_tokens=pipe.task.response_tokens, batch_size=2,
                   autocast=autocast_dtype("auto", model_device(target)))["mlp"]
gain_b = [-x.detach().cpu() for x in g]  # first-order rise of log p(refusal | benign prompt)
out["contrast_cpu"] = round(time.process_time() - t1, 1)
flat_a, flat_b = torch.cat(base.scores), torch.cat(gain_b)
out["corr"] = float(torch.corrcoef(torch.stack([flat_a, flat_b]))[0, 1])
print(json.dumps({k: out[k] for k in ("locate_cpu", "contrast_cpu", "corr", "n_refusals")}), flush=True)
val = pipe.validator()
out["val_target"], out["val_donor"] = val.target, val.donor
variants = {}
for lam in lams:
    if lam == 0:
        variants["attribution"] = base
    else:
        variants[f"clamp{lam:g}"] = dataclasses.replace(base, scores=[a - lam * b.clamp(min=0) for a, b in zip(base.scores, gain_b)])
        if os.environ.get("DIFF", "1") == "1":
            variants[f"diff{lam:g}"] = dataclasses.replace(base, scores=[a - lam * b for a, b in zip(base.scores, gain_b)])
from cnt.transfer import NeuronPatch
from cnt.functions import choose_alpha
from cnt.search import ALPHAS
from cnt.arch import total_params
n_weights = total_params(target)
for b in budgets:
    for name, sc in variants.items():
        t2 = time.process_time()
        sel, gamma = sc.select(int(b * n_weights))
        slices = NeuronPatch.extract(donor, target, sel, gamma=gamma)
        tried, assessed, i = choose_alpha(ALPHAS, lambda a: val.assess(dataclasses.replace(slices, alpha=a)))
        rec = {"variant": name, "budget": b, "alpha": tried[i], "param_fraction": slices.param_fraction,
               "n_units": slices.n_units("mlp"),
               "sel": {str(l): [int(x) for x in v] for l, v in sel["mlp"].items()},
               "tried": [{"alpha": a, "share": x["share"], "ok": x["utility_ok"], "failed": x.get("failed"),
                          "fr": x["proxy"].get("false_refusal"), "fr_n": x["proxy"].get("false_refusal_n")}
                         for a, x in zip(tried, assessed)], "cpu": round(time.process_time() - t2, 1)}
        out["runs"].append(rec)
        print(json.dumps({k: rec[k] for k in ("variant", "budget", "alpha", "n_units", "tried", "cpu")}, default=str), flush=True)
        json.dump(out, open(out_path, "w"), indent=1, default=str)
