"""Per-unit scores (``NeuronScores``) and how a selection is read from them: the best units by count (MLP neurons) or
by a budget in weights across every kind of unit, with the amplitudes a scorer learned. Budgets as fractions of MLP
neurons are checked and turned into a count here, for every caller (:func:`check_budget`, :func:`neurons_for`)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import torch

from .arch import units


def check_budget(budget, *, auto: bool = False, what: str = "budget", error: type[ValueError] = ValueError):
    """``budget`` as a float if it is a fraction of MLP neurons in (0, 1] (or ``"auto"`` where ``auto``: the
    minimal-subset search); otherwise ``error`` (a ValueError) naming ``what``."""
    if auto and budget == "auto":
        return budget
    if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not math.isfinite(budget) \
            or not 0 < budget <= 1:
        raise error(f"{what} must be a fraction of MLP neurons in (0, 1]{' or ' + repr('auto') if auto else ''}, "
                         f"got {budget!r}")
    return float(budget)


def check_budgets(budgets, *, what: str = "budgets") -> tuple[float, ...]:
    """Several budgets (at least one), each a fraction of MLP neurons in (0, 1]."""
    try:
        out = tuple(check_budget(b) for b in budgets)
    except (ValueError, TypeError):
        out = ()
    if not out:
        raise ValueError(f"{what} must be fractions of MLP neurons in (0, 1], got {list(budgets)}")
    return out


def neurons_for(budget: float, n_neurons: int) -> int:
    """How many MLP neurons a budget (a fraction of them) buys: at least one."""
    return max(1, round(budget * n_neurons))

@dataclass
class NeuronScores:
    """Per-unit scores (higher = transfer first): ``scores[layer]`` of shape ``[intermediate]`` for MLP neurons, and
    ``units[kind][layer]`` for the other kinds a scorer covered (``"head"``, ``"kv"``).

    ``costs[kind][layer]``: weights one unit owns (what budgets in weights count). ``per_weight``: rank by score per
    weight (first-order gains, whose sizes scale with the unit) or by the score itself (a learned mask's, already
    chosen under a budget in weights). ``gamma``: per-unit amplitudes the scorer learned, same shape as the scores;
    ``snapshots``: the amplitudes of the sets it kept at given sizes (``{"n_params", "gamma"}``), nested, largest
    first — a selection takes its amplitudes from the smallest snapshot that holds it."""

    scorer: str
    scores: list[torch.Tensor]
    settings: dict = field(default_factory=dict)
    seconds: float = 0.0
    units: dict[str, list[torch.Tensor]] = field(default_factory=dict)
    costs: dict[str, list[int]] = field(default_factory=dict)
    per_weight: bool = True
    gamma: dict[str, list[torch.Tensor]] = field(default_factory=dict)
    snapshots: list[dict] = field(default_factory=list)

    def by_kind(self) -> dict[str, list[torch.Tensor]]:
        return {"mlp": self.scores, **self.units}

    def flat(self) -> torch.Tensor:
        return torch.cat(self.scores)

    def top(self, k: int, exclude: dict[int, torch.Tensor] | None = None) -> dict[int, torch.Tensor]:
        """The ``k`` best MLP neurons as ``{layer: sorted indices}`` (global ranking across layers; ``exclude``
        skipped)."""
        flat = self.flat().clone()
        offsets = [0]
        for s in self.scores:
            offsets.append(offsets[-1] + s.numel())
        if exclude:
            for layer, idx in exclude.items():
                flat[offsets[layer] + idx] = -float("inf")
        k = min(k, int(torch.isfinite(flat).sum()))
        best = torch.topk(flat, k).indices  # topk, not quantile: fine above 2^24 elements
        out: dict[int, list] = {}
        for b in best.tolist():
            layer = next(i for i in range(len(self.scores)) if b < offsets[i + 1])
            out.setdefault(layer, []).append(b - offsets[layer])
        return {layer: torch.tensor(sorted(v)) for layer, v in sorted(out.items())}

    def pick(self, k: int) -> tuple[dict, dict | None]:
        """The units a budget of ``k`` MLP neurons buys: the top ``k`` neurons, or — when the scores also cover heads
        and k/v groups, or carry learned amplitudes — the best units of every kind within the weights of ``k``
        neurons. Returns ``(selection, gamma)`` for :meth:`cnt.transfer.NeuronPatch.extract` (``gamma`` ``None``:
        one global α)."""
        if not self.units and not self.gamma:
            return self.top(k), None
        return self.select(k * self.costs["mlp"][0])

    def _ranked(self):
        """Every unit as flat tensors (kind id, layer, index, cost), best first."""
        kinds, layers, idx, cost, prio = [], [], [], [], []
        for ki, (kind, per_layer) in enumerate(self.by_kind().items()):
            for layer, sc in enumerate(per_layer):
                c = self.costs.get(kind, [1] * len(per_layer))[layer]
                n = sc.numel()
                kinds.append(torch.full((n,), ki))
                layers.append(torch.full((n,), layer))
                idx.append(torch.arange(n))
                cost.append(torch.full((n,), int(c)))
                prio.append(sc.double() / c if self.per_weight else sc.double())
        prio = torch.cat(prio)
        order = torch.argsort(prio, descending=True, stable=True)
        order = order[torch.isfinite(prio[order])]
        return [torch.cat(x)[order] for x in (kinds, layers, idx, cost)]

    def select(self, n_params: int) -> tuple[dict[str, dict[int, torch.Tensor]], dict | None]:
        """The best units whose weights add up to at most ``n_params``, across kinds and layers (a unit too large
        for what is left is skipped, smaller ones after it still fit): ``({kind: {layer: sorted indices}}, gamma)``,
        ``gamma`` the per-unit amplitudes in the same shape, or ``None`` if the scorer learned none."""
        kinds, layers, idx, cost = self._ranked()
        take = torch.zeros(len(cost), dtype=torch.bool)
        left = int(n_params)
        prefix = torch.cumsum(cost, 0) <= left  # the common case: everything up to the budget fits in order
        n_prefix = int(prefix.sum())
        take[:n_prefix] = True
        left -= int(cost[:n_prefix].sum())
        for i in range(n_prefix, len(cost)):  # then smaller units into what is left
            if cost[i] <= left:
                take[i] = True
                left -= int(cost[i])
            if left < int(cost.min()):
                break
        names = list(self.by_kind())
        sel: dict[str, dict[int, list]] = {}
        for k, layer, i in zip(kinds[take].tolist(), layers[take].tolist(), idx[take].tolist()):
            sel.setdefault(names[k], {}).setdefault(layer, []).append(i)
        sel_t = {kind: {layer: torch.tensor(sorted(v)) for layer, v in sorted(d.items())} for kind, d in sel.items()}
        if not self.gamma:
            return sel_t, None
        used = int(cost[take].sum())
        source = self.gamma
        for snap in sorted(self.snapshots, key=lambda s: s["n_params"]):
            if snap["n_params"] >= used:
                source = snap["gamma"]
                break
        gam = {kind: {layer: source[kind][layer][i].float() for layer, i in d.items()} for kind, d in sel_t.items()}
        return sel_t, gam

    def n_params_of(self, selection: dict[str, dict[int, torch.Tensor]]) -> int:
        return sum(self.costs.get(kind, [1] * len(self.by_kind()[kind]))[layer] * len(i)
                   for kind, d in selection.items() for layer, i in d.items())


def unit_costs(model, kinds: Sequence[str]) -> dict[str, list[int]]:
    """Weights per unit, per kind and layer (an MLP neuron of SmolLM2: 1,728; a query head: 73,728)."""
    out = {}
    for kind in kinds:
        r = units(model, kind)
        out[kind] = [r.params_per_unit(layer) for layer in range(r.n_layers)]
    return out
