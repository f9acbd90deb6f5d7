"""Writes the notebooks in this folder (their sources live here so that the three application notebooks share one
structure and no logic: every computation is a call into ``cnt``). Run ``python notebooks/_make_notebooks.py`` after
editing; ``--store-checked`` also executes them as smoke runs and stores the outputs of the cells nbval checks."""

import json
from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

from cnt.applications import APPLICATIONS
from cnt.experiment import FAMILIES, ApplicationConfig
from cnt.arch import UNIT_KINDS
from cnt.functions import default_scorer, default_units
from cnt.locate import SCORERS

HERE = Path(__file__).parent
CHECK = "# NBVAL_CHECK_OUTPUT\n"


def nb(cells):
    book = new_notebook(cells=cells)
    book.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3 (cnt)", "language": "python"}
    book.metadata["language_info"] = {"name": "python"}
    return book


def params_cell(src):
    c = new_code_cell(src)
    c.metadata["tags"] = ["parameters"]
    return c


def declared(src: str) -> list[str]:
    """The names a parameters cell assigns, in order."""
    import ast

    return [t.id for node in ast.parse(src).body if isinstance(node, ast.Assign) for t in node.targets]


def parameter_cells(src: str) -> list:
    """The parameters cell and, right after it (after papermill's injected cell), the check that refuses a parameter
    the notebook does not declare: a misspelled ``-p bugdets ...`` stops the run instead of running the defaults."""
    return [params_cell(src),
            new_code_cell("from cnt.experiment import check_parameters\n\n"
                          f"check_parameters(globals(), {declared(src)!r})")]


APPS = {spec.notebook: (name, spec.title, spec.story) for name, spec in APPLICATIONS.items()}


def application_notebook(app: str, title: str, story: str):
    """An application's notebook; its parameters and their documentation come from the registries (families,
    scorers, baselines) and :class:`cnt.experiment.ApplicationConfig`'s defaults."""
    spec = APPLICATIONS[app]
    scorer = default_scorer(spec.function)
    defaults = ApplicationConfig(app)
    families = " | ".join(f for f, apps in FAMILIES.items() if app in apps)
    return nb([
        new_markdown_cell(f"# {title} with Cross-Model Neuron Transfer\n\n{story}\n\n"
                          "Everything below is parameterized: papermill can run this notebook for another family, other "
                          "budgets or the full evaluation profile (`papermill in.ipynb out.ipynb -p family "
                          "qwen2.5-coder-0.5b -p profile full`). Results go to JSON first; every figure and table is "
                          "drawn from that JSON."),
        *parameter_cells(f'family = "{defaults.family}"  # model family (zoo pairs for this application): {families}\n'
                    "donor = None  # None: the family's zoo donor for this application; or an embedded or zoo name, a folder or a hub id\n"
                    "target = None\n"
                    "base = None  # the common base (task arithmetic, TIES, DARE)\n"
                    f"budgets = {list(defaults.budgets)}  # fractions of all MLP neurons (with heads: the weights of that many)\n"
                    f'scorers = ["{scorer}"]  # the default locator; any of {", ".join(SCORERS)} '
                    "(each adds a locate and evaluations)\n"
                    f"units = None  # kinds of unit, any of {', '.join(UNIT_KINDS)}; None: the function's default "
                    f"({'+'.join(default_units(spec.function))} for {spec.function})\n"
                    f"baselines = {json.dumps(list(defaults.baselines))}  # any of cnt.baselines.BASELINES\n"
                    f'profile = "{defaults.profile}"  # reported settings on: report (the whole eval split) | sweep (48 prompts) | quick: + MMLU, NQ-Open | full\n'
                    f"seed = {defaults.seed}\n"
                    "tag = None  # names a variant run: results/<application>[.<family>].<tag>.json beside the default\n"
                    'output_dir = "../papers"  # results/ and figures/ go under it'),
        new_markdown_cell("The first code cell checks every parameter and stops with a message that names a wrong "
                          "one and what is accepted."),
        new_code_cell("from IPython.display import Image, Markdown, display\n\n"
                      "from cnt import experiment, plots, report\n\n"
                      f'config, out = experiment.notebook_config("{app}", family=family, donor=donor, target=target, '
                      "base=base,\n"
                      "    budgets=budgets, scorers=scorers, units=units, baselines=baselines, profile=profile, seed=seed, "
                      "tag=tag, output_dir=output_dir)\n"
                      "print(f\"{config.donor} -> {config.target} (base {config.base}); profile {config.profile}\")"),
        new_markdown_cell("## Run: CNT (every scorer and budget, then the minimal subset) and every baseline\n\n"
                          "Hyper-parameters (α, λ, density, layer, the CNT variant, the minimal subset) are chosen on "
                          "the validation split; the numbers below are on the eval split. The result is written to "
                          "`results/<application>.json` atomically: a failed run leaves the previous result in place."),
        new_code_cell("result = experiment.run_application(config, out / \"results\")  # typed records (cnt.results)\n"
                      "print(f\"{result.application}: {len(result.methods)} methods in {result.seconds / 60:.1f} min\")"),
        new_code_cell(CHECK + "print(sorted(result.methods))"),
        new_markdown_cell("## Headline: CNT against the neuron-level baselines at every budget"),
        new_code_cell("display(Markdown(\"\\n\".join(line for line in report.application_section(result.application, "
                      "result, \"figures\") if not line.startswith(\"![\"))))  # the figures follow below"),
        new_markdown_cell("## Effect against the share of neurons (left) and of parameters (right) changed"),
        new_code_cell("figures = plots.application_figures(result, out / \"figures\")\n"
                      "display(Image(str(figures[\"effect\"])))"),
        new_markdown_cell("## Utility against effect\n\nThe ideal is the right edge (the whole donor–target gap) at zero "
                          "utility change."),
        new_code_cell("for name in (\"tradeoff\", \"tradeoff_ppl\"):  # MMLU, perplexity: those the profile measured\n"
                      "    if name in figures:\n"
                      "        display(Image(str(figures[name])))"),
        new_markdown_cell("## Where the transferred neurons sit"),
        new_code_cell("if \"layers\" in figures:\n    display(Image(str(figures[\"layers\"])))"),
        *([new_markdown_cell("## StereoSet SS per bias category"),
           new_code_cell("display(Image(str(figures[\"categories\"])))")] if "categories" in spec.extra_figures else []),
        new_markdown_cell("## Headline numbers"),
        new_code_cell("label, h = report.headline(result)\n"
                      "share = plots.gap_share(h.score, result.target_score, result.donor_score)\n"
                      "print(f\"{label}: {100 * h.neuron_fraction:.3g}% of MLP neurons, {100 * h.param_fraction:.3g}% \"\n"
                      "      f\"of weights -> {result.metric} {h.score:.3g} (target {result.target_score:.3g}, \"\n"
                      "      f\"donor {result.donor_score:.3g}): {100 * share:.0f}% of the gap\")"),
    ])


