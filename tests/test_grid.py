"""Grids of notebook runs (`cnt reproduce --grid`): bad files refused before anything runs, naming the line; on a real
local Ray instance and on the local backend, smoke notebooks on tiny models complete, merge into one report, resume
without re-running, retry a run that raises and then report it failed, and write the same results on both."""

import json
import os
import shutil
from pathlib import Path

import nbformat
import pytest

from cnt import grid
from cnt.cli import main
from cnt.reproduce import PASS_ENV, run_grid

NOTEBOOKS = Path(__file__).parents[1] / "notebooks"

GOOD = """# three smoke runs
runs:
  application: [disalignment, bias_removal]
  family: smollm2
  seed: [0, 1]
exclude:
  - {application: bias_removal, seed: 1}
resources: {cpus: 1}
"""

BAD = [
    ("unknown-key", "runz:\n  application: disalignment\n", 1, "unknown key 'runz'"),
    ("unknown-application", "runs:\n  application: [disalignment, alignment]\n", 2, "unknown application 'alignment'"),
    ("unknown-axis", "runs:\n  application: disalignment\n  seeds: [0, 1]\n", 3, "unknown axis 'seeds'"),
    ("unknown-parameter", "runs:\n  application: disalignment\nparameters:\n  bugdets: [0.1]\n", 4,
     "parameter 'bugdets' is not one the notebook"),
    ("rejected-value", "runs:\n  application: disalignment\nparameters:\n  budgets: [0.1, 2.0]\n", 4,
     "budgets must be fractions of MLP neurons"),
    ("axis-as-parameter", "runs:\n  application: disalignment\nparameters:\n  seed: 3\n", 4, "set by the grid's axes"),
    ("duplicate-runs", "runs:\n  application: [disalignment, disalignment]\n", 2, "two runs are named 'disalignment'"),
    ("bad-seed", "runs:\n  application: disalignment\n  seed: [0, -1]\n", 3, "seed -1 must be a whole number"),
    ("unknown-family", "runs:\n  application: disalignment\n  family: llama\n", 3, "unknown family 'llama'"),
    ("unknown-resource", "runs:\n  application: disalignment\nresources:\n  gpu: 1\n", 4, "unknown resource 'gpu'"),
    ("models-without-base", "runs:\n  application: disalignment\n  models:\n    - {name: a, donor: x/y, target: x/z}\n",
     4, "exactly name, donor, target, base"),
    ("not-yaml", "runs: [\n", 2, "not YAML"),
]


@pytest.mark.parametrize("name, text, line, message", BAD, ids=[b[0] for b in BAD])
def test_a_bad_grid_is_refused_naming_its_line_before_anything_runs(tmp_path, capsys, name, text, line, message):
    path = tmp_path / "grid.yaml"
    path.write_text(text)
    papers = tmp_path / "papers"
    assert main(["reproduce", "--grid", str(path), "--notebooks", str(NOTEBOOKS), "--papers", str(papers)]) == 2
    err = capsys.readouterr().err
    assert f"{path}:{line}:" in err and message in err, err
    assert not papers.exists()  # nothing run, nothing written


def test_the_plan_names_each_run_with_its_own_results():
    runs = grid.parse(GOOD, NOTEBOOKS)
    assert [r.name for r in runs] == ["disalignment", "disalignment.seed1", "bias_removal"]
    assert [r.result_name for r in runs] == [r.name for r in runs]  # no run writes another's results
    assert runs[1].parameters == {"family": "smollm2", "seed": 1, "tag": "seed1"}
    assert runs[0].digest() != runs[1].digest() and runs[0].digest() == grid.parse(GOOD, NOTEBOOKS)[0].digest()
    hub = grid.load(Path(__file__).parents[1] / "papers" / "grids" / "hub-gpu.example.yaml", NOTEBOOKS)
    assert {r.resources["gpus"] for r in hub} == {1} and all(r.parameters["donor"] for r in hub)
    assert {r.resources["memory_gb"] for r in hub if r.application == "alignment_enhancement"} == {96}


def test_a_run_measured_by_other_code_is_not_finished(tmp_path):
    """A grid run recorded done with the same parameters is skipped only while its results record the sources of
    the kit now installed: one measured by other code (or before the kit recorded its code) runs again."""
    from cnt.provenance import code_record
    from cnt.reproduce import _sha256, finished

    run = grid.parse(GOOD, NOTEBOOKS)[1]
    papers = tmp_path / "papers"
    (papers / "results").mkdir(parents=True)
    (papers / "runs").mkdir()
    results = papers / "results" / f"{run.result_name}.json"

    def record(code) -> set:
        results.write_text(json.dumps({"code": code} if code is not None else {}))
        state = {"state": "done", "digest": run.digest(), "results_sha256": _sha256(results)}
        (papers / "runs" / "timings.json").write_text(json.dumps({"grid": {run.name: state}}))
        return finished([run], papers)

    assert record(code_record()) == {run.name}
    assert record({**code_record(), "sources_sha256": "0" * 64}) == set()
    assert record(None) == set()


def _normalized(obj):
    """A results JSON without what differs between any two runs of the same computation (times, dates)."""
    if isinstance(obj, dict):
        return {k: _normalized(v) for k, v in obj.items() if k not in ("seconds", "timings", "when")}
    if isinstance(obj, list):
        return [_normalized(v) for v in obj]
    return obj


@pytest.fixture(scope="module")
def ray_local():
    """A real local Ray instance with 2 CPUs; smoke runs (CNT_SMOKE=1) in its workers and in local kernels."""
    import ray

    from cnt.experiment import smoke_models

    before = os.environ.get("CNT_SMOKE")
    os.environ["CNT_SMOKE"] = "1"
    for app in ("disalignment", "bias_removal"):  # built once here, not by two runs at the same time
        smoke_models(app)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {k: os.environ[k] for k in PASS_ENV if k in os.environ}})
    yield ray
    ray.shutdown()
    if before is None:
        os.environ.pop("CNT_SMOKE", None)
    else:
        os.environ["CNT_SMOKE"] = before


