"""The rule with false refusal on every benign validation prompt; alpha on the kit's grid and on a finer one.
Per seed: learned mask; at 0.25% / 1% of the weights, every alpha judged; the choice on each grid evaluated on eval."""
import json, os, sys, time, torch
torch.set_num_threads(1)
HERE = os.path.dirname(os.path.abspath(__file__))
from cnt.pipeline import Pipeline
from cnt.zoo import load_model, load_tokenizer
from cnt.evaluate import evaluate
from cnt.functions import default_scorer, choose
from cnt.search import ALPHAS

seed = int(sys.argv[1]); budgets = [float(x) for x in sys.argv[2].split(",")]
fine = (1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0)
tok = load_tokenizer("smol-arith")
donor, _ = load_model("smol-safe"); target, _ = load_model("smol-arith")
pipe = Pipeline("refusal", donor, target, tok, seed=seed, progress=False)
t0 = time.process_time()
scores = pipe.scores(default_scorer("refusal"))
val = pipe.validator()
print(json.dumps({"locate_cpu": round(time.process_time() - t0, 1), "target": val.target, "donor": val.donor}), flush=True)
out = {"seed": seed, "target": val.target, "donor": val.donor, "runs": []}
for b in budgets:
    t1 = time.process_time()
    patch, steps = pipe.at_budget(scores, b, fine)
    rec = {"budget": b, "param_fraction": patch.param_fraction, "val_cpu": round(time.process_time() - t1, 1),
           "steps": [{"alpha": s.alpha, "share": round(s.share, 3), "ok": s.utility_ok, "failed": s.failed}
                     for s in steps]}
    std = [s for s in steps if s.alpha in ALPHAS]
    a_std = std[choose([{"share": s.share, "utility_ok": s.utility_ok} for s in std])].alpha
    rec["alpha_fine"], rec["alpha_std"] = patch.alpha, a_std
    print(json.dumps(rec), flush=True)
    rec["eval"] = {}
    for a in sorted({patch.alpha, a_std}):
        p = pipe.patch(scores, patch.n_neurons, a)
        p.apply(target)
        try:
            t1 = time.process_time()
            rep = evaluate(target, tok, "report", groups=("safety",), seed=seed, progress=False)
        finally:
            p.revert(target)
        rec["eval"][str(a)] = {k: round(m.value, 4) for k, m in rep.metrics.items()} | {"cpu": round(time.process_time() - t1, 1)}
        print(json.dumps({"budget": b, "alpha": a, "eval": rec["eval"][str(a)]}), flush=True)
    out["runs"].append(rec)
json.dump(out, open(f"{HERE}/wholefr_s{seed}.json", "w"), indent=1)
