"""The task's contrast (build_task n_contrast / contrast_weight) with attribution and the learned mask on validation,
each variant scorer:n_contrast:weight at 0.25 / 1% of the weights, alpha chosen by the kit's rule, one validator
shared. Run as `contrast_task.py SEED smol-arith OUT VARIANTS 0.0025,0.01`: on the code at 7e030ac (the contrast
floored at the target's NLL of the refusal): contrast_floor_s0_{a,b}.json; at e281796 (the margin hinge):
contrast_margin_s0_{a,b}.json, contrast_margin_s1.json. Another pair: DONOR=... in the environment — run so at
e281796 on Qwen adding refusal (DONOR=qwen2.5-coder-0.5b-instruct, target qwen-abliterated, attribution:96:2 then
attribution:0:2 at 0.001,0.0025; stopped after the first variant for time): contrast_margin_qwen_add.json. METHOD:
"A contrast in the objective", "Qwen addition"."""
import json, os, sys, time, dataclasses, torch
torch.set_num_threads(int(os.environ.get("THREADS", "1")))
from cnt.pipeline import Pipeline
from cnt.zoo import load_model, load_tokenizer
from cnt.transfer import NeuronPatch
from cnt.functions import choose_alpha
from cnt.search import ALPHAS
from cnt.arch import total_params

seed = int(sys.argv[1]); target_name = sys.argv[2]; out_path = sys.argv[3]
donor_name = os.environ.get("DONOR", "smol-safe")
variants = [v.split(":") for v in sys.argv[4].split(",")]  # scorer:n_contrast:weight
budgets = [float(x) for x in sys.argv[5].split(",")]
tok = load_tokenizer(target_name)
donor, _ = load_model(donor_name); target, _ = load_model(target_name)
n_weights = total_params(target)
out = {"seed": seed, "target": target_name, "runs": []}
val = None
for scorer, n_c, w in variants:
    pipe = Pipeline("refusal", donor, target, tok, seed=seed, progress=False,
                    task_kwargs={"n_contrast": int(n_c), "contrast_weight": float(w)})
    if val is not None:
        pipe._validators[()] = val
    t0 = time.process_time()
    sc = pipe.scores(scorer, ("mlp",))
    loc = round(time.process_time() - t0, 1)
    val = pipe.validator()
    out["val_target"], out["val_donor"] = val.target, val.donor
    for b in budgets:
        t2 = time.process_time()
        sel, gamma = sc.select(int(b * n_weights))
        slices = NeuronPatch.extract(donor, target, sel, gamma=gamma)
        tried, assessed, i = choose_alpha(ALPHAS, lambda a: val.assess(dataclasses.replace(slices, alpha=a)))
        rec = {"variant": f"{scorer}:{n_c}:{w}", "locate_cpu": loc, "budget": b, "alpha": tried[i],
               "param_fraction": slices.param_fraction, "n_units": slices.n_units("mlp"),
               "sel": {str(l): [int(x) for x in v] for l, v in sel["mlp"].items()},
               "tried": [{"alpha": a, "share": x["share"], "ok": x["utility_ok"], "failed": x.get("failed"),
                          "fr": x["proxy"].get("false_refusal"), "fr_n": x["proxy"].get("false_refusal_n"),
                          "ppl": x["proxy"].get("ppl")}
                         for a, x in zip(tried, assessed)], "cpu": round(time.process_time() - t2, 1)}
        out["runs"].append(rec)
        print(json.dumps({k: rec[k] for k in ("variant", "budget", "alpha", "n_units", "tried", "cpu", "locate_cpu")},
                         default=str), flush=True)
        json.dump(out, open(out_path, "w"), indent=1, default=str)
