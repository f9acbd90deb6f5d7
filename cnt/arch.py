"""Where MLP neurons and attention heads live, per architecture (one :class:`ArchAdapter` per layout).

(Over 400 lines on purpose: the adapter table and the two unit readers it drives are one piece of knowledge — where
units live — and a new architecture is one table entry here.)

A *neuron* is one unit of an MLP's intermediate layer: neuron ``k`` of layer ``l`` owns

* gated MLPs (Llama, Mistral, Qwen2/3, Gemma 1/2/3): row ``k`` of ``gate_proj`` and ``up_proj`` (and entry ``k`` of
  their biases, where ``mlp_bias=True``), column ``k`` of ``down_proj`` (with ``gate_up_proj`` fused, as in Phi-3, gate
  row ``k`` and up row ``I + k``);
* plain MLPs (GPT-2, GPT-J, GPT-NeoX): the ``k``-th output of the input projection (weight and bias) and the ``k``-th
  input of the output projection. GPT-2's ``Conv1D`` stores weights transposed relative to ``nn.Linear``.

Attention is cut into two more kinds of unit (:class:`AttentionUnits`), read from each model's config:

* ``head`` — query head ``h`` owns its ``head_dim`` rows of the query projection (and their bias) and its ``head_dim``
  columns of the attention output projection: what it attends *with* and what it writes back.
* ``kv`` — key/value group ``g`` owns its rows of the key and value projections (and their biases). With grouped-query
  attention (Llama 3, Qwen2, Gemma 3, SmolLM2: ``num_key_value_heads < num_attention_heads``) one k/v group serves
  ``n_heads / n_kv_heads`` query heads, so it is a unit of its own: transferring a query head keeps the target's keys
  and values, and transferring a k/v group changes what *every* query head of the group reads. Without GQA (GPT-2,
  GPT-J, GPT-NeoX) group ``h`` is head ``h``'s own keys and values.

Parameters shared by all heads (Gemma 3's ``q_norm``/``k_norm`` over ``head_dim``, the output projection's bias) belong
to no unit and always stay the target's. Fused projections are split here: Phi-3's ``qkv_proj`` (q, then k, then v),
GPT-2's ``c_attn`` (``Conv1D``: q | k | v along its output axis), GPT-NeoX's ``query_key_value`` (per head q, k, v
interleaved: head ``h`` is rows ``3·h·d … 3·(h+1)·d``).

Everything architecture-specific is in this file. The rest of the kit sees a unit as a dict of named slices
(``{"gate": [k, hidden], "up": [k, hidden], "down": [k, hidden]}``, or ``{"q": [k, head_dim, hidden], "o": ...}``),
unit axis first, and an :class:`ArchFingerprint` that says whether two models can exchange units at all.
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
class HeadSlot:
    """Unit ``u`` (a query head or a k/v group) of a layer owns ``head_dim`` consecutive entries of ``param`` along
    ``dim``, starting at ``(base[0]·n_heads + base[1]·n_kv_heads + base[2] + stride·u)·head_dim``."""

    key: str
    unit: str  # "head" or "kv"
    module: str
    param: str
    dim: int
    base: tuple[int, int, int] = (0, 0, 0)
    stride: int = 1


def _separate_qkvo(q: str, k: str, v: str, o: str, *, biases: bool = True) -> tuple[HeadSlot, ...]:
    slots = [HeadSlot("q", "head", q, "weight", 0), HeadSlot("o", "head", o, "weight", 1),
             HeadSlot("k", "kv", k, "weight", 0), HeadSlot("v", "kv", v, "weight", 0)]
    if biases:  # Qwen2 has q/k/v biases; absent biases are skipped when read
        slots += [HeadSlot("q_bias", "head", q, "bias", 0), HeadSlot("k_bias", "kv", k, "bias", 0),
                  HeadSlot("v_bias", "kv", v, "bias", 0)]
    return tuple(slots)


_LLAMA_ATTN = _separate_qkvo("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")
_PHI3_ATTN = (HeadSlot("q", "head", "self_attn.qkv_proj", "weight", 0),
              HeadSlot("o", "head", "self_attn.o_proj", "weight", 1),
              HeadSlot("k", "kv", "self_attn.qkv_proj", "weight", 0, (1, 0, 0)),
              HeadSlot("v", "kv", "self_attn.qkv_proj", "weight", 0, (1, 1, 0)))
_GPT2_ATTN = (HeadSlot("q", "head", "attn.c_attn", "weight", 1), HeadSlot("q_bias", "head", "attn.c_attn", "bias", 0),
              HeadSlot("o", "head", "attn.c_proj", "weight", 0),
              HeadSlot("k", "kv", "attn.c_attn", "weight", 1, (1, 0, 0)),
              HeadSlot("k_bias", "kv", "attn.c_attn", "bias", 0, (1, 0, 0)),
              HeadSlot("v", "kv", "attn.c_attn", "weight", 1, (2, 0, 0)),
              HeadSlot("v_bias", "kv", "attn.c_attn", "bias", 0, (2, 0, 0)))
_NEOX_ATTN = tuple(HeadSlot(key, unit, "attention.query_key_value", param, 0, (0, 0, j), 3)
                   for j, (key, unit) in enumerate((("q", "head"), ("k", "kv"), ("v", "kv")))
                   for param in ("weight", "bias")) + (HeadSlot("o", "head", "attention.dense", "weight", 1),)
_NEOX_ATTN = tuple(dataclasses.replace(s, key=s.key + "_bias") if s.param == "bias" else s for s in _NEOX_ATTN)


@dataclass(frozen=True)
class ArchAdapter:
    """Where one architecture keeps its units: the decoder blocks, each MLP neuron's slices (slots) and, where mapped,
    each attention head's and k/v group's (attn_slots). One adapter serves every ``model_type`` listed."""

    name: str
    model_types: tuple[str, ...]
    layers_path: str  # attribute path from the *CausalLM* object to the list of decoder blocks
    slots: tuple[Slot, ...]
    intermediate_module: str  # module whose out_features (or Conv1D nf) is the intermediate size
    attn_out: str  # the attention block's output projection (writes into the residual stream)
    embeddings: str  # the token embedding module, from the *CausalLM* object
    decoder: str  # the module whose ``last_hidden_state`` the output head reads, from the *CausalLM* object
    intermediate_blocks: int = 1  # fused gate_up: 2
    attn_slots: tuple[HeadSlot, ...] = ()  # where query heads and k/v groups live (empty: no attention units)


_GATED = (
    Slot("gate", "mlp.gate_proj", "weight", 0),
    Slot("up", "mlp.up_proj", "weight", 0),
    Slot("gate_bias", "mlp.gate_proj", "bias", 0),  # Llama's mlp_bias=True: each neuron owns its gate and up bias;
    Slot("up_bias", "mlp.up_proj", "bias", 0),  # absent biases are skipped (down_proj's bias belongs to no neuron)
    Slot("down", "mlp.down_proj", "weight", 1),
)

ADAPTERS: tuple[ArchAdapter, ...] = (
    ArchAdapter("llama", ("llama", "mistral", "qwen2", "qwen3", "olmo", "olmo2", "granite"), "model.layers", _GATED,
           "mlp.up_proj", "self_attn.o_proj", "model.embed_tokens", "model", attn_slots=_LLAMA_ATTN),
    ArchAdapter("gemma", ("gemma", "gemma2", "gemma3_text"), "model.layers", _GATED, "mlp.up_proj", "self_attn.o_proj",
           "model.embed_tokens", "model", attn_slots=_LLAMA_ATTN),
    ArchAdapter("phi3", ("phi3",), "model.layers",
           (Slot("gate", "mlp.gate_up_proj", "weight", 0, 0), Slot("up", "mlp.gate_up_proj", "weight", 0, 1),
            Slot("gate_bias", "mlp.gate_up_proj", "bias", 0, 0), Slot("up_bias", "mlp.gate_up_proj", "bias", 0, 1),
            Slot("down", "mlp.down_proj", "weight", 1)), "mlp.gate_up_proj", "self_attn.o_proj", "model.embed_tokens",
           "model", intermediate_blocks=2, attn_slots=_PHI3_ATTN),
    ArchAdapter("gpt2", ("gpt2",), "transformer.h",
           (Slot("in", "mlp.c_fc", "weight", 1), Slot("in_bias", "mlp.c_fc", "bias", 0),
            Slot("out", "mlp.c_proj", "weight", 0)), "mlp.c_fc", "attn.c_proj", "transformer.wte",
           "transformer", attn_slots=_GPT2_ATTN),
    ArchAdapter("gptj", ("gptj",), "transformer.h",
           (Slot("in", "mlp.fc_in", "weight", 0), Slot("in_bias", "mlp.fc_in", "bias", 0),
            Slot("out", "mlp.fc_out", "weight", 1)), "mlp.fc_in", "attn.out_proj", "transformer.wte",
           "transformer",
           attn_slots=_separate_qkvo("attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.out_proj", biases=False)),
    ArchAdapter("gpt_neox", ("gpt_neox",), "gpt_neox.layers",
           (Slot("in", "mlp.dense_h_to_4h", "weight", 0), Slot("in_bias", "mlp.dense_h_to_4h", "bias", 0),
            Slot("out", "mlp.dense_4h_to_h", "weight", 1)), "mlp.dense_h_to_4h", "attention.dense",
           "gpt_neox.embed_in", "gpt_neox", attn_slots=_NEOX_ATTN),
)
UNIT_KINDS = ("mlp", "head", "kv")  # MLP neurons, query heads, key/value groups

SUPPORTED_MODEL_TYPES = tuple(t for a in ADAPTERS for t in a.model_types)


def _getattr_path(obj, path: str):
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


def adapter_of(model) -> ArchAdapter:
    """The architecture adapter of a model, by its ``config.model_type``."""
    model_type = getattr(model.config, "model_type", None)
    for adapter in ADAPTERS:
        if model_type in adapter.model_types:
            return adapter
    raise UnsupportedArchitectureError(
        f"model_type {model_type!r} is not supported; supported model types: {', '.join(SUPPORTED_MODEL_TYPES)}. "
        "Add an ArchAdapter to cnt/arch.py to support another architecture.")


def output_head(model) -> tuple[nn.Module, nn.Linear] | None:
    """``(decoder, head)`` of a causal LM whose logits are exactly ``head(decoder(...).last_hidden_state)`` — a
    bias-free projection, no logit scale or soft-capping (Llama, Qwen2, Gemma 3, GPT-2, GPT-NeoX) — so a caller may
    apply the head to the positions it needs, a slice of the vocabulary at a time; None where the model's own forward
    must make the logits (GPT-J's head has a bias, Gemma 2 soft-caps, Granite scales; an unknown architecture; a
    head that accelerate's hooks place or load — ``device_map`` dispatch, offloading — since reading its weight
    directly would bypass them)."""
    try:
        adapter = adapter_of(model)
    except UnsupportedArchitectureError:
        return None
    head, cfg = model.get_output_embeddings(), model.config
    if not isinstance(head, nn.Linear) or head.bias is not None or hasattr(head, "_hf_hook"):
        return None
    if getattr(cfg, "final_logit_softcapping", None) is not None or getattr(cfg, "logits_scaling", 1.0) != 1.0:
        return None
    return _getattr_path(model, adapter.decoder), head


@dataclass(frozen=True)
class ArchFingerprint:
    """What must match for two models to exchange units (independent of dtype and device)."""

    model_type: str  # llama, qwen2, gemma3_text, gpt2, ...: the same layout is not the same architecture
    n_layers: int
    hidden_size: int
    intermediate_sizes: tuple[int, ...]  # per layer
    attention: tuple[int, int, int] | None = None  # (n_heads, n_kv_heads, head_dim); None: no attention units known

    @property
    def n_neurons(self) -> int:
        return sum(self.intermediate_sizes)

    def n_units(self, kind: str) -> int:
        """Units of one kind in the whole model (MLP neurons, query heads or k/v groups)."""
        if kind == "mlp":
            return self.n_neurons
        if self.attention is None:
            raise UnsupportedArchitectureError(f"{self.model_type}: no attention units are known for this architecture")
        return self.n_layers * self.attention[0 if kind == "head" else 1]

    def mlp_only(self) -> "ArchFingerprint":
        """The fingerprint without its attention layout (what patches of format version 1 recorded)."""
        return dataclasses.replace(self, attention=None)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        if self.attention is None:
            del d["attention"]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "ArchFingerprint":
        att = d.get("attention")
        model_type = d["model_type"] if "model_type" in d else d["family"]  # "family": what files before 0.2 wrote
        return cls(model_type, int(d["n_layers"]), int(d["hidden_size"]),
                   tuple(int(x) for x in d["intermediate_sizes"]),
                   tuple(int(x) for x in att) if att is not None else None)

    def __str__(self) -> str:
        inter = set(self.intermediate_sizes)
        inter_s = str(inter.pop()) if len(inter) == 1 else "/".join(map(str, self.intermediate_sizes))
        att = "" if self.attention is None else \
            f", heads={self.attention[0]}, kv_heads={self.attention[1]}, head_dim={self.attention[2]}"
        return f"{self.model_type}(layers={self.n_layers}, hidden={self.hidden_size}, intermediate={inter_s}{att})"

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
        self.adapter = adapter_of(model)
        self.layers = _getattr_path(model, self.adapter.layers_path)

    # -- shape ---------------------------------------------------------------------------------------------------------
    def intermediate_size(self, layer: int) -> int:
        mod = _getattr_path(self.layers[layer], self.adapter.intermediate_module)
        w = mod.weight
        n = w.shape[1] if type(mod).__name__ == "Conv1D" else w.shape[0]
        return n // self.adapter.intermediate_blocks

    @property
    def n_layers(self) -> int:
        return len(self.layers)

    def fingerprint(self) -> ArchFingerprint:
        emb = self.model.get_input_embeddings().weight
        try:  # MLP neurons stay usable on a model whose attention layout this adapter does not know
            layout = AttentionUnits(self.model, "head").layout if self.adapter.attn_slots else None
        except UnsupportedArchitectureError:
            layout = None
        return ArchFingerprint(self.model.config.model_type, self.n_layers, int(emb.shape[1]),
                               tuple(self.intermediate_size(i) for i in range(self.n_layers)), layout)

    def slots(self) -> tuple[Slot, ...]:
        return self.adapter.slots

    # -- parameters ----------------------------------------------------------------------------------------------------
    def _param(self, layer: int, slot: Slot) -> torch.Tensor | None:
        mod = _getattr_path(self.layers[layer], slot.module)
        return getattr(mod, slot.param, None)

    def _active_slots(self, layer: int) -> Iterator[tuple[Slot, torch.Tensor]]:
        for slot in self.adapter.slots:
            p = self._param(layer, slot)
            if p is not None:  # e.g. bias=False
                yield slot, p

    def _index(self, layer: int, slot: Slot, idx: torch.Tensor, device) -> torch.Tensor:
        off = slot.offset_blocks * self.intermediate_size(layer)
        return (idx.to(device=device, dtype=torch.long) + off)

    def read(self, layer: int, idx: torch.Tensor | Sequence[int], *, grad: bool = False) -> dict[str, torch.Tensor]:
        """Copies of the slices owned by neurons ``idx`` of ``layer``, neuron axis first (``grad=True``: the same
        slices of the parameters' ``.grad``, where there is one)."""
        idx = torch.as_tensor(idx, dtype=torch.long)
        out = {}
        for slot, p in self._active_slots(layer):
            src = p.grad if grad else p.detach()
            if src is None:
                continue
            sel = src.index_select(slot.dim, self._index(layer, slot, idx, p.device))
            out[slot.key] = sel.movedim(slot.dim, 0).clone()
        return out

    def features(self, layer: int) -> list[tuple[str, str, torch.Tensor]]:
        """Where each neuron of ``layer`` sits in the projections it owns, for code that acts on activations rather
        than weights: ``(module path in the layer, "out" | "in", positions [n_units, width])`` per projection, where
        "out" means the unit owns those *output* features (rows of a Linear) and "in" those *input* features."""
        idx = torch.arange(self.intermediate_size(layer))
        out = []
        for slot, p in self._active_slots(layer):
            if slot.param == "weight":
                out.append((slot.module, _side(_getattr_path(self.layers[layer], slot.module), slot.dim),
                            self._index(layer, slot, idx, "cpu")[:, None]))
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
        return {s.key: f"{self.adapter.layers_path}.{layer}.{s.module}.{s.param}" for s, _ in self._active_slots(layer)}

    def params_per_neuron(self, layer: int) -> int:
        """Number of scalar parameters one neuron of ``layer`` owns (e.g. 3·hidden for a gated MLP without biases)."""
        return sum(p.numel() // p.shape[slot.dim] for slot, p in self._active_slots(layer))

    def parameters(self, layer: int) -> list[torch.Tensor]:
        """The parameters the neurons of ``layer`` own slices of."""
        return [p for _, p in self._active_slots(layer)]

    kind = "mlp"
    n_units = intermediate_size  # the interface every kind of unit shares (see AttentionUnits)
    params_per_unit = params_per_neuron

    def residual_writers(self) -> list[tuple[str, nn.Module, int]]:
        """Every module that writes into the residual stream, with the axis of its weight that is the hidden
        dimension: the token embeddings, then per layer the attention and MLP output projections.

        (Gemma 2/3 normalise each block's output before adding it, so for them these modules write *through* a norm.)
        """
        emb = _getattr_path(self.model, self.adapter.embeddings)
        out = [(self.adapter.embeddings, emb, 1)]
        for i, layer in enumerate(self.layers):
            for path in (self.adapter.attn_out, self.adapter.slots[-1].module):
                mod = _getattr_path(layer, path)
                out.append((f"{self.adapter.layers_path}.{i}.{path}", mod, 1 if type(mod).__name__ == "Conv1D" else 0))
        return out

    def mlp_output_module(self, layer: int) -> nn.Module:
        """The module whose *input* is the neuron activation vector (down_proj / c_proj / fc_out / dense_4h_to_h)."""
        return _getattr_path(self.layers[layer], self.adapter.slots[-1].module)


class AttentionUnits:
    """Read and write one kind of attention unit — query heads (``kind="head"``) or key/value groups (``"kv"``) — of
    one model, addressed by ``(layer, indices)``, with the same interface as :class:`MLPNeurons`.

    ``read(layer, idx)`` returns ``{"q": [k, head_dim, hidden], "o": [k, head_dim, hidden], ...}`` (unit axis first,
    then the unit's ``head_dim`` rows or columns, each moved to the front of its parameter's axis); ``write`` is its
    bit-exact inverse. The numbers of heads come from the config and are checked against every layer's projections,
    so a layout this adapter does not know is refused before anything is read.
    """

    def __init__(self, model: nn.Module, kind: str = "head"):
        if kind not in ("head", "kv"):
            raise ValueError(f"attention unit kind must be 'head' or 'kv', got {kind!r}")
        self.model, self.kind = model, kind
        self.adapter = adapter_of(model)
        if not self.adapter.attn_slots:
            raise UnsupportedArchitectureError(
                f"{self.adapter.name}: attention units are not mapped for this architecture; use MLP neurons only, or "
                "add attn_slots to its ArchAdapter in cnt/arch.py")
        self.layers = _getattr_path(model, self.adapter.layers_path)
        cfg = model.config
        n_heads = int(cfg.num_attention_heads)
        n_kv = int(getattr(cfg, "num_key_value_heads", None) or n_heads)
        head_dim = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // n_heads)
        if n_heads % n_kv:
            raise UnsupportedArchitectureError(f"{n_heads} query heads do not split into {n_kv} key/value groups")
        self.layout = (n_heads, n_kv, head_dim)
        self.slots = tuple(s for s in self.adapter.attn_slots if s.unit == kind)
        owned: dict[tuple[str, str], int] = {}  # entries each projection's units tile, by the config
        for slot in self.adapter.attn_slots:
            owned[(slot.module, slot.param)] = owned.get((slot.module, slot.param), 0) + \
                (n_heads if slot.unit == "head" else n_kv) * head_dim
        for layer in range(len(self.layers)):  # the layout must tile every projection exactly, or nothing is read
            for slot in self.adapter.attn_slots:
                p = self._param(layer, slot)
                if p is not None and p.shape[slot.dim] != owned[(slot.module, slot.param)]:
                    raise UnsupportedArchitectureError(
                        f"layer {layer}: {slot.module}.{slot.param} has {p.shape[slot.dim]} entries along axis "
                        f"{slot.dim}, but the config's attention layout (heads={n_heads}, kv_heads={n_kv}, "
                        f"head_dim={head_dim}) tiles {owned[(slot.module, slot.param)]}: this head layout is not "
                        "supported (refused before anything is read)")

    @property
    def n_layers(self) -> int:
        return len(self.layers)

    def n_units(self, layer: int = 0) -> int:
        return self.layout[0] if self.kind == "head" else self.layout[1]

    def group_of(self, head: int) -> int:
        """The k/v group query head ``head`` reads (GQA: ``n_heads / n_kv_heads`` consecutive heads share one)."""
        return head // (self.layout[0] // self.layout[1])

    def _start(self, slot: HeadSlot) -> int:
        n_heads, n_kv, d = self.layout
        return (slot.base[0] * n_heads + slot.base[1] * n_kv + slot.base[2]) * d

    def _param(self, layer: int, slot: HeadSlot) -> torch.Tensor | None:
        return getattr(_getattr_path(self.layers[layer], slot.module), slot.param, None)

    def _active_slots(self, layer: int) -> Iterator[tuple[HeadSlot, torch.Tensor]]:
        for slot in self.slots:
            p = self._param(layer, slot)
            if p is not None:
                yield slot, p

    def _index(self, slot: HeadSlot, idx: torch.Tensor, device) -> torch.Tensor:
        d = self.layout[2]
        rows = self._start(slot) + slot.stride * d * idx.to(torch.long)[:, None] + torch.arange(d)[None, :]
        return rows.flatten().to(device)

    def read(self, layer: int, idx: torch.Tensor | Sequence[int], *, grad: bool = False) -> dict[str, torch.Tensor]:
        idx = torch.as_tensor(idx, dtype=torch.long).flatten()
        d = self.layout[2]
        out = {}
        for slot, p in self._active_slots(layer):
            src = p.grad if grad else p.detach()
            if src is None:
                continue
            sel = src.index_select(slot.dim, self._index(slot, idx, p.device)).movedim(slot.dim, 0)
            out[slot.key] = sel.reshape(len(idx), d, *sel.shape[1:]).clone()
        return out

    def features(self, layer: int) -> list[tuple[str, str, torch.Tensor]]:
        """As :meth:`MLPNeurons.features`: each unit's ``head_dim`` output (q, k, v) or input (o) features."""
        idx = torch.arange(self.n_units(layer))
        out = []
        for slot, p in self._active_slots(layer):
            if slot.param == "weight":
                out.append((slot.module, _side(_getattr_path(self.layers[layer], slot.module), slot.dim),
                            self._index(slot, idx, "cpu").view(len(idx), -1)))
        return out

    def parameters(self, layer: int) -> list[torch.Tensor]:
        return [p for _, p in self._active_slots(layer)]

    @torch.no_grad()
    def write(self, layer: int, idx: torch.Tensor | Sequence[int], values: dict[str, torch.Tensor]) -> None:
        idx = torch.as_tensor(idx, dtype=torch.long).flatten()
        active = {s.key: (s, p) for s, p in self._active_slots(layer)}
        if set(values) != set(active):
            raise ValueError(f"layer {layer}: expected {self.kind} slices {sorted(active)}, got {sorted(values)}")
        for key, (slot, p) in active.items():
            v = values[key].to(device=p.device, dtype=p.dtype)
            v = v.reshape(v.shape[0] * v.shape[1], *v.shape[2:]).movedim(0, slot.dim)
            p.index_copy_(slot.dim, self._index(slot, idx, p.device), v)

    def param_names(self, layer: int) -> dict[str, str]:
        return {s.key: f"{self.adapter.layers_path}.{layer}.{s.module}.{s.param}" for s, _ in self._active_slots(layer)}

    def params_per_unit(self, layer: int) -> int:
        d = self.layout[2]
        return sum(d * (p.numel() // p.shape[slot.dim]) for slot, p in self._active_slots(layer))


def _side(module: nn.Module, dim: int) -> str:
    """Whether axis ``dim`` of ``module.weight`` indexes its output ("out") or input ("in") features."""
    conv1d = type(module).__name__ == "Conv1D"  # GPT-2: weight [in, out]
    return "out" if (dim == 1) == conv1d else "in"


def project(module: nn.Module, x: torch.Tensor, bias: bool = True) -> torch.Tensor:
    """``module``'s affine map applied to ``x`` (without its bias if ``bias=False``): ``nn.Linear`` and GPT-2's
    transposed ``Conv1D`` alike."""
    w = module.weight
    b = getattr(module, "bias", None) if bias else None
    if type(module).__name__ == "Conv1D":
        y = x @ w.to(x.dtype)
        return y if b is None else y + b.to(y.dtype)
    return torch.nn.functional.linear(x, w.to(x.dtype), None if b is None else b.to(x.dtype))


def units(model: nn.Module, kind: str) -> "MLPNeurons | AttentionUnits":
    """The reader/writer of one kind of unit (``"mlp"``, ``"head"`` or ``"kv"``; see :data:`UNIT_KINDS`)."""
    if kind == "mlp":
        return MLPNeurons(model)
    if kind in ("head", "kv"):
        return AttentionUnits(model, kind)
    raise ValueError(f"unknown unit kind {kind!r}; kinds: {', '.join(UNIT_KINDS)}")


def fingerprint(model: nn.Module) -> ArchFingerprint:
    return MLPNeurons(model).fingerprint()


def check_compatible(donor: nn.Module | ArchFingerprint, target: nn.Module | ArchFingerprint) -> ArchFingerprint:
    """Raise :class:`IncompatibleModelsError` unless both have the same fingerprint; return it."""
    fd = donor if isinstance(donor, ArchFingerprint) else fingerprint(donor)
    ft = target if isinstance(target, ArchFingerprint) else fingerprint(target)
    if fd != ft:
        raise IncompatibleModelsError(
            f"donor and target have different architectures: donor {fd} vs target {ft}. CNT transfers neurons only "
            "between models of the same architecture and shape (e.g. two fine-tunes of one base).")
    return fd


def total_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def same_weights(a: nn.Module, b: nn.Module) -> bool:
    """Whether ``a`` and ``b`` hold the same parameters bit for bit (same names, shapes, dtypes and values). Stops at
    the first tensor that differs, so telling two different models apart costs one tensor's comparison."""
    if a is b:
        return True
    pa, pb = dict(a.named_parameters()), dict(b.named_parameters())
    return pa.keys() == pb.keys() and all(
        pa[n].shape == pb[n].shape and pa[n].dtype == pb[n].dtype and torch.equal(pa[n], pb[n]) for n in pa)


def check_distinct(donor: nn.Module, target: nn.Module) -> None:
    """Raise :class:`IncompatibleModelsError` when donor and target hold the same weights (a transfer would change
    nothing and every share of their gap would be 0/0)."""
    if same_weights(donor, target):
        raise IncompatibleModelsError("donor and target have identical weights: there is nothing to transfer (pass a "
                                      "donor that differs from the target)")
