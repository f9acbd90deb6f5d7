"""Bad inputs and faults, as a new user would make them: each is refused with one message that names the input, the
right exit status, and nothing changed — the target model's files, the previous results and the cache stay
byte-identical. Table-driven: one row per bad input."""

from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path

import pytest
import torch

from cnt import atomic, cache, experiment, models
from cnt.cli import main
from cnt.tiny import tiny_model
from cnt.transfer import NeuronPatch, PatchError, _checksum

IDX = {0: [1, 5, 7], 1: [0, 3]}


# ---------------------------------------------------------------------------------------------------------------------
# a small world: a target and a donor folder, a good patch, a previous result, in one folder that every case leaves alone
# ---------------------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from cnt.models import load_tokenizer

    root = tmp_path_factory.mktemp("world")
    tok = load_tokenizer("smollm2-135m-instruct")
    target, donor = tiny_model("llama", seed=0, vocab_size=len(tok)), tiny_model("llama", seed=1, vocab_size=len(tok))
    for name, m in (("target", target), ("donor", donor)):
        m.save_pretrained(root / name)
        tok.save_pretrained(root / name)
    NeuronPatch.extract(donor, target, IDX, alpha=1.5, donor_name="donor", target_name="target").save(root / "patch")
    (root / "previous").mkdir()
    (root / "previous" / "result.json").write_text('{"kept": true}\n')
    (root / "a_file").write_text("not a folder\n")
    (root / "other").mkdir()
    (root / "other" / "notes.txt").write_text("mine\n")
    return {"root": root, "target": target, "donor": donor, "tok": tok}


def _tree(folder: Path) -> dict[str, str]:
    """sha256 of every file under ``folder`` (and the folders, so that a new empty one counts as a change)."""
    out = {}
    for p in sorted(folder.rglob("*")):
        rel = str(p.relative_to(folder))
        out[rel] = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
    return out


def _cache_listing() -> dict[str, tuple[int, int]]:
    root = cache.cache_dir()
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in root.rglob("*") if p.is_file() and not p.name.endswith(".lock")}


def _bad_patch(world, tmp: Path, *, tensors=None, meta=None, raw_meta: str | None = None) -> Path:
    """A copy of the good patch with its tensors and/or metadata rewritten — and the sha256, size and checksum
    recomputed, as someone forging a patch would — so that only the content checks can catch it."""
    from safetensors.torch import load, save

    d = tmp / "bad_patch"
    d.mkdir()
    src = world["root"] / "patch"
    t = load((src / "patch.safetensors").read_bytes())
    if tensors:
        tensors(t)
    data = save(t)
    (d / "patch.safetensors").write_bytes(data)
    m = json.loads((src / "patch.json").read_text())
    m.update(sha256=hashlib.sha256(data).hexdigest(), bytes=len(data))
    if meta:
        meta(m)
    m["checksum"] = _checksum(m) if "checksum" in m else None
    if m["checksum"] is None:
        del m["checksum"]
    (d / "patch.json").write_text(raw_meta if raw_meta is not None else json.dumps(m))
    return d


def _edited_json(world, tmp: Path, edit) -> Path:
    """A copy of the good patch whose patch.json was edited by hand (the checksum not recomputed)."""
    d = tmp / "edited_patch"
    d.mkdir()
    src = world["root"] / "patch"
    (d / "patch.safetensors").write_bytes((src / "patch.safetensors").read_bytes())
    m = json.loads((src / "patch.json").read_text())
    text = edit(m)
    (d / "patch.json").write_text(text if isinstance(text, str) else json.dumps(m))
    return d


def _set(key, value):
    def edit(m):
        m[key] = value
    return edit


def _drop(key):
    def edit(m):
        del m[key]
    return edit


def _index(value, layer="0"):
    def edit(t):
        t[f"mlp.{layer}.indices"] = value
    return edit


def _nan_donor(t):
    t["mlp.0.donor.up"] = t["mlp.0.donor.up"].clone()
    t["mlp.0.donor.up"][0, 0] = float("nan")


def _move_layer(t):
    for k in [k for k in t if k.startswith("mlp.1.")]:
        t[k.replace("mlp.1.", "mlp.7.")] = t.pop(k)


