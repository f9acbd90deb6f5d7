"""Speed goals of the kit, measured (not asserted in tests). Run with `make bench` (or `python benchmarks/run.py load`).

load: the embedded SmolLM2 from the converted cache in a fresh process (goal: <= 5 s on 2 CPU cores).
eval: the whole evaluation suite on SmolLM2-135M (goals: quick profile <= 60 s, full profile <= 300 s).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def time_fresh_load(name: str, repeats: int = 3) -> dict:
    code = ("import time; t=time.time(); from cnt.models import load_model; load_model(%r, device='cpu'); "
            "print(time.time()-t)" % name)
    subprocess.run([sys.executable, "-c", "from cnt.models import convert_embedded; convert_embedded(%r)" % name],
                   check=True, capture_output=True)  # conversion (first use) is not part of the goal
    times = []
    for _ in range(repeats):
        t0 = time.time()
        out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
        times.append({"in_process_s": float(out.stdout.strip().splitlines()[-1]),
                      "process_s": time.time() - t0})
    best = min(t["in_process_s"] for t in times)
    return {"model": name, "runs": times, "best_in_process_s": round(best, 2), "goal_s": 5.0, "meets_goal": best <= 5.0}


def time_eval(name: str, profile: str, goal_s: float) -> dict:
    code = ("import json; from cnt.models import load_model; from cnt.evaluate import evaluate; "
            "m, t = load_model(%r); r = evaluate(m, t, %r, name=%r, progress=False); "
            "print(json.dumps({'seconds': r.seconds, 'per_metric': {k: v.seconds for k, v in r.metrics.items()}}))"
            % (name, profile, name))
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    res = json.loads(out.stdout.strip().splitlines()[-1])
    return {"model": name, "profile": profile, "seconds": round(res["seconds"], 1), "goal_s": goal_s,
            "meets_goal": res["seconds"] <= goal_s, "per_metric_s": res["per_metric"]}


def main() -> None:
    which = sys.argv[1:] or ["load", "eval"]
    results: dict = {"when": time.strftime("%Y-%m-%dT%H:%M:%S")}
    if "load" in which:
        results["load"] = [time_fresh_load("smollm2-135m-instruct")]
    if "eval" in which:
        results["eval"] = [time_eval("smollm2-135m-instruct", "quick", 60.0),
                           time_eval("smollm2-135m-instruct", "full", 300.0)]
    out = ROOT / "papers" / "results" / "bench.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    previous = json.loads(out.read_text()) if out.is_file() else {}
    previous.update(results)
    out.write_text(json.dumps(previous, indent=1) + "\n")
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
