"""How many passages a sequential whole-split perplexity read needs: per-passage NLL of target and merges."""
import json, time, torch
torch.set_num_threads(1)
from cnt.zoo import load_model
from cnt import data
from cnt.evaluate.metrics import sequence_logprobs
donor, tok = load_model("smol-safe"); target, _ = load_model("smol-arith")
texts = data.texts(data.load("wiki", "validation", seed=0), "text")
out = {}
sd_t = {k: v.clone() for k, v in target.state_dict().items()}
sd_d = donor.state_dict()
for lam in (0.0, 0.2, 0.35, 0.5):
    target.load_state_dict({k: sd_t[k] + lam * (sd_d[k] - sd_t[k]) for k in sd_t})
    m = target.to(torch.bfloat16)
    t = time.process_time()
    with torch.no_grad():
        out[lam] = sequence_logprobs(m, tok, texts, 8, 128)
    print(lam, time.process_time() - t, flush=True)
    target = m.float()
json.dump({str(k): v for k, v in out.items()}, open("papers/experiments/ppl_seq.json", "w"))
