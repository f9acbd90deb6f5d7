"""The patched point, differentiable in the per-unit amplitudes: the target at ``θ_T + γ ⊙ (θ_D − θ_T)``.

A learned mask needs the loss *at the patched model* and its gradient with respect to one amplitude ``γ_u`` per unit
(MLP neuron, query head, k/v group). Writing ``θ_T + γ·Δθ`` into the weights at every step would copy every projection
the units own; instead :class:`MixedModel` hooks each owned projection and mixes the two models' *activations*, which
is exact because a unit owns whole output features (rows: gate, up, q, k, v) or whole input features (columns: down, o):

* a unit owning output features ``r``:  ``y_r = y_T,r + γ_u·(y_D,r − y_T,r)`` (biases of those rows included);
* a unit owning input features ``c``:   ``y = y_T + W_D·(γ ⊙ x) − W_T·(γ ⊙ x)`` (only the columns' weights move).

No weight is copied: the donor's projections are read in place (memory: the two models, plus activations). Where the
units live comes from ``cnt.arch`` (``features``); this module knows no architecture.

:func:`gamma_gradient` is ``∂L/∂γ`` of a task loss at a patched point, streamed over batches: at ``γ = 0`` (the
target itself) ``−∂L/∂γ_u = −∇_θ L · (θ_D,u − θ_T,u)``, the first-order effect of transferring unit u — attribution —
computed from activations, with no gradient buffer for any weight.

:func:`recomputed` trades compute for memory in both: each decoder block's activations are recomputed in the
backward pass instead of kept (activation checkpointing, in eval mode), so a backward pass holds the blocks' inputs
and one block's activations rather than every block's.
"""

from __future__ import annotations

import functools
from contextlib import contextmanager
from typing import Iterator, Sequence

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from .arch import check_compatible, project, units
from .tasks import Example, streamed_loss


class MixedModel:
    """Context manager: inside it, ``target``'s forward computes the patched point for the amplitudes in
    :attr:`gamma` (``gamma[kind][layer]``, shape ``[n_units]``; set them — leaf tensors with ``requires_grad`` for a
    mask — before the forward pass). Leaving restores the plain target (the hooks are removed; no weight changed)."""

    def __init__(self, donor: nn.Module, target: nn.Module, kinds: Sequence[str] = ("mlp",)):
        check_compatible(donor, target)
        self.donor, self.target, self.kinds = donor, target, tuple(kinds)
        self.gamma: dict[str, list[torch.Tensor]] = {}
        self._sites: dict[tuple[int, str], dict] = {}  # (layer, module path) -> {"side", "modules", [(kind, pos)]}
        for kind in self.kinds:
            rt, rd = units(target, kind), units(donor, kind)
            self.gamma[kind] = [torch.zeros(rt.n_units(layer)) for layer in range(rt.n_layers)]
            for layer in range(rt.n_layers):
                for path, side, pos in rt.features(layer):
                    site = self._sites.setdefault((layer, path), {
                        "side": side, "target": rt.layers[layer].get_submodule(path),
                        "donor": rd.layers[layer].get_submodule(path), "parts": []})
                    if site["side"] != side:
                        raise ValueError(f"layer {layer} {path}: units own both its input and output features")
                    site["parts"].append((kind, pos))
        self._handles: list = []

    def _feature_gamma(self, layer: int, site: dict, n: int, like: torch.Tensor) -> torch.Tensor:
        g = torch.zeros(n, dtype=torch.float32, device=like.device)
        for kind, pos in site["parts"]:
            amp = self.gamma[kind][layer].to(like.device, torch.float32)
            g = g.index_put((pos.flatten().to(like.device),), amp.repeat_interleave(pos.shape[1]), accumulate=True)
        return g.to(like.dtype)

    def _hook(self, layer: int, site: dict):
        def f(module, args, output):
            x = args[0]
            if site["side"] == "out":
                g = self._feature_gamma(layer, site, output.shape[-1], output)
                return output + g * (project(site["donor"], x) - output)
            g = self._feature_gamma(layer, site, x.shape[-1], x)
            xs = x * g
            return output + project(site["donor"], xs, bias=False) - project(module, xs, bias=False)
        return f

    def __enter__(self) -> "MixedModel":
        for (layer, _), site in self._sites.items():
            self._handles.append(site["target"].register_forward_hook(self._hook(layer, site)))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()


@contextmanager
def recomputed(model: nn.Module, enabled: bool = True) -> Iterator[nn.Module]:
    """Inside: every decoder block of ``model`` runs under non-reentrant activation checkpointing (its activations
    recomputed in the backward pass; the same gradients, tested). Unlike ``gradient_checkpointing_enable`` it works
    in eval mode (no dropout switched on) and on every family the adapter knows; forward hooks (the mixing) run again
    in the recomputation. Leaving restores the blocks' own ``forward``. The model must be called without a KV cache."""
    blocks = list(units(model, "mlp").layers) if enabled else []
    for block in blocks:
        block.forward = functools.partial(checkpoint, block.forward, use_reentrant=False)
    try:
        yield model
    finally:
        for block in blocks:
            del block.forward  # the instance attribute: the class's forward again


def gamma_gradient(examples: Sequence[Example], donor: nn.Module, target: nn.Module, tokenizer,
                   gamma: dict[str, list[torch.Tensor]], *, response_tokens: int = 3, batch_size: int = 8,
                   autocast: torch.dtype | None = None, recompute: bool = True,
                   progress: str | None = None) -> dict[str, list[torch.Tensor]]:
    """``∂L/∂γ`` at the patched point ``gamma`` (``gamma[kind][layer]``), ``L`` the mean task loss over ``examples``,
    accumulated batch by batch (memory: the two models and one batch's activations, whatever the number of
    examples; with ``recompute``, one block's activations: :func:`recomputed`). No weight is written and no weight
    gets a gradient. ``progress``: a progress bar's label."""
    mixed = MixedModel(donor, target, list(gamma))
    leaves = {k: [g.detach().float().clone().requires_grad_(True) for g in v] for k, v in gamma.items()}
    mixed.gamma = leaves
    params = list(target.parameters()) + list(donor.parameters())
    req = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(False)
    try:
        with mixed, recomputed(target, recompute):
            streamed_loss(target, tokenizer, examples, response_tokens, batch_size=batch_size, autocast=autocast,
                          backward=True, progress=progress)
    finally:
        for p, r in zip(params, req):
            p.requires_grad_(r)
    return {k: [g.grad.detach().clone() if g.grad is not None else torch.zeros_like(g) for g in v]
            for k, v in leaves.items()}
