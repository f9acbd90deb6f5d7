"""The reproduce orchestrator (``make reproduce``, ``cnt reproduce``): papermill executes the notebooks — one after
another or side by side, the CPU cores split between their kernels — into ``papers/runs/``, records each run's time in
``papers/runs/timings.json``, and regenerates ``papers/REPORT.md`` and ``results/summary.json`` from the results the
notebooks wrote. Parameters are checked against what the notebooks declare before anything runs. A grid of runs
(``cnt reproduce --grid``: local or Ray backend, resumable) is run here too: it executes the same notebooks under the
same names into the same ``timings.json`` record, so the two stay one module of over 400 lines."""

from __future__ import annotations

import hashlib
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
from .provenance import code_record


def select(notebooks: str | Path, only: Sequence[str] | None = None) -> list[Path]:
    """The notebooks of a folder whose file names contain one of ``only`` (all when empty): part of a name
    (``03_bias``) or the whole of it, with or without ``.ipynb``; refused when none matches."""
    folder = Path(notebooks).resolve()
    books = sorted(p for p in folder.glob("*.ipynb") if not only or any(o in p.name for o in only))
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


def run_papermill(book: Path, output, params: dict, *, kernel: str, progress: bool) -> None:
    """papermill executes ``book`` into ``output`` with its kernel started in the notebook's folder. The folder goes
    to the kernel (nbclient's ``resources.metadata.path``), not through papermill's ``cwd=``, which changes this
    whole process's working directory for the run: two runs on threads side by side (``--jobs 2``) restore each
    other's and leave the process in a notebook folder, where every relative path then fails."""
    import papermill as pm

    book = Path(book).resolve()
    pm.execute_notebook(str(book), str(Path(output).resolve()), parameters=params, kernel_name=kernel,
                        progress_bar=progress, resources={"metadata": {"path": str(book.parent)}})


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
        run_papermill(book, tmp, params, kernel=kernel, progress=progress)
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
              params: dict | None = None, jobs: int = 1, kernel: str = "python3", progress: bool = True,
              grids: Sequence[tuple[str, list]] = (), backend: str = "local", address: str | None = None,
              retries: int = 1) -> dict:
    """Execute the notebooks (``only``: substrings of their names) with their default parameters or ``params``, with
    ``jobs`` side by side, into ``<papers>/runs/``; then, in the same invocation, each of ``grids`` (``(file, runs)``
    as :func:`cnt.grid.load` reads them: e.g. the seeds beside the default runs) through :func:`run_grid` — its runs
    already finished with the same parameters and code skipped — on ``backend``; write ``timings.json`` (the
    invocation's time covers the grids too) and regenerate the report. Returns the timings record, with the grids'
    run states under ``grid_states``."""
    if jobs < 1:
        raise ValueError(f"--jobs must be >= 1, got {jobs}")
    t_all = time.time()
    papers, nb_dir = Path(papers).resolve(), Path(notebooks).resolve()
    books = select(nb_dir, only)
    extra = dict(params or {})
    check_parameters(books, extra)
    if grids and (only or extra):
        raise ValueError("a grid beside the notebooks goes with the full default run only (no --only, no -p): its "
                         "runs sit beside the default results; run a grid alone with --grid FILE")
    runs = papers / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    timings_path = runs / "timings.json"
    previous = json.loads(timings_path.read_text()) if timings_path.is_file() else {}
    before = previous.get("notebooks", {})  # the last timing of each notebook: the longest start first
    ran: dict[str, dict] = {}  # this invocation's notebooks (a grid below writes its runs' entries itself)

    def run(book: Path) -> None:
        name, seconds, used = execute(book, runs, {"output_dir": str(papers), **extra}, kernel=kernel,
                                      progress=progress and jobs == 1)
        ran[name] = {"seconds": seconds, "when": time.strftime("%Y-%m-%dT%H:%M:%S"),
                         "parameters": {k: v for k, v in used.items() if k != "output_dir"}, "jobs": jobs}

    if jobs == 1:
        for book in books:
            run(book)
    else:  # side by side, longest first
        from concurrent.futures import ThreadPoolExecutor

        books.sort(key=lambda b: -before.get(b.name, {}).get("seconds", 0))
        with _threads_per_job(jobs), ThreadPoolExecutor(jobs) as pool:
            for f in [pool.submit(run, b) for b in books]:
                f.result()  # the first failure is raised once every notebook has finished
    grid_states: dict[str, dict] = {}
    for _, grid_runs in grids:
        grid_states.update(run_grid(grid_runs, notebooks=nb_dir, papers=papers, backend=backend, address=address,
                                    jobs=jobs, retries=retries, kernel=kernel, progress=progress, write_report=False))
    total = round(time.time() - t_all, 1)
    current = json.loads(timings_path.read_text()) if timings_path.is_file() else {}  # a grid's records since
    timings = {**current.get("notebooks", {}), **ran}  # notebooks not run this time keep their last timing
    record = {**current, "notebooks": dict(sorted(timings.items())),
              "sum_of_latest_seconds": round(sum(v["seconds"] for k, v in timings.items()  # default runs only
                                                 if (nb_dir / k).is_file()), 1),
              "last_invocation": {"notebooks": sorted(b.name for b in books), "seconds": total, "jobs": jobs,
                                  "all": not only, "parameters": extra,
                                  "grids": {str(f): {n.name: grid_states[n.name]["state"] for n in r}
                                            for f, r in grids},
                                  "when": time.strftime("%Y-%m-%dT%H:%M:%S")}}
    if only or extra:  # a partial or non-default run keeps the record of the last full default one
        last = previous.get("last_invocation", {})
        full = previous.get("last_full_invocation") or (
            last if last.get("all") and not last.get("parameters") else None)
        if full:
            record["last_full_invocation"] = full
    else:
        record["last_full_invocation"] = record["last_invocation"]
    atomic.write_json(timings_path, record)
    summary, rep = report.write(papers / "results", papers / "REPORT.md")  # (it states the invocation's time)
    print(f"[cnt reproduce] wrote {summary} and {rep}; this run {total / 60:.1f} min")
    return {**record, "grid_states": grid_states}



