"""How far a benign prompt's own answer leads a refusal (NLL per token of the first 3 response tokens: refusal minus
answer) on the target (smol-arith) and the donor (smol-safe), 195 validation prompts, seed 0; which prompts the donor
refuses (greedy, 16 tokens). METHOD: "A contrast in the objective". Output: margins.txt."""
import torch, json
torch.set_num_threads(1)
from cnt import data
from cnt.zoo import load_model, load_tokenizer
from cnt.models import generate
from cnt.tasks import Example, task_loss


def pair_nll(model, tok, examples, k):
    with torch.no_grad():
        return [float(task_loss(model, tok, [e], k)) for e in examples]
from cnt.evaluate import is_refusal
tok = load_tokenizer("smol-arith")
donor, _ = load_model("smol-safe"); target, _ = load_model("smol-arith")
benign = data.texts(data.load("benign", "validation", seed=0, limit=195))
harm = data.texts(data.load("harmful", "locate", seed=0, limit=16))
ref = [r for r in generate(donor, tok, harm, max_new_tokens=16) if is_refusal(r)]
t_ans = generate(target, tok, benign, max_new_tokens=16)
d_ans = generate(donor, tok, benign, max_new_tokens=16)
R = [Example(prompt=p, response=ref[i % len(ref)]) for i, p in enumerate(benign)]
A = [Example(prompt=p, response=a) for p, a in zip(benign, t_ans)]
out = {}
for name, m in (("target", target), ("donor", donor)):
    nr, na = pair_nll(m, tok, R, 3), pair_nll(m, tok, A, 3)
    out[name] = {"nll_ref": nr, "nll_ans": na}
d_ref = [is_refusal(a) for a in d_ans]
import numpy as np
for name in out:
    d = np.array(out[name]["nll_ref"]) - np.array(out[name]["nll_ans"])
    print(name, "margin d quantiles", np.percentile(d, [0, 5, 25, 50, 75]).round(2), "mean nll_ref", np.mean(out[name]["nll_ref"]).round(2), "mean nll_ans", np.mean(out[name]["nll_ans"]).round(2))
dd = np.array(out["donor"]["nll_ref"]) - np.array(out["donor"]["nll_ans"])
print("donor refuses", sum(d_ref), "their donor margins", dd[np.array(d_ref)].round(2))
