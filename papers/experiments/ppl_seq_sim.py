import json, numpy as np
from cnt.functions import perplexity_change_decided, PPL_CHUNK
d = {k: np.array([[-lp, n] for lp, n in v], float) for k, v in json.load(open("papers/experiments/ppl_seq.json")).items()}
base = d["0.0"]
for lam in ("0.2", "0.35", "0.5"):
    ch = d[lam]
    whole = np.exp((ch[:, 0].sum() - base[:, 0].sum()) / ch[:, 1].sum()) - 1
    print(f"lambda {lam}: whole-split change {100*whole:+.2f}%")
    rows = []
    for limit in np.arange(-0.02, 0.12, 0.005):
        n = len(ch)
        for i in range(PPL_CHUNK, len(ch), PPL_CHUNK):
            if perplexity_change_decided(ch[:i], base, limit):
                n = i; break
        est = np.exp((ch[:n, 0].sum() - base[:n, 0].sum()) / ch[:n, 1].sum()) - 1
        rows.append((round(limit, 3), n, (est <= limit) == (whole <= limit)))
    print(" ".join(f"{100*l:+.1f}%:{n}{'' if ok else '!'}" for l, n, ok in rows))
