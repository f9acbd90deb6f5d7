"""On real searches: where the sequential whole-split perplexity read would stop, and whether its verdict equals the
full read's. Every read runs to the end; the decision rule is only observed."""
import json, sys, time
import numpy as np, torch
torch.set_num_threads(1)
from cnt import functions
from cnt.zoo import load_model
from cnt.pipeline import transfer_function

function, donor_name, target_name, scorer = sys.argv[1:5]
READS, current = [], {}
real = functions.perplexity_change_decided

def observe(read, base, limit, z=functions.PPL_DECIDED_Z):
    if current.get("stop") is None and real(read, base, limit, z):
        current["stop"] = len(read)
    current["limit"] = limit
    return False

functions.perplexity_change_decided = observe
orig = functions.Proxy.whole_passages

def whole(self, model, tok, stop=None):
    current.clear()
    t = time.process_time()
    rows = orig(self, model, tok, stop)
    if stop is not None:
        READS.append({"rows": rows, "stop": current.get("stop"), "limit": current.get("limit"),
                      "cpu_s": time.process_time() - t})
    else:
        READS.append({"target": rows})
    return rows

functions.Proxy.whole_passages = whole
donor, tok = load_model(donor_name); target, _ = load_model(target_name)
t0 = time.process_time()
patch, info = transfer_function(donor, target, tok, function, budget="auto", scorer=scorer,
                                task_kwargs={"n_function": 48, "split": "locate"}, progress=False)
base = next(r["target"] for r in READS if "target" in r)
out = []
for r in READS:
    if "rows" not in r:
        continue
    ch = r["rows"]; n = r["stop"] or len(ch)
    change = lambda k: float(np.exp((ch[:k, 0].sum() - base[:k, 0].sum()) / ch[:k, 1].sum()) - 1)
    out.append({"full_change": change(len(ch)), "stop_at": n, "estimate_at_stop": change(n), "limit": r["limit"],
                "same_verdict": (change(n) <= r["limit"]) == (change(len(ch)) <= r["limit"]),
                "cpu_s_full": round(r["cpu_s"], 1), "passages": len(ch)})
print(json.dumps({"pair": [function, donor_name, target_name, scorer], "cpu_s": time.process_time() - t0,
                  "search_steps": len(info["search"]["steps"]), "reads": out}, indent=1))
