"""Transient of one TIES / DARE merge of a task-vector pair the size of gemma-3-270m's embedding (262,144 x 640, random):
`python ties_transient.py prune|ties|dare|lean`; outputs (2026-12-04, late): prune 6,146 MiB 28.4 CPU-s; ties 8,645 MiB 42.3;
dare 4,483 MiB 12.1; lean (cnt.baselines._ties) 3,846 MiB 19.9."""
import time, torch, sys
from peft.utils import merge_utils
from peak_rss import PeakRSS

sampler = PeakRSS()
torch.set_num_threads(1)
g=torch.Generator().manual_seed(0)
shape=(262144, 640)
base=torch.randn(shape, generator=g); t=base+0.01*torch.randn(shape, generator=g); d=base+0.01*torch.randn(shape, generator=g)
b0=sampler.start(); t0=time.process_time()
tv=[t.float()-base.float(), d.float()-base.float()]
step=sys.argv[1]
if step=="ties": out=merge_utils.ties(tv, torch.tensor([1.0,1.0]), 0.2)
elif step=="prune": out=[merge_utils.prune(x, 0.2, "magnitude") for x in tv]
elif step=="lean":
    from cnt import baselines as B
    out=B._ties(tv, torch.tensor([1.0,1.0]), 0.2)
    ref=None
elif step=="dare": out=merge_utils.dare_linear(tv, torch.tensor([1.0,1.0]), 0.2)
print(step, "tensor MiB", round(base.numel()*4/2**20), "peak over start MiB", round(sampler.peak-b0), "cpu s", round(time.process_time()-t0,1))
