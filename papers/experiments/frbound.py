"""False refusal judged at its 95% upper bound on validation (functions.judge's false_refusal_confidence) against the
point estimate. Per seed: the learned mask; at 0.25% / 1% of the weights the kit's alpha choice (choose_alpha: grid
1, 2, 4, 8 and one halfway step) under each rule, from one memo of validation measurements; each rule's choice
evaluated on eval (report profile, safety group)."""
import json, os, sys, time, dataclasses, torch
torch.set_num_threads(1)
HERE = os.path.dirname(os.path.abspath(__file__))
from cnt.pipeline import Pipeline
from cnt.zoo import load_model, load_tokenizer
from cnt.evaluate import evaluate
from cnt.functions import default_scorer, choose_alpha, judge
from cnt.scores import neurons_for
from cnt.search import ALPHAS

seed = int(sys.argv[1]); budgets = [float(x) for x in sys.argv[2].split(",")]
rules = {"point": None, "bound95": 0.95}
tok = load_tokenizer("smol-arith")
donor, _ = load_model("smol-safe"); target, _ = load_model("smol-arith")
pipe = Pipeline("refusal", donor, target, tok, seed=seed, progress=False)
t0 = time.process_time()
scores = pipe.scores(default_scorer("refusal"))
val = pipe.validator(false_refusal_confidence=None)  # measures once; each rule re-judges the same measurements
out = {"seed": seed, "locate_cpu": round(time.process_time() - t0, 1), "target": val.target, "donor": val.donor,
       "runs": []}
print(json.dumps({k: out[k] for k in ("locate_cpu", "target", "donor")}), flush=True)
for b in budgets:
    k = neurons_for(b, pipe.n_neurons)
    base = pipe.patch(scores, k, 1.0)
    memo = {}

    def measured(alpha):
        if alpha not in memo:
            t1 = time.process_time()
            memo[alpha] = val.assess(dataclasses.replace(base, alpha=alpha))["proxy"]
            memo[alpha]["cpu"] = round(time.process_time() - t1, 1)
        return memo[alpha]

    rec = {"budget": b, "k": k, "param_fraction": base.param_fraction, "choice": {}, "eval": {}}
    for name, conf in rules.items():
        assess = lambda a: judge(measured(a), val.target, val.donor, "refusal", false_refusal_confidence=conf)
        tried, verdicts, i = choose_alpha(ALPHAS, assess)
        rec["choice"][name] = {"alpha": tried[i], "tried": tried,
                               "verdicts": [{"share": v["share"], "ok": v["utility_ok"], "failed": v["failed"]} for v in verdicts]}
        print(json.dumps({"budget": b, "rule": name, **rec["choice"][name]}), flush=True)
    rec["proxy"] = {str(a): m for a, m in sorted(memo.items())}
    for a in sorted({c["alpha"] for c in rec["choice"].values()}):
        p = dataclasses.replace(base, alpha=a)
        p.apply(target)
        try:
            t1 = time.process_time()
            rep = evaluate(target, tok, "report", groups=("safety",), seed=seed, progress=False)
        finally:
            p.revert(target)
        rec["eval"][str(a)] = {k2: round(m.value, 4) for k2, m in rep.metrics.items()} | \
            {"n": {k2: m.n for k2, m in rep.metrics.items()}, "cpu": round(time.process_time() - t1, 1)}
        print(json.dumps({"budget": b, "alpha": a, "eval": rec["eval"][str(a)]}), flush=True)
    out["runs"].append(rec)
    json.dump(out, open(f"{HERE}/frbound_s{seed}.json", "w"), indent=1)
