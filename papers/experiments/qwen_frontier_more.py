"""The Qwen deletion frontier's missing points (issue #20: every locator with and without heads, beside random and
weight-delta): attribution over MLP neurons, query heads and k/v groups, random neurons and weight-delta at the
committed frontier's budgets (0.1 / 0.25% of the weights), without the ceilings (the committed run measured them).
Merged into papers/results/disalignment.qwen2.5-coder-0.5b.frontier.json as a second part (`runs`) when its target,
donor and validation measurements equal the committed run's; otherwise kept beside it as a tagged file. Run:
PYTHONPATH=. OMP_NUM_THREADS=2 HF_HUB_OFFLINE=1 .venv/bin/python papers/experiments/qwen_frontier_more.py"""
import json
import sys
import tempfile
from pathlib import Path

from cnt import plots
from cnt.atomic import write_json
from cnt.experiment import run_frontier
from cnt.results import FrontierResult

RESULTS = Path("papers/results")
NAME = "disalignment.qwen2.5-coder-0.5b"
committed = FrontierResult.from_dict(json.loads((RESULTS / f"{NAME}.frontier.json").read_text()))
with tempfile.TemporaryDirectory() as tmp:
    part = run_frontier("disalignment", Path(tmp) / "results", family="qwen2.5-coder-0.5b",
                        budgets=tuple(committed.budgets), locators=[("attribution", ("mlp", "head", "kv"))],
                        baselines=("random", "weight_delta"), ceilings=False, seed=committed.seed,
                        profile=committed.profile)
same = {k: (getattr(part, k), getattr(committed, k)) for k in ("target_score", "donor_score", "target_metrics",
                                                                 "donor_metrics", "validation")}
differ = [k for k, (a, b) in same.items() if json.dumps(a, sort_keys=True) != json.dumps(b, sort_keys=True)]
print("measurements that differ from the committed run:", differ or "none", file=sys.stderr)
first = committed.runs or [{"what": "attribution (MLP) at 0.1 / 0.25% of the weights and the ceilings",
                            "when": committed.when, "seconds": committed.seconds, "code": committed.code}]
this = {"what": "attribution (MLP neurons, query heads, k/v groups), random neurons and weight-delta at 0.1 / 0.25% "
                "of the weights (papers/experiments/qwen_frontier_more.py)", "when": part.when,
        "seconds": part.seconds, "code": part.code, "torch_threads": part.torch_threads}
if differ:
    out = RESULTS / f"{NAME}.more.frontier.json"
    write_json(out, part.to_dict(), default=str)
    print(f"kept apart: {out}", file=sys.stderr)
else:
    merged = FrontierResult.from_dict({
        **committed.to_dict(), "points": [p for p in committed.to_dict()["points"]] +
        [p for p in part.to_dict()["points"]], "baselines": list(part.baselines),
        "timings": {**committed.timings, **part.timings}, "seconds": round(committed.seconds + part.seconds, 1),
        "runs": [*first, this]})
    write_json(RESULTS / f"{NAME}.frontier.json", merged.to_dict(), default=str)
    plots.save(plots.frontier(merged), RESULTS.parent / "figures" / f"{NAME}_frontier.png")
    print("merged", file=sys.stderr)
for p in part.points:
    print(p.method, p.kinds, p.budget, f"{100 * p.param_fraction:.3f}%", "alpha", p.alpha, "share",
          round(p.share, 3), [round(x, 3) for x in p.share_ci], "val", round(p.validation_share, 3),
          "held", p.utility_held, p.units)
print("seconds", part.seconds, "timings", part.timings)