# ---------------------------------------------------------------------------------------------------------------------
# the table: (id, setup(world, tmp) -> argv, exit status, text the message must contain)
# ---------------------------------------------------------------------------------------------------------------------

def _apply(patch, model="target", out=None):
    def argv(w, tmp):
        p = patch(w, tmp) if callable(patch) else w["root"] / patch
        o = out(w, tmp) if callable(out) else (w["root"] / out if out else tmp / "applied")
        m = model(w, tmp) if callable(model) else w["root"] / model
        return ["apply", "--patch", str(p), "--model", str(m), "--out", str(o)]
    return argv


def _transfer(*extra, out=None):
    def argv(w, tmp):
        o = out(w, tmp) if callable(out) else (w["root"] / out if out else tmp / "new_patch")
        return ["transfer", "--donor", str(w["root"] / "donor"), "--target", str(w["root"] / "target"),
                "--function", "refusal", "--out", str(o), *extra]
    return argv


def _plain(*args):
    return lambda w, tmp: [a.format(root=w["root"], tmp=tmp) for a in args]


def _patched_model(w, tmp):
    """The target with the good patch applied, saved (applying the patch again must be refused)."""
    m = tiny_model("llama", seed=0, vocab_size=len(w["tok"]))
    NeuronPatch.load(w["root"] / "patch").apply(m)
    m.save_pretrained(tmp / "patched")
    w["tok"].save_pretrained(tmp / "patched")
    return tmp / "patched"


