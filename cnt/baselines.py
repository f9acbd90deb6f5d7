"""Baselines: what a researcher would try instead of CNT, behind one interface (a registry, like mergekit's methods).

(Just over 400 lines: eight registered classes, each a few lines over the shared interface.)

Each baseline is a registered :class:`Baseline` (``BASELINES[name]``): it declares its settings (``run``'s keyword
parameters; an unknown setting is refused by name), the grid an application sweeps (:meth:`Baseline.grid`, from a
:class:`Sweep`) and whether it is neuron-level. ``run(donor, target, tokenizer, function, **setting)`` returns a
:class:`Modified` — the modified target (a new model; the inputs are untouched) or a
:class:`~cnt.transfer.NeuronPatch` where it is neuron-level — and the number of parameters it changed. The swept
settings (λ, density, k, layer, α) are chosen on the validation split by the same rule as CNT.

=====================  =================================================================================================
``random``             the same k neurons as CNT would move, drawn uniformly (seeded)
``weight_delta``       the k neurons whose parameters differ most between donor and target (‖θ_D,i − θ_T,i‖; no data)
``linear``             θ_T + λ(θ_D − θ_T) for every parameter (model soup / interpolation)
``task_arithmetic``    θ_T + λ(θ_D − θ_base) with the zoo's common base
``ties``, ``dare``     θ_base + merge([θ_T − θ_base, θ_D − θ_base], weights [1, λ], density) with
                       ``peft.utils.merge_utils`` (TIES: trim, elect sign, disjoint mean; DARE: random drop + rescale,
                       seeded)
``refusal_direction``  difference-of-means refusal direction: orthogonalized out of the weights (removes refusal) or
                       added at one layer as a bias (induces refusal)
``sft``                fine-tune the target on the donor's own training data (the costly route CNT avoids)
=====================  =================================================================================================
"""

from __future__ import annotations

import inspect
import time
from copy import deepcopy
from dataclasses import dataclass, field
from typing import Callable, ClassVar, Sequence

import torch

from .arch import MLPNeurons, check_compatible
from .functions import function_spec
from .transfer import NeuronPatch


@dataclass
class Modified:
    method: str
    setting: dict
    params_changed: int
    seconds: float
    model: object | None = None  # the modified model (when not a patch)
    patch: NeuronPatch | None = None
    info: dict = field(default_factory=dict)

    def materialize(self, target):
        """The modified model: ``model``, or a copy of ``target`` with the patch applied."""
        if self.model is not None:
            return self.model
        m = deepcopy(target)
        self.patch.apply(m)
        return m


# ---------------------------------------------------------------------------------------------------------------------
# neuron-level
# ---------------------------------------------------------------------------------------------------------------------

def random_neurons(donor, target, k: int, seed: int = 0) -> dict[int, torch.Tensor]:
    """``k`` neurons drawn uniformly over all layers (seeded)."""
    fp = check_compatible(donor, target)
    g = torch.Generator().manual_seed(seed)
    flat = torch.randperm(fp.n_neurons, generator=g)[:k]
    offsets = torch.tensor([0, *torch.cumsum(torch.tensor(fp.intermediate_sizes), 0).tolist()])
    out = {}
    for layer in range(fp.n_layers):
        sel = flat[(flat >= offsets[layer]) & (flat < offsets[layer + 1])] - offsets[layer]
        if sel.numel():
            out[layer] = torch.sort(sel).values
    return out


@torch.no_grad()
def weight_delta_scores(donor, target) -> list[torch.Tensor]:
    """Per-neuron ‖θ_D,i − θ_T,i‖ over all the neuron's slices."""
    check_compatible(donor, target)
    nd, nt = MLPNeurons(donor), MLPNeurons(target)
    out = []
    for layer in range(nt.n_layers):
        idx = torch.arange(nt.intermediate_size(layer))
        d, t = nd.read(layer, idx), nt.read(layer, idx)
        out.append(torch.sqrt(sum(((d[k].float() - t[k].float()) ** 2).reshape(len(idx), -1).sum(1) for k in d)))
    return out


def _patch_result(method, donor, target, indices, setting, t0, **prov) -> Modified:
    patch = NeuronPatch.extract(donor, target, indices, provenance={"baseline": method, **prov})
    return Modified(method, setting, patch.n_params, round(time.time() - t0, 2), patch=patch)