# ---------------------------------------------------------------------------------------------------------------------
# a grid of runs (cnt reproduce --grid FILE): two backends behind one interface, resumable
# ---------------------------------------------------------------------------------------------------------------------

PASS_ENV = ("CNT_SMOKE", "CNT_CACHE", "HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HOME",
            "TOKENIZERS_PARALLELISM", "PYTHONPATH")  # what a worker needs of this environment


def execute_run(notebook: str, name: str, parameters: dict, *, threads: int | None = None,
                kernel: str = "python3") -> dict[str, bytes]:
    """One grid run wherever it is scheduled: papermill executes ``notebook`` with ``parameters`` into a private
    folder (``output_dir`` is set here), and every file it wrote comes back as ``{path under papers/: bytes}`` —
    the results JSON, its figures and the executed notebook under the name ``make reproduce`` gives it
    (:func:`run_name`: ``runs/<notebook stem>[.<family>][.<tag>].ipynb``) — for the caller to write, so
    a worker on another machine needs no shared disk. ``threads``: the kernel's OMP/MKL threads (None: as set)."""
    if threads is not None:
        os.environ.update(dict.fromkeys(_threads_per_job.VARS, str(threads)))
    with tempfile.TemporaryDirectory(prefix="cnt-run-") as tmp:
        out = Path(tmp) / "papers"
        (out / "results").mkdir(parents=True)
        executed = Path(tmp) / f"{name}.ipynb"
        run_papermill(Path(notebook), executed, {**parameters, "output_dir": str(out)}, kernel=kernel, progress=False)
        files = {f"runs/{run_name(Path(notebook), parameters)}": executed.read_bytes()}  # as make reproduce names it
        files.update({str(f.relative_to(out)): f.read_bytes() for f in sorted(out.rglob("*")) if f.is_file()})
    return files


class LocalBackend:
    """Runs on this machine, ``jobs`` side by side (the cores split between their kernels), as ``cnt reproduce``."""

    name = "local"

    def __init__(self, jobs: int = 1):
        if jobs < 1:
            raise ValueError(f"--jobs must be >= 1, got {jobs}")
        self.jobs = jobs

    def __enter__(self):
        from concurrent.futures import ThreadPoolExecutor

        self.threads = _threads_per_job(self.jobs)
        self.threads.__enter__()
        self.pool = ThreadPoolExecutor(self.jobs)
        return self

    def __exit__(self, *exc):
        self.pool.shutdown(wait=True)
        self.threads.__exit__(*exc)

    def submit(self, run, notebook: str, kernel: str):
        return self.pool.submit(execute_run, notebook, run.name, run.parameters, kernel=kernel)

    def how(self, run) -> dict:
        """How ``run`` was executed, for its ``notebooks`` entry in ``timings.json``."""
        return {"jobs": self.jobs, "via": f"cnt reproduce --grid (local backend, -j {self.jobs}, "
                                          f"{_threads_per_job(self.jobs).threads} torch thread(s) each)"}

    def wait(self, pending: list) -> tuple[list, list]:
        from concurrent.futures import FIRST_COMPLETED, wait

        done, rest = wait(pending, return_when=FIRST_COMPLETED)
        return list(done), list(rest)

    @staticmethod
    def result(handle) -> dict[str, bytes]:
        return handle.result()


