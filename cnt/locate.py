"""Scoring every MLP neuron (layer × intermediate unit) by how much transferring it moves the target toward the donor.

All scorers share one interface — ``score(task, donor, target) -> NeuronScores`` — and stream statistics over batches
(per-neuron running sums; never ``[prompts × tokens × neurons]`` for all layers).

* ``activation_contrast`` — how differently donor and target write to the residual stream through neuron *i*:
  mean over tokens of ``‖a_D,i·w_D,i − a_T,i·w_T,i‖`` (``a``: the neuron's activation, ``w``: its output column) on
  function prompts, minus the same on utility prompts.
* ``attribution`` — the first-order effect of transferring neuron *i*: ``−∇_θ L_f(target)·(θ_D,i − θ_T,i)``, where
  ``L_f`` is the task's function loss on the target (NLL of the donor's own responses, or a bias margin), minus
  ``λ·max(0, ∇_θ L_u·(θ_D,i − θ_T,i))`` for the utility loss ``L_u`` (NLL of the target's own benign answers), and
  the same for the task's contrast where it has one (benign prompts brought closer to a refusal; ``Task.contrast``).
  Forward and backward run under bf16 autocast (weights and gradients stay in the model's dtype): measured on
  smol-safe -> smol-arith, 48 prompts, the top 0.1 / 0.5 / 2% of neurons agree with float32 on 100 / 99.1 / 99.1%
  (score correlation 0.9999) at 1.6x the speed on 2 CPU cores.
* ``iterative`` — attribution, re-scored on the patched target after each transferred chunk.
* ``learned_mask`` — per-unit amplitudes trained at the patched point and pruned down a schedule of budgets in
  weights (``cnt.masks``): a joint choice, where the scorers above rank each unit alone.

``attribution``, ``iterative`` and ``learned_mask`` also score attention heads and k/v groups
(``kinds=("mlp", "head", "kv")``); ``activation_contrast`` scores MLP neurons only.
"""

from __future__ import annotations

import inspect
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from .arch import UNIT_KINDS, MLPNeurons, check_compatible, units
from .models import autocast_dtype, lean_allocator, model_device
from .masks import learned_mask
from .mixing import gamma_gradient
from .scores import NeuronScores, unit_costs
from .tasks import Example, Task, batches, pair_batch, task_loss, text_batch

__all__ = ["Example", "Task", "task_loss", "NeuronScores", "attribution", "activation_contrast", "iterative",
           "learned_mask", "Scorer", "SCORERS", "register", "kind_scorers", "locate"]


def attribution(task: Task, donor, target, tokenizer, *, kinds: Sequence[str] = ("mlp",), batch_size: int = 2,
                recompute: bool = True, progress: bool = True,
                autocast: torch.dtype | str | None = "auto") -> NeuronScores:
    """First-order gain of transferring each unit, minus a penalty for first-order utility harm (see module doc).
    ``kinds``: the units scored (MLP neurons, and with ``"head"``/``"kv"`` attention heads and k/v groups).
    ``autocast``: the precision of the forward/backward matmuls (``"auto"``: :func:`cnt.models.fast_dtype`, bf16 where
    native; ``None``: the model's own).

    ``∇_θ L·Δθ_u`` is read as ``∂L/∂γ_u`` at ``γ = 0`` of the patched point ``θ_T + γ⊙Δθ``
    (:func:`cnt.mixing.gamma_gradient`): activation-side, streamed over batches, no gradient buffer for any weight
    (memory: the two models and one batch's activations; with ``recompute``, one block's:
    :func:`cnt.mixing.recomputed`)."""
    t0 = time.time()
    autocast = autocast_dtype(autocast, model_device(target))
    fp = check_compatible(donor, target)
    zero = {kind: [torch.zeros(units(target, kind).n_units(layer)) for layer in range(fp.n_layers)] for kind in kinds}
    kw = dict(response_tokens=task.response_tokens, batch_size=batch_size, autocast=autocast, recompute=recompute)
    gain = gamma_gradient(task.function, donor, target, tokenizer, zero, **kw,
                          progress=f"attribution ({task.name})" if progress else None)
    scores = {kind: [-g for g in v] for kind, v in gain.items()}
    for examples, weight, what in ((task.utility, task.utility_weight, "utility"),
                                   (task.contrast, task.contrast_weight, "contrast")):
        if examples and weight:
            harm = gamma_gradient(examples, donor, target, tokenizer, zero, **kw,
                                  progress=f"attribution ({task.name}, {what})" if progress else None)
            scores = {kind: [g - weight * h.clamp(min=0) for g, h in zip(scores[kind], harm[kind])] for kind in kinds}
    scores = {kind: [s.detach().cpu() for s in v] for kind, v in scores.items()}
    return NeuronScores("attribution", scores.pop("mlp", [torch.full((n,), -float("inf"))
                                                          for n in fp.intermediate_sizes]),
                        {"task": task.name, "task_digest": task.digest(), "response_tokens": task.response_tokens,
                         "utility_weight": task.utility_weight, "contrast_weight": task.contrast_weight,
                         "n_contrast": len(task.contrast), "autocast": str(autocast) if autocast else None,
                         "kinds": list(kinds), "batch_size": batch_size, "recompute": recompute},
                        round(time.time() - t0, 2), units=scores, costs=unit_costs(target, kinds))