WALKTHROUGH = nb([
    new_markdown_cell("""# Cross-Model Neuron Transfer, step by step

CNT (arXiv 2603.18449) moves a *small set of MLP neurons* from a **donor** model into a **target** model of the same
architecture, to add a function the donor has (here: refusing harmful requests) or to delete one the donor lacks.

This walkthrough uses two real models from the kit's zoo, both fine-tunes of SmolLM2-135M-Instruct: the donor
`smol-safe` (refuses harmful requests) and the target, the base model itself (it complies)."""),
    *parameter_cells('donor = "smol-safe"\ntarget = "smollm2-135m-instruct"\nbudget = 0.005  # fraction of MLP neurons\n'
                     f'scorer = "{default_scorer("refusal")}"  # the default for adding refusal; "attribution": its first-order start\n'
                     'seed = 0\nprompts = 24  # harmful eval prompts for the before/after check'),
    new_code_cell("import tempfile\n\nimport torch\nfrom IPython.display import display\n\n"
                  "from cnt import NeuronPatch, arch, data, experiment, plots\n"
                  "from cnt.pipeline import Pipeline\nfrom cnt.scores import neurons_for\n"
                  "from cnt.baselines import weight_delta_scores\nfrom cnt.evaluate import refusal_rate\nfrom cnt.zoo import load_model, load_tokenizer\n\n"
                  "experiment.check_walkthrough(donor=donor, target=target, budget=budget, scorer=scorer, seed=seed, "
                  "prompts=prompts)\n"
                  "if experiment.smoke():  # nbval in `make test`: tiny stand-ins, same code path\n"
                  "    donor, target, _ = experiment.smoke_models(\"alignment_enhancement\")\n"
                  "donor_model, tok = load_model(donor)\ntarget_model, _ = load_model(target)\n"
                  "fp = arch.check_compatible(donor_model, target_model)\nprint(fp)"),
    new_markdown_cell("""## What an MLP neuron is

In a Llama-style block the MLP computes `down(silu(gate(x)) * up(x))`. Unit *i* of the intermediate layer is one
**neuron**: it reads the residual stream through row *i* of `gate_proj` and `up_proj` and writes back through column *i*
of `down_proj`. CNT moves those three slices together. `cnt.arch` knows where they live for each family."""),
    new_code_cell("neurons = arch.MLPNeurons(target_model)\n"
                  "print(f\"{neurons.n_layers} layers x {fp.intermediate_sizes[0]} neurons = {fp.n_neurons:,} neurons; \"\n"
                  "      f\"{neurons.params_per_neuron(0):,} parameters each\")\n"
                  "diff = weight_delta_scores(donor_model, target_model)  # per layer: |donor - target| over each neuron's slices\n"
                  "display(plots.neuron_map(torch.stack(diff), 'how far each donor neuron is from the target (L2 of its slices)'))"),
    new_markdown_cell("""## Locate: which neurons carry the function?

The task is the target's loss on the donor's own behaviour (its first response tokens on harmful *locate-split*
prompts), with the target's own benign answers and Wikipedia text as utility. *Attribution* scores each neuron by the
first-order effect of moving it to the donor's values, minus the same on the utility examples. The default locator,
the *learned mask*, starts there and then chooses jointly: it gives every neuron an amplitude γ, trains the amplitudes
at the patched model and prunes neurons down to a budget, re-measuring each removal — so neurons that only matter
together are kept together. Its map shows how long each neuron survived the pruning."""),
    new_code_cell("pipe = Pipeline(\"refusal\", donor_model, target_model, tok, seed=seed)  # task -> scores -> patch\n"
                  "scores = pipe.scores(scorer)  # builds the task (pipe.task) on first use, then locates\n"
                  "k = neurons_for(budget, fp.n_neurons)\n"
                  "display(plots.neuron_map(torch.stack(list(scores.scores)), f'{scorer} scores', top=k))"),
    new_markdown_cell("""## Transfer: a reversible neuron patch

The patch moves each chosen neuron by α·γ of the donor–target difference (γ: the mask's learned amplitude, 1 for
attribution). α is chosen on the *validation* split among 1, 2, 4, 8: the furthest toward the donor with perplexity
within 2%, false refusal within 5 points and no more broken answers than the target's."""),
    new_code_cell("patch, trials = pipe.at_budget(scores, budget)  # one trial per alpha on validation; the rule's choice\n"
                  "alpha = patch.alpha\n"
                  "harmful = data.texts(data.load(\"harmful\", \"eval\", seed=seed, limit=prompts))\n"
                  "before = refusal_rate(target_model, tok, harmful, max_new_tokens=24).value\n"
                  "patch.apply(target_model)\n"
                  "after = refusal_rate(target_model, tok, harmful, max_new_tokens=24).value\n"
                  "print(f\"{patch.n_neurons} neurons ({100 * patch.param_fraction:.3f}% of the weights), alpha {alpha:g}: \"\n"
                  "      f\"refusal {before:.0%} -> {after:.0%} \"\n"
                  "      f\"on {prompts} held-out harmful prompts\")\n"
                  "display(plots.layer_distribution(patch.per_layer(), neurons.n_layers))"),
    new_markdown_cell("## Save, load, revert\n\nThe patch carries the target's original slices, so `revert` restores "
                      "the target bit for bit; `load` checks the file's sha256."),
    new_code_cell("with tempfile.TemporaryDirectory() as folder:\n    patch.save(folder)\n    loaded = NeuronPatch.load(folder)\n"
                  "loaded.revert(target_model)\n"
                  "fresh, _ = load_model(target)\n"
                  "same = all(torch.equal(a, b) for a, b in zip(target_model.state_dict().values(), fresh.state_dict().values()))"),
    new_code_cell(CHECK + "print(\"revert restores the target bit for bit:\", same)"),
    new_markdown_cell("Next: the application notebooks run this at several budgets, search the minimal subset, and "
                      "compare CNT with every baseline."),
])