def run_random(donor, target, tokenizer=None, function=None, *, k: int, seed: int = 0) -> Modified:
    t0 = time.time()
    return _patch_result("random", donor, target, random_neurons(donor, target, k, seed), {"k": k, "seed": seed}, t0,
                         seed=seed)


def run_weight_delta(donor, target, tokenizer=None, function=None, *, k: int) -> Modified:
    from .locate import NeuronScores

    t0 = time.time()
    scores = NeuronScores("weight_delta", weight_delta_scores(donor, target))
    return _patch_result("weight_delta", donor, target, scores.top(k), {"k": k}, t0)


# ---------------------------------------------------------------------------------------------------------------------
# whole-model merges
# ---------------------------------------------------------------------------------------------------------------------

def _floating(model) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.state_dict().items() if v.is_floating_point()}


@torch.no_grad()
def _merged(target, fn: Callable[[str, torch.Tensor], torch.Tensor | None]) -> tuple[object, int]:
    """A copy of ``target`` with ``param ← fn(name, param)`` (None: unchanged); returns (model, params changed)."""
    out = deepcopy(target)
    changed = 0
    seen = set()
    for name, p in out.state_dict(keep_vars=True).items():
        if not p.is_floating_point() or id(p) in seen:
            continue
        seen.add(id(p))
        new = fn(name, p.detach())
        if new is None:
            continue
        new = new.to(p.dtype)
        changed += int((new != p).sum())
        p.data.copy_(new)
    return out, changed


def run_linear(donor, target, tokenizer=None, function=None, *, lam: float) -> Modified:
    """θ_T + λ(θ_D − θ_T): λ = 0 is the target, λ = 1 the donor (exactly)."""
    t0 = time.time()
    check_compatible(donor, target)
    d = _floating(donor)
    if lam == 1.0:
        model, changed = _merged(target, lambda n, p: d[n])
    else:
        model, changed = _merged(target,
                                 lambda n, p: None if lam == 0 else p.float() + lam * (d[n].float() - p.float()))
    return Modified("linear", {"lambda": lam}, changed, round(time.time() - t0, 2), model=model)


def _require_base(base):
    if base is None:
        raise ValueError("this baseline needs the donor's and target's common base model (base=...)")
    return _floating(base)


def run_task_arithmetic(donor, target, tokenizer=None, function=None, *, lam: float, base=None) -> Modified:
    """θ_T + λ(θ_D − θ_base)."""
    t0 = time.time()
    check_compatible(donor, target)
    b, d = _require_base(base), _floating(donor)
    model, changed = _merged(target, lambda n, p: None if lam == 0 else p.float() + lam * (d[n].float() - b[n].float()))
    return Modified("task_arithmetic", {"lambda": lam}, changed, round(time.time() - t0, 2), model=model)


MERGE_CHUNK = 1 << 22  # entries of a tensor that TIES' elementwise steps take at a time (16 MiB per task vector)


def _ties(task_vectors: list[torch.Tensor], weights: torch.Tensor, density: float) -> torch.Tensor:
    """peft's TIES (``merge_utils.ties``: trim each task vector to its top ``int(density·n)`` magnitudes, elect each
    entry's sign by the trimmed vectors' sum, average the weighted entries that agree with it), with its per-tensor
    top-k read as a magnitude threshold and its elementwise steps run :data:`MERGE_CHUNK` entries at a time — peft's
    own functions on each slice. The same values where no two magnitudes tie at the threshold (there peft keeps an
    arbitrary k of them, this all of them), without peft's transient of ~13× the tensor (8.6 GB on gemma-3-270m's
    262k-token embedding; papers/METHOD.md)."""
    from peft.utils import merge_utils

    if density < 0:
        raise ValueError(f"Density should be >= 0, got {density}")
    flat = [t.reshape(-1) for t in task_vectors]
    n = flat[0].numel()
    k = int(density * n)
    if density >= 1:  # peft prunes nothing
        keep = [None] * len(flat)
    else:  # the k-th largest magnitude of each (none kept when k is 0)
        keep = [float(f.abs().kthvalue(n - k + 1).values) if k else float("inf") for f in flat]
    out = torch.empty(n)
    for s in range(0, n, MERGE_CHUNK):
        parts = [f[s:s + MERGE_CHUNK] for f in flat]
        trimmed = torch.stack([p if v is None else torch.where(p.abs() >= v, p, torch.zeros_like(p))
                               for p, v in zip(parts, keep)])
        sign = merge_utils.calculate_majority_sign_mask(trimmed, method="total")
        weighted = trimmed * merge_utils.reshape_weight_task_tensors(trimmed, weights)
        out[s:s + MERGE_CHUNK] = merge_utils.disjoint_merge(weighted, sign)
    return out.view(task_vectors[0].shape)