CLI_CASES = [
    # --out: the wrong kind of path, or one that would destroy something
    ("apply-out-is-a-file", _apply("patch", out="a_file"), 2, "a_file' is an existing file"),
    ("apply-out-has-other-files", _apply("patch", out="other"), 2, "other' is a folder with other files"),
    ("apply-out-below-a-file", _apply("patch", out="a_file/x"), 2, "a_file is a file, not a folder"),
    ("transfer-out-is-a-file", _transfer("--budget", "0.1", out="a_file"), 2, "a_file' is an existing file"),
    ("transfer-out-has-other-files", _transfer("--budget", "0.1", out="other"), 2, "other' is a folder with other"),
    ("transfer-out-below-a-file", _transfer("--budget", "0.1", out="a_file/p"), 2, "is a file, not a folder"),
    ("locate-out-is-a-folder", _plain("locate", "--donor", "{root}/donor", "--target", "{root}/target", "--function",
                                      "refusal", "--out", "{root}/other"), 2, "other' is a folder"),
    ("eval-out-is-a-folder", _plain("eval", "{root}/target", "--out", "{root}/other"), 2, "other' is a folder"),
    ("run-out-below-a-file", _plain("run", "disalignment", "--out", "{root}/a_file"), 2, "is a file, not a folder"),
    ("frontier-out-below-a-file", _plain("frontier", "disalignment", "--out", "{root}/a_file"), 2,
     "is a file, not a folder"),
    # numbers: not finite, out of range, the wrong count
    ("alpha-inf", _transfer("--alpha", "inf"), 2, "alpha must be a finite number"),
    ("alpha-nan", _transfer("--alpha", "nan"), 2, "alpha must be a finite number"),
    ("alpha-zero", _transfer("--alpha", "0"), 2, "alpha must be a finite number in (0, 16]"),
    ("alpha-text", _transfer("--alpha", "two"), 2, "alpha must be a number, got 'two'"),
    ("budget-zero", _transfer("--budget", "0"), 2, "budget must be a fraction of MLP neurons in (0, 1]"),
    ("budget-nan", _transfer("--budget", "nan"), 2, "budget must be a fraction of MLP neurons in (0, 1]"),
    ("budget-above-one", _transfer("--budget", "1.5"), 2, "budget must be a fraction of MLP neurons in (0, 1]"),
    ("budget-text", _transfer("--budget", "half"), 2, "got 'half'"),
    ("donor-is-target", _plain("transfer", "--donor", "{root}/target", "--target", "{root}/target", "--function",
                               "refusal", "--out", "{tmp}/p"), 2, "are both"),
    ("unknown-units", _transfer("--units", "mlp,neck"), 2, "unknown unit kinds ['neck']"),
    ("unknown-scorer", _transfer("--scorer", "oracle"), 2, "invalid choice: 'oracle'"),
    ("iterative-budget-zero", _plain("locate", "--donor", "{root}/donor", "--target", "{root}/target", "--function",
                                     "refusal", "--out", "{tmp}/s.pt", "--iterative-budget", "0"), 2,
     "a whole number >= 1, got 0"),
    ("data-negative-n", _plain("data", "advbench", "-n", "-3"), 2, "a whole number >= 0, got -3"),
    ("eval-unknown-dtype", _plain("eval", "{root}/target", "--dtype", "int8"), 2, "invalid choice: 'int8'"),
    ("frontier-budget-above-one", _plain("frontier", "disalignment", "--budgets", "2", "--out", "{tmp}/f"), 2,
     "--budgets must be fractions"),
    ("frontier-unknown-locator", _plain("frontier", "disalignment", "--locators", "oracle:mlp", "--out", "{tmp}/f"), 2,
     "--locators 'oracle:mlp'"),
    ("frontier-unknown-kind", _plain("frontier", "disalignment", "--locators", "attribution:mlp+neck", "--out",
                                     "{tmp}/f"), 2, "'attribution:mlp+neck'"),
    ("reproduce-jobs-zero", _plain("reproduce", "-j", "0", "--papers", "{tmp}/papers"), 2, ">= 1, got 0"),
    ("run-param-wrong-type", _plain("run", "disalignment", "--out", "{tmp}/papers", "-p", "budgets=true"), 2,
     "budgets=(True,)"),
    ("run-param-unknown", _plain("run", "disalignment", "--out", "{tmp}/papers", "-p", "bugdets=[0.1]"), 2,
     "unexpected keyword argument 'bugdets'"),
    ("run-param-no-value", _plain("run", "disalignment", "--out", "{tmp}/papers", "-p", "budgets"), 2,
     "parameter 'budgets' must look like NAME=VALUE"),
    ("prepare-unknown-model", _plain("prepare", "smollm3-9b"), 2, "unknown model 'smollm3-9b'"),
    # patches: missing, damaged, edited, forged
    ("patch-folder-missing", _apply(lambda w, t: t / "nowhere"), 2, "nowhere is not a patch folder"),
    ("patch-alpha-edited", _apply(lambda w, t: _edited_json(w, t, _set("alpha", 2.0))), 2, "field 'checksum'"),
    ("patch-alpha-nan", _apply(lambda w, t: _edited_json(w, t, _set("alpha", float("nan")))), 2, "field 'alpha'"),
    ("patch-alpha-string", _apply(lambda w, t: _edited_json(w, t, _set("alpha", "1.5"))), 2, "field 'alpha'"),
    ("patch-alpha-huge", _apply(lambda w, t: _edited_json(w, t, _set("alpha", 1e6))), 2, "field 'alpha'"),
    ("patch-json-is-a-list", _apply(lambda w, t: _edited_json(w, t, lambda m: "[1, 2]")), 2, "holds a JSON list"),
    ("patch-json-not-json", _apply(lambda w, t: _edited_json(w, t, lambda m: "{alpha: 1")), 2, "is not valid JSON"),
    ("patch-json-lacks-donor", _apply(lambda w, t: _edited_json(w, t, _drop("donor"))), 2, "field 'donor' is missing"),
    ("patch-json-lacks-checksum", _apply(lambda w, t: _edited_json(w, t, _drop("checksum"))), 2,
     "field 'checksum' is missing"),
    ("patch-total-params-text", _apply(lambda w, t: _edited_json(w, t, _set("target_total_params", "many"))), 2,
     "field 'target_total_params' must be a JSON int"),
    ("patch-format-version", _apply(lambda w, t: _edited_json(w, t, _set("format_version", 9))), 2,
     "'format_version'"),
    ("patch-fingerprint-broken", _apply(lambda w, t: _edited_json(w, t, _set("fingerprint", {"family": "llama"}))), 2,
     "field 'fingerprint'"),
    ("patch-tensors-truncated", _apply(lambda w, t: _truncated(w, t)), 2, "truncated"),
    ("forged-nan-donor-slice", _apply(lambda w, t: _bad_patch(w, t, tensors=_nan_donor)), 2, "NaN/inf"),
    ("forged-index-out-of-range", _apply(lambda w, t: _bad_patch(w, t, tensors=_index(torch.tensor([1, 5, 700])))),
     2, "unit indices must lie in [0, 96)"),
    ("forged-negative-index", _apply(lambda w, t: _bad_patch(w, t, tensors=_index(torch.tensor([-1, 5, 7])))), 2,
     "unit indices must lie in [0, 96)"),
    ("forged-float-indices", _apply(lambda w, t: _bad_patch(w, t, tensors=_index(torch.tensor([1.0, 5.0, 7.0])))), 2,
     "must be integers"),
    ("forged-duplicate-indices", _apply(lambda w, t: _bad_patch(w, t, tensors=_index(torch.tensor([1, 5, 5])))), 2,
     "duplicate unit indices"),
    ("forged-layer-past-model", _apply(lambda w, t: _bad_patch(w, t, tensors=_move_layer)), 2,
     "layer 7 out of range"),
    ("forged-unit-count", _apply(lambda w, t: _bad_patch(w, t, tensors=_index(torch.tensor([1, 5])))), 2,
     "expected 2 units first"),
    ("forged-stray-tensor", _apply(lambda w, t: _bad_patch(w, t, tensors=lambda x: x.update(extra=torch.ones(1))))
     , 2, "unexpected tensor 'extra'"),
    ("forged-per-layer-count", _apply(lambda w, t: _bad_patch(w, t, meta=_set("per_layer", [3, 3])), ), 2,
     "field 'per_layer'"),
    ("forged-dtype-field", _apply(lambda w, t: _bad_patch(w, t, meta=_set("dtype", "bfloat16"))), 2, "field 'dtype'"),
    # applying to the wrong model
    ("apply-to-the-donor", _apply("patch", model="donor"), 2, "it is the patch's donor (donor), not its target"),
    ("apply-twice", _apply("patch", model=_patched_model), 2, "the patch is already applied"),
    ("revert-unpatched", lambda w, t: ["revert", "--patch", str(w["root"] / "patch"), "--model",
                                       str(w["root"] / "target"), "--out", str(t / "reverted")], 2,
     "are not the patched values"),
]