def store_checked_outputs(path: Path) -> None:
    """Execute ``path`` as a smoke run (papermill, CNT_SMOKE=1) and keep the outputs of the NBVAL_CHECK_OUTPUT cells
    only: what nbval compares in ``make test``; every other cell is stored without outputs."""
    import os
    import tempfile

    import papermill as pm

    os.environ["CNT_SMOKE"] = "1"
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / path.name
        pm.execute_notebook(str(path), str(out), cwd=str(HERE), kernel_name="python3", progress_bar=False)
        ran = nbformat.read(out, as_version=4)
    book = nbformat.read(path, as_version=4)
    for cell, done in zip(book.cells, ran.cells):
        if cell.cell_type == "code" and cell.source.startswith(CHECK):
            cell.outputs = [o for o in done.outputs if o.get("name") != "stderr"]
            cell.execution_count = 1
    nbformat.write(book, path)


def main(store: bool = False):
    paths = [HERE / "00_walkthrough.ipynb"]
    nbformat.write(WALKTHROUGH, paths[0])
    for stem, (app, title, story) in APPS.items():
        paths.append(HERE / f"{stem}.ipynb")
        nbformat.write(application_notebook(app, title, story), paths[-1])
    if store:
        for p in paths:
            store_checked_outputs(p)


if __name__ == "__main__":
    import sys

    main(store="--store-checked" in sys.argv)
