"""Where the search's time goes (SmolLM2 addition pair, attribution, as benchmarks/run.py cnt runs it); output
prof_search.json. Run:
PYTHONPATH=. OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 .venv/bin/python papers/experiments/prof_search.py"""
import json, time, collections
import torch
torch.set_num_threads(1)
from cnt.zoo import load_model
from cnt import functions
from cnt.pipeline import transfer_function

T = collections.defaultdict(float); N = collections.Counter(); READ = []

def timed(cls, name):
    f = getattr(cls, name)
    def g(*a, **k):
        t = time.process_time(); out = f(*a, **k); T[name] += time.process_time() - t; N[name] += 1
        if name == "whole_false_refusal":  # (prompts read, most refusals allowed, rate)
            READ.append((out[1], k.get("most_refused", a[4] if len(a) > 4 else None), round(out[0], 4)))
        return out
    setattr(cls, name, g)

for n in ("measure", "whole_false_refusal", "whole_perplexity"):
    timed(functions.Proxy, n)
orig_gen = functions.generate
def gen(*a, **k):
    t = time.process_time(); out = orig_gen(*a, **k); T["generate"] += time.process_time() - t
    N["generate_prompts"] += sum(x is not None for x in out); return out
functions.generate = gen

donor, tok = load_model("smol-safe"); target, _ = load_model("smol-arith")
stage_t = {}
from contextlib import contextmanager
@contextmanager
def stage(key):
    t = time.process_time(); yield; stage_t[key] = stage_t.get(key, 0) + time.process_time() - t
patch, info = transfer_function(donor, target, tok, "refusal", budget="auto", scorer="attribution",
                                task_kwargs={"n_function": 48, "split": "locate"}, progress=False, stage=stage)
steps = info["search"]["steps"]
print(json.dumps({"stages": stage_t, "cpu": T, "calls": N, "reads": READ, "n_steps": len(steps),
                  "steps": [{k: s[k] for k in ("k", "alpha", "share", "utility_ok", "failed", "false_refusal_n")}
                            for s in steps]},
                 indent=1, default=str))