def _truncated(w, tmp):
    d = tmp / "short"
    d.mkdir()
    raw = (w["root"] / "patch" / "patch.safetensors").read_bytes()
    (d / "patch.safetensors").write_bytes(raw[:-100])
    (d / "patch.json").write_text((w["root"] / "patch" / "patch.json").read_text())
    return d


@pytest.mark.parametrize("case", CLI_CASES, ids=[c[0] for c in CLI_CASES])
def test_bad_cli_input_is_refused_and_changes_nothing(case, world, tmp_path, capsys):
    name, setup, status, text = case
    argv = setup(world, tmp_path)
    capsys.readouterr()  # (what the setup printed)
    before, listing, work = _tree(world["root"]), _cache_listing(), _tree(tmp_path)
    try:
        rc = main(argv)
    except SystemExit as e:  # argparse: the type and choice checks
        rc = e.code
    err = capsys.readouterr().err
    assert rc == status, (rc, err)
    assert text in err, err
    assert len([ln for ln in err.strip().splitlines() if ln.strip()]) <= 3 and "Traceback" not in err  # one message
    assert _tree(world["root"]) == before  # the target model, the good patch, the previous result: byte-identical
    assert _cache_listing() == listing
    assert _tree(tmp_path) == work  # no half-written output beside the inputs


# ---------------------------------------------------------------------------------------------------------------------
# the same through the Python API and the notebooks' parameters
# ---------------------------------------------------------------------------------------------------------------------

def _bf16_patch_on_fp32(w):
    import copy

    p = NeuronPatch.extract(copy.deepcopy(w["donor"]).to(torch.bfloat16), copy.deepcopy(w["target"]).to(torch.bfloat16),
                            IDX)
    p.apply(w["target"])


def _compose_other_targets(w):
    a = NeuronPatch.extract(w["donor"], w["target"], {0: [1]}, target_name="target")
    b = NeuronPatch.extract(w["donor"], w["target"], {0: [2]}, target_name="someone-else")
    NeuronPatch.compose([a, b])


