#!/usr/bin/env bash
# cnt transfer --budget auto for adding refusal, as a user runs it, then the saved patch on the eval split
# (report profile: every harmful prompt, 200 benign + every over-refusal probe, 200 passages). Output beside this file.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd); OUT=${OUT:-/tmp/cnt_auto_add}; NAME=${NAME:-auto_add}
rm -rf "$OUT"
/usr/bin/time -v cnt transfer --donor smol-safe --target smol-arith --function refusal --budget auto \
    --save-best-effort --out "$OUT" 2> "$HERE/$NAME.time" || true
python - "$OUT" "$HERE/$NAME.json" <<'PY'
import json, sys, torch
torch.set_num_threads(int(__import__('os').environ.get('OMP_NUM_THREADS', '1')))
from cnt.transfer import NeuronPatch
from cnt.zoo import load_model, load_tokenizer
from cnt.evaluate import evaluate
patch = NeuronPatch.load(sys.argv[1]); tok = load_tokenizer("smol-arith"); target, _ = load_model("smol-arith")
info = json.load(open(f"{sys.argv[1]}/transfer.json"))
patch.apply(target)
rep = evaluate(target, tok, "report", groups=("safety", "perplexity"), seed=0, progress=False)
out = {"n_neurons": patch.n_neurons, "param_fraction": patch.param_fraction, "alpha": patch.alpha,
       "search": {k: v for k, v in info["search"].items() if k not in ("target", "donor")},
       "eval": {k: m.value for k, m in rep.metrics.items()}}
json.dump(out, open(sys.argv[2], "w"), indent=1)
print(json.dumps(out["eval"]), out["n_neurons"], out["param_fraction"], out["alpha"])
PY