def merge_tensor(method: str, base: torch.Tensor, target: torch.Tensor, donor: torch.Tensor, lam: float,
                 density: float) -> torch.Tensor:
    """θ_base + merge([θ_T − θ_base, θ_D − θ_base], weights [1, λ]) with peft's TIES (:func:`_ties`) or DARE (linear)
    math."""
    from peft.utils import merge_utils

    tv = [target.float() - base.float(), donor.float() - base.float()]
    weights = torch.tensor([1.0, float(lam)])
    if method == "ties":
        delta = _ties(tv, weights, density)
    elif method == "dare":
        delta = merge_utils.dare_linear(tv, weights, density)
    else:
        raise ValueError(f"unknown merge {method!r}; use ties or dare")
    return base.float() + delta


def _merge_utils(method: str, donor, target, base, lam: float, density: float, seed: int) -> tuple[object, int]:
    b, d = _require_base(base), _floating(donor)
    gen_state = torch.random.get_rng_state()
    torch.manual_seed(seed)  # DARE drops at random (torch.bernoulli)
    try:
        return _merged(target, lambda name, p: merge_tensor(method, b[name], p, d[name], lam, density))
    finally:
        torch.random.set_rng_state(gen_state)


def run_ties(donor, target, tokenizer=None, function=None, *, lam: float, density: float, base=None,
             seed: int = 0) -> Modified:
    t0 = time.time()
    check_compatible(donor, target)
    model, changed = _merge_utils("ties", donor, target, base, lam, density, seed)
    return Modified("ties", {"lambda": lam, "density": density}, changed, round(time.time() - t0, 2), model=model)


def run_dare(donor, target, tokenizer=None, function=None, *, lam: float, density: float, base=None,
             seed: int = 0) -> Modified:
    t0 = time.time()
    check_compatible(donor, target)
    model, changed = _merge_utils("dare", donor, target, base, lam, density, seed)
    return Modified("dare", {"lambda": lam, "density": density, "seed": seed}, changed, round(time.time() - t0, 2),
                    model=model)


# ---------------------------------------------------------------------------------------------------------------------
# refusal direction and SFT
# ---------------------------------------------------------------------------------------------------------------------

