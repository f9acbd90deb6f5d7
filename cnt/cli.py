"""``cnt`` command line: inspect models and data, and the kit's jobs. Run ``cnt --help`` or ``cnt COMMAND --help``.

(Over 400 lines: every subcommand's parser beside its handler; each handler only checks its arguments and calls the
module that does the work.)"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path


def _cmd_models(args) -> int:
    from .models import EMBEDDED, is_converted, is_installed

    print(f"{'name':30s} {'hub original':40s} {'installed':9s} {'converted':9s}")
    for name, emb in EMBEDDED.items():
        installed = "yes" if is_installed(name) else "no"
        print(f"{name:30s} {emb.hub_id:40s} {installed:9s} {'yes' if is_converted(name) else 'no':9s}")
    print("\nAny other name is passed to transformers' from_pretrained (a hub id, or a local folder).")
    return 0


def _cmd_prepare(args) -> int:
    from . import zoo
    from .models import EMBEDDED, ModelLoadError, convert_embedded, verify_cached, is_converted

    unknown = [n for n in args.models if n not in EMBEDDED and n not in zoo.RECIPES]
    if unknown:
        print(f"cnt prepare: error: unknown model {', '.join(map(repr, unknown))}; embedded models: "
              f"{', '.join(EMBEDDED)}; zoo models: {', '.join(zoo.RECIPES)}", file=sys.stderr)
        return 2
    names = args.models or list(EMBEDDED)
    failed = 0
    for name in names:
        try:
            t0 = time.time()
            if args.verify and not (is_converted(name) if name in EMBEDDED else zoo.is_cached(name)):
                print(f"{name}: not in the cache (nothing to verify)")  # --verify reports; it does not build
                continue
            path = (convert_embedded(name, force=args.force) if name in EMBEDDED
                    else zoo.ensure(name, force=args.force, allow_build=args.allow_build))
        except ModelLoadError as e:  # not installed: skipped (an error only when asked for by name)
            print(f"{name}: skipped — {e}")
            failed += name in args.models
            continue
        try:
            verify_cached(name, path, full=args.verify)
            print(f"{name}: {'verified' if args.verify else 'ready'} in {path} ({time.time() - t0:.1f} s)")
        except ModelLoadError as e:
            print(f"{name}: FAILED — {e}")
            failed += 1
    return 1 if failed else 0


def _cmd_info(args) -> int:
    from .arch import MLPNeurons, total_params
    from .zoo import load_model

    t0 = time.time()
    model, tok = load_model(args.model, device="cpu", allow_build=args.allow_build)
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
    from .atomic import check_output
    from .evaluate import METRIC_GROUPS, evaluate
    from .zoo import load_model

    if args.out:
        check_output(args.out, "file", what="--out")
    model, tok = load_model(args.model, dtype=args.dtype, allow_build=args.allow_build)
    report = evaluate(model, tok, args.profile, groups=args.groups or METRIC_GROUPS, name=args.model,
                      seed=args.seed)
    print(report.table())
    print(f"\ntotal {report.seconds:.1f} s ({args.profile} profile)")
    if args.out:
        print(f"saved {report.save(args.out)}")
    return 0


def _expectations(exp: dict) -> str:
    return ", ".join(f"{k}={v['value']:.3g} ({v['rule']}: {'ok' if v['holds'] else 'FAILS'})" for k, v in exp.items())


def _setting(kv: str) -> tuple[str, object]:
    key, sep, value = kv.partition("=")
    if not sep:
        raise ValueError(f"--set takes KEY=VALUE, got {kv!r}")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def _cmd_zoo(args) -> int:
    from . import zoo

    if args.action == "list":
        for name, r in zoo.RECIPES.items():
            state = "cached" if zoo.is_cached(name) else "artifact" if zoo.has_artifact(name) else "not built"
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

    def profile_of(name: str) -> str | None:  # --profile, else try: the tuning profile; build/measure: the card's
        if args.profile == "none":
            return None
        return args.profile or ("tune" if args.action == "try" else zoo.card_profile(name))

    if args.action == "try":
        changes = dict(_setting(kv) for kv in args.set)
        for name in names:
            rec = zoo.trial(name, changes, profile=profile_of(name) or "tune")
            print(f"{rec['variant']}: built in {rec['build_seconds']:.0f} s; on {' + '.join(rec['splits'])}:")
            for k, v in rec["pooled"]["variant"].items():
                ci = f" [{v['ci'][0]:.3f}, {v['ci'][1]:.3f}]" if v["ci"] else ""
                print(f"  {k} = {v['value']:.3f}{ci} (n={v['n']}; rule {rec['rules'][k]}: "
                      f"{'holds' if rec['holds'][k] else 'FAILS'})")
            for k, v in rec.get("card_weighted", {}).get("variant", {}).items():
                if v["value"] is not None:
                    print(f"  {k} weighted to the card's sources = {v['value']:.3f} [{v['ci'][0]:.3f}, "
                          f"{v['ci'][1]:.3f}]")
        return 0
    failed = []
    if args.action == "measure":
        for name in names:
            measure = profile_of(name) or zoo.card_profile(name)
            zoo.base_behaviour(zoo.recipe(name).base, measure)
            exp = zoo.measure(name, measure)["meets_expectations"]
            print(f"{name}: {_expectations(exp)}")
        if args.card:
            zoo.card(args.card)
        return 0
    for name in names:
        from .models import EMBEDDED, is_installed

        base = zoo.recipe(name).base
        if not is_installed(base):
            print(f"{name}: skipped — its base {base!r} is not installed: `{EMBEDDED[base].pip}` (or make setup-extra)")
            continue
        measure = profile_of(name)
        if measure:
            zoo.base_behaviour(zoo.recipe(name).base, measure)
        _, _, manifest = zoo.build(name, measure=measure)
        exp = manifest.get("meets_expectations", {})
        print(f"{name}: built in {manifest['build_seconds']:.0f} s; {_expectations(exp) or 'not measured'}")
        rc = manifest.get("rebuild_check")
        if rc:
            weights = "weights not compared (no committed or cached weights)" if rc["max_abs_weight_diff"] is None \
                else (f"identical weights ({rc['weights_compared_with']}): {rc['identical_weights']} "
                      f"(max |Δ| {rc['max_abs_weight_diff']:.3g})")
            print(f"  rebuild vs committed: {weights}; metrics within tolerance: {rc['all_within_tolerance']}")
        if exp and not all(v["holds"] for v in exp.values()):
            failed.append(name)
    if args.card:
        zoo.card(args.card)
    if failed:
        print(f"expectations not met: {', '.join(failed)}")
    return 1 if failed else 0


def _budget(value: str):
    from .scores import check_budget

    try:
        return check_budget(value if value == "auto" else float(value), auto=True)
    except ValueError:
        raise argparse.ArgumentTypeError(f"budget must be a fraction of MLP neurons in (0, 1] or 'auto', "
                                         f"got {value!r}") from None


def _alpha(value: str) -> float:
    from .transfer import ALPHA_MAX

    try:
        a = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"alpha must be a number, got {value!r}") from None
    if not math.isfinite(a) or not 0 < a <= ALPHA_MAX:
        raise argparse.ArgumentTypeError(f"alpha must be a finite number in (0, {ALPHA_MAX:g}], got {value!r}")
    return a


def _integer(value: str, low: int) -> int:
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {value!r}") from None
    if n < low:
        raise argparse.ArgumentTypeError(f"expected a whole number >= {low}, got {n}")
    return n


def _count(value: str) -> int:
    return _integer(value, 0)


def _positive(value: str) -> int:
    return _integer(value, 1)


def _nonnegative(value: str) -> int:
    return _integer(value, 0)


def _scorers() -> list[str]:
    from .locate import SCORERS

    return list(SCORERS)


def _functions() -> list[str]:
    from .functions import FUNCTIONS

    return list(FUNCTIONS)


def _applications() -> list[str]:
    from .applications import APPLICATIONS

    return list(APPLICATIONS)


def _metric_groups() -> list[str]:
    from .evaluate import METRIC_GROUPS

    return list(METRIC_GROUPS)


def _alphas() -> tuple[float, ...]:
    from .search import ALPHAS

    return ALPHAS


def _units(value: str) -> tuple[str, ...]:
    from .locate import check_units

    try:
        return check_units(dict.fromkeys(v.strip() for v in value.split(",") if v.strip()))
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _cmd_transfer(args) -> int:
    from .arch import check_compatible
    from .atomic import check_output
    from .pipeline import transfer_function
    from .zoo import load_model, load_tokenizer

    check_output(args.out, "folder", what="--out", marker="patch.json")
    if args.donor == args.target:
        raise ValueError(f"--donor and --target are both {args.donor!r}: there is nothing to transfer")
    donor, _ = load_model(args.donor, dtype="float32", allow_build=args.allow_build)
    target, _ = load_model(args.target, dtype="float32", allow_build=args.allow_build)
    check_compatible(donor, target)  # refused before any compute
    tok = load_tokenizer(args.target)
    patch, info = transfer_function(donor, target, tok, args.function, budget=args.budget, scorer=args.scorer,
                                    kinds=args.units, alpha=args.alpha if len(args.alpha) > 1 else args.alpha[0],
                                    seed=args.seed, donor_name=args.donor, target_name=args.target)
    search = info.get("search")
    if search is not None and not search["reached"]:
        short = (f"--budget auto did not reach its goal: the subset tried that went furthest with utility held "
                 f"({patch.n_neurons} neurons, "
                 f"{100 * patch.param_fraction:.3g}% of the weights) moved {100 * search['share']:.0f}% of the gap "
                 f"on validation, the goal is {100 * search['goal']:.0f}% with utility held")
        broke = [s for s in search["steps"] if s["share"] >= search["goal"] and s["failed"]]
        if broke:  # the share was there; a utility check stopped it: say which
            s = min(broke, key=lambda s: (s["k"], s["alpha"]))
            short += (f"; every subset that reached it broke utility (the smallest, {s['k']} units at alpha "
                      f"{s['alpha']:g}: {'; '.join(s['failed'])})")
        if not args.save_best_effort:
            print(f"cnt transfer: {short}; nothing saved (--save-best-effort saves that subset anyway)",
                  file=sys.stderr)
            return 1
        print(f"cnt transfer: warning: {short}; saved anyway (--save-best-effort)", file=sys.stderr)
    out = patch.save(args.out, extra_files={"transfer.json": json.dumps(info, indent=1, default=str) + "\n"})
    print(patch)
    print(f"saved {out}/patch.safetensors ({(out / 'patch.safetensors').stat().st_size / 1e6:.2f} MB) in "
          f"{info['seconds']:.0f} s")
    return 0


def _cmd_locate(args) -> int:
    import torch

    from .atomic import check_output, write_file
    from .pipeline import Pipeline
    from .zoo import load_model, load_tokenizer

    check_output(args.out, "file", what="--out")
    donor, _ = load_model(args.donor, dtype="float32", allow_build=args.allow_build)
    target, _ = load_model(args.target, dtype="float32", allow_build=args.allow_build)
    tok = load_tokenizer(args.target)  # (Pipeline refuses an incompatible pair before any compute)
    extra = {"budget": args.iterative_budget} if args.scorer == "iterative" else {}
    scores = Pipeline(args.function, donor, target, tok, seed=args.seed).scores(args.scorer, args.units, **extra)
    with write_file(args.out) as f:
        torch.save({"scorer": scores.scorer, "scores": scores.scores, "units": scores.units, "costs": scores.costs,
                    "gamma": scores.gamma, "settings": scores.settings}, f)
    top = scores.top(args.show)
    print(f"{scores.scorer} scores for {sum(s.numel() for s in scores.scores)} neurons in {scores.seconds:.0f} s; "
          f"saved {args.out}")
    print("top neurons per layer:", {layer: idx.tolist() for layer, idx in top.items()})
    return 0


def _patch_cmd(args, action: str) -> int:
    from .atomic import check_output, folder
    from .transfer import NeuronPatch
    from .zoo import load_model

    check_output(args.out, "folder", what="--out", marker="config.json")
    patch = NeuronPatch.load(args.patch)
    model, tok = load_model(args.model, dtype=patch.dtype, allow_build=args.allow_build)
    getattr(patch, action)(model)
    with folder(args.out) as tmp:  # the model folder appears whole, or the previous one stays
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
    print(f"{action} {patch} -> saved {args.out}")
    return 0


def _parse_params(pairs: list[str]) -> dict:
    out = {}
    for kv in pairs or []:
        if "=" not in kv:
            raise ValueError(f"parameter {kv!r} must look like NAME=VALUE")
        k, v = kv.split("=", 1)
        try:
            out[k] = json.loads(v)
        except json.JSONDecodeError:
            out[k] = v
    return out


def _cmd_reproduce(args) -> int:
    """papermill runs every notebook (default parameters unless -p) into papers/runs/, then the report."""
    from .reproduce import finished, reproduce, run_grid

    from . import grid

    if args.grid is None:
        with_grids = args.with_grid or []
        for flag, given in (("--backend", args.backend != "local"), ("--address", args.address),
                            ("--dry-run", args.dry_run)):
            if given and not with_grids:
                raise ValueError(f"{flag} goes with --grid FILE or --with-grid FILE")
        grids = [(f, grid.load(f, args.notebooks)) for f in with_grids]  # a bad grid file fails before any notebook
        if args.dry_run:
            for f, runs in grids:
                print(f"{f}:\n{grid.plan(runs, finished(runs, args.papers))}")
            return 0
        record = reproduce(args.notebooks, args.papers, only=args.only or (), params=_parse_params(args.param),
                           jobs=args.jobs, kernel=args.kernel, progress=not args.quiet, grids=grids,
                           backend=args.backend, address=args.address, retries=args.retries)
        return 1 if any(s["state"] == "failed" for s in record["grid_states"].values()) else 0
    if args.with_grid:
        raise ValueError("--with-grid FILE adds a grid to the notebooks' run; with --grid FILE alone, name one grid")
    if args.only or args.param:
        raise ValueError("--grid FILE names its runs and parameters; --only and -p do not go with it")
    runs = grid.load(args.grid, args.notebooks)
    if args.dry_run:
        print(grid.plan(runs, finished(runs, args.papers)))
        return 0
    states = run_grid(runs, notebooks=args.notebooks, papers=args.papers, backend=args.backend, address=args.address,
                      jobs=args.jobs, retries=args.retries, kernel=args.kernel, progress=not args.quiet)
    return 1 if any(s["state"] == "failed" for s in states.values()) else 0


def _cmd_frontier(args) -> int:
    from .experiment import run_frontier

    from .atomic import check_output
    from .locate import SCORERS, check_units

    if any(not 0 < b < 1 for b in args.budgets):
        print(f"cnt frontier: error: --budgets must be fractions of the weights in (0, 1), got {args.budgets}",
              file=sys.stderr)
        return 2
    locators = [(name, tuple(k for k in kinds.split("+"))) for spec in args.locators
                for name, _, kinds in [spec.partition(":")]]
    for (name, kinds), spec in zip(locators, args.locators):
        try:
            if name not in SCORERS:
                raise ValueError(f"unknown scorer {name!r}; scorers: {', '.join(SCORERS)}")
            check_units(kinds, [name])
        except ValueError as e:
            print(f"cnt frontier: error: --locators {spec!r} must be SCORER:KINDS, kinds joined by '+' ({e})",
                  file=sys.stderr)
            return 2
    check_output(Path(args.out) / "results", "folder", what="--out")
    res = run_frontier(args.application, Path(args.out) / "results", family=args.family, donor=args.donor,
                       target=args.target, tag=args.tag, budgets=tuple(args.budgets), locators=locators,
                       profile=args.profile, seed=args.seed, baselines=tuple(args.baselines),
                       ceilings=args.ceilings)
    print(f"{res.name}: {len(res.points)} points in {res.seconds:.0f} s -> {args.out}/results/{res.name}.frontier.json")
    return 0


def _cmd_run(args) -> int:
    from . import experiment, plots
    from .atomic import check_output

    check_output(Path(args.out) / "results", "folder", what="--out")
    config, out = experiment.notebook_config(args.application, family=args.family, donor=args.donor,
                                             target=args.target, base=args.base, output_dir=args.out,
                                             **_parse_params(args.param))
    result = experiment.run_application(config, out / "results")
    plots.application_figures(result, out / "figures")
    print(f"wrote {out / 'results' / (result.name + '.json')} and figures in {out / 'figures'} "
          f"({result.seconds / 60:.1f} min)")
    return 0


def _cmd_report(args) -> int:
    from . import report

    summary, rep = report.write(args.results, args.report)
    print(f"wrote {summary} and {rep}")
    return 0


class _Parser(argparse.ArgumentParser):
    """One error line (and where to look), exit status 2 — not the whole usage text."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n(`{self.prog} --help` lists the arguments)\n")