def _search(w, **kw):
    from cnt.pipeline import transfer_function

    transfer_function(w["donor"], w["target"], w["tok"], "refusal", **kw)


def _notebook(**kw):
    def run(w):
        before = os.environ.get("CNT_SMOKE")  # (make test sets it for the notebooks that run after these tests)
        os.environ["CNT_SMOKE"] = "1"
        try:
            experiment.notebook_config("disalignment", output_dir=str(w["root"] / "nb_out"), **kw)
        finally:
            if before is None:
                os.environ.pop("CNT_SMOKE")
            else:
                os.environ["CNT_SMOKE"] = before
    return run


API_CASES = [
    ("extract-alpha-bool", lambda w: NeuronPatch.extract(w["donor"], w["target"], IDX, alpha=True), PatchError,
     "alpha must be a finite number"),
    ("extract-alpha-inf", lambda w: NeuronPatch.extract(w["donor"], w["target"], IDX, alpha=math.inf), PatchError,
     "alpha must be a finite number"),
    ("extract-gamma-huge", lambda w: NeuronPatch.extract(w["donor"], w["target"], {0: [1]}, gamma={0: [1e9]}),
     PatchError, "gamma"),
    ("bf16-patch-on-fp32-model", _bf16_patch_on_fp32, PatchError, "the patch holds bfloat16 slices, the model is "
                                                                  "float32"),
    ("compose-different-targets", _compose_other_targets, PatchError, "different targets"),
    ("search-budget-true", lambda w: _search(w, budget=True), PatchError, "budget must be a fraction"),
    ("search-alpha-nan", lambda w: _search(w, budget=0.1, alpha=math.nan), PatchError, "alpha must be a finite"),
    ("search-donor-is-target", lambda w: _search({**w, "donor": w["target"]}, budget=0.1), PatchError,
     "identical weights"),
    ("notebook-negative-budget", _notebook(budgets=[-1]), ValueError, "budgets must be fractions"),
    ("notebook-unknown-scorer", _notebook(scorers=["nope"]), ValueError, "unknown scorers ['nope']"),
    ("notebook-unknown-profile", _notebook(profile="nope"), ValueError, "unknown profile 'nope'"),
    ("notebook-budget-true", _notebook(budgets=True), ValueError, "budgets=(True,)"),
    ("notebook-seed-text", _notebook(seed="0"), ValueError, "seed='0' must be a whole number"),
    ("notebook-alpha-inf", _notebook(alphas=[math.inf]), ValueError,
     "alphas=(inf,) must be a list of finite numbers"),
    ("notebook-output-dir-file", lambda w: _notebook(output_dir=None)(w) if False else
     experiment.notebook_config("disalignment", output_dir=str(w["root"] / "a_file")), ValueError,
     "is a file, not a folder"),
    ("notebook-misspelled-parameter", lambda w: experiment.check_parameters(
        {"bugdets": [0.1], "budgets": [0.01], "In": [], "_i": ""}, ["budgets", "seed"]), ValueError,
     "'bugdets' (did you mean 'budgets'?)"),
    ("walkthrough-budget-zero", lambda w: experiment.check_walkthrough(donor="a", target="b", budget=0,
                                                                       scorer="attribution", seed=0, prompts=4),
     ValueError, "budget=0"),
]


@pytest.mark.parametrize("case", API_CASES, ids=[c[0] for c in API_CASES])
def test_bad_api_input_is_refused_and_changes_nothing(case, world):
    name, call, error, text = case
    target = {k: v.clone() for k, v in world["target"].state_dict().items()}
    before, listing = _tree(world["root"]), _cache_listing()
    with pytest.raises(error) as e:
        call(world)
    assert text in str(e.value)
    assert all(torch.equal(v, world["target"].state_dict()[k]) for k, v in target.items())
    assert world["target"].dtype == torch.float32
    assert _tree(world["root"]) == before and _cache_listing() == listing


