"""The reproduce orchestrator (``make reproduce``, ``cnt reproduce``): papermill executes the notebooks — one after
another or side by side, the CPU cores split between their kernels — into ``papers/runs/``, records each run's time in
``papers/runs/timings.json``, and regenerates ``papers/REPORT.md`` and ``results/summary.json`` from the results the
notebooks wrote. Parameters are checked against what the notebooks declare before anything runs."""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Sequence

from . import atomic, report
from .applications import DEFAULT_FAMILY


def select(notebooks: str | Path, only: Sequence[str] | None = None) -> list[Path]:
    """The notebooks of a folder whose names contain one of ``only`` (all when empty); refused when none matches."""
    folder = Path(notebooks).resolve()
    books = sorted(p for p in folder.glob("*.ipynb") if not only or any(o in p.stem for o in only))
    if not books:
        raise ValueError(f"no notebooks in {folder} match {list(only or [])}")
    return books


def check_parameters(books: Sequence[Path], params: dict) -> None:
    """Refuse, before anything runs, a parameter that no notebook declares (a misspelling)."""
    import papermill as pm

    declared = set().union(*(pm.inspect_notebook(str(b)) for b in books))
    unknown = sorted(set(params) - declared)
    if unknown:
        raise ValueError(f"no notebook has parameter {', '.join(map(repr, unknown))}; their parameters: "
                         f"{', '.join(sorted(declared))}")


def run_name(book: Path, params: dict) -> str:
    """The executed notebook's file name: another family or a tagged variant keeps its own beside the default one."""
    variant = [str(v) for v in (params.get("family"), params.get("tag")) if v and v != DEFAULT_FAMILY]
    return ".".join([book.stem, *variant]) + ".ipynb"


def execute(book: Path, runs: Path, params: dict, *, kernel: str = "python3",
            progress: bool = True) -> tuple[str, float, dict]:
    """Execute one notebook with the parameters it declares (the others named as ignored there) into ``runs``;
    a failed run never replaces the previous executed notebook. Returns its file name, seconds and the parameters
    it was given."""
    import papermill as pm

    declared = pm.inspect_notebook(str(book))
    ignored = sorted(set(params) - set(declared) - {"output_dir"})
    if ignored:
        print(f"[cnt reproduce] {book.name} has no parameter {', '.join(ignored)}: ignored there (it declares "
              f"{', '.join(declared)})", file=sys.stderr, flush=True)
    params = {k: v for k, v in params.items() if k in declared}
    name = run_name(book, params)
    t0 = time.time()
    print(f"[cnt reproduce] {book.name} {params or ''}", flush=True)
    fd, tmp = tempfile.mkstemp(suffix=".ipynb", dir=runs)
    os.close(fd)
    os.chmod(tmp, 0o644)  # mkstemp makes it private; the executed notebook is a shared artifact
    try:
        pm.execute_notebook(str(book), tmp, parameters=params, cwd=str(book.parent), kernel_name=kernel,
                            progress_bar=progress)
    except Exception:
        os.unlink(tmp)
        raise
    shutil.move(tmp, runs / name)
    seconds = round(time.time() - t0, 1)
    print(f"[cnt reproduce] {name}: {seconds / 60:.1f} min", flush=True)
    return name, seconds, params


class _threads_per_job:
    """The kernels started inside inherit OMP/MKL_NUM_THREADS = cores // jobs; restored afterwards (later kernels,
    e.g. nbval's in the same process, get all cores)."""

    VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")

    def __init__(self, jobs: int):
        self.threads = str(max(1, (os.cpu_count() or 1) // jobs))

    def __enter__(self):
        self.saved = {var: os.environ.get(var) for var in self.VARS}
        os.environ.update(dict.fromkeys(self.VARS, self.threads))

    def __exit__(self, *exc):
        for var, value in self.saved.items():
            if value is None:
                os.environ.pop(var, None)
            else:
                os.environ[var] = value


def reproduce(notebooks: str | Path = "notebooks", papers: str | Path = "papers", *, only: Sequence[str] = (),
              params: dict | None = None, jobs: int = 1, kernel: str = "python3", progress: bool = True) -> dict:
    """Execute the notebooks (``only``: substrings of their names) with their default parameters or ``params``, with
    ``jobs`` side by side, into ``<papers>/runs/``; write ``timings.json`` and regenerate the report. Returns the
    timings record."""
    if jobs < 1:
        raise ValueError(f"--jobs must be >= 1, got {jobs}")
    t_all = time.time()
    papers, nb_dir = Path(papers).resolve(), Path(notebooks).resolve()
    books = select(nb_dir, only)
    extra = dict(params or {})
    check_parameters(books, extra)
    runs = papers / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    timings_path = runs / "timings.json"
    previous = json.loads(timings_path.read_text()) if timings_path.is_file() else {}
    timings = previous.get("notebooks", {})  # notebooks not run this time keep their last timing

    def run(book: Path) -> None:
        name, seconds, used = execute(book, runs, {"output_dir": str(papers), **extra}, kernel=kernel,
                                      progress=progress and jobs == 1)
        timings[name] = {"seconds": seconds, "when": time.strftime("%Y-%m-%dT%H:%M:%S"),
                         "parameters": {k: v for k, v in used.items() if k != "output_dir"}, "jobs": jobs}

    if jobs == 1:
        for book in books:
            run(book)
    else:  # side by side, longest first
        from concurrent.futures import ThreadPoolExecutor

        books.sort(key=lambda b: -timings.get(b.name, {}).get("seconds", 0))
        with _threads_per_job(jobs), ThreadPoolExecutor(jobs) as pool:
            for f in [pool.submit(run, b) for b in books]:
                f.result()  # the first failure is raised once every notebook has finished
    total = round(time.time() - t_all, 1)
    record = {"notebooks": dict(sorted(timings.items())),
              "sum_of_latest_seconds": round(sum(v["seconds"] for k, v in timings.items()  # default runs only
                                                 if (nb_dir / k).is_file()), 1),
              "last_invocation": {"notebooks": sorted(b.name for b in books), "seconds": total, "jobs": jobs,
                                  "all": not only, "parameters": extra}}
    if only or extra:  # a partial or non-default run keeps the record of the last full default one
        last = previous.get("last_invocation", {})
        full = previous.get("last_full_invocation") or (last if last.get("all") and not last.get("parameters") else None)
        if full:
            record["last_full_invocation"] = full
    else:
        record["last_full_invocation"] = record["last_invocation"]
    atomic.write_json(timings_path, record)
    summary, rep = report.write(papers / "results", papers / "REPORT.md")  # (it states the invocation's time)
    print(f"[cnt reproduce] wrote {summary} and {rep}; this run {total / 60:.1f} min")
    return record