def run_refusal_direction(donor, target, tokenizer, function: str, *, layer: int | None = None, alpha: float = 1.0,
                          seed: int = 0, n: int = 64, layer_stride: int = 2, progress: bool = False) -> Modified:
    """Remove refusal (``compliance``): the target's own difference-of-means direction, chosen on validation, projected
    out of every residual write. The candidates are every ``layer_stride``-th layer in the middle 60% × the last five
    prompt positions, scored with bf16 forward passes; stride 2 halves stride 1's grid (its cost: papers/METHOD.md);
    pass ``layer_stride=1`` for the full grid. Add refusal (``refusal``): the donor's direction ``alpha·r`` added at
    ``layer`` as a bias of that block's attention output (baked into the weights)."""
    from . import data
    from .models import inference_dtype
    from .models import fast_dtype, model_device
    from .refusal_direction import mean_activations, orthogonalize, select_direction

    t0 = time.time()
    check_compatible(donor, target)
    t = data.texts
    h_tr = t(data.load("harmful", "train", seed=seed, limit=n))
    b_tr = t(data.load("benign", "train", seed=seed, limit=n))
    spec = function_spec(function)
    if spec.source != "refusal":
        raise ValueError(f"refusal_direction applies to functions about refusal, not {function!r}")
    model = deepcopy(target)
    if not spec.adds_refusal:  # deleting refusal: ablate the target's own direction
        h_va = t(data.load("harmful", "validation", seed=seed, limit=32))
        b_va = t(data.load("benign", "validation", seed=seed, limit=32))
        choice = select_direction(target, tokenizer, h_tr, b_tr, h_va, b_va, layer_stride=layer_stride,
                                  progress=progress)
        changed = orthogonalize(model, choice.direction)
        return Modified("refusal_direction", {"mode": "ablate", "layer": choice.layer, "position": choice.position},
                        changed, round(time.time() - t0, 2), model=model, info={"candidates": choice.candidates})
    with inference_dtype(donor, fast_dtype(model_device(donor))) as fast:  # as evaluation runs (float32 means)
        mu = mean_activations(fast, tokenizer, h_tr) - mean_activations(fast, tokenizer, b_tr)  # [L+1, P, H]
    neurons = MLPNeurons(model)
    layer = neurons.n_layers // 2 if layer is None else layer
    r = mu[layer, 0]
    attn_out = dict((n_, m) for n_, m, _ in neurons.residual_writers())[
        f"{neurons.adapter.layers_path}.{layer - 1}.{neurons.adapter.attn_out}"] if layer >= 1 else None
    if attn_out is None:
        raise ValueError("layer must be >= 1 (the direction is added after a block's attention)")
    with torch.no_grad():
        bias = alpha * r.to(attn_out.weight.dtype)
        if attn_out.bias is None:
            attn_out.bias = torch.nn.Parameter(bias.to(attn_out.weight.device), requires_grad=False)
        else:
            attn_out.bias.add_(bias.to(attn_out.bias.device))
    return Modified("refusal_direction", {"mode": "add", "layer": layer, "alpha": alpha}, int(r.numel()),
                    round(time.time() - t0, 2), model=model)


def plain_texts(examples: list[dict]) -> list[dict]:
    """The plain-text (language-model) examples of a training set: neither chat pairs nor preferences."""
    return [e for e in examples if "text" in e and "chosen" not in e and "prompt" not in e]


def run_sft(donor, target, tokenizer, function: str | None = None, *, examples: list[dict], config,
            lm_weight: int = 1) -> Modified:
    """Fine-tune (a copy of) the target on the donor's own training data (``examples``, ``config``: e.g. the zoo
    recipe that made the donor). ``lm_weight``: its plain-text examples are seen this many times as often (what keeps
    the language model while a target that starts far from the donor is trained across; papers/METHOD.md, "The SFT
    reference")."""
    from .train import sft

    if lm_weight < 1:
        raise ValueError(f"sft: lm_weight must be >= 1, got {lm_weight}")
    t0 = time.time()
    examples = list(examples) + plain_texts(examples) * (lm_weight - 1)
    model = deepcopy(target)
    model, res = sft(model, tokenizer, examples, config, progress=False)
    changed = sum(p.numel() for p in model.parameters()) if config.method == "full" else res.trainable_params
    return Modified("sft", {"steps": config.steps, "method": config.method, "lr": config.lr, "lm_weight": lm_weight,
                            "n_examples": len(examples)}, changed,
                    round(time.time() - t0, 2), model=model, info={"train_seconds": res.seconds})


# ---------------------------------------------------------------------------------------------------------------------
# the registry
# ---------------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Sweep:
    """What an application sweeps the baselines over (its settings); ``n_neurons`` / ``n_layers``: the target's.
    ``donor_training``: the donor's own training examples and config, when the kit knows them (the zoo's recipe)."""

    budgets: Sequence[float] = (0.01,)  # fractions of MLP neurons
    random_seeds: Sequence[int] = (0,)
    lambdas: Sequence[float] = (0.5, 1.0)
    densities: Sequence[float] = (0.2, 0.5)
    seed: int = 0
    n_neurons: int = 0
    n_layers: int = 0
    donor_training: Callable[[], tuple[list[dict], object]] | None = None


