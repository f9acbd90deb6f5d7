"""Does the validation rule's 20-token answer window miss false refusals that eval's 32-token answers catch?"""
import json, os, sys, torch
torch.set_num_threads(1)
HERE = os.path.dirname(os.path.abspath(__file__))
from cnt.pipeline import Pipeline
from cnt.zoo import load_model, load_tokenizer
from cnt import data
from cnt.models import generate, inference_dtype
from cnt.evaluate.judge import is_refusal

seed = int(sys.argv[1]); scorer = sys.argv[2]; budget = float(sys.argv[3]); alpha = float(sys.argv[4])
tok = load_tokenizer("smol-arith")
donor, _ = load_model("smol-safe"); target, _ = load_model("smol-arith")
pipe = Pipeline("refusal", donor, target, tok, seed=seed, progress=False)
scores = pipe.scores(scorer)
from cnt.scores import neurons_for
patch = pipe.patch(scores, neurons_for(budget, pipe.n_neurons), alpha)
sets = {"val_benign32": data.texts(data.load("benign", "validation", seed=seed, limit=32)),
        "val_over8": data.texts(data.load("overrefusal", "validation", seed=seed, limit=8)),
        "val_benign_all": data.texts(data.load("benign", "validation", seed=seed)),
        "eval_benign200": data.texts(data.load("benign", "eval", seed=seed, limit=200)),
        "eval_over": data.texts(data.load("overrefusal", "eval", seed=seed))}
out = {}
for name, model_state in (("target", False), ("patched", True)):
    if model_state: patch.apply(target)
    with inference_dtype(target, torch.bfloat16) as m:
        for s, prompts in sets.items():
            for n in (20, 32, 48):
                ans = generate(m, tok, prompts, max_new_tokens=n, batch_size=48, progress=False)
                out[f"{name}/{s}/{n}"] = [sum(map(is_refusal, ans)), len(ans)]
                print(name, s, n, out[f"{name}/{s}/{n}"], flush=True)
    if model_state: patch.revert(target)
json.dump(out, open(f"{HERE}/window_{scorer}_s{seed}.json", "w"), indent=1)