class RayBackend:
    """Each run a Ray task with its declared resources (CPUs, GPUs, memory), on the cluster at ``address`` (or a local
    instance started here). Ray's own task retries are off (``max_retries=0``): a lost worker comes back to
    :func:`run_grid` as an error, like a notebook that raised, and the grid's one ``retries`` budget covers both
    (otherwise Ray's retries and the grid's would multiply)."""

    name = "ray"

    def __init__(self, address: str | None = None, num_cpus: int | None = None):
        try:
            import ray  # noqa: F401
        except ImportError:
            raise ValueError("--backend ray needs Ray: pip install -e '.[ray]' (make setup installs it)") from None
        self.address, self.num_cpus = address, num_cpus

    def __enter__(self):
        import ray

        self.started = not ray.is_initialized()
        env = {k: os.environ[k] for k in PASS_ENV if k in os.environ}
        if self.started:
            kw = {"address": self.address} if self.address else {"num_cpus": self.num_cpus or os.cpu_count()}
            ray.init(include_dashboard=False, log_to_driver=False, runtime_env={"env_vars": env}, **kw)
        self.task = ray.remote(execute_run)
        return self

    def __exit__(self, *exc):
        import ray

        if self.started:
            ray.shutdown()

    def submit(self, run, notebook: str, kernel: str):
        cpus = int(run.resources.get("cpus") or 1)
        opts = {"num_cpus": cpus, "num_gpus": run.resources.get("gpus") or 0, "max_retries": 0}
        if run.resources.get("memory_gb"):
            opts["memory"] = int(run.resources["memory_gb"] * 2**30)
        return self.task.options(**opts).remote(notebook, run.name, run.parameters, threads=cpus, kernel=kernel)

    @staticmethod
    def how(run) -> dict:
        """How ``run`` was executed, for its ``notebooks`` entry in ``timings.json``."""
        return {"via": f"cnt reproduce --grid (ray backend, {int(run.resources.get('cpus') or 1)} CPU(s) and torch "
                       f"thread(s), {run.resources.get('gpus') or 0} GPU(s))"}

    def wait(self, pending: list) -> tuple[list, list]:
        import ray

        return ray.wait(pending, num_returns=1)

    @staticmethod
    def result(handle) -> dict[str, bytes]:
        import ray

        return ray.get(handle)


def _last_line(error: BaseException) -> str:
    """The last line of an exception's message, or '' for an empty one."""
    text = str(error).strip()
    return text.splitlines()[-1] if text else ""


def _sha256(path: Path) -> str | None:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None


def _measured_by_this_code(results: bytes) -> bool:
    """Whether a results file's bytes record the sources of the ``cnt`` this process runs (:mod:`cnt.provenance`)."""
    try:
        code = json.loads(results).get("code") or {}
    except ValueError:
        return False
    return code.get("sources_sha256") == code_record()["sources_sha256"]


def finished(runs, papers: str | Path) -> set[str]:
    """The runs already done with the same parameters and the same code: recorded ``done`` in ``runs/timings.json``
    with the same digest, their results JSON still the file that run wrote, and that file measured by the sources of
    the kit now installed (a run whose code changed since, or that predates the record, runs again)."""
    papers = Path(papers)
    path = papers / "runs" / "timings.json"
    state = (json.loads(path.read_text()) if path.is_file() else {}).get("grid", {})
    out = set()
    for r in runs:
        s = state.get(r.name, {})
        if s.get("state") != "done" or s.get("digest") != r.digest() or not s.get("results_sha256"):
            continue
        results = papers / "results" / f"{r.result_name}.json"
        blob = results.read_bytes() if results.is_file() else None  # read once: its digest, then its code record
        if blob is not None and s["results_sha256"] == hashlib.sha256(blob).hexdigest() and \
                _measured_by_this_code(blob):
            out.add(r.name)
    return out


