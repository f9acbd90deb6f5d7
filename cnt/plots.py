"""Figures drawn from results: an application's typed records (:class:`cnt.results.ApplicationResult`, as
:func:`cnt.experiment.run_application` returns and writes them) or a frontier's (:class:`cnt.results.FrontierResult`).

Every function takes those records (or a part of them), draws on a matplotlib axis and returns the figure; nothing
here computes a result. ``save(fig, path)`` writes PNGs for ``papers/figures/``.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
from matplotlib.ticker import MaxNLocator

from . import atomic
from .outcomes import gap_share, reported  # gap_share: also the notebooks' (plots.gap_share)
from .results import ApplicationResult, FrontierResult, MethodEntry

MARKERS = "o^v<>PhXsD*dp"
NAMES = {"all_mlp": "every MLP neuron (α=1)"}
LABEL = {"refusal_rate": "refusal rate (harmful eval prompts)", "stereoset_ss": "StereoSet SS (50 = unbiased)"}


def styles(names) -> dict[str, tuple[str, str, str]]:
    """(colour, marker, line style) for each method, from the order the result lists them — the runner writes them in
    the registries' order, so a new scorer or baseline gets its own style without an entry here. CNT and its variants
    share red (solid lines, a star for the minimal subset); random neurons are grey; every other method takes the next
    colour and marker; lines join the methods that have a curve over budgets."""
    out, i = {}, 0
    for name in names:
        if name == "cnt_minimal":
            out[name] = ("C3", "*", "")
        elif name == "all_mlp":
            out[name] = ("C3", "s", "")
        elif name == "cnt":
            out[name] = ("C3", "o", "-")
        elif name == "random":
            out[name] = ("0.5", "x", "-")
        else:  # a locator's own CNT curve (cnt_<scorer>) dashed in red; any other method its own colour
            colour = "C3" if name.startswith("cnt_") else f"C{[0, 1, 2, 4, 5, 6, 8, 9][i % 8]}"
            out[name] = (colour, MARKERS[i % len(MARKERS)], "--" if name.startswith("cnt_") else "-")
            i += 1
    return out


def _yerr(entries):
    return [[e.score - e.ci[0] for e in entries], [e.ci[1] - e.score for e in entries]]


def _references(ax, result: ApplicationResult):
    for who, color in (("target", "k"), ("donor", "C2")):
        v, ci = getattr(result, f"{who}_score"), getattr(result, f"{who}_ci")
        ax.axhline(v, color=color, lw=1, ls=":", label=f"{who} ({getattr(result, who)}): {v:.3g}")
        if ci:
            ax.axhspan(ci[0], ci[1], color=color, alpha=0.07)


def effect_vs_fraction(result: ApplicationResult, title: str | None = None):
    """Left: neuron-level methods (CNT variants, random, weight-delta) against the share of MLP neurons moved.
    Right: every method against the share of parameters it changed (merges change nearly all of them)."""
    methods = result.methods
    style = styles(methods)
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(12, 4.2), sharey=True)
    for name, entries in methods.items():
        entries = [e for e in entries if e.neuron_fraction]
        if not entries or name == "cnt" or name == "cnt_minimal":
            continue
        c, m, ls = style[name]
        entries = sorted(entries, key=lambda e: e.neuron_fraction)
        xs = [100 * e.neuron_fraction for e in entries]
        ys = [e.score for e in entries]
        if name == "random" and len(entries[0].seeds or []) > 1:  # several draws: their spread (one: its CI)
            ax.errorbar(xs, ys, yerr=[e.score_sd for e in entries], color=c, marker=m, ls=ls, capsize=3,
                        label="random neurons (mean ± sd over seeds)")
        else:
            ax.errorbar(xs, ys, yerr=_yerr(entries), color=c, marker=m, ls=ls, capsize=3,
                        label=NAMES.get(name, name))
    for e in result.entries("cnt_minimal"):
        ax.plot([100 * e.neuron_fraction], [e.score], marker="*", ms=16, color="C3", ls="",
                label=f"CNT minimal subset ({100 * e.neuron_fraction:.3g}%)")
    _references(ax, result)
    ax.set_xscale("log")
    ax.set_xlabel("MLP neurons transferred (%)")
    ax.set_ylabel(LABEL.get(result.metric, result.metric))
    # legends below the axes: inside, they covered measured points (the right panel has a dozen methods)
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=3, frameon=False)
    for name, entries in methods.items():
        if name == "cnt" or not entries:
            continue
        c, m, _ = style[name]
        xs = [100 * max(e.param_fraction, 1e-6) for e in entries]
        ax2.scatter(xs, [e.score for e in entries], color=c, marker=m, s=36, label=name)
    _references(ax2, result)
    ax2.set_xscale("log")
    ax2.set_xlabel("parameters changed (% of the model)")
    ax2.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=4, frameon=False)
    fig.suptitle(title or f"{result.application}: {result.donor} → {result.target}")
    fig.tight_layout()
    return fig


PPL_AXIS = 50.0  # % perplexity change: points beyond it sit at the axis's edge, labelled with their value


def measured(result: ApplicationResult, utility: str) -> bool:
    """Whether ``utility`` was measured in this run (the target and at least one method have a value): a figure of
    it is drawn only then."""
    return result.target_utility.get(utility) is not None and any(
        e.utility.get(utility) is not None for entries in result.methods.values() for e in entries)


def utility_tradeoff(result: ApplicationResult, utility: str = "mmlu", title: str | None = None):
    """Effect (share of the donor–target gap closed) against the change of one utility metric, every method and
    setting; the ideal corner is right (whole gap) and at zero utility change. A perplexity change past
    ±:data:`PPL_AXIS` % is drawn at the axis's edge (an open triangle) with its value, not by rescaling the axis."""
    if not measured(result, utility):
        raise ValueError(f"{result.name or result.application}: {utility} was not measured; no trade-off to draw")
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    t, d = result.target_score, result.donor_score
    base_u = result.target_utility[utility]
    style = styles(result.methods)
    edge = PPL_AXIS if utility == "perplexity" else None
    at_edge = {1: 0, -1: 0}  # labels already at the top / bottom edge: each next one a line further in
    for name, entries in result.methods.items():
        if name == "cnt" or not entries:
            continue
        c, m, _ = style[name]
        pts = [(gap_share(e.score, t, d), e.utility[utility] - base_u) for e in entries
               if e.utility.get(utility) is not None]
        if utility == "perplexity" and base_u:
            pts = [(x, 100 * y / base_u) for x, y in pts]
        inside = [(x, y) for x, y in pts if edge is None or abs(y) <= edge]
        if inside:
            ax.scatter([x for x, _ in inside], [y for _, y in inside], color=c, marker=m, s=36, label=name)
        for j, (x, y) in enumerate(p for p in pts if p not in inside):
            side = 1 if y > 0 else -1
            at = side * edge
            ax.scatter([x], [at], color=c, marker="^" if y > 0 else "v", s=60, facecolors="none",
                       label=name if not inside and j == 0 else None)  # the legend shows the marker drawn
            shift = 9 * at_edge[side]
            at_edge[side] += 1
            ax.annotate(f"{name} {y:+.0f}%", (x, at), textcoords="offset points",
                        xytext=(4, -10 - shift if y > 0 else 4 + shift), fontsize=7, color=c)
    if edge is not None:
        ax.set_ylim(-edge * 1.05, edge * 1.05)
    ax.axhline(0, color="k", lw=0.8)
    ax.axvline(1, color="C2", lw=0.8, ls=":")
    ax.set_xlabel("share of the donor–target gap closed")
    ax.set_ylabel(f"Δ {utility}" + (" (%)" if utility == "perplexity" else " (absolute)"))
    ax.legend(fontsize=7, ncol=2)
    ax.set_title(title or f"{result.application}: effect vs utility ({utility})")
    fig.tight_layout()
    return fig