def _allow_build(s) -> None:
    s.add_argument("--allow-build", action="store_true",
                   help="a zoo model without a committed artifact is trained from its recipe (minutes on CPU); "
                        "without this flag it is refused with the command that builds it")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="cnt", description="Cross-Model Neuron Transfer research kit.")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("models", help="list the embedded models and whether they are installed/converted")
    s.set_defaults(func=_cmd_models)

    s = sub.add_parser("prepare", help="verify and convert the embedded models once into the cache (CNT_CACHE)")
    s.add_argument("models", nargs="*", help="embedded or zoo names (default: every installed embedded one)")
    s.add_argument("--force", action="store_true", help="convert (or reconstruct) again even when cached")
    s.add_argument("--verify", action="store_true",
                   help="hash every cached file again against the record written with it; exit 1 on a mismatch")
    _allow_build(s)
    s.set_defaults(func=_cmd_prepare)

    s = sub.add_parser("info", help="load a model and print its architecture fingerprint and neuron counts")
    s.add_argument("model", help="embedded or zoo name, local folder or hub id")
    _allow_build(s)
    s.set_defaults(func=_cmd_info)

    s = sub.add_parser("data", help="list datasets with split sizes, or print records of one dataset")
    s.add_argument("name", nargs="?", help="dataset to print (omit to list all)")
    s.add_argument("--split", choices=["train", "locate", "validation", "eval"], default=None)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("-n", type=_count, default=5, help="records to print")
    s.set_defaults(func=_cmd_data)

    s = sub.add_parser("eval",
                       help="evaluate a model: refusal, false refusal, utility (lm-eval), perplexity, bias, skill",
                       description="Run the evaluation suite on the eval splits and print a table with 95%% CIs. "
                                   "The quick profile takes about a minute on a 135M model on 2 CPU cores, "
                                   "the full profile about three.")
    s.add_argument("model", help="embedded name, local folder or hub id")
    s.add_argument("--profile", choices=["quick", "full"], default="quick")
    s.add_argument("--groups", nargs="+", choices=_metric_groups(),
                   help="metric groups (default: all)")
    s.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="load dtype (default float32 on CPU, bfloat16 on CUDA)")
    s.add_argument("--seed", type=int, default=0, help="split seed")
    s.add_argument("--out", help="write the report as JSON here")
    _allow_build(s)
    s.set_defaults(func=_cmd_eval)

    s = sub.add_parser("zoo", help="the model zoo: list recipes, build them, write the zoo card",
                       description="Build zoo models from their recipes (training on CPU: minutes each), measure them "
                                   "on the eval splits, and write manifests, committed artifacts and papers/zoo.md.")
    s.add_argument("action", choices=["list", "build", "measure", "try", "card"],
                   help="build: train + measure; measure: (re)measure a built model into its manifests; try: build a "
                        "variant (--set) and measure it on the validation + locate splits (tuning; nothing saved but a "
                        "line in papers/zoo/NAME/trials.jsonl)")
    s.add_argument("names", nargs="*", help="recipes to build")
    s.add_argument("--all", action="store_true", help="build every recipe")
    s.add_argument("--profile", choices=["full", "quick", "tune", "none"], default=None,
                   help="evaluation profile: build/measure write the manifest's (default: the recipe's card profile, "
                        "full for SmolLM2, quick for the slower Qwen and Gemma; none: do not measure); "
                        "try measures the tuning splits (default tune: every safety prompt of each split)")
    s.add_argument("--card", default="papers/zoo.md", help="where the zoo card goes")
    s.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="try: a training setting (steps, lr, lora_r, ...) or data hyper-parameter to change (repeat)")
    s.set_defaults(func=_cmd_zoo)

    s = sub.add_parser("transfer", help="CNT: locate neurons, pick the subset, save a NeuronPatch",
                       description="Transfer a function from DONOR into TARGET (same architecture fingerprint; refused "
                                   "otherwise, before any compute) and save the patch (patch.safetensors + patch.json) "
                                   "to OUT. --budget is a fraction of MLP neurons, or 'auto' for the minimal-subset "
                                   "search on the validation split.")
    s.add_argument("--donor", required=True,
                   help="model with the function (an embedded or zoo name, a folder or a hub id)")
    s.add_argument("--target", required=True, help="model to change")
    s.add_argument("--function", required=True, choices=_functions())
    s.add_argument("--budget", type=_budget, default="auto", help="fraction of MLP neurons in (0, 1], or auto")
    s.add_argument("--scorer", choices=_scorers(),
                   help="the locator (default: the function's: learned_mask for refusal, attribution otherwise)")
    s.add_argument("--units", type=_units,
                   help="kinds of unit, comma-separated: mlp (neurons), head (query heads), kv (key/value groups) "
                        "(default: the function's: mlp,head,kv for bias with a locator that scores heads, mlp "
                        "otherwise)")
    s.add_argument("--alpha", type=_alpha, nargs="+", default=list(_alphas()),
                   help="amplification of the transferred difference; several values (default: %(default)s) are "
                        "chosen among on the validation split (utility held, answers still language)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--save-best-effort", action="store_true",
                   help="with --budget auto: save the subset tried that went furthest with utility held even when "
                        "it misses the goal (default: exit 1 and save nothing)")
    s.add_argument("--out", required=True, help="folder for the patch")
    _allow_build(s)
    s.set_defaults(func=_cmd_transfer)

    s = sub.add_parser("locate", help="score every MLP neuron for a donor/target pair and function",
                       description="Score all MLP neurons (layer x unit) with a scorer and save the scores (torch).")
    s.add_argument("--donor", required=True)
    s.add_argument("--target", required=True)
    s.add_argument("--function", required=True, choices=_functions())
    s.add_argument("--scorer", choices=_scorers(),
                   help="the locator (default: the function's: learned_mask for refusal, attribution otherwise)")
    s.add_argument("--units", type=_units,
                   help="kinds of unit, comma-separated: mlp, head, kv (attribution, iterative and learned_mask; "
                        "default: the function's: mlp,head,kv for bias, mlp otherwise)")
    s.add_argument("--iterative-budget", type=_positive, default=256, help="neurons chosen by the iterative scorer")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--show", type=_count, default=20, help="print the top N neurons")
    s.add_argument("--out", required=True, help="file for the scores (.pt)")
    _allow_build(s)
    s.set_defaults(func=_cmd_locate)

    for action, text in (("apply", "apply a saved patch to a model and save the patched model"),
                         ("revert", "revert a saved patch from a patched model and save the restored model")):
        s = sub.add_parser(action, help=text, description=text.capitalize() + ". Refused, with nothing written, "
                           "if the model's fingerprint or slices do not match the patch.")
        s.add_argument("--patch", required=True, help="patch folder (patch.safetensors + patch.json)")
        s.add_argument("--model", required=True, help="model name or folder")
        s.add_argument("--out", required=True, help="folder for the resulting model")
        _allow_build(s)
        s.set_defaults(func=lambda a, action=action: _patch_cmd(a, action))

    s = sub.add_parser("run", help="one application end to end: CNT + every baseline + evaluation -> JSON + figures",
                       description="Runs an application (what its notebook runs) and writes <out>/results/"
                                   "<application>.json and <out>/figures/. Parameters as in the notebooks: "
                                   "-p budgets='[0.001,0.01]' -p profile=full -p baselines='[\"random\"]'.")
    s.add_argument("application", choices=_applications())
    s.add_argument("--family", default="smollm2", help="model family whose zoo pair to use (smollm2, "
                                                        "qwen2.5-coder-0.5b)")
    s.add_argument("--donor", help="override the donor (an embedded or zoo name, a folder or a hub id)")
    s.add_argument("--target", help="override the target")
    s.add_argument("--base", help="override the common base (task arithmetic, TIES, DARE)")
    s.add_argument("--out", default="papers", help="output folder (results/ and figures/ go under it)")
    s.add_argument("-p", "--param", action="append", metavar="NAME=VALUE",
                   help="any ApplicationConfig field (JSON values)")
    s.set_defaults(func=_cmd_run)

    s = sub.add_parser("frontier", help="the sparsity frontier of an application: share of the gap vs %% of weights",
                       description="For each locator (and kind of unit) at each budget in weights, beside random "
                                   "neurons, weight-delta and the ceilings (every MLP neuron, attention only, every "
                                   "unit): alpha chosen on validation, the share of the gap measured on eval. Writes "
                                   "<out>/results/<name>.frontier.json and <out>/figures/<name>_frontier.png.")
    s.add_argument("application", choices=_applications())
    s.add_argument("--family", default="smollm2")
    s.add_argument("--donor")
    s.add_argument("--target")
    s.add_argument("--tag")
    s.add_argument("--budgets", type=float, nargs="+", default=[0.001, 0.0025, 0.01],
                   help="fractions of the model's weights")
    s.add_argument("--locators", nargs="+", default=["learned_mask:mlp", "learned_mask:mlp+head+kv",
                                                     "attribution:mlp", "attribution:mlp+head+kv"],
                   help="SCORER:KINDS, kinds joined by '+'")
    s.add_argument("--baselines", nargs="*", choices=["random", "weight_delta"], default=["random", "weight_delta"],
                   help="neuron-level baselines at every budget (none: a reduced run, locators and ceilings only)")
    s.add_argument("--no-ceilings", dest="ceilings", action="store_false",
                   help="leave out the ceilings (every MLP neuron, attention only, every unit): a part of a frontier "
                        "whose ceilings another run measured")
    s.add_argument("--profile", default="frontier", help="evaluation profile of every point (default: frontier, "
                                                           "the sweep's metric with 120 benign prompts)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--out", default="papers")
    s.set_defaults(func=_cmd_frontier)

    s = sub.add_parser("report", help="regenerate papers/REPORT.md and results/summary.json from results/*.json")
    s.add_argument("--results", default="papers/results")
    s.add_argument("--report", default=None, help="default: REPORT.md beside the results folder")
    s.set_defaults(func=_cmd_report)

    s = sub.add_parser("reproduce", help="papermill runs every notebook into papers/runs/, then regenerates "
                                         "papers/REPORT.md and papers/results/summary.json",
                       description="The main job (make reproduce): executes notebooks/*.ipynb with their default "
                                   "parameters (or -p NAME=VALUE for all of them), writing executed notebooks to "
                                   "papers/runs/, results to papers/results/ and figures to papers/figures/.")
    s.add_argument("--papers", default="papers")
    s.add_argument("--notebooks", default="notebooks")
    s.add_argument("--only", nargs="*", help="substrings of notebook names to run (default: all)")
    s.add_argument("-p", "--param", action="append", metavar="NAME=VALUE", help="parameter for every notebook")
    s.add_argument("--kernel", default="python3", help="Jupyter kernel (default python3: this environment)")
    s.add_argument("--quiet", action="store_true", help="no papermill progress bar")
    s.add_argument("-j", "--jobs", type=_positive, default=1,
                   help="notebooks run side by side, the CPU cores split between them (default 1)")
    s.add_argument("--grid", metavar="FILE", help="a YAML grid of runs (applications x families or model pairs x "
                   "seeds x profiles x tags, with resources and parameters; README 'Grids'); runs already finished "
                   "with the same parameters and code are skipped")
    s.add_argument("--with-grid", metavar="FILE", action="append",
                   help="after the notebooks, in the same invocation, the runs of this grid too (e.g. the seeds, "
                   "papers/grids/seeds.yaml; make reproduce adds it), those finished with the same parameters and "
                   "code skipped; repeatable")
    s.add_argument("--backend", choices=("local", "ray"), default="local",
                   help="with --grid: local (this machine, -j side by side) or ray (a Ray cluster: --address)")
    s.add_argument("--address", help="with --backend ray: the cluster to join (e.g. auto, or HEAD:6379); default: "
                   "start a local Ray instance")
    s.add_argument("--retries", type=_nonnegative, default=1,
                   help="with --grid: times a run that raised (or lost its Ray worker) is tried again before it is "
                   "reported failed")
    s.add_argument("--dry-run", action="store_true", help="with --grid: print the plan (each run, run or skip)")
    s.set_defaults(func=_cmd_reproduce)
    return p


def main(argv: list[str] | None = None) -> int:
    from .arch import IncompatibleModelsError, UnsupportedArchitectureError
    from .data import DataError
    from .models import ModelLoadError
    from .transfer import PatchError

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (PatchError, ModelLoadError, IncompatibleModelsError, UnsupportedArchitectureError, DataError,
            ValueError, OSError) as e:
        print(f"cnt {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
