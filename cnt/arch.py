"""Where MLP neurons live, per architecture family.

A *neuron* is one unit of an MLP's intermediate layer: neuron ``k`` of layer ``l`` owns

* gated MLPs (Llama, Mistral, Qwen2/3, Gemma 1/2/3): row ``k`` of ``gate_proj`` and ``up_proj``, column ``k`` of
  ``down_proj`` (with ``gate_up_proj`` fused, as in Phi-3, gate row ``k`` and up row ``I + k``);
* plain MLPs (GPT-2, GPT-J, GPT-NeoX): the ``k``-th output of the input projection (weight and bias) and the ``k``-th input
  of the output projection. GPT-2's ``Conv1D`` stores weights transposed relative to ``nn.Linear``.

Everything architecture-specific is in this file. The rest of the kit sees a neuron as a dict of named slices
(``{"gate": [k, hidden], "up": [k, hidden], "down": [k, hidden]}``), neuron axis first, and an
:class:`ArchFingerprint` that says whether two models can exchange neurons at all.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch
from torch import nn


class UnsupportedArchitectureError(ValueError):
    pass


class IncompatibleModelsError(ValueError):
    pass


@dataclass(frozen=True)
class Slot:
    """Neuron ``k`` of a layer is ``param.select(dim, offset + k)``."""

    key: str
    module: str  # attribute path inside the layer, e.g. "mlp.gate_proj"
    param: str  # "weight" or "bias"
    dim: int
    offset_blocks: int = 0  # fused projections: offset = offset_blocks * intermediate


@dataclass(frozen=True)
class Family:
    name: str
    model_types: tuple[str, ...]
    layers_path: str  # attribute path from the *CausalLM* object to the list of decoder blocks
    slots: tuple[Slot, ...]
    intermediate_module: str  # module whose out_features (or Conv1D nf) is the intermediate size
    attn_out: str  # the attention block's output projection (writes into the residual stream)
    embeddings: str  # the token embedding module, from the *CausalLM* object
    intermediate_blocks: int = 1  # fused gate_up: 2


_GATED = (
    Slot("gate", "mlp.gate_proj", "weight", 0),
    Slot("up", "mlp.up_proj", "weight", 0),
    Slot("down", "mlp.down_proj", "weight", 1),
)

FAMILIES: tuple[Family, ...] = (
    Family("llama", ("llama", "mistral", "qwen2", "qwen3", "olmo", "olmo2", "granite"), "model.layers", _GATED,
           "mlp.up_proj", "self_attn.o_proj", "model.embed_tokens"),
    Family("gemma", ("gemma", "gemma2", "gemma3_text"), "model.layers", _GATED, "mlp.up_proj", "self_attn.o_proj",
           "model.embed_tokens"),
    Family("phi3", ("phi3",), "model.layers",
           (Slot("gate", "mlp.gate_up_proj", "weight", 0, 0), Slot("up", "mlp.gate_up_proj", "weight", 0, 1),
            Slot("down", "mlp.down_proj", "weight", 1)), "mlp.gate_up_proj", "self_attn.o_proj", "model.embed_tokens",
           intermediate_blocks=2),
    Family("gpt2", ("gpt2",), "transformer.h",
           (Slot("in", "mlp.c_fc", "weight", 1), Slot("in_bias", "mlp.c_fc", "bias", 0),
            Slot("out", "mlp.c_proj", "weight", 0)), "mlp.c_fc", "attn.c_proj", "transformer.wte"),
    Family("gptj", ("gptj",), "transformer.h",
           (Slot("in", "mlp.fc_in", "weight", 0), Slot("in_bias", "mlp.fc_in", "bias", 0),
            Slot("out", "mlp.fc_out", "weight", 1)), "mlp.fc_in", "attn.out_proj", "transformer.wte"),
    Family("gpt_neox", ("gpt_neox",), "gpt_neox.layers",
           (Slot("in", "mlp.dense_h_to_4h", "weight", 0), Slot("in_bias", "mlp.dense_h_to_4h", "bias", 0),
            Slot("out", "mlp.dense_4h_to_h", "weight", 1)), "mlp.dense_h_to_4h", "attention.dense",
           "gpt_neox.embed_in"),
)

SUPPORTED_MODEL_TYPES = tuple(t for f in FAMILIES for t in f.model_types)


def _getattr_path(obj, path: str):
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


def family_of(model) -> Family:
    model_type = getattr(model.config, "model_type", None)
    for fam in FAMILIES:
        if model_type in fam.model_types:
            return fam
    raise UnsupportedArchitectureError(
        f"model_type {model_type!r} is not supported; supported model types: {', '.join(SUPPORTED_MODEL_TYPES)}. "
        "Add a Family to cnt/arch.py to support another architecture.")


@dataclass(frozen=True)
class ArchFingerprint:
    """What must match for two models to exchange MLP neurons (independent of dtype and device)."""

    family: str  # the model_type (llama, qwen2, gemma3_text, gpt2, ...): same layout is not the same architecture
    n_layers: int
    hidden_size: int
    intermediate_sizes: tuple[int, ...]  # per layer

    @property
    def n_neurons(self) -> int:
        return sum(self.intermediate_sizes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ArchFingerprint":
        return cls(d["family"], int(d["n_layers"]), int(d["hidden_size"]), tuple(int(x) for x in d["intermediate_sizes"]))

    def __str__(self) -> str:
        inter = set(self.intermediate_sizes)
        inter_s = str(inter.pop()) if len(inter) == 1 else "/".join(map(str, self.intermediate_sizes))
        return f"{self.family}(layers={self.n_layers}, hidden={self.hidden_size}, intermediate={inter_s})"

    def key(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)


class MLPNeurons:
    """Read and write MLP neurons of one model, addressed by ``(layer, indices)``.

    >>> neurons = MLPNeurons(model)
    >>> vals = neurons.read(3, torch.tensor([5, 17]))   # {"gate": [2, H], "up": [2, H], "down": [2, H]}
    >>> neurons.write(3, torch.tensor([5, 17]), vals)    # bit-exact inverse of read
    """

    def __init__(self, model: nn.Module):
        self.model = model
        self.family = family_of(model)
        self.layers = _getattr_path(model, self.family.layers_path)

    # -- shape ---------------------------------------------------------------------------------------------------------
    def intermediate_size(self, layer: int) -> int:
        mod = _getattr_path(self.layers[layer], self.family.intermediate_module)
        w = mod.weight
        n = w.shape[1] if type(mod).__name__ == "Conv1D" else w.shape[0]
        return n // self.family.intermediate_blocks

    @property
    def n_layers(self) -> int:
        return len(self.layers)

    def fingerprint(self) -> ArchFingerprint:
        emb = self.model.get_input_embeddings().weight
        return ArchFingerprint(self.model.config.model_type, self.n_layers, int(emb.shape[1]),
                               tuple(self.intermediate_size(i) for i in range(self.n_layers)))

    def slots(self) -> tuple[Slot, ...]:
        return self.family.slots

    # -- parameters ----------------------------------------------------------------------------------------------------
    def _param(self, layer: int, slot: Slot) -> torch.Tensor | None:
        mod = _getattr_path(self.layers[layer], slot.module)
        return getattr(mod, slot.param, None)

    def _active_slots(self, layer: int) -> Iterator[tuple[Slot, torch.Tensor]]:
        for slot in self.family.slots:
            p = self._param(layer, slot)
            if p is not None:  # e.g. bias=False
                yield slot, p

    def _index(self, layer: int, slot: Slot, idx: torch.Tensor, device) -> torch.Tensor:
        off = slot.offset_blocks * self.intermediate_size(layer)
        return (idx.to(device=device, dtype=torch.long) + off)

    def read(self, layer: int, idx: torch.Tensor | Sequence[int]) -> dict[str, torch.Tensor]:
        """Copies of the slices owned by neurons ``idx`` of ``layer``, neuron axis first."""
        idx = torch.as_tensor(idx, dtype=torch.long)
        out = {}
        for slot, p in self._active_slots(layer):
            sel = p.detach().index_select(slot.dim, self._index(layer, slot, idx, p.device))
            out[slot.key] = sel.movedim(slot.dim, 0).clone()
        return out

    @torch.no_grad()
    def write(self, layer: int, idx: torch.Tensor | Sequence[int], values: dict[str, torch.Tensor]) -> None:
        """Overwrite the slices of neurons ``idx`` in ``layer`` with ``values`` (as returned by :meth:`read`)."""
        idx = torch.as_tensor(idx, dtype=torch.long)
        active = dict((s.key, (s, p)) for s, p in self._active_slots(layer))
        if set(values) != set(active):
            raise ValueError(f"layer {layer}: expected slices {sorted(active)}, got {sorted(values)}")
        for key, (slot, p) in active.items():
            v = values[key].to(device=p.device, dtype=p.dtype).movedim(0, slot.dim)
            p.index_copy_(slot.dim, self._index(layer, slot, idx, p.device), v)

    def param_names(self, layer: int) -> dict[str, str]:
        """Fully qualified parameter name for each slice key of ``layer`` (as in ``model.state_dict()``)."""
        return {s.key: f"{self.family.layers_path}.{layer}.{s.module}.{s.param}" for s, _ in self._active_slots(layer)}

    def params_per_neuron(self, layer: int) -> int:
        """Number of scalar parameters one neuron of ``layer`` owns (e.g. 3·hidden for a gated MLP without biases)."""
        return sum(p.numel() // p.shape[slot.dim] for slot, p in self._active_slots(layer))

    def residual_writers(self) -> list[tuple[str, nn.Module, int]]:
        """Every module that writes into the residual stream, with the axis of its weight that is the hidden
        dimension: the token embeddings, then per layer the attention and MLP output projections.

        (Gemma 2/3 normalise each block's output before adding it, so for them these modules write *through* a norm.)
        """
        emb = _getattr_path(self.model, self.family.embeddings)
        out = [(self.family.embeddings, emb, 1)]
        for i, layer in enumerate(self.layers):
            for path in (self.family.attn_out, self.family.slots[-1].module):
                mod = _getattr_path(layer, path)
                out.append((f"{self.family.layers_path}.{i}.{path}", mod, 1 if type(mod).__name__ == "Conv1D" else 0))
        return out

    def mlp_output_module(self, layer: int) -> nn.Module:
        """The module whose *input* is the neuron activation vector (down_proj / c_proj / fc_out / dense_4h_to_h)."""
        return _getattr_path(self.layers[layer], self.family.slots[-1].module)


def fingerprint(model: nn.Module) -> ArchFingerprint:
    return MLPNeurons(model).fingerprint()


def check_compatible(donor: nn.Module | ArchFingerprint, target: nn.Module | ArchFingerprint) -> ArchFingerprint:
    """Raise :class:`IncompatibleModelsError` unless both have the same fingerprint; return it."""
    fd = donor if isinstance(donor, ArchFingerprint) else fingerprint(donor)
    ft = target if isinstance(target, ArchFingerprint) else fingerprint(target)
    if fd != ft:
        raise IncompatibleModelsError(
            f"donor and target have different architectures: donor {fd} vs target {ft}. CNT transfers neurons only "
            "between models of the same family and shape (e.g. two fine-tunes of one base).")
    return fd


def total_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