def layer_distribution(per_layer, n_layers: int | None = None, title: str = "transferred neurons per layer"):
    """Bar chart of how many neurons a patch moved in each layer (``per_layer``: a list of counts, or a dict layer
    -> count)."""
    fig, ax = plt.subplots(figsize=(7, 3))
    if isinstance(per_layer, dict):
        n_layers = n_layers or 1 + max(int(k) for k in per_layer)
        counts = [per_layer.get(str(i), per_layer.get(i, 0)) for i in range(n_layers)]
    else:
        counts = list(per_layer)
        n_layers = len(counts)
    ax.bar(range(n_layers), counts, color="C3")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # layers are whole numbers (18 layers gave ticks at 2.5)
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))  # and so are counts (a 10-neuron patch gave ticks at 0.5)
    ax.set_xlabel("layer")
    ax.set_ylabel("neurons")
    ax.set_title(title)
    fig.tight_layout()
    return fig


def neuron_map(scores, title: str = "neuron scores (layer × neuron)", top: int | None = None):
    """Heat map of per-neuron scores (a ``[layers, neurons]`` tensor/array); with ``top``, the chosen neurons are
    marked."""
    import numpy as np
    import seaborn as sns

    arr = np.asarray(scores, dtype=float)
    fig, ax = plt.subplots(figsize=(10, 3.6))
    sns.heatmap(np.abs(arr), ax=ax, cmap="magma", cbar_kws={"label": "|score|"}, xticklabels=max(1, arr.shape[1] // 8),
                yticklabels=max(1, arr.shape[0] // 6), rasterized=True)
    if top:
        flat = np.argsort(-arr, axis=None)[:top]
        rows, cols = np.unravel_index(flat, arr.shape)
        ax.scatter(cols + 0.5, rows + 0.5, s=6, color="cyan", marker="o", label=f"top {top}")  # cell centres
        ax.legend(loc="upper right", fontsize=7)
    ax.set_xlabel("neuron (intermediate unit)")
    ax.set_ylabel("layer")
    ax.set_title(title)
    fig.tight_layout()
    return fig


BAR_COLOURS = {"target": "k", "donor": "0.3", "random": "0.7", "all_mlp": "#f4a582"}


def per_category(result: ApplicationResult, key: str = "per_bias_type", title: str | None = None):
    """Grouped bars of a per-category score (StereoSet SS per bias type) for the target, the donor and each method's
    reported setting (:func:`cnt.outcomes.reported`: CNT's best budget, the one the report quotes; ``details`` of
    each entry); CNT once, under the variant chosen on validation."""
    import pandas as pd
    import seaborn as sns

    rows = {"target": result.target_details.get(key, {}), "donor": result.donor_details.get(key, {})}
    for name in result.methods:
        if name == "cnt" and all(e.variant in result.methods for e in result.entries(name)):
            continue  # the best variant's entries, copied: drawn once, under the variant's name
        best = reported(result, name)
        if best and best.details.get(key):
            rows[name] = best.details[key]
    rows = {k: v for k, v in rows.items() if v}
    cats = sorted({c for v in rows.values() for c in v})
    long = pd.DataFrame([{"category": c, "model": name, "SS": vals[c]} for name, vals in rows.items()
                         for c in cats if c in vals])
    fig, ax = plt.subplots(figsize=(max(7, 1.2 * len(cats) * len(rows) / 3), 4))
    style = styles(result.methods)
    # bars carry no marker: the models that share a colour in the line plots (CNT and the every-MLP ceiling; the
    # donor's grey and random's) get shades of their own here
    palette = {name: BAR_COLOURS.get(name, style[name][0] if name in style else "C7") for name in rows}
    sns.barplot(long, x="category", y="SS", hue="model", order=cats, hue_order=list(rows), palette=palette, ax=ax)
    ax.axhline(50, color="k", lw=0.8, ls=":")
    ax.set_xlabel("")
    ax.set_ylabel("SS")
    ax.legend(fontsize=7, ncol=min(len(rows), 6), loc="upper center", bbox_to_anchor=(0.5, -0.08), frameon=False)
    ax.set_title(title or f"{result.application}: SS per category (the reported setting of each method)")
    fig.tight_layout()
    return fig


def frontier(result: FrontierResult, title: str | None = None):
    """Share of the donor–target gap on the eval split (95% CI) against the % of the model's weights moved, one line
    per locator and kind of unit, beside random neurons and weight-delta; the ceilings as single markers at their
    weights; the donor (share 1) and the 90% goal as lines; a red ring marks each point whose utility was not held on
    eval (perplexity, false refusal, broken text, skill). Drawn from a :class:`cnt.results.FrontierResult`."""
    fig, ax = plt.subplots(figsize=(8, 4.8))
    style = styles(dict.fromkeys(p.method for p in result.points))  # locators, baselines, ceilings in order
    groups: dict[tuple, list] = {}
    for pt in result.points:
        if pt.budget is None:
            continue
        groups.setdefault((pt.method, tuple(pt.kinds)), []).append(pt)
    for (method, kinds), pts in groups.items():
        pts = sorted(pts, key=lambda p: p.param_fraction)
        c, m, _ = style[method]
        heads = len(kinds) > 1
        xs = [100 * p.param_fraction for p in pts]
        ys = [p.share for p in pts]
        err = [[p.share - p.share_ci[0] for p in pts], [p.share_ci[1] - p.share for p in pts]]
        label = method.replace("_", " ") + (" (MLP + heads + k/v)" if heads else " (MLP neurons)" if method in
                                            ("learned_mask", "attribution") else "")
        ax.errorbar(xs, ys, yerr=err, color=c, marker=m, ls="--" if heads else "-", capsize=3, label=label,
                    mfc="white" if heads else c)
    broken = [p for p in result.points if p.utility_held is False]
    if broken:
        ax.scatter([100 * p.param_fraction for p in broken], [p.share for p in broken], s=90, marker="o",
                   facecolors="none", edgecolors="red", lw=1.2, zorder=5, label="utility not held on eval")
    for pt in result.points:
        if pt.budget is None:
            c, m, _ = style[pt.method]
            ax.errorbar([100 * pt.param_fraction], [pt.share],
                        yerr=[[pt.share - pt.share_ci[0]], [pt.share_ci[1] - pt.share]], color=c, marker=m, ms=10,
                        capsize=3, ls="", label=f"{pt.method} (α={pt.alpha:g})")
    ax.axhline(1.0, color="C2", ls=":", lw=1, label="donor")
    ax.axhline(0.9, color="k", ls="--", lw=0.7, label="90% of the gap")
    ax.axhline(0.0, color="k", ls=":", lw=1, label="target")
    ax.set_xscale("log")
    ax.set_xlabel("% of the model's weights moved (log)")
    ax.set_ylabel(f"share of the target→donor gap ({result.metric}, eval)")
    ax.set_title(title or f"sparsity frontier: {result.name or result.function}")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # outside: the ceilings sit at the right
    return fig


def save(fig, path: str | Path) -> Path:
    path = Path(path)
    with atomic.write_file(path) as f:  # a figure appears whole or not at all
        fig.savefig(f, format=path.suffix.lstrip(".") or "png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def layer_map_setting(result: ApplicationResult) -> tuple[MethodEntry | None, str]:
    """The CNT entry whose neurons the layer map shows, and what it is: the minimal subset where the search reached
    its goal, else the setting the report quotes (:func:`cnt.outcomes.reported`: CNT's best budget)."""
    minimal = result.entries("cnt_minimal")
    if minimal:
        return minimal[-1], "the minimal subset"
    return reported(result, "cnt"), "the reported budget"


def figure_plan(result: ApplicationResult) -> dict[str, str]:
    """The figures one application's results can carry, name -> caption: only those of what was measured (a
    trade-off only for a utility metric the run measured; the layer map only with CNT's per-layer counts; the
    categories only for a bias run). The report links exactly these."""
    plan = {"effect": "effect vs fraction"}
    for name, utility in (("tradeoff", "mmlu"), ("tradeoff_ppl", "perplexity")):
        if measured(result, utility):
            plan[name] = f"utility trade-off ({utility})"
    chosen, _ = layer_map_setting(result)
    if chosen and chosen.per_layer:
        plan["layers"] = "CNT neurons per layer"
    if result.target_details.get("per_bias_type"):
        plan["categories"] = "SS per bias category"
    return plan


def application_figures(result: ApplicationResult, folder: str | Path, prefix: str | None = None) -> dict[str, Path]:
    """Every figure of :func:`figure_plan`, drawn from the result JSON and saved as ``<folder>/<prefix>_<name>.png``:
    effect vs fraction, utility trade-offs (MMLU, perplexity: where measured), the per-layer distribution of CNT's
    neurons, and (bias) SS per category."""
    prefix = prefix or result.name or result.application
    folder = Path(folder)
    chosen, which = layer_map_setting(result)
    draw = {"effect": lambda: effect_vs_fraction(result),
            "tradeoff": lambda: utility_tradeoff(result, "mmlu"),
            "tradeoff_ppl": lambda: utility_tradeoff(result, "perplexity"),
            "layers": lambda: layer_distribution(
                chosen.per_layer, result.fingerprint["n_layers"],
                f"CNT neurons per layer ({chosen.variant or 'cnt'}, {which}: {100 * chosen.neuron_fraction:.2g}% of "
                f"MLP neurons, {100 * chosen.param_fraction:.2g}% of the weights)"),
            "categories": lambda: per_category(result)}
    return {name: save(draw[name](), folder / f"{prefix}_{name}.png") for name in figure_plan(result)}
