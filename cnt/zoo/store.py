"""Where zoo models live and how they come to be: built from their recipe (:func:`build`: training, minutes),
reconstructed from the committed artifact (:func:`reconstruct`: seconds), cached under the cache root, and loaded by
name (:func:`load_model`; it builds only when asked). Committed artifacts (``cnt/zoo/artifacts/<name>/``: a bf16
LoRA adapter or a refusal direction, with the build manifest) are package data, apart from the results in
``papers/``."""

from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path
from typing import Sequence

import torch

from .. import atomic, data, models
from ..cache import cache_dir, has_record, record_files
from ..models import ModelLoadError
from ..train import TrainConfig, sft
from .recipe_data import BuildContext, assert_disjoint_from_eval
from .recipes import RECIPES, Recipe, card_profile, holds, recipe, rule_text

ARTIFACTS = Path(os.environ.get("CNT_ZOO_ARTIFACTS") or Path(__file__).resolve().parent / "artifacts")


def model_dir(name: str) -> Path:
    return cache_dir("zoo") / name


def artifact_dir(name: str) -> Path:
    return ARTIFACTS / name


def library_versions() -> dict:
    import peft
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__}


def merge_lora(model, adapter: dict[str, torch.Tensor], config: TrainConfig, targets: Sequence[str]):
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(model, LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=0.0,
                                                  target_modules=list(targets), bias="none"))
    missing = set(adapter) - set(peft_model.state_dict())
    if missing:
        raise ValueError(f"adapter does not fit the model: {sorted(missing)[:3]}")
    peft_model.load_state_dict({k: v.float() for k, v in adapter.items()}, strict=False)
    return peft_model.merge_and_unload()


def load_base(r: Recipe, tiny: bool):
    if not tiny:
        return models.load_model(r.base, dtype="float32", device="cpu")
    from ..tiny import tiny_model

    tok = models.load_tokenizer(r.base)
    return tiny_model("llama", seed=r.seed, vocab_size=len(tok)), tok


