"""Lever for adding refusal: over-refusal probes in the locate objective's utility term. Per seed, n_over in {0, 20}:
learned mask locate, at_budget (alpha per the kit's rule, validation), chosen setting on eval (safety, report profile)."""
import json, os, sys, time, torch
torch.set_num_threads(1)
HERE = os.path.dirname(os.path.abspath(__file__))
from cnt.pipeline import Pipeline
from cnt.zoo import load_model, load_tokenizer
from cnt.evaluate import evaluate
from cnt.functions import default_scorer

seed = int(sys.argv[1]); variants = [int(x) for x in sys.argv[2].split(",")]
budgets = [float(x) for x in sys.argv[3].split(",")]
out = {"seed": seed, "runs": []}
tok = load_tokenizer("smol-arith")
donor, _ = load_model("smol-safe"); target, _ = load_model("smol-arith")
for n_over in variants:
    t0 = time.process_time()
    pipe = Pipeline("refusal", donor, target, tok, seed=seed, task_kwargs={"n_overrefusal": n_over}, progress=False)
    scores = pipe.scores(default_scorer("refusal"))
    t_loc = time.process_time() - t0
    for b in budgets:
        patch, steps = pipe.at_budget(scores, b)
        rec = {"n_over": n_over, "budget": b, "alpha": patch.alpha, "param_fraction": patch.param_fraction,
               "locate_cpu": round(t_loc, 1),
               "steps": [{"alpha": s.alpha, "share": round(s.share, 3), "ok": s.utility_ok, "failed": s.failed,
                          "ppl": round(s.ppl, 2)} for s in steps]}
        print(json.dumps(rec), flush=True)
        patch.apply(target)
        try:
            t1 = time.process_time()
            rep = evaluate(target, tok, "report", groups=("safety",), seed=seed, progress=False)
        finally:
            patch.revert(target)
        rec["eval"] = {k: round(m.value, 4) for k, m in rep.metrics.items()}
        rec["eval_cpu"] = round(time.process_time() - t1, 1)
        print(json.dumps(rec), flush=True)
        out["runs"].append(rec)
json.dump(out, open(f"{HERE}/overref_s{seed}.json", "w"), indent=1)