def run_grid(runs, *, notebooks: str | Path = "notebooks", papers: str | Path = "papers", backend: str = "local",
             address: str | None = None, jobs: int = 1, retries: int = 1, kernel: str = "python3",
             progress: bool = True, write_report: bool = True) -> dict:
    """Execute the grid's ``runs`` (:func:`cnt.grid.load`) that are not already finished (:func:`finished`) on the
    ``local`` or ``ray`` backend; a run that raises (or whose Ray worker is lost) is tried again up to ``retries``
    times — at most ``retries + 1`` attempts in all — then recorded failed
    while the others go on (its earlier good result, if any, stays in place). Every run's files are written under
    ``papers`` as it finishes, its state, attempts and time into ``runs/timings.json`` (``grid``); the report and
    summary are regenerated once at the end (unless ``write_report`` is false: a caller that writes them itself).
    Returns the states of this invocation's runs."""
    from tqdm.auto import tqdm

    if retries < 0:
        raise ValueError(f"--retries must be >= 0, got {retries}")
    papers, nb_dir = Path(papers).resolve(), Path(notebooks).resolve()
    (papers / "runs").mkdir(parents=True, exist_ok=True)
    timings_path = papers / "runs" / "timings.json"
    skip = finished(runs, papers)
    todo = [r for r in runs if r.name not in skip]
    impl = LocalBackend(jobs) if backend == "local" else RayBackend(address) if backend == "ray" else None
    if impl is None:
        raise ValueError(f"unknown backend {backend!r}; backends: local, ray")
    states: dict[str, dict] = {r.name: {"state": "skipped"} for r in runs if r.name in skip}
    t_all = time.time()

    def record(run, **entry) -> None:
        timings = json.loads(timings_path.read_text()) if timings_path.is_file() else {}
        timings.setdefault("grid", {})[run.name] = entry
        if entry["state"] == "done":  # the executed notebook's entry, as make reproduce writes its own
            timings.setdefault("notebooks", {})[run_name(Path(run.notebook), run.parameters)] = {
                "seconds": entry["seconds"], "when": entry["when"], "parameters": run.parameters, **impl.how(run)}
            timings["notebooks"] = dict(sorted(timings["notebooks"].items()))
        atomic.write_json(timings_path, timings)
        states[run.name] = entry

    bar = tqdm(total=len(runs), initial=len(skip), desc="grid", unit="run", disable=not progress)
    if todo:
        with impl:
            pending, started, attempts = {}, {}, {}

            def submit(run):
                attempts[run.name] = attempts.get(run.name, 0) + 1
                started.setdefault(run.name, time.time())
                pending[impl.submit(run, str(nb_dir / run.notebook), kernel)] = run

            for run in todo:
                submit(run)
            while pending:
                done, _ = impl.wait(list(pending))
                for handle in done:
                    run = pending.pop(handle)
                    try:
                        files = impl.result(handle)
                    except Exception as e:  # the notebook raised, or its Ray worker was lost
                        if attempts[run.name] <= retries:
                            submit(run)
                            continue
                        record(run, state="failed", digest=run.digest(), attempts=attempts[run.name],
                               seconds=round(time.time() - started[run.name], 1), backend=impl.name,
                               error=f"{type(e).__name__}: {_last_line(e)}"[:500],
                               when=time.strftime("%Y-%m-%dT%H:%M:%S"))
                        print(f"[cnt reproduce] {run.name} failed after {attempts[run.name]} attempt(s)",
                              file=sys.stderr, flush=True)
                        bar.update()
                        continue
                    for rel, blob in files.items():
                        atomic.write_bytes(papers / rel, blob)
                    record(run, state="done", digest=run.digest(), attempts=attempts[run.name],
                           seconds=round(time.time() - started[run.name], 1), backend=impl.name,
                           resources=run.resources, parameters=run.parameters,
                           results=f"results/{run.result_name}.json",
                           results_sha256=_sha256(papers / "results" / f"{run.result_name}.json"),
                           when=time.strftime("%Y-%m-%dT%H:%M:%S"))
                    bar.update()
    bar.close()
    timings = json.loads(timings_path.read_text()) if timings_path.is_file() else {}
    timings["last_grid"] = {"runs": len(runs), "ran": len(todo), "skipped": len(skip), "backend": impl.name,
                            "seconds": round(time.time() - t_all, 1), "when": time.strftime("%Y-%m-%dT%H:%M:%S")}
    atomic.write_json(timings_path, timings)
    if write_report:
        report.write(papers / "results", papers / "REPORT.md")
    failed = [n for n, s in states.items() if s["state"] == "failed"]
    print(f"[cnt reproduce] grid: {len(todo) - len(failed)} ran, {len(skip)} skipped, {len(failed)} failed"
          + (f" ({', '.join(failed)})" if failed else "") + f"; {time.time() - t_all:.0f} s", flush=True)
    return states