def build(name: str | Recipe, *, tiny: bool = False, measure: str | None = "card", progress: bool = True,
          save: bool = True) -> tuple[object, object, dict]:
    """Build a recipe (by name, or a :class:`Recipe` such as a :func:`variant`) from scratch. Returns ``(model,
    tokenizer, manifest)``; with ``save`` the model goes to the cache and (not tiny) the artifact + manifest to
    ``cnt/zoo/artifacts/<name>/``. ``measure``: the evaluation profile of the manifest's behaviour (``card``: the
    recipe's :func:`card_profile`; None: not measured)."""
    from ..arch import MLPNeurons

    r = name if isinstance(name, Recipe) else recipe(name)
    name = r.name
    measure = measure and card_profile(r, measure)
    if save and r is not RECIPES.get(name):
        raise ValueError(f"{name!r} is not a registered recipe: build it with save=False (a variant is tried, "
                         "not cached; register it in zoo.RECIPES to adopt it)")
    t0 = time.time()
    model, tok = load_base(r, tiny)
    ctx = BuildContext(r, model, tok, tiny, progress)
    t_data = time.time()
    parts = r.data(ctx)
    info: dict = {"data_seconds": round(time.time() - t_data, 1), **({"base_answers": ctx.answers}
                                                                 if any(ctx.answers.values()) else {})}
    unread = set(r.hyper) - ctx.read if r.method == "sft" else set()  # abliteration: select_direction takes them
    if unread:
        raise ValueError(f"recipe {name!r}: no data function reads {sorted(unread)} (a typo, or a training setting: "
                         f"{', '.join(f.name for f in dataclasses.fields(TrainConfig))})")
    assert_disjoint_from_eval(parts)
    artifact: dict[str, torch.Tensor] = {}
    if r.method == "sft":
        cfg = dataclasses.replace(r.train, seed=r.seed, steps=2 if tiny else r.train.steps)
        examples = [ex for recs in parts.values() for ex in recs]
        trained, res = sft(model, tok, examples, cfg, progress=progress)
        info.update(train_seconds=res.seconds,
                    losses=[round(x, 4) for x in res.losses[::10]] + [round(res.losses[-1], 4)],
                    trainable_params=res.trainable_params)
        if cfg.method == "lora":  # merge the bf16-rounded adapter into a fresh base: identical to a reconstruction
            artifact = {k: v.to(torch.bfloat16) for k, v in res.adapter.items()}
            targets = sorted({k.split(".")[-4] for k in artifact})
            info["lora_targets"] = targets
            model, tok = load_base(r, tiny)
            model = merge_lora(model, artifact, cfg, targets)
        else:
            model = trained
    elif r.method == "abliterate":
        from ..refusal_direction import orthogonalize, select_direction

        t = data.texts
        choice = select_direction(model, tok, t(parts["harmful_train"]), t(parts["benign_train"]),  # in bf16
                                  t(parts["harmful_validation"]), t(parts["benign_validation"]), progress=progress,
                                  **{k: tuple(v) if isinstance(v, list) else v for k, v in r.hyper.items()})
        orthogonalize(model, choice.direction)
        artifact = {"direction": choice.direction.float().contiguous()}
        info.update(layer=choice.layer, position=choice.position, validation_refusal_score=choice.harmful_score,
                    baseline_refusal_score=choice.baseline_score, benign_kl=choice.benign_kl,
                    select_seconds=choice.seconds, n_means=choice.n_means, candidates=choice.candidates)
    else:
        raise ValueError(f"unknown recipe method {r.method!r}")
    model.eval()
    build_seconds = round(time.time() - t0, 1)
    manifest = {
        "name": name, "recipe": r.to_dict(), "recipe_key": r.key(), "tiny": tiny,
        "data": {k: {"n": len(v), "sha256": data.records_hash(v)} for k, v in parts.items()},
        "libraries": library_versions(), "build_seconds": build_seconds, "build": info,
        "fingerprint": MLPNeurons(model).fingerprint().to_dict(), "when": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    if measure and not tiny:
        manifest["behaviour"] = measure_behaviour(model, tok, name, measure)
        manifest["meets_expectations"] = check_expectations(r, manifest["behaviour"])
    if not tiny and _manifest_ok(name):
        manifest["rebuild_check"] = compare_with_committed(name, artifact if r.artifact else None, manifest,
                                                           model=model)
    if save:
        save_model(name, model, tok, manifest)
        if not tiny:  # a full fine-tune commits its manifest only (the card reads it; the weights are too large)
            save_artifact(name, artifact if r.artifact else None, manifest)
    return model, tok, manifest



def compare_with_committed(name: str, artifact: dict[str, torch.Tensor] | None, manifest: dict, tol: float = 0.05,
                           model=None) -> dict:
    """A rebuild against the committed build: largest weight difference — of the artifact against the committed one,
    or (a full fine-tune commits no weights) of ``model`` against the cached build of the same recipe, when there is
    one — and each measured metric's change against the committed manifest (within tolerance when
    |Δ| <= tol·max(1, |committed|) or the new value lies inside the committed 95% CI)."""
    from safetensors.torch import load_file

    old = json.loads((artifact_dir(name) / "manifest.json").read_text())
    if artifact is not None and (artifact_dir(name) / "artifact.safetensors").is_file():
        old_t, new_t, against = load_file(str(artifact_dir(name) / "artifact.safetensors")), artifact, "artifact"
    elif model is not None and is_cached(name):
        old_t = {k: v for f in sorted(model_dir(name).glob("*.safetensors")) for k, v in load_file(str(f)).items()}
        new_t, against = dict(model.state_dict()), "cached build"
    else:
        old_t, new_t, against = None, None, None
    if old_t is None:
        diff = None
    elif old_t and set(old_t) <= set(new_t):  # a saved model may omit tied weights
        diff = max(float((old_t[k].float() - new_t[k].float()).abs().max()) for k in old_t)
    else:
        diff = float("inf")
    out = {"weights_compared_with": against, "max_abs_weight_diff": diff,
           "identical_weights": None if diff is None else diff == 0.0, "metrics": {}}
    new_m = (manifest.get("behaviour") or {}).get("metrics", {})
    for k, m in (old.get("behaviour") or {}).get("metrics", {}).items():
        if k in new_m:
            v, c = new_m[k]["value"], m["value"]
            ok = abs(v - c) <= tol * max(1.0, abs(c)) or m["ci"][0] <= v <= m["ci"][1]
            out["metrics"][k] = {"committed": c, "rebuilt": v, "within_tolerance": bool(ok)}
    out["all_within_tolerance"] = all(x["within_tolerance"] for x in out["metrics"].values())
    return out


def measure(name: str, profile: str = "card") -> dict:
    """Measure a built zoo model (cache, else its artifact) on the eval splits and record the behaviour and the
    expectations in its manifests (cache and committed artifact). Lets a build (``--profile none``) and its
    measurement run at different times; the weights are not touched."""
    r = recipe(name)
    folder = ensure(name)
    model, tok = models.load_model(str(folder), dtype="float32", device="cpu")
    behaviour = measure_behaviour(model, tok, name, card_profile(r, profile))
    expectations = check_expectations(r, behaviour)
    for f in (folder / "cnt_zoo.json", artifact_dir(name) / "manifest.json"):
        if f.is_file():
            m = json.loads(f.read_text())
            if m.get("recipe_key") == r.key():
                m.update(behaviour=behaviour, meets_expectations=expectations)
                atomic.write_json(f, m)
                if f.parent == folder and has_record(folder):
                    record_files(folder)  # the manifest is one of the recorded files
    return {"behaviour": behaviour, "meets_expectations": expectations}


def measure_behaviour(model, tok, name: str, profile: str = "full") -> dict:
    from ..evaluate import evaluate

    report = evaluate(model, tok, profile, name=name, progress=False)
    return report.to_dict()


def base_behaviour(base: str, profile: str = "full") -> dict:
    """The unmodified base model's behaviour (cached per profile): the reference for relative expectations."""
    path = ARTIFACTS / "_base" / f"{base}.{profile}.json"
    if path.is_file():
        return json.loads(path.read_text())
    model, tok = models.load_model(base, dtype="float32", device="cpu")
    out = measure_behaviour(model, tok, base, profile)
    atomic.write_json(path, out)
    return out


def check_expectations(r: Recipe, behaviour: dict) -> dict:
    """Each expectation with the measured value (and the base's where relative) and whether it holds."""
    out = {}
    for metric, (op, thr) in r.expect.items():
        value = behaviour["metrics"][metric]["value"]
        ref = base_behaviour(r.base, behaviour["profile"])["metrics"][metric]["value"] if op.endswith("base") else None
        out[metric] = {"value": value, **({"base": ref} if ref is not None else {}), "rule": rule_text(op, thr),
                       "holds": holds(op, thr, value, ref)}
    return out



def save_model(name: str, model, tok, manifest: dict) -> Path:
    """The model's cache folder, written atomically with the record of its files (verified on every load)."""
    out = model_dir(name)
    with atomic.folder(out) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        (tmp / "cnt_zoo.json").write_text(json.dumps(manifest, indent=1) + "\n")
        record_files(tmp)
    return out


def save_artifact(name: str, tensors: dict[str, torch.Tensor] | None, manifest: dict) -> Path:
    from safetensors.torch import save

    out = artifact_dir(name)
    out.mkdir(parents=True, exist_ok=True)
    if tensors is None:
        (out / "artifact.safetensors").unlink(missing_ok=True)
    else:
        atomic.write_bytes(out / "artifact.safetensors", save({k: v.contiguous() for k, v in tensors.items()}))
    atomic.write_json(out / "manifest.json", manifest)
    return out


def reconstruct(name: str) -> Path:
    """Rebuild a zoo model from its committed artifact (seconds) into the cache."""
    from safetensors.torch import load_file

    r = recipe(name)
    folder = artifact_dir(name)
    manifest = json.loads((folder / "manifest.json").read_text())
    tensors = load_file(str(folder / "artifact.safetensors"))
    model, tok = models.load_model(r.base, dtype="float32", device="cpu")
    if r.artifact == "lora":
        model = merge_lora(model, tensors, r.train, manifest["build"]["lora_targets"])
    elif r.artifact == "direction":
        from ..refusal_direction import orthogonalize

        orthogonalize(model, tensors["direction"])
    return save_model(name, model.eval(), tok, {**manifest, "reconstructed_from": str(folder)})


def _of_current_recipe(manifest: Path, name: str) -> bool:
    try:
        m = json.loads(manifest.read_text()) if manifest.is_file() else None
    except ValueError:  # a damaged manifest: not current (the cache entry is rebuilt; a committed one is reported)
        return False
    return isinstance(m, dict) and m.get("recipe_key") == recipe(name).key()


def is_cached(name: str) -> bool:
    return _of_current_recipe(model_dir(name) / "cnt_zoo.json", name) and has_record(model_dir(name))


def _manifest_ok(name: str) -> bool:
    return _of_current_recipe(artifact_dir(name) / "manifest.json", name)


def has_artifact(name: str) -> bool:
    return _manifest_ok(name) and (artifact_dir(name) / "artifact.safetensors").is_file()


def ensure(name: str, *, force: bool = False, allow_build: bool = False, progress: bool = True) -> Path:
    """The local folder of zoo model ``name``: the cached build; else (or with ``force``) a reconstruction from its
    committed artifact (seconds, once); else a build from its recipe (training: minutes on CPU) — only with
    ``allow_build``, otherwise a :class:`~cnt.models.ModelLoadError` that says how to build it."""
    r = recipe(name)
    if is_cached(name) and not force:
        return model_dir(name)
    if has_artifact(name):
        print(f"[cnt] zoo model {name!r}: reconstructing it from its committed artifact into the cache (once) ...",
              flush=True)
        return reconstruct(name)
    if not allow_build:
        raise ModelLoadError(
            f"zoo model {name!r} is not built and has no committed artifact: it has to be trained from its recipe "
            f"({r.base}, several minutes on CPU). Build it with `cnt prepare --allow-build {name}` (or `cnt zoo build "
            f"{name}`, which also measures it), or pass allow_build=True.")
    print(f"[cnt] zoo model {name!r} has no committed artifact; building it from its recipe (several minutes on CPU) "
          "...", flush=True)
    build(name, measure=None, progress=progress)
    return model_dir(name)


def resolve(name_or_path: str, *, allow_build: bool = False) -> str:
    """A zoo model's name: its local folder (:func:`ensure`), verified against the record of its files; any other name
    or path: :func:`cnt.models.resolve`."""
    if name_or_path not in RECIPES:
        return models.resolve(name_or_path)
    models.sweep_cache()
    return str(models.verify_cached(name_or_path, ensure(name_or_path, allow_build=allow_build)))


def load_model(name_or_path: str, dtype=None, device: str | None = None, device_map=None, *,
               allow_build: bool = False):
    """:func:`cnt.models.load_model` that also knows the zoo's names (a zoo model is built only with
    ``allow_build``)."""
    path = resolve(name_or_path, allow_build=allow_build)
    try:
        return models.load_model(path, dtype=dtype, device=device, device_map=device_map)
    except ModelLoadError as e:
        if name_or_path not in RECIPES:
            raise
        raise ModelLoadError(f"zoo model {name_or_path!r}: {e}; rebuild it: `{models.rebuild_command(name_or_path)}`"
                             ) from None


def load_tokenizer(name_or_path: str, *, allow_build: bool = False):
    """:func:`cnt.models.load_tokenizer` that also knows the zoo's names."""
    return models.load_tokenizer(resolve(name_or_path, allow_build=allow_build))
