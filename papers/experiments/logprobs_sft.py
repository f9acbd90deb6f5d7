"""SFT steps by a SmolLM2 recipe (CPU time, losses), for the code on PYTHONPATH."""
import sys, time, json, dataclasses, copy
import torch
from cnt import zoo
from cnt.zoo.store import load_model
from cnt.train import sft
torch.set_num_threads(1)
name, steps = sys.argv[1], int(sys.argv[2])
r = zoo.recipe(name)
base, tok = load_model(r.base, dtype="float32", device="cpu")
parts = r.data(zoo.BuildContext(r, base, tok, tiny=False, progress=False))
ex = [e for v in parts.values() for e in v]
cfg = dataclasses.replace(r.train, steps=steps)
t = time.process_time()
_, res = sft(copy.deepcopy(base), tok, ex, cfg, progress=False)
print(json.dumps({"recipe": name, "cpu_s": round(time.process_time() - t, 1), "losses": [round(x, 5) for x in res.losses]}))