@torch.no_grad()
def activation_contrast(task: Task, donor, target, tokenizer, *, batch_size: int = 8,
                        progress: bool = True) -> NeuronScores:
    """Mean per-token norm of the difference between donor's and target's writes through each neuron."""
    from tqdm.auto import tqdm

    t0 = time.time()
    check_compatible(donor, target)
    nt, nd = MLPNeurons(target), MLPNeurons(donor)
    L = nt.n_layers
    geo = []
    for layer in range(L):
        idx = torch.arange(nt.intermediate_size(layer))
        wt = nt.read(layer, idx)[nt.slots()[-1].key].float()  # [I, H] output columns
        wd = nd.read(layer, idx)[nd.slots()[-1].key].float()
        geo.append(((wd * wd).sum(1), (wt * wt).sum(1), (wd * wt).sum(1)))

    def mean_contrast(examples) -> list[torch.Tensor]:
        acts: dict[str, dict[int, torch.Tensor]] = {"d": {}, "t": {}}
        sums = [torch.zeros(nt.intermediate_size(i)) for i in range(L)]
        count = 0

        def hook(which, layer):
            def f(module, args):
                acts[which][layer] = args[0].detach().float()
            return f

        handles = [n.mlp_output_module(layer).register_forward_pre_hook(hook(w, layer))
                   for w, n in (("d", nd), ("t", nt)) for layer in range(L)]
        try:
            for chunk in tqdm(list(batches(examples, batch_size)), desc=f"contrast ({task.name})",
                              disable=not progress, leave=False):
                device = model_device(target)
                pairs = [e for e in chunk if e.prompt is not None]
                texts = [t for e in chunk if e.text_pos is not None for t in (e.text_pos, e.text_neg)]
                texts += [e.text for e in chunk if e.text is not None]
                inputs = []
                if pairs:
                    inputs.append(pair_batch(tokenizer, pairs, task.response_tokens, device))
                if texts:
                    inputs.append(text_batch(tokenizer, texts, device))
                for inp, _, mask in inputs:
                    donor(input_ids=inp.to(model_device(donor)), attention_mask=mask.to(model_device(donor)))
                    target(input_ids=inp, attention_mask=mask)
                    m = mask.bool()
                    for layer in range(L):
                        a_d, a_t = acts["d"][layer][m], acts["t"][layer][m]  # [tokens, I]
                        dd, tt, dt = (g.to(a_d.device) for g in geo[layer])
                        sq = a_d ** 2 * dd + a_t ** 2 * tt - 2 * a_d * a_t * dt
                        sums[layer] += sq.clamp(min=0).sqrt().sum(0).cpu()
                    count += int(m.sum())
        finally:
            for h in handles:
                h.remove()
        return [s / max(count, 1) for s in sums]

    f = mean_contrast(task.function)
    u = mean_contrast(task.utility) if task.utility else [torch.zeros_like(x) for x in f]
    scores = [a - task.utility_weight * b for a, b in zip(f, u)]
    return NeuronScores("activation_contrast", scores, {"task": task.name, "task_digest": task.digest(),
                                                        "utility_weight": task.utility_weight},
                        round(time.time() - t0, 2))