def test_patch_round_trip_keeps_every_check(world, tmp_path):
    """The good patch loads, applies, reverts bit-exact, and saving it again over itself keeps the folder a patch."""
    p = NeuronPatch.load(world["root"] / "patch")
    assert p.alpha == 1.5 and p.dtype == "float32"
    m = tiny_model("llama", seed=0, vocab_size=len(world["tok"]))
    before = {k: v.clone() for k, v in m.state_dict().items()}
    p.revert(p.apply(m))
    assert all(torch.equal(v, m.state_dict()[k]) for k, v in before.items())
    out = p.save(tmp_path / "again")
    p.save(out, extra_files={"note.txt": "x"})  # over a patch folder: replaced as a whole
    assert sorted(x.name for x in out.iterdir()) == ["note.txt", "patch.json", "patch.safetensors"]
    assert not [x for x in tmp_path.iterdir() if atomic.TMP_MARK in x.name]


# ---------------------------------------------------------------------------------------------------------------------
# --budget auto that misses its goal
# ---------------------------------------------------------------------------------------------------------------------

def test_budget_auto_that_misses_its_goal_exits_1_unless_asked(world, tmp_path, capsys, monkeypatch):
    from cnt import pipeline, search

    def short_search(scores, donor, target, tokenizer, *, alphas, progress, **kw):
        steps = [search.SearchStep(k=k, alpha=alphas[0], score=0.1, share=0.3, ppl=10.0, drift=None, ok=False)
                 for k in (10, 40)]
        return search.SearchResult(0, alphas[0], False, 0.3, {}, {}, steps, 0.1, 0.9, 0.02, closest_k=40)

    def broken_search(scores, donor, target, tokenizer, *, alphas, progress, **kw):  # reached, utility broke
        failed = ["false refusal +8.3 points (limit +5)"]
        steps = [search.SearchStep(k=10, alpha=4.0, score=0.1, share=0.4, ppl=10.0, drift=None, ok=False),
                 search.SearchStep(k=40, alpha=4.0, score=0.9, share=0.99, ppl=10.0, drift=None, ok=False,
                                   utility_ok=False, failed=failed)]
        return search.SearchResult(0, 4.0, False, 0.99, {}, {}, steps, 0.1, 0.9, 0.02, closest_k=10)

    monkeypatch.setattr(pipeline, "minimal_subset", short_search)
    argv = ["transfer", "--donor", str(world["root"] / "donor"), "--target", str(world["root"] / "target"),
            "--function", "refusal", "--budget", "auto", "--out", str(tmp_path / "p")]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "did not reach its goal" in err and "moved 30% of the gap" in err and "nothing saved" in err
    assert not (tmp_path / "p").exists()
    assert main([*argv, "--save-best-effort"]) == 0
    assert "saved anyway" in capsys.readouterr().err
    assert NeuronPatch.load(tmp_path / "p").n_neurons == 40
    assert json.loads((tmp_path / "p" / "transfer.json").read_text())["search"]["reached"] is False
    monkeypatch.setattr(pipeline, "minimal_subset", broken_search)  # the goal's share reached, utility broken: why
    assert main([*argv[:-1], str(tmp_path / "q")]) == 1
    err = capsys.readouterr().err
    assert "moved 99% of the gap" in err and "40 units at alpha 4: false refusal +8.3 points (limit +5)" in err


# ---------------------------------------------------------------------------------------------------------------------
# the cache: a flipped byte or a truncated file is refused with the command that rebuilds it
# ---------------------------------------------------------------------------------------------------------------------

@pytest.fixture
def cached_tiny(world, tmp_path, monkeypatch):
    """A kit-written cache folder (atomically, with its file record) served as the zoo model "cached-tiny"."""
    from cnt.zoo import store

    folder = tmp_path / "cached-tiny"
    with atomic.folder(folder) as tmp:
        world["target"].save_pretrained(tmp)
        world["tok"].save_pretrained(tmp)
        cache.record_files(tmp)
    monkeypatch.setitem(store.RECIPES, "cached-tiny", None)
    monkeypatch.setattr(store, "ensure", lambda name, **kw: folder)
    return folder


