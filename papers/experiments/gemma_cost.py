"""CNT end to end on gemma bias removal (the pair whose search spent 703 s in whole-split perplexity reads)."""
import json, time, collections
from contextlib import contextmanager
import torch
torch.set_num_threads(1)
from cnt.zoo import load_model
from cnt.pipeline import transfer_function
donor, tok = load_model("gemma-debiased"); target, _ = load_model("gemma-biased")
T = collections.defaultdict(float); W = collections.defaultdict(float)
@contextmanager
def stage(key):
    c, w = time.process_time(), time.time(); yield
    T[key] += time.process_time() - c; W[key] += time.time() - w
patch, info = transfer_function(donor, target, tok, "bias", budget="auto", scorer="attribution", progress=False, stage=stage)
s = info["search"]
print(json.dumps({"cpu_s": T, "wall_s": W, "reached": s["reached"], "k": s["k"], "closest_k": s["closest_k"],
                  "steps": [{k: st[k] for k in ("k", "alpha", "share", "utility_ok", "ppl", "failed")} |
                            {"ppl_n": st.get("ppl_n")} for st in s["steps"]]}, indent=1, default=str))