def iterative(task: Task, donor, target, tokenizer, *, budget: int, rounds: int = 4, kinds: Sequence[str] = ("mlp",),
              batch_size: int = 8, progress: bool = True) -> NeuronScores:
    """Attribution re-scored on the patched target: ``rounds`` chunks, each the best units per weight within
    ``budget/rounds`` MLP neurons' weight (``kinds``: as for attribution). The returned scores rank chosen units
    first (by round), then the rest by the last round's attribution per weight."""
    from .transfer import NeuronPatch

    t0 = time.time()
    bonus: dict[str, list[torch.Tensor]] | None = None
    patches = []
    last = None
    try:
        for r in range(rounds):
            last = attribution(task, donor, target, tokenizer, kinds=kinds, batch_size=batch_size, progress=progress)
            if bonus is None:
                bonus = {kind: [torch.zeros_like(x) for x in v] for kind, v in last.by_kind().items()}
                per_round = max(1, budget // rounds) * unit_costs(target, ("mlp",))["mlp"][0]  # weights
            for kind, v in last.by_kind().items():  # units already moved cannot be chosen again
                for x, b in zip(v, bonus[kind]):
                    x[b > 0] = -float("inf")
            picked, _ = last.select(per_round)
            if not picked:
                break
            patch = NeuronPatch.extract(donor, target, picked)
            patch.apply(target)
            patches.append(patch)
            for kind, per_layer in picked.items():
                for layer, idx in per_layer.items():
                    bonus[kind][layer][idx] = float(rounds - r)
    finally:
        for p in reversed(patches):
            p.revert(target)
    costs = last.costs
    per_weight = {kind: [x / costs[kind][layer] for layer, x in enumerate(v)] for kind, v in last.by_kind().items()}
    finite = torch.cat([x[torch.isfinite(x)].abs() for v in per_weight.values() for x in v])
    span = max(float(finite.max()) if finite.numel() else 1.0, 1e-30)
    ranked = {kind: [torch.where(b > 0, b, x / (2 * span)) for x, b in zip(v, bonus[kind])]  # chosen (>= 1) first
              for kind, v in per_weight.items()}
    sizes = check_compatible(donor, target).intermediate_sizes
    mlp = ranked.pop("mlp", [torch.full((n,), -float("inf")) for n in sizes])
    return NeuronScores("iterative", mlp, {**last.settings, "rounds": rounds, "budget": budget},
                        round(time.time() - t0, 2), units=ranked, costs=costs, per_weight=False)


@dataclass(frozen=True)
class Scorer:
    """A locator in the registry: its name, the function that scores (``run(task, donor, target, tokenizer,
    **settings) -> NeuronScores``), the kinds of unit it can score and one line that says what it does. Its parameters
    are the keyword arguments ``run`` declares; a setting it does not declare is refused, naming the ones it has."""

    name: str
    run: Callable[..., NeuronScores]
    kinds: tuple[str, ...] = ("mlp",)
    summary: str = ""

    def parameters(self) -> dict[str, object]:
        """The scorer's settings and their defaults (``inspect.Parameter.empty``: required)."""
        sig = inspect.signature(self.run)
        return {n: p.default for n, p in list(sig.parameters.items())[4:] if p.kind is p.KEYWORD_ONLY}

    def __call__(self, task: Task, donor, target, tokenizer, **settings) -> NeuronScores:
        params = self.parameters()
        bad = [k for k in settings.get("kinds", ("mlp",)) if k not in self.kinds]
        if bad:
            raise ValueError(f"scorer {self.name!r} scores {', '.join(self.kinds)} units, not {', '.join(bad)}")
        if "kinds" not in params:  # a scorer of MLP neurons only: kinds=("mlp",) is its one choice
            settings = {k: v for k, v in settings.items() if k != "kinds"}
        unknown = sorted(set(settings) - set(params))
        if unknown:
            raise ValueError(f"scorer {self.name!r}: unknown settings {unknown}; its settings: {', '.join(params)}")
        return self.run(task, donor, target, tokenizer, **settings)


SCORERS: dict[str, Scorer] = {}


def register(scorer: Scorer) -> Scorer:
    """Add a locator to :data:`SCORERS` (the CLI's ``--scorer`` choices, the notebooks' and the runner's)."""
    if scorer.name in SCORERS:
        raise ValueError(f"scorer {scorer.name!r} is already registered")
    SCORERS[scorer.name] = scorer
    return scorer


ALL_KINDS = ("mlp", "head", "kv")
register(Scorer("attribution", attribution, ALL_KINDS, "first-order gain of moving each unit, minus utility harm"))
register(Scorer("activation_contrast", activation_contrast, ("mlp",),
                "how differently donor and target write to the residual stream through each neuron"))
register(Scorer("iterative", iterative, ALL_KINDS, "attribution re-scored on the patched target after each chunk"))
register(Scorer("learned_mask", learned_mask, ALL_KINDS,
                "per-unit amplitudes trained at the patched point, pruned down budgets in weights"))


def kind_scorers() -> tuple[str, ...]:
    """The scorers that also score attention heads and k/v groups."""
    return tuple(n for n, s in SCORERS.items() if set(s.kinds) > {"mlp"})


def check_units(kinds: Sequence[str], scorers: Sequence[str] = ()) -> tuple[str, ...]:
    """``kinds`` as a tuple, checked before any compute: at least one, each a kind of unit the architecture adapters
    know (:data:`cnt.arch.UNIT_KINDS`), and — beyond MLP neurons alone — scored by every one of ``scorers``. A
    ValueError names what was given and what to pass instead. The one check of the CLI, a run's config and the
    pipeline."""
    kinds = tuple(kinds)
    bad = [k for k in kinds if k not in UNIT_KINDS]
    if bad or not kinds:
        raise ValueError(f"unknown unit kinds {bad or list(kinds)}; kinds: {', '.join(UNIT_KINDS)}")
    only_mlp = [s for s in scorers if s not in kind_scorers()]
    if kinds != ("mlp",) and only_mlp:
        raise ValueError(f"scorers {only_mlp} score MLP neurons only; with units {list(kinds)} use "
                         f"{', '.join(kind_scorers())}, or units ['mlp']")
    return kinds


def locate(scorer: str, task: Task, donor, target, tokenizer, **settings) -> NeuronScores:
    """Score every unit with the named scorer (one of :data:`SCORERS`) and its ``settings``."""
    try:
        found = SCORERS[scorer]
    except KeyError:
        raise ValueError(f"unknown scorer {scorer!r}; scorers: {', '.join(SCORERS)}") from None
    with lean_allocator(model_device(target)):  # the peak is what is live, not what earlier steps freed
        return found(task, donor, target, tokenizer, **settings)
