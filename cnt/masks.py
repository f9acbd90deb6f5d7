"""A learned mask: per-unit amplitudes γ ∈ [0, γ_max] trained at the patched point, pruned to each budget in weights.

Grafting (Panigrahi et al. 2023) and Localize-and-Stitch learn one gate per parameter with the task loss evaluated at
the *patched* model; CNT's units are whole neurons and heads, so the gate is per unit: the patched target is
``θ_T + γ ⊙ (θ_D − θ_T)`` (:class:`cnt.mixing.MixedModel`, differentiable in γ), ``γ_u = γ_max·σ(s_u)``.

The loss is the task's (the function's NLL of the donor's own responses, plus ``utility_weight`` × the NLL of the
target's own benign answers, plus ``contrast_weight`` × its contrast where it has one), on seeded minibatches of the
locate split. Sparsity is not left to an L1 weight that
would need tuning per model: the mask is *pruned* to an explicit schedule of sizes in weights —

1. start from every unit at ``γ = init_gamma`` (1: the donor itself, where every unit's joint role is visible);
2. measure importances over ``warmup_steps`` steps (nothing pruned), then descend geometrically to the largest budget in
   ``levels`` over ``descent_steps`` steps, then, level by level, prune to each budget and train ``steps_per_level``
   steps there, keeping a *snapshot* of the amplitudes at each level;
3. after each step remove the units whose removal is estimated to cost least per weight: importance
   ``I_u = −γ_u·∂L/∂γ_u``, the first-order loss increase of setting γ_u to 0, averaged over steps (``ema``). With
   ``integrated=True`` (default) the gradient is taken at a random point ``t·γ``, ``t ~ U(0, 1)``, of the straight path
   from the target to the current patch: over the steps this is a Monte Carlo estimate of integrated gradients, whose
   importances add up to ``L(0) − L(γ)`` — what the patch as a whole achieves — so a unit that matters only together
   with another (it feeds it, past a threshold) is credited where both are strong, whereas the gradient at the full
   patch alone (``integrated=False``) can even call its removal a gain, and at ``t = 0`` it is attribution. During
   warm-up and descent the amplitudes stay at ``init_gamma``; at each level every step also makes a pass at the clean
   patch, which trains them (``losses`` records those). At ``γ = 0`` the gradient is exactly the attribution score
   (:func:`cnt.mixing.gamma_gradient`).

4. with ``verify=True`` (default) every removal is re-measured: the loss on a fixed batch with the chunk removed;
   a chunk that costs more than its share of the patch's gain (``tolerance`` × gain × its share of the active
   weights) is bisected until the units that matter are found, and those are kept while others can go — a greedy
   joint elimination that sees what no gradient does (a unit that only enables another, or is harmful alone).

The result is one nested path: ``NeuronScores`` ranking units by how long they survived, with the snapshots' amplitudes
(``select(n_params)`` takes them from the smallest level that holds the selection).
"""

from __future__ import annotations

import math
import time
from typing import Sequence

import torch

from .arch import check_compatible, total_params
from .mixing import MixedModel, recomputed
from .models import autocast_dtype, is_cuda, model_device
from .scores import NeuronScores, unit_costs
from .tasks import Task, streamed_loss

LEVELS = (0.01, 0.0025, 0.001)  # budgets in fractions of the target's weights (the frontier's)


def _loss(task: Task, target, tokenizer, function, utility, contrast, autocast, micro_batch: int,
          backward: bool) -> float:
    """The task's loss (function + ``utility_weight`` × utility + ``contrast_weight`` × contrast) over these
    examples, ``micro_batch`` examples at a time (:func:`cnt.tasks.streamed_loss`: the whole batch's value and
    gradient, one micro-batch's activations)."""
    kw = dict(batch_size=micro_batch, autocast=autocast, backward=backward)
    total = streamed_loss(target, tokenizer, function, task.response_tokens, **kw)
    for examples, weight in ((utility, task.utility_weight), (contrast, task.contrast_weight)):
        if examples and weight:
            total += streamed_loss(target, tokenizer, examples, task.response_tokens, weight=weight, **kw)
    return total