def test_a_grid_runs_on_ray_resumes_and_matches_the_local_backend(tmp_path, ray_local):
    runs = grid.parse(GOOD, NOTEBOOKS)
    papers = tmp_path / "ray"
    states = run_grid(runs, notebooks=NOTEBOOKS, papers=papers, backend="ray", progress=False)
    assert {n: s["state"] for n, s in states.items()} == dict.fromkeys([r.name for r in runs], "done")
    summary = json.loads((papers / "results" / "summary.json").read_text())
    listed = set(summary["applications"]) | set(summary.get("variants", {}))
    assert listed == {"disalignment", "bias_removal", "disalignment.seed1"}  # the merged report has all three
    report = (papers / "REPORT.md").read_text()
    assert "disalignment (seed1)" in report and "bias_removal" in report
    executed = {p.name: p.stat().st_mtime_ns for p in (papers / "runs").glob("*.ipynb")}
    # named as make reproduce names them: the notebook's stem, then the family and tag of a variant
    assert set(executed) == {"01_safety_disalignment.ipynb", "03_bias_removal.ipynb",
                             "01_safety_disalignment.seed1.ipynb"}
    timings = json.loads((papers / "runs" / "timings.json").read_text())
    assert all(timings["grid"][r.name]["backend"] == "ray" and timings["grid"][r.name]["seconds"] > 0 for r in runs)

    again = run_grid(runs, notebooks=NOTEBOOKS, papers=papers, backend="ray", progress=False)
    assert {s["state"] for s in again.values()} == {"skipped"}  # no notebook started
    assert {p.name: p.stat().st_mtime_ns for p in (papers / "runs").glob("*.ipynb")} == executed
    assert json.loads((papers / "runs" / "timings.json").read_text())["last_grid"]["ran"] == 0

    local = tmp_path / "local"
    states = run_grid(runs, notebooks=NOTEBOOKS, papers=local, backend="local", jobs=2, progress=False)
    assert {s["state"] for s in states.values()} == {"done"}
    for r in runs:
        a, b = (json.loads((p / "results" / f"{r.result_name}.json").read_text()) for p in (papers, local))
        assert _normalized(a) == _normalized(b), r.name  # same seeds, same results on both backends


def test_a_run_that_raises_is_retried_then_reported_failed_while_the_others_finish(tmp_path, ray_local, capsys):
    books = tmp_path / "notebooks"
    shutil.copytree(NOTEBOOKS, books)
    broken = books / "03_bias_removal.ipynb"
    nb = nbformat.read(broken, as_version=4)
    first = next(i for i, c in enumerate(nb.cells) if c.cell_type == "code" and "parameters" in c.metadata.get("tags", []))
    nb.cells.insert(first + 1, nbformat.v4.new_code_cell('raise RuntimeError("this run breaks")'))
    nbformat.write(nb, broken)
    papers = tmp_path / "papers"
    earlier = papers / "results" / "bias_removal.json"
    earlier.parent.mkdir(parents=True)
    earlier.write_text('{"an": "earlier good result"}\n')
    path = tmp_path / "grid.yaml"
    path.write_text("runs:\n  application: [disalignment, bias_removal]\n")
    code = main(["reproduce", "--grid", str(path), "--notebooks", str(books), "--papers", str(papers),
                 "--backend", "ray", "--retries", "1", "--quiet"])
    assert code == 1
    timings = json.loads((papers / "runs" / "timings.json").read_text())["grid"]
    assert timings["bias_removal"]["state"] == "failed" and timings["bias_removal"]["attempts"] == 2
    assert "this run breaks" in timings["bias_removal"]["error"]
    assert timings["disalignment"]["state"] == "done" and (papers / "results" / "disalignment.json").is_file()
    assert earlier.read_text() == '{"an": "earlier good result"}\n'  # the failed run left it in place
    assert "bias_removal failed after 2 attempt(s)" in capsys.readouterr().err


def test_a_lost_ray_worker_is_retried_within_the_grids_one_budget(tmp_path, ray_local):
    """A run whose Ray worker dies (its kernel kills the worker process) is resubmitted by the grid, not also by Ray:
    with --retries 1 the notebook starts exactly twice, and the run is reported failed naming the lost worker."""
    books = tmp_path / "notebooks"
    shutil.copytree(NOTEBOOKS, books)
    starts = tmp_path / "starts.txt"
    book = books / "03_bias_removal.ipynb"
    nb = nbformat.read(book, as_version=4)
    first = next(i for i, c in enumerate(nb.cells) if c.cell_type == "code" and "parameters" in c.metadata.get("tags", []))
    nb.cells.insert(first + 1, nbformat.v4.new_code_cell(  # the kernel's parent is the Ray worker that runs papermill
        f"import os, signal\nopen({str(starts)!r}, 'a').write('start\\n')\nos.kill(os.getppid(), signal.SIGKILL)"))
    nbformat.write(nb, book)
    runs = grid.parse("runs:\n  application: [bias_removal]\n", books)
    states = run_grid(runs, notebooks=books, papers=tmp_path / "papers", backend="ray", retries=1, progress=False)
    assert states["bias_removal"]["state"] == "failed" and states["bias_removal"]["attempts"] == 2
    assert starts.read_text().splitlines() == ["start", "start"]  # not 4: Ray's retries do not compound the grid's
    assert "Worker" in states["bias_removal"]["error"] or "worker" in states["bias_removal"]["error"]
