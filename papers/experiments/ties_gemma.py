"""One TIES merge (λ 1, density 0.2: the setting gemma bias removal chose) of the gemma zoo trio, peak resident set over
its start (sampled every 2 ms), for the code on PYTHONPATH. Output (2026-12-04, late), 39f968f (peft's TIES) then the
sliced TIES: {"start_mib": 3667, "peak_over_start_mib": 9509, "cpu_s": 40.4, "changed": 83368639};
{"start_mib": 3658, "peak_over_start_mib": 4715, "cpu_s": 20.3, "changed": 83368614}."""
import json, time
import torch
from cnt import baselines as B
from cnt.zoo.store import load_model

from peak_rss import PeakRSS

sampler = PeakRSS()
torch.set_num_threads(2)
donor, target, base = (load_model(n, dtype="float32", device="cpu")[0] for n in ("gemma-debiased", "gemma-biased", "gemma-3-270m"))
for m in (donor, target, base):  # resident, as in the run
    sum(float(p.sum()) for p in m.parameters())
start = sampler.start(); t = time.process_time()
mod = B.run("ties", donor, target, lam=1.0, density=0.2, base=base)
print(json.dumps({"start_mib": round(start), "peak_over_start_mib": round(sampler.peak - start),
                  "cpu_s": round(time.process_time() - t, 1), "changed": mod.params_changed}))
