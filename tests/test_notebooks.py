"""The committed notebooks are generated from one source (notebooks/_make_notebooks.py) and refuse parameters they
do not declare before any compute."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import nbformat
import pytest

NOTEBOOKS = Path(__file__).parents[1] / "notebooks"


def _generator():
    spec = importlib.util.spec_from_file_location("make_notebooks", NOTEBOOKS / "_make_notebooks.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _shape(book) -> list[tuple]:
    return [(c.cell_type, c.source, tuple(c.metadata.get("tags", ()))) for c in book.cells]


def test_committed_notebooks_equal_their_generated_source():
    gen = _generator()
    books = {"00_walkthrough": gen.WALKTHROUGH,
             **{stem: gen.application_notebook(*spec) for stem, spec in gen.APPS.items()}}
    assert sorted(p.stem for p in NOTEBOOKS.glob("*.ipynb")) == sorted(books)
    for stem, book in books.items():
        committed = nbformat.read(NOTEBOOKS / f"{stem}.ipynb", as_version=4)
        assert _shape(committed) == _shape(book), f"{stem}.ipynb differs from _make_notebooks.py: run `python " \
                                                  "notebooks/_make_notebooks.py --store-checked`"


def test_a_misspelled_papermill_parameter_stops_the_notebook(tmp_path):
    import papermill as pm

    gen = _generator()
    book = gen.nb([*gen.parameter_cells("budgets = [0.01]\nseed = 0"), nbformat.v4.new_code_cell("ran = True")])
    nbformat.write(book, tmp_path / "in.ipynb")
    pm.execute_notebook(str(tmp_path / "in.ipynb"), str(tmp_path / "ok.ipynb"), parameters={"seed": 1},
                        kernel_name="python3", progress_bar=False)
    with pytest.raises(pm.PapermillExecutionError, match=r"unknown notebook parameter 'bugdets' \(did you mean "
                                                         r"'budgets'\?\)"):
        pm.execute_notebook(str(tmp_path / "in.ipynb"), str(tmp_path / "bad.ipynb"), parameters={"bugdets": [0.5]},
                            kernel_name="python3", progress_bar=False)
    ran = nbformat.read(tmp_path / "bad.ipynb", as_version=4)
    assert not ran.cells[-1].get("outputs") and ran.cells[-1].get("execution_count") is None  # stopped before it


def test_progress_bars_in_a_notebook_are_widgets(tmp_path):
    """With the kit's dependencies a notebook's tqdm bars are widgets (what JupyterLab draws), without tqdm's
    "IProgress not found ... update jupyter and ipywidgets" warning."""
    import papermill as pm

    book = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(
        "from tqdm.auto import tqdm\nfor _ in tqdm(range(3), desc='steps'):\n    pass")])
    book.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(book, tmp_path / "in.ipynb")
    pm.execute_notebook(str(tmp_path / "in.ipynb"), str(tmp_path / "out.ipynb"), kernel_name="python3",
                        progress_bar=False)
    outputs = nbformat.read(tmp_path / "out.ipynb", as_version=4).cells[0].outputs
    text = "".join(o.get("text", "") for o in outputs)
    assert "IProgress not found" not in text
    assert any("application/vnd.jupyter.widget-view+json" in o.get("data", {}) for o in outputs)


def test_notebooks_run_side_by_side_in_their_own_folders_without_moving_this_process(tmp_path, monkeypatch):
    """`cnt reproduce --jobs 2` and the grid's local backend execute notebooks on threads of this process: each
    kernel starts in its notebook's folder, and nothing changes this process's working directory (papermill's
    ``cwd=`` did, and two runs restoring each other's left the test session inside a notebook folder)."""
    from concurrent.futures import ThreadPoolExecutor

    from cnt.reproduce import execute, execute_run

    before, chdir = os.getcwd(), os.chdir

    def stay(path):  # papermill's file handler re-enters the current directory around each read: a no-op
        if os.path.realpath(path) != os.path.realpath(before):
            raise AssertionError(f"os.chdir({path!r}) called while notebooks run")
        chdir(path)

    books = []
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        book = nbformat.v4.new_notebook(cells=[
            nbformat.v4.new_code_cell("output_dir = None", metadata={"tags": ["parameters"]}),
            nbformat.v4.new_code_cell("import os, time\nhere = os.getcwd()\ntime.sleep(1)\nprint(here)")])
        book.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
        nbformat.write(book, tmp_path / name / f"{name}.ipynb")
        books.append(tmp_path / name / f"{name}.ipynb")
    (tmp_path / "runs").mkdir()
    monkeypatch.setattr(os, "chdir", stay)
    with ThreadPoolExecutor(2) as pool:
        local = list(pool.map(lambda b: execute(b, tmp_path / "runs", {}, progress=False), books))
        grid = list(pool.map(lambda b: execute_run(str(b), b.stem, {}), books))
    assert os.getcwd() == before
    for book, (name, _, _), files in zip(books, local, grid):
        for ran in (nbformat.read(tmp_path / "runs" / name, as_version=4),
                    nbformat.reads(files[f"runs/{book.stem}.ipynb"].decode(), as_version=4)):
            assert ran.cells[-1].outputs[0]["text"].strip() == str(book.parent)