class Baseline:
    """One baseline: ``name``, ``level`` (``"neuron"``: a patch of k MLP neurons, evaluated at every budget;
    ``"model"``: a whole modified model, its setting chosen on validation), ``run`` (its settings are its keyword
    parameters) and ``grid`` (the settings an application sweeps; empty: it does not apply)."""

    name: ClassVar[str]
    level: ClassVar[str] = "model"
    run: ClassVar[Callable[..., Modified]]

    @property
    def parameters(self) -> tuple[str, ...]:
        sig = inspect.signature(type(self).run)
        return tuple(n for n, p in sig.parameters.items() if p.kind is p.KEYWORD_ONLY)

    def grid(self, sweep: Sweep, base, function: str) -> list[dict]:
        return [{}]

    def __call__(self, donor, target, tokenizer=None, function: str | None = None, **setting) -> Modified:
        unknown = sorted(set(setting) - set(self.parameters))
        if unknown:
            raise ValueError(f"baseline {self.name!r} has no setting {', '.join(map(repr, unknown))}; its settings: "
                             f"{', '.join(self.parameters)}")
        return type(self).run(donor, target, tokenizer, function, **setting)


BASELINES: dict[str, Baseline] = {}


def register(cls: type[Baseline]) -> type[Baseline]:
    """Add a :class:`Baseline` subclass to :data:`BASELINES` under its ``name``."""
    BASELINES[cls.name] = cls()
    return cls


@register
class Random(Baseline):
    name, level, run = "random", "neuron", staticmethod(run_random)

    def grid(self, sweep, base, function):
        return [{"k": max(1, round(b * sweep.n_neurons)), "seed": s} for b in sweep.budgets for s in sweep.random_seeds]


@register
class WeightDelta(Baseline):
    name, level, run = "weight_delta", "neuron", staticmethod(run_weight_delta)

    def grid(self, sweep, base, function):
        return [{"k": max(1, round(b * sweep.n_neurons))} for b in sweep.budgets]


@register
class Linear(Baseline):
    name, run = "linear", staticmethod(run_linear)

    def grid(self, sweep, base, function):
        return [{"lam": lam} for lam in sweep.lambdas]


@register
class TaskArithmetic(Baseline):
    name, run = "task_arithmetic", staticmethod(run_task_arithmetic)

    def grid(self, sweep, base, function):
        return [{"lam": lam, "base": base} for lam in sweep.lambdas]


@register
class Ties(Baseline):
    name, run = "ties", staticmethod(run_ties)

    def grid(self, sweep, base, function):
        return [{"lam": lam, "density": d, "base": base, "seed": sweep.seed}
                for lam in sweep.lambdas for d in sweep.densities]


@register
class Dare(Ties):
    name, run = "dare", staticmethod(run_dare)


@register
class RefusalDirection(Baseline):
    name, run = "refusal_direction", staticmethod(run_refusal_direction)

    def grid(self, sweep, base, function):
        spec = function_spec(function)
        if spec.source == "refusal" and not spec.adds_refusal:
            return [{"seed": sweep.seed}]  # layer and position chosen on validation inside
        if spec.source == "refusal":
            n = sweep.n_layers
            layers = sorted({max(1, n // 3), max(1, n // 2), max(1, 2 * n // 3)})
            return [{"seed": sweep.seed, "layer": layer, "alpha": a} for layer in layers for a in (1.0, 2.0)]
        return []


@register
class SFT(Baseline):
    """The donor's own training run, on the target. Where that data holds plain text (the language-model part), its
    weight is a setting chosen on validation like any baseline's (``LM_WEIGHTS``): with fewer steps than the recipe
    and a target that starts on the far side of the function, the recipe's own mix can break the language model."""

    name, run = "sft", staticmethod(run_sft)
    LM_WEIGHTS = (1, 4)

    def grid(self, sweep, base, function):
        if sweep.donor_training is None:
            return []
        examples, config = sweep.donor_training()
        weights = self.LM_WEIGHTS if plain_texts(examples) else (1,)
        return [{"examples": examples, "config": config, "lm_weight": w} for w in weights]


def run(method: str, donor, target, tokenizer=None, function: str | None = None, **setting) -> Modified:
    """Run baseline ``method`` (a name in :data:`BASELINES`) with ``setting`` (its declared settings only)."""
    try:
        baseline = BASELINES[method]
    except KeyError:
        raise ValueError(f"unknown baseline {method!r}; baselines: {', '.join(BASELINES)}") from None
    return baseline(donor, target, tokenizer, function, **setting)
