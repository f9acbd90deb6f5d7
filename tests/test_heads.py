"""Attention heads and key/value groups as units (cnt.arch.AttentionUnits), on every supported family, GQA included."""

import pytest
import torch

from cnt.arch import (AttentionUnits, IncompatibleModelsError, UnsupportedArchitectureError, check_compatible,
                      fingerprint, units)
from cnt.tiny import TINY_MODEL_TYPES, tiny_model

from .helpers import state_copy

MHA_ONLY = ("gpt2", "gptj", "gpt_neox")  # their configs have no separate key/value head count
CASES = [(t, 4) for t in TINY_MODEL_TYPES] + [(t, 2) for t in TINY_MODEL_TYPES if t not in MHA_ONLY] + [("llama", 1)]


def _model(model_type, n_kv, seed=0):
    return tiny_model(model_type, seed=seed, **({} if model_type in MHA_ONLY else {"num_key_value_heads": n_kv}))


@pytest.mark.parametrize("model_type,n_kv", CASES)
@pytest.mark.parametrize("kind", ["head", "kv"])
def test_read_write_round_trip(model_type, n_kv, kind):
    model = _model(model_type, n_kv)
    u = AttentionUnits(model, kind)
    assert u.layout == (4, n_kv, 16)
    idx = [0, u.n_units() - 1] if u.n_units() > 1 else [0]
    before = state_copy(model)
    old = u.read(1, idx)
    g = torch.Generator().manual_seed(0)
    new = {k: torch.randn(v.shape, generator=g) for k, v in old.items()}
    u.write(1, idx, new)
    got = u.read(1, idx)
    assert all(torch.equal(got[k], new[k]) for k in new)
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed == set(u.param_names(1).values())
    others = [i for i in range(u.n_units()) if i not in idx]
    if others:  # the other units of the layer are untouched
        assert all(torch.equal(a, b) for a, b in zip(AttentionUnits(model, kind).read(1, others).values(),
                                                      _readstate_copy(before, model, kind, others).values()))
    u.write(1, idx, old)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def _readstate_copy(state, model, kind, idx):
    twin = _model(model.config.model_type, AttentionUnits(model, kind).layout[1])
    twin.load_state_dict(state)
    return AttentionUnits(twin, kind).read(1, idx)


@pytest.mark.parametrize("model_type,n_kv", CASES)
def test_heads_and_groups_tile_the_attention_projections(model_type, n_kv):
    """Every entry of the q/k/v/o projections belongs to exactly one unit: zeroing every head and every k/v group of a
    layer zeroes those projections and nothing else (norms shared by all heads stay)."""
    model = _model(model_type, n_kv)
    before = state_copy(model)
    names = set()
    for kind in ("head", "kv"):
        u = AttentionUnits(model, kind)
        vals = u.read(0, range(u.n_units()))
        u.write(0, range(u.n_units()), {k: torch.zeros_like(v) for k, v in vals.items()})
        names |= set(u.param_names(0).values())
    for k, v in model.state_dict().items():
        if k in names:
            assert not v.any(), k
        else:
            assert torch.equal(v, before[k]), k
    per_head = AttentionUnits(model, "head").params_per_unit(0)
    per_group = AttentionUnits(model, "kv").params_per_unit(0)
    assert 4 * per_head + n_kv * per_group == sum(before[n].numel() for n in names)


def _attention_input_of_output_projection(model, x):
    """The input of layer 0's attention output projection (the concatenated per-head outputs) for embeddings ``x``."""
    u = AttentionUnits(model, "head")
    o = [s for s in u.slots if s.key == "o"][0]
    mod = u.layers[0].get_submodule(o.module)
    seen = {}
    h = mod.register_forward_pre_hook(lambda m, a: seen.setdefault("x", a[0].detach().clone()))
    try:
        with torch.no_grad():
            model(inputs_embeds=x)
    finally:
        h.remove()
    return seen["x"]


@pytest.mark.parametrize("model_type,n_kv", CASES)
def test_a_query_head_changes_only_its_own_output_and_a_group_only_its_heads(model_type, n_kv):
    model = _model(model_type, n_kv)
    x = torch.randn(1, 5, model.config.hidden_size, generator=torch.Generator().manual_seed(1))
    base = _attention_input_of_output_projection(model, x)
    heads, kv = AttentionUnits(model, "head"), AttentionUnits(model, "kv")
    d = heads.layout[2]

    def changed_heads(after):
        return {h for h in range(4) if not torch.allclose(after[..., h * d:(h + 1) * d], base[..., h * d:(h + 1) * d])}

    q = heads.read(0, [2])
    heads.write(0, [2], {k: v * 3 + 0.5 for k, v in q.items()})
    assert changed_heads(_attention_input_of_output_projection(model, x)) == {2}
    heads.write(0, [2], q)
    g = kv.group_of(3)
    old = kv.read(0, [g])
    kv.write(0, [g], {k: -v + 0.3 for k, v in old.items()})
    assert changed_heads(_attention_input_of_output_projection(model, x)) == {h for h in range(4) if kv.group_of(h) == g}
    assert len({kv.group_of(h) for h in range(4)}) == n_kv


@pytest.mark.parametrize("model_type", TINY_MODEL_TYPES)
def test_a_zeroed_head_is_silent(model_type):
    """Zeroing query head h's output columns equals masking that head's output before the output projection."""
    model = tiny_model(model_type)
    heads = AttentionUnits(model, "head")
    d = heads.layout[2]
    x = torch.randn(1, 5, model.config.hidden_size, generator=torch.Generator().manual_seed(2))
    o = [s for s in heads.slots if s.key == "o"][0]
    mod = heads.layers[0].get_submodule(o.module)

    def mask(m, args):
        a = args[0].clone()
        a[..., 1 * d:2 * d] = 0
        return (a,)

    h = mod.register_forward_pre_hook(mask)
    with torch.no_grad():
        masked = model(inputs_embeds=x).logits
    h.remove()
    vals = heads.read(0, [1])
    heads.write(0, [1], {k: torch.zeros_like(v) for k, v in vals.items()})
    with torch.no_grad():
        zeroed = model(inputs_embeds=x).logits
    assert torch.allclose(masked, zeroed, atol=1e-5)


def test_fingerprint_has_the_head_layout_and_gqa_mismatch_is_refused():
    a, b = _model("llama", 2), _model("llama", 4)
    assert fingerprint(a).attention == (4, 2, 16)
    assert fingerprint(a).n_units("head") == 2 * 4 and fingerprint(a).n_units("kv") == 2 * 2
    with pytest.raises(IncompatibleModelsError, match="kv_heads=2.*kv_heads=4"):
        check_compatible(a, b)  # same MLPs, different attention layout: refused before any compute
    assert fingerprint(a).mlp_only() == fingerprint(b).mlp_only()


def test_a_layout_the_config_does_not_describe_is_refused():
    model = tiny_model("llama")
    model.config.head_dim = 8  # the projections hold 4 x 16 rows
    with pytest.raises(UnsupportedArchitectureError, match="head_dim=8.*not supported"):
        AttentionUnits(model, "head")
    with pytest.raises(ValueError, match="unknown unit kind"):
        units(model, "neuron")
