import pytest
import torch

from cnt.arch import (ArchFingerprint, IncompatibleModelsError, MLPNeurons, UnsupportedArchitectureError,
                      check_compatible, check_distinct, fingerprint, same_weights)
from cnt.tiny import TINY_MODEL_TYPES, tiny_model

from .helpers import state_copy


def _round_trip(model, layer, idx):
    """read -> write new values -> read gives the new values; only the neurons' slices change; writing the old values
    back restores the model bit for bit."""
    neurons = MLPNeurons(model)
    before = state_copy(model)
    old = neurons.read(layer, idx)
    g = torch.Generator().manual_seed(0)
    new = {k: torch.randn(v.shape, generator=g, dtype=torch.float32).to(v.dtype) for k, v in old.items()}
    neurons.write(layer, idx, new)
    got = neurons.read(layer, idx)
    for k in new:
        assert torch.equal(got[k], new[k]), k

    after = state_copy(model)
    names = neurons.param_names(layer)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == set(names.values())
    # exactly the expected slices: mask out the neurons' rows/columns and everything else is identical
    keep = {}
    for slot in neurons.slots():
        if slot.key not in names:
            continue
        name = names[slot.key]
        off = slot.offset_blocks * neurons.intermediate_size(layer)
        mask = keep.setdefault(name, (slot.dim, torch.ones(before[name].shape[slot.dim], dtype=torch.bool)))[1]
        mask[torch.as_tensor(idx) + off] = False
    for name, (dim, mask) in keep.items():
        rest = mask.nonzero().squeeze(1)
        assert torch.equal(before[name].index_select(dim, rest), after[name].index_select(dim, rest)), name

    neurons.write(layer, idx, old)
    restored = state_copy(model)
    assert all(torch.equal(before[k], restored[k]) for k in before)


def test_round_trip_real_smollm2(smol):
    model, _ = smol
    _round_trip(model, 5, [0, 17, 1535])
    _round_trip(model, 29, list(range(0, 1536, 7)))


@pytest.mark.parametrize("model_type", TINY_MODEL_TYPES)
def test_round_trip_tiny_families(model_type):
    model = tiny_model(model_type)
    _round_trip(model, 1, [0, 5, 95])


@pytest.mark.parametrize("model_type", TINY_MODEL_TYPES)
def test_slices_cover_the_whole_mlp(model_type):
    """Reading every neuron of a layer reproduces the MLP's projection matrices exactly (nothing missed, no overlap)."""
    model = tiny_model(model_type)
    neurons = MLPNeurons(model)
    inter = neurons.intermediate_size(0)
    full = neurons.read(0, torch.arange(inter))
    params = dict(model.named_parameters())
    names = neurons.param_names(0)
    for slot in neurons.slots():
        if slot.key not in full:
            continue
        p = params[names[slot.key]].detach()
        part = p.narrow(slot.dim, slot.offset_blocks * inter, inter)
        assert torch.equal(full[slot.key].movedim(0, slot.dim), part), slot.key
        assert sum(s.offset_blocks == 0 for s in neurons.slots() if names.get(s.key) == names[slot.key]) == 1


@pytest.mark.parametrize("model_type", TINY_MODEL_TYPES)
def test_zeroed_neurons_are_silent(model_type):
    """Behaviour: a neuron whose slices are all zero contributes nothing; zeroing all neurons of a layer leaves only
    the output projection's bias."""
    model = tiny_model(model_type)
    neurons = MLPNeurons(model)
    x = torch.randn(1, 4, neurons.fingerprint().hidden_size)
    mlp = neurons.layers[0].mlp
    before = mlp(x)
    idx = torch.arange(neurons.intermediate_size(0))
    neurons.write(0, idx, {k: torch.zeros_like(v) for k, v in neurons.read(0, idx).items()})
    out_bias = getattr(neurons.mlp_output_module(0), "bias", None)
    expected = torch.zeros_like(before) if out_bias is None else out_bias.detach().expand_as(before)
    assert torch.allclose(mlp(x), expected)
    assert not torch.allclose(before, expected)