def default_micro_batch(device, batch_size: int) -> int:
    """How many examples one backward pass of the mask takes: the whole minibatch on a GPU (which otherwise waits on
    kernel launches; still within the 1.5x memory goal), 2 on a CPU (compute-bound there; 2 keeps the peak low).
    Measurements: papers/METHOD.md, "On a CUDA device"; papers/results/bench_gpu.json."""
    return batch_size if is_cuda(device) else 2


def learned_mask(task: Task, donor, target, tokenizer, *, kinds: Sequence[str] = ("mlp",),
                 levels: Sequence[float] = LEVELS, warmup_steps: int = 4, descent_steps: int = 6,
                 steps_per_level: int = 3,
                 gamma_max: float = 4.0, init_gamma: float = 1.0, lr: float = 0.05, ema: float = 0.8,
                 batch_size: int = 8, utility_batch: int = 8, seed: int = 0, integrated: bool = True,
                 verify: bool = True, tolerance: float = 1.0, max_checks: int = 8, check_examples: int = 8,
                 micro_batch: int | None = None, recompute: bool = True,
                 autocast: torch.dtype | str | None = "auto", progress: bool = True) -> NeuronScores:
    """Train and prune per-unit amplitudes down the budgets ``levels`` (fractions of the target's weights, largest
    first); see the module doc. The target's weights are never written. The default schedule (4 warm-up, 6 descent,
    3 steps per level) is the middle of the three measured on SmolLM2 (papers/METHOD.md: 2/3/1, 4/6/3, 8/12/6).
    Each minibatch is backpropagated ``micro_batch`` examples at a time (the same gradient; the activations of one
    micro-batch in memory; ``None``: :func:`default_micro_batch`), with ``recompute`` each block's activations
    recomputed in the backward pass (:func:`cnt.mixing.recomputed`: the same gradient, about a third more compute, a
    block's activations in memory)."""
    from tqdm.auto import tqdm

    t0 = time.time()
    check_compatible(donor, target)
    autocast = autocast_dtype(autocast, model_device(target))  # bf16 only where the hardware has it natively
    micro_batch = default_micro_batch(model_device(target), batch_size) if micro_batch is None else micro_batch
    if not 0 < init_gamma < gamma_max:
        raise ValueError(f"init_gamma must lie in (0, gamma_max={gamma_max}), got {init_gamma}")
    levels = sorted({float(x) for x in levels}, reverse=True)
    if not levels or not all(0 < x < 1 for x in levels):
        raise ValueError(f"levels must be fractions of the weights in (0, 1), got {list(levels)}")
    n_weights = total_params(target)
    costs = unit_costs(target, kinds)
    mixed = MixedModel(donor, target, kinds)
    shapes = [(kind, layer, g.numel()) for kind in kinds for layer, g in enumerate(mixed.gamma[kind])]
    cost = torch.cat([torch.full((n,), float(costs[kind][layer])) for kind, layer, n in shapes]).double()
    n_units = len(cost)
    p0 = init_gamma / gamma_max
    logits = torch.full((n_units,), math.log(p0 / (1 - p0)), requires_grad=True)
    active = torch.ones(n_units, dtype=torch.bool)
    importance = torch.zeros(n_units, dtype=torch.float64)
    pruned_at = torch.full((n_units,), -1, dtype=torch.long)  # the step a unit was removed (-1: survived)
    gamma_at = torch.zeros(n_units)  # its amplitude then
    opt = torch.optim.Adam([logits], lr=lr)
    gen = torch.Generator().manual_seed(seed)
    warm_order = torch.randperm(max(warmup_steps, 1), generator=gen)
    fn, ut = list(task.function), list(task.utility)
    ct = list(task.contrast) if task.contrast_weight else []
    req = [p.requires_grad for p in target.parameters()] + [p.requires_grad for p in donor.parameters()]
    for p in list(target.parameters()) + list(donor.parameters()):
        p.requires_grad_(False)

    def split(flat: torch.Tensor) -> dict[str, list[torch.Tensor]]:
        parts = torch.split(flat, [n for _, _, n in shapes])
        out: dict[str, list[torch.Tensor]] = {kind: [] for kind in kinds}
        for (kind, _, _), part in zip(shapes, parts):
            out[kind].append(part)
        return out

    def amplitudes() -> torch.Tensor:
        return gamma_max * torch.sigmoid(logits) * active

    check = (fn[:check_examples], ut[:check_examples // 2], ct[:check_examples // 2])  # removals re-measured on it
    bonus = torch.zeros(n_units, dtype=torch.float64)  # units whose measured removal cost more than allowed
    empty = torch.empty(0, dtype=torch.long)

    @torch.no_grad()
    def measured(removed: torch.Tensor, gamma: torch.Tensor | None = None) -> float:
        g = amplitudes().detach().clone() if gamma is None else gamma
        g[removed] = 0
        mixed.gamma = split(g)
        return _loss(task, target, tokenizer, *check, autocast, micro_batch, backward=False)

    def drop(ids: torch.Tensor, step: int) -> None:
        g = amplitudes().detach()
        gamma_at[ids], pruned_at[ids] = g[ids], step
        active[ids] = False

    def prune_to(budget: float, step: int) -> None:
        """Remove the cheapest units until the active weights fit ``budget``; with ``verify``, each chunk's removal
        is re-measured on a fixed batch and a chunk that costs more than its share of the gap is split (bisection)
        until the units that matter are found and kept for later (greedy joint elimination)."""
        over = float(cost[active].sum()) - budget
        if over <= 0:
            return
        ids = active.nonzero().flatten()
        order = ids[torch.argsort(importance[ids] / cost[ids] + bonus[ids], stable=True)]  # cheapest to lose first
        if not verify:
            drop(order[: int((torch.cumsum(cost[order], 0) < over).sum()) + 1], step)
            return
        current = measured(empty)
        gap = max(loss_target - current, 1e-3 * abs(loss_target))
        per_weight = tolerance * gap / float(cost[active].sum())
        accepted, refused, pos, checks = [], [], 0, 0
        while over > 0 and pos < len(order):
            chunk = order[pos:][: int((torch.cumsum(cost[order[pos:]], 0) < over).sum()) + 1]
            pos += len(chunk)
            stack = [chunk]
            while stack and over > 0:
                c = stack.pop()
                if checks >= max_checks:  # out of re-measurements for this step: trust the ranking
                    accepted.append(c)
                    over -= float(cost[c].sum())
                    continue
                loss = measured(torch.cat(accepted + [c]))
                checks += 1
                if loss - current <= per_weight * float(cost[c].sum()):
                    accepted.append(c)
                    current, over = loss, over - float(cost[c].sum())
                elif len(c) == 1:
                    refused.append((loss - current, c))
                    bonus[c] += (loss - current) / float(cost[c].sum()) + 1.0
                else:
                    stack += [c[len(c) // 2:], c[: len(c) // 2]]
        for _, c in sorted(refused, key=lambda r: r[0]):  # the schedule holds: what must still go, least harm first
            if over <= 0:
                break
            accepted.append(c)
            over -= float(cost[c].sum())
        drop(torch.cat(accepted) if accepted else empty, step)

    with mixed:
        loss_target = measured(empty, torch.zeros(n_units))
    start = float(cost.sum())
    schedule = [start] * warmup_steps  # importance first measured over the whole path, nothing pruned yet
    schedule += [start * (levels[0] * n_weights / start) ** ((t + 1) / descent_steps) for t in range(descent_steps)]
    descent_steps += warmup_steps
    for lv in levels:
        schedule += [lv * n_weights] * steps_per_level
    snapshots, losses = [], []
    bar = tqdm(total=len(schedule), desc=f"learned mask ({task.name})", disable=not progress, leave=False)
    try:
        with mixed, recomputed(target, recompute):
            for step, budget in enumerate(schedule):
                fb = [fn[i] for i in torch.randperm(len(fn), generator=gen)[:batch_size].tolist()]
                ub = [ut[i] for i in torch.randperm(len(ut), generator=gen)[:utility_batch].tolist()] if ut else []
                cb = [ct[i] for i in torch.randperm(len(ct), generator=gen)[:utility_batch].tolist()] if ct else []
                # importance, at a random point t·γ of the straight path from the target (t = 0) to the current
                # patch (t = 1): Monte Carlo integrated gradients, one t per step
                g = amplitudes().detach()
                if not integrated:
                    t = 1.0
                elif step < warmup_steps:  # a stratified grid over the path, in a seeded order
                    t = (float(warm_order[step]) + 0.5) / warmup_steps
                else:
                    t = float(torch.rand((), generator=gen))
                point = (g * t).requires_grad_(True)
                mixed.gamma = split(point)
                _loss(task, target, tokenizer, fb, ub, cb, autocast, micro_batch, backward=True)
                sample = -(g * point.grad).double()
                if step < warmup_steps:  # a plain mean over the warm-up, then a moving average
                    importance.add_(sample / warmup_steps)
                else:
                    importance.mul_(ema).add_((1 - ema) * sample)
                if step >= descent_steps:  # at the levels: train the amplitudes, at the clean patched point
                    g = amplitudes().detach().requires_grad_(True)
                    mixed.gamma = split(g)
                    loss = _loss(task, target, tokenizer, fb, ub, cb, autocast, micro_batch, backward=True)
                    opt.zero_grad()
                    amplitudes().backward(g.grad)  # through γ = γ_max·σ(s)·active to the logits
                    opt.step()
                    losses.append(round(loss, 4))
                prune_to(budget, step)
                level_end = step + 1 == len(schedule) or (step >= descent_steps and schedule[step + 1] < budget)
                if level_end:
                    snapshots.append({"n_params": int(cost[active].sum()), "level": budget / n_weights,
                                      "gamma": split(amplitudes().detach().clone())})
                bar.update()
                bar.set_postfix(loss=f"{losses[-1]:.3f}" if losses else "-", units=int(active.sum()))
    finally:
        bar.close()
        for p, r in zip(list(target.parameters()) + list(donor.parameters()), req):
            p.requires_grad_(r)
    final = amplitudes().detach()
    gamma_at[active] = final[active]
    pruned_at[active] = len(schedule)
    # rank: by the step a unit was removed (survivors last removed), then by importance within that step
    rank_in_step = torch.zeros(n_units)
    for s in pruned_at.unique().tolist():
        ids = (pruned_at == s).nonzero().flatten()
        order = ids[torch.argsort(importance[ids] / cost[ids], stable=True)]
        rank_in_step[order] = torch.arange(len(order), dtype=torch.float32) / max(len(order), 1)
    priority = pruned_at.float() + rank_in_step
    ranked, gam = split(priority), split(gamma_at)
    settings = {"task": task.name, "task_digest": task.digest(), "response_tokens": task.response_tokens,
                "utility_weight": task.utility_weight, "contrast_weight": task.contrast_weight,
                "n_contrast": len(ct), "kinds": list(kinds), "levels": levels,
                "warmup_steps": warmup_steps, "descent_steps": descent_steps - warmup_steps,
                "steps_per_level": steps_per_level, "gamma_max": gamma_max,
                "init_gamma": init_gamma, "lr": lr, "ema": ema, "batch_size": batch_size,
                "utility_batch": utility_batch, "seed": seed, "integrated": integrated, "verify": verify,
                "tolerance": tolerance, "max_checks": max_checks, "check_examples": check_examples,
                "micro_batch": micro_batch, "recompute": recompute,
                "autocast": str(autocast) if autocast else None,
                "losses": losses}
    mlp = ranked.pop("mlp", None)
    if mlp is None:
        mlp = [torch.full((n,), -float("inf")) for n in check_compatible(donor, target).intermediate_sizes]
    return NeuronScores("learned_mask", mlp, settings, round(time.time() - t0, 2),
                        units=ranked, costs=costs, per_weight=False, gamma=gam, snapshots=snapshots)
