"""``cnt`` command line: inspect models and data, and the kit's jobs. Run ``cnt --help`` or ``cnt COMMAND --help``."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def _cmd_models(args) -> int:
    from .models import EMBEDDED, _is_converted

    print(f"{'name':30s} {'hub original':40s} {'installed':9s} {'converted':9s}")
    for name, emb in EMBEDDED.items():
        try:
            from .models import _part_paths

            _part_paths(emb)
            installed = "yes"
        except Exception:
            installed = "no"
        print(f"{name:30s} {emb.hub_id:40s} {installed:9s} {'yes' if _is_converted(name) else 'no':9s}")
    print("\nAny other name is passed to transformers' from_pretrained (a hub id, or a local folder).")
    return 0


def _cmd_prepare(args) -> int:
    from .models import EMBEDDED, ModelLoadError, convert_embedded

    names = args.models or list(EMBEDDED)
    failed = 0
    for name in names:
        try:
            t0 = time.time()
            path = convert_embedded(name, force=args.force)
            print(f"{name}: ready in {path} ({time.time() - t0:.1f} s)")
        except ModelLoadError as e:
            print(f"{name}: skipped — {e}")
            failed += name in (args.models or [])
    return 1 if failed else 0


def _cmd_info(args) -> int:
    from .arch import MLPNeurons, total_params
    from .models import load_model

    t0 = time.time()
    model, tok = load_model(args.model, device="cpu")
    neurons = MLPNeurons(model)
    fp = neurons.fingerprint()
    info = {"model": args.model, "fingerprint": fp.to_dict(), "mlp_neurons": fp.n_neurons,
            "params": total_params(model), "params_per_neuron": neurons.params_per_neuron(0),
            "chat_template": bool(tok.chat_template), "load_seconds": round(time.time() - t0, 2)}
    print(json.dumps(info, indent=1))
    return 0


def _cmd_data(args) -> int:
    from . import data

    if args.name:
        s = data.spec(args.name)
        rows = data.load(args.name, args.split, seed=args.seed, limit=args.n)
        print(f"# {s.name}: {s.description} ({s.package or 'mix of ' + ', '.join(s.parts)})")
        for r in rows:
            print(json.dumps(r, ensure_ascii=False))
        return 0
    print(f"{'name':18s} {'kind':12s} " + " ".join(f"{sp:>10s}" for sp in data.SPLITS) + "  source")
    for name, s in data.REGISTRY.items():
        sizes = [len(data.load(name, sp, seed=args.seed)) for sp in data.SPLITS]
        print(f"{name:18s} {s.kind:12s} " + " ".join(f"{n:10d}" for n in sizes)
              + f"  {s.package or '+'.join(s.parts)}")
    return 0


def _cmd_eval(args) -> int:
    from .evaluate import GROUPS, evaluate
    from .models import load_model

    model, tok = load_model(args.model, dtype=args.dtype)
    report = evaluate(model, tok, args.profile, groups=args.groups or GROUPS, name=args.model, seed=args.seed)
    print(report.table())
    print(f"\ntotal {report.seconds:.1f} s ({args.profile} profile)")
    if args.out:
        print(f"saved {report.save(args.out)}")
    return 0


def _cmd_zoo(args) -> int:
    from . import zoo

    if args.action == "list":
        for name, r in zoo.RECIPES.items():
            state = "cached" if zoo._cached_ok(name) else "artifact" if zoo._artifact_ok(name) else "not built"
            print(f"{name:18s} {r.base:28s} {state:10s} {r.description}")
        return 0
    if args.action == "card":
        path = Path(args.card)
        zoo.card(path)
        print(f"wrote {path}")
        return 0
    names = list(zoo.RECIPES) if args.all else args.names
    if not names:
        print("name one or more recipes, or --all")
        return 2
    measure = None if args.profile == "none" else args.profile
    failed = []
    for name in names:
        from .models import EMBEDDED, ModelLoadError, _part_paths

        try:
            _part_paths(EMBEDDED[zoo.recipe(name).base])
        except ModelLoadError as e:
            print(f"{name}: skipped — {e}")
            continue
        if measure:
            zoo.base_behaviour(zoo.recipe(name).base, measure)
        _, _, manifest = zoo.build(name, measure=measure)
        exp = manifest.get("meets_expectations", {})
        print(f"{name}: built in {manifest['build_seconds']:.0f} s; "
              + (", ".join(f"{k}={v['value']:.3g} ({v['rule']}: {'ok' if v['holds'] else 'FAILS'})"
                           for k, v in exp.items()) or "not measured"))
        if exp and not all(v["holds"] for v in exp.values()):
            failed.append(name)
    if args.card:
        zoo.card(args.card)
    if failed:
        print(f"expectations not met: {', '.join(failed)}")
    return 1 if failed else 0


def _cmd_reproduce(args) -> int:
    papers = Path(args.papers)
    print(f"cnt reproduce: results under {papers}/")
    found = sorted(p for p in papers.rglob("*") if p.is_file()) if papers.exists() else []
    for p in found:
        print(f"  {p}")
    if not found:
        print("  (nothing yet)")
    print("The experiment notebooks are not part of the kit yet; this job lists what exists.")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="cnt", description="Cross-Model Neuron Transfer research kit.")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("models", help="list the embedded models and whether they are installed/converted")
    s.set_defaults(func=_cmd_models)

    s = sub.add_parser("prepare", help="verify and convert the embedded models once into the cache (CNT_CACHE)")
    s.add_argument("models", nargs="*", help="embedded names (default: every installed one)")
    s.add_argument("--force", action="store_true", help="convert again even when cached")
    s.set_defaults(func=_cmd_prepare)

    s = sub.add_parser("info", help="load a model and print its architecture fingerprint and neuron counts")
    s.add_argument("model", help="embedded name, local folder or hub id")
    s.set_defaults(func=_cmd_info)

    s = sub.add_parser("data", help="list datasets with split sizes, or print records of one dataset")
    s.add_argument("name", nargs="?", help="dataset to print (omit to list all)")
    s.add_argument("--split", choices=["train", "locate", "validation", "eval"], default=None)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("-n", type=int, default=5, help="records to print")
    s.set_defaults(func=_cmd_data)

    s = sub.add_parser("eval", help="evaluate a model: refusal, false refusal, utility (lm-eval), perplexity, bias, skill",
                       description="Run the evaluation suite on the eval splits and print a table with 95%% CIs. "
                                   "The quick profile takes about a minute on a 135M model on 2 CPU cores, "
                                   "the full profile about three.")
    s.add_argument("model", help="embedded name, local folder or hub id")
    s.add_argument("--profile", choices=["quick", "full"], default="quick")
    s.add_argument("--groups", nargs="+", choices=["safety", "proxy", "utility", "perplexity", "bias", "skill"],
                   help="metric groups (default: all)")
    s.add_argument("--dtype", default=None, help="load dtype (inference runs in bfloat16 either way)")
    s.add_argument("--seed", type=int, default=0, help="split seed")
    s.add_argument("--out", help="write the report as JSON here")
    s.set_defaults(func=_cmd_eval)

    s = sub.add_parser("zoo", help="the model zoo: list recipes, build them, write the zoo card",
                       description="Build zoo models from their recipes (training on CPU: minutes each), measure them "
                                   "on the eval splits, and write manifests, committed artifacts and papers/zoo.md.")
    s.add_argument("action", choices=["list", "build", "card"])
    s.add_argument("names", nargs="*", help="recipes to build")
    s.add_argument("--all", action="store_true", help="build every recipe")
    s.add_argument("--profile", choices=["full", "quick", "none"], default="full",
                   help="evaluation profile for the manifest (none: do not measure)")
    s.add_argument("--card", default="papers/zoo.md", help="where the zoo card goes")
    s.set_defaults(func=_cmd_zoo)

    s = sub.add_parser("reproduce", help="regenerate papers/ (for now: list what exists)")
    s.add_argument("--papers", default="papers")
    s.set_defaults(func=_cmd_reproduce)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