def test_fingerprints():
    llama, llama2 = tiny_model("llama", seed=0), tiny_model("llama", seed=1)
    assert fingerprint(llama) == fingerprint(llama2)  # weights differ, architecture does not
    assert fingerprint(llama) == fingerprint(tiny_model("llama", dtype=torch.bfloat16))  # dtype-independent
    assert fingerprint(llama) != fingerprint(tiny_model("gpt2"))
    assert fingerprint(llama) != fingerprint(tiny_model("mistral"))  # same layout, different architecture
    assert fingerprint(llama) != fingerprint(tiny_model("llama", intermediate_size=128))
    assert fingerprint(llama) != fingerprint(tiny_model("llama", num_hidden_layers=3))
    fp = fingerprint(llama)
    assert ArchFingerprint.from_dict(fp.to_dict()) == fp
    assert fp.n_neurons == 2 * 96


def test_fingerprint_real_model_differs_from_tiny(smol):
    fp = fingerprint(smol[0])
    assert fp == ArchFingerprint("llama", 30, 576, (1536,) * 30, (9, 3, 64))  # SmolLM2: GQA, 3 k/v groups
    with pytest.raises(IncompatibleModelsError, match="different architectures"):
        check_compatible(smol[0], tiny_model("llama"))


def test_unsupported_architecture_lists_supported():
    from transformers import OPTConfig, OPTForCausalLM

    model = OPTForCausalLM(OPTConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, ffn_dim=48,
                                     num_attention_heads=2, word_embed_proj_dim=32))
    with pytest.raises(UnsupportedArchitectureError, match="'opt'.*llama.*gpt2.*gpt_neox"):
        MLPNeurons(model)


def test_write_rejects_wrong_slices():
    neurons = MLPNeurons(tiny_model("llama"))
    vals = neurons.read(0, [1])
    del vals["up"]
    with pytest.raises(ValueError, match="expected slices"):
        neurons.write(0, [1], vals)


def test_params_per_neuron():
    assert MLPNeurons(tiny_model("llama")).params_per_neuron(0) == 3 * 64
    assert MLPNeurons(tiny_model("phi3")).params_per_neuron(0) == 3 * 64
    assert MLPNeurons(tiny_model("gpt2")).params_per_neuron(0) == 2 * 64 + 1


@pytest.mark.parametrize("model_type", TINY_MODEL_TYPES)
def test_residual_writers(model_type):
    model = tiny_model(model_type)
    neurons = MLPNeurons(model)
    writers = neurons.residual_writers()
    assert len(writers) == 1 + 2 * neurons.n_layers
    hidden = neurons.fingerprint().hidden_size
    for name, mod, axis in writers:
        assert mod.weight.shape[axis] == hidden, name


def test_fingerprint_names_the_model_type_and_reads_older_files():
    """A fingerprint serializes its ``model_type``; files written before the rename (key ``family``) still load."""
    from cnt.arch import ArchFingerprint

    fp = MLPNeurons(tiny_model("qwen2", seed=0)).fingerprint()
    d = fp.to_dict()
    assert d["model_type"] == "qwen2" and "family" not in d
    legacy = {("family" if k == "model_type" else k): v for k, v in d.items()}
    assert ArchFingerprint.from_dict(legacy) == fp == ArchFingerprint.from_dict(d)


def test_same_weights_compares_every_parameter_bit_for_bit():
    """Two loads of one model hold the same weights; one changed value, or another shape, makes them differ; a
    donor identical to its target is refused as having nothing to transfer."""
    a, b = tiny_model("llama", seed=0), tiny_model("llama", seed=0)
    assert a is not b and same_weights(a, b) and same_weights(a, a)
    with pytest.raises(IncompatibleModelsError, match="identical weights"):
        check_distinct(a, b)
    with torch.no_grad():
        list(b.parameters())[-1].view(-1)[-1] += 1e-3
    assert not same_weights(a, b)
    check_distinct(a, b)
    assert not same_weights(a, tiny_model("llama", seed=0, intermediate_size=a.config.intermediate_size * 2))
