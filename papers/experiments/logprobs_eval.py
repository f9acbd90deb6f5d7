"""Prototype: sequence log-probabilities through the sliced head (no [batch, positions, vocab] logits) vs the current."""
import time, sys, json
import numpy as np, torch
from cnt import models, data
try:
    from cnt.logprobs import token_logprobs
except ImportError:  # the code it first ran on (bf1972e) had it in cnt.tasks
    from cnt.tasks import token_logprobs
from cnt.zoo.store import load_model
from cnt.evaluate import metrics

from peak_rss import PeakRSS

sampler = PeakRSS()
torch.set_num_threads(int(sys.argv[2]) if len(sys.argv) > 2 else 1)

@torch.no_grad()
def sliced(model, tokenizer, texts, batch_size=16, max_tokens=None):
    device = models.model_device(model)
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    ids = [[bos] + tokenizer(t, add_special_tokens=False)["input_ids"][: max_tokens] for t in texts]
    order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))
    out = [(0.0, 0)] * len(ids)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else bos
    for s in range(0, len(order), batch_size):
        idx = order[s:s + batch_size]
        inp, lab, mask = models.pad_right([ids[i] for i in idx], pad, [[-100] + ids[i][1:] for i in idx], device)
        lp, keep = token_logprobs(model, inp, lab, mask)
        for r, i in enumerate(idx):
            out[i] = (float(lp[r].double().sum()), int(keep[r].sum()))
    return out

name = sys.argv[1]
model, tok = load_model(name, dtype="float32", device="cpu")
res = {}
with models.inference_dtype(model, models.fast_dtype()) as m:
    texts = data.texts(data.load("wiki", "eval", limit=64), "text")
    recs = data.load("stereoset", "eval", limit=128)
    sents = [r[k] for r in recs for k in ("stereotype", "anti_stereotype", "unrelated")]
    for label, args in [("ppl", (texts, 8, 256)), ("stereoset", (sents, 32, None))]:
        for impl, fn in [("whole", metrics.sequence_logprobs), ("sliced", sliced), ("whole2", metrics.sequence_logprobs), ("sliced2", sliced)]:
            models.release_freed_memory(); b = sampler.start(); t = time.process_time()
            r = fn(m, tok, *args)
            res[label, impl] = (np.array(r), round(time.process_time() - t, 2), round(sampler.peak - b))
            print(label, impl, res[label, impl][1:], flush=True)
        a, b_ = res[label, "whole"][0], res[label, "sliced"][0]
        print(label, "max |Δ sum lp|", float(np.abs(a[:, 0] - b_[:, 0]).max()), "rel", float(np.abs(a[:, 0] - b_[:, 0]).max() / np.abs(a[:, 0]).max()), "same n", bool((a[:, 1] == b_[:, 1]).all()))
        if label == "stereoset":
            def ss(x):
                avg = x[:, 0] / x[:, 1]; return (avg[0::3] > avg[1::3])
            print("stereoset per-item preference equal:", int((ss(a) == ss(b_)).sum()), "/", len(recs))
        else:
            print("ppl", np.exp(-a[:, 0].sum() / a[:, 1].sum()), np.exp(-b_[:, 0].sum() / b_[:, 1].sum()))
