"""One bias-removal setting measured three ways (shared by biasppl.py and biasheads.py): the validation rule's verdict
on ``base`` at ``alpha``, perplexity on every validation passage (``whole``), and eval (report profile: StereoSet,
perplexity on 200 passages); the target is patched for the two readings and reverted."""
import dataclasses
import time

from cnt.evaluate import evaluate


def measure_alpha(base, alpha, val, target, tok, whole, *, seed, target_whole_ppl, target_eval_ppl) -> dict:
    t1 = time.process_time()
    p = dataclasses.replace(base, alpha=alpha)
    v = val.assess(p)
    p.apply(target)
    try:
        wp = whole(target)
        rep = evaluate(target, tok, "report", groups=("bias", "perplexity"), seed=seed, progress=False)
    finally:
        p.revert(target)
    rec = {"alpha": alpha, "share": v["share"], "utility_ok": v["utility_ok"], "failed": v["failed"],
           "proxy": v["proxy"], "whole_ppl": wp, "whole_ppl_change": wp / target_whole_ppl - 1,
           "eval": {k: round(m.value, 4) for k, m in rep.metrics.items()}, "cpu": round(time.process_time() - t1, 1)}
    rec["eval_ppl_change"] = rec["eval"]["perplexity"] / target_eval_ppl - 1
    return rec