def test_cache_flipped_byte_is_refused_with_the_rebuild_command(cached_tiny):
    from cnt.zoo import load_model

    model, _ = load_model("cached-tiny", device="cpu")  # intact: loads (and is hashed once)
    st = cached_tiny / "model.safetensors"
    raw = bytearray(st.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    st.write_bytes(bytes(raw))
    with pytest.raises(models.ModelLoadError, match=r"sha256 recorded.*cnt prepare --force cached-tiny"):
        load_model("cached-tiny", device="cpu")
    st.write_bytes(bytes(raw[:-5000]))
    with pytest.raises(models.ModelLoadError, match=r"bytes.*truncated or replaced.*cnt prepare --force"):
        load_model("cached-tiny", device="cpu")
    (cached_tiny / "model.safetensors").unlink()
    with pytest.raises(models.ModelLoadError, match="model.safetensors is missing"):
        load_model("cached-tiny", device="cpu")


def test_cache_hash_is_checked_once_per_process_and_size_every_time(cached_tiny, monkeypatch):
    calls = []
    real = cache.sha256_file
    monkeypatch.setattr(cache, "sha256_file", lambda p: calls.append(Path(p).name) or real(p))
    cache._VERIFIED.clear()
    for _ in range(3):
        cache.verify_files(cached_tiny, "rebuild")
    assert calls.count("model.safetensors") == 1
    cache.verify_files(cached_tiny, "rebuild", full=True)
    assert calls.count("model.safetensors") == 2


def test_damaged_local_folder_names_the_folder(world, tmp_path):
    import shutil

    shutil.copytree(world["root"] / "target", tmp_path / "m")
    st = tmp_path / "m" / "model.safetensors"
    st.write_bytes(st.read_bytes()[:1000])
    with pytest.raises(models.ModelLoadError, match=r"could not be read.*damaged"):
        models.load_model(str(tmp_path / "m"), device="cpu")


# ---------------------------------------------------------------------------------------------------------------------
# atomic writes: leftovers of a killed writer are cleaned on the next write; an interrupted swap is repaired
# ---------------------------------------------------------------------------------------------------------------------

def test_failed_writes_leave_the_previous_version_and_no_temp(tmp_path):
    f = atomic.write_text(tmp_path / "r.json", "old")
    with pytest.raises(RuntimeError):
        with atomic.write_file(f, "w") as h:
            h.write("new, half")
            raise RuntimeError("crash")
    assert f.read_text() == "old"
    d = tmp_path / "folder"
    with atomic.folder(d) as tmp:
        (tmp / "a").write_text("old")
    with pytest.raises(RuntimeError):
        with atomic.folder(d) as tmp:
            (tmp / "a").write_text("new")
            raise RuntimeError("crash")
    assert (d / "a").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["folder", "r.json"]


def test_sweep_removes_dead_writers_temps_and_restores_a_half_swapped_folder(tmp_path):
    dead = 2 ** 22 + 12345  # above any pid_max default: no such process
    (tmp_path / f".m{atomic.TMP_MARK}{dead}-abcd").mkdir()
    (tmp_path / f".r.json{atomic.TMP_MARK}{dead}-beef").write_text("half")
    (tmp_path / f"model.tmp{dead}").mkdir()  # what earlier versions of the kit left
    old = tmp_path / f".p{atomic.OLD_MARK}{dead}-0123"  # a swap killed between its two renames
    old.mkdir()
    (old / "patch.json").write_text("the good one")
    mine = tmp_path / f".x{atomic.TMP_MARK}{os.getpid()}-aaaa"  # a live writer's temp is left alone
    mine.mkdir()
    atomic.sweep(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["p", mine.name])
    assert (tmp_path / "p" / "patch.json").read_text() == "the good one"


def test_check_output_refuses_before_anything_is_written(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(atomic.OutputPathError, match="is an existing file"):
        atomic.check_output(tmp_path / "f", "folder", what="--out")
    with pytest.raises(atomic.OutputPathError, match="is a folder"):
        atomic.check_output(tmp_path, "file", what="--out")
    assert atomic.check_output(tmp_path / "new" / "deeper", "folder", what="--out") == tmp_path / "new" / "deeper"
    assert not (tmp_path / "new").exists()


# ---------------------------------------------------------------------------------------------------------------------
# neurons own their biases
# ---------------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("family,overrides", [("llama", {"mlp_bias": True}), ("gpt2", {}), ("gpt_neox", {})])
def test_neurons_own_their_biases(family, overrides):
    """Every per-neuron bias travels with its neuron: transferring every neuron reproduces the donor's MLP exactly,
    one neuron moves exactly its own bias entries, and revert restores the target bit for bit."""
    from cnt.arch import MLPNeurons
    from cnt.transfer import transfer_all

    target, donor = tiny_model(family, seed=0, **overrides), tiny_model(family, seed=1, **overrides)
    with torch.no_grad():  # (random init leaves biases at zero in both)
        for k, v in donor.named_parameters():
            if k.endswith("bias"):
                v.add_(torch.randn_like(v))
    neurons = MLPNeurons(target)
    biases = [k for k in neurons.read(0, [0]) if k.endswith("bias")]
    assert biases == (["gate_bias", "up_bias"] if family == "llama" else ["in_bias"])
    before = {k: v.clone() for k, v in target.state_dict().items()}
    patch = transfer_all(donor, target)
    patch.apply(target)
    owned = {name for layer in range(neurons.n_layers) for name in neurons.param_names(layer).values()}
    assert sum(k.endswith("bias") for k in owned) == len(biases) * neurons.n_layers
    for k, v in target.state_dict().items():
        assert torch.equal(v, donor.state_dict()[k] if k in owned else before[k]), k
    patch.revert(target)
    one = NeuronPatch.extract(donor, target, {1: [3]})
    one.apply(target)
    layer1 = neurons.param_names(1)
    for key in biases:
        name = layer1[key]
        got, was, want = target.state_dict()[name], before[name], donor.state_dict()[name]
        moved = (~torch.eq(got, was)).nonzero().flatten().tolist()
        offset = neurons.intermediate_size(1) if key == "up_bias" and family == "phi3" else 0
        assert moved == [3 + offset] and got[3 + offset] == want[3 + offset], (name, moved)
    one.revert(target)
    assert all(torch.equal(v, before[k]) for k, v in target.state_dict().items())


def test_leftovers_of_a_killed_conversion_are_removed_on_the_next_start(monkeypatch, tmp_path, capsys):
    """A conversion killed mid-write leaves its temporary folder (~0.5 GB for SmolLM2) in the cache; the first load
    of a kit model in the next process removes it and says so."""
    monkeypatch.setenv("CNT_CACHE", str(tmp_path))
    monkeypatch.setattr(models, "_SWEPT", set())
    dead = 2 ** 22 + 4321
    left = cache.cache_dir("models") / f".smollm2-135m-instruct{atomic.TMP_MARK}{dead}-abcd"
    left.mkdir(parents=True)
    (left / "model.safetensors").write_bytes(b"half")
    legacy = cache.cache_dir("zoo") / f"smol-safe.tmp{dead}"  # the name earlier versions of the kit used
    legacy.mkdir()
    assert len(models.sweep_cache()) == 2
    assert not left.exists() and not legacy.exists()
    assert "removed 2 leftover(s)" in capsys.readouterr().out


def test_prepare_verify_rehashes_and_reports_damage(smol, tmp_path, monkeypatch, capsys):
    """`cnt prepare --verify` hashes every cached file again: the intact conversion passes; a copy of it in another
    cache with one flipped byte is reported FAILED (exit 1) with the command that rebuilds it, and nothing is rebuilt."""
    import shutil

    assert main(["prepare", "--verify", "smollm2-135m-instruct"]) == 0
    assert "smollm2-135m-instruct: verified" in capsys.readouterr().out
    src = models.convert_embedded("smollm2-135m-instruct")
    monkeypatch.setenv("CNT_CACHE", str(tmp_path))
    dst = cache.cache_dir("models") / "smollm2-135m-instruct"
    shutil.copytree(src, dst, dirs_exist_ok=True)
    with open(dst / "model.safetensors", "r+b") as f:
        f.seek(10_000_000)
        b = f.read(1)
        f.seek(10_000_000)
        f.write(bytes([b[0] ^ 0x10]))
    before = _tree(dst)
    assert main(["prepare", "--verify", "smollm2-135m-instruct"]) == 1
    out = capsys.readouterr().out
    assert "FAILED" in out and "does not match the sha256" in out and "cnt prepare --force smollm2-135m-instruct" in out
    assert _tree(dst) == before
