"""Peak resident memory, gemma: SFT reference steps (donor's recipe), stereoset, perplexity."""
import time, sys, json, dataclasses, copy
import torch
from cnt import zoo, models, data
from cnt.zoo.store import load_model
from cnt.train import sft
from cnt.evaluate import metrics

from peak_rss import PeakRSS

sampler = PeakRSS()
torch.set_num_threads(1)
out = {}
def measure(label, fn):
    models.release_freed_memory(); b = sampler.start(); t = time.process_time(); r = fn()
    out[label] = dict(s=round(time.process_time() - t, 1), base=round(b), peak_over_base=round(sampler.peak - b)); print(label, out[label], flush=True)
    return r
base, tok = load_model("gemma-3-270m", dtype="float32", device="cpu")
target, _ = load_model("gemma-biased", dtype="float32", device="cpu")
r = zoo.recipe("gemma-debiased")
parts = r.data(zoo.BuildContext(r, base, tok, tiny=False, progress=False))
ex = [e for v in parts.values() for e in v]
print({k: len(v) for k, v in parts.items()})
cfg = dataclasses.replace(r.train, steps=int(sys.argv[1]) if len(sys.argv) > 1 else 4)
measure("sft", lambda: sft(copy.deepcopy(target), tok, ex, cfg, progress=False))
with models.inference_dtype(target, models.fast_dtype()) as m:
    texts = data.texts(data.load("wiki", "eval", limit=16), "text")
    measure("perplexity_bf16", lambda: metrics.perplexity(m, tok, texts, progress=False))
    recs = data.load("stereoset", "eval", limit=64)
    measure("stereoset_bf16", lambda: metrics.stereoset(m, tok, recs, progress=False))
print(json.dumps(out))
