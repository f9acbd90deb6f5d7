import json

import pytest
import torch

from cnt import NeuronPatch
from cnt.arch import MLPNeurons
from cnt.tiny import tiny_model
from cnt.transfer import PatchError, transfer_all

from .helpers import gqa_model, state_copy

IDX = {0: [1, 5, 9], 1: [0, 95]}


def _same(a, b):
    return all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture
def pair():
    return tiny_model("llama", seed=1), tiny_model("llama", seed=0)  # donor, target


def test_apply_revert_bit_exact(pair):
    donor, target = pair
    before = state_copy(target)
    patch = NeuronPatch.extract(donor, target, IDX, donor_name="d", target_name="t")
    patch.apply(target)
    nd, nt = MLPNeurons(donor), MLPNeurons(target)
    for layer, idx in IDX.items():
        got, want = nt.read(layer, idx), nd.read(layer, idx)
        assert all(torch.equal(got[k], want[k]) for k in want)
    changed = {k for k, v in target.state_dict().items() if not torch.equal(v, before[k])}
    assert changed == {f"model.layers.{i}.mlp.{p}.weight" for i in IDX for p in ("gate_proj", "up_proj", "down_proj")}
    assert patch.is_applied(target)
    patch.revert(target)
    assert _same(before, target.state_dict())
    assert patch.n_neurons == 5 and patch.n_params == 5 * 3 * 64
    assert patch.neuron_fraction == pytest.approx(5 / 192)


def test_save_load_apply_equals_direct(pair, tmp_path):
    donor, target = pair
    patch = NeuronPatch.extract(donor, target, IDX, alpha=1.5, provenance={"scorer": "test"})
    d = patch.save(tmp_path / "p")
    assert (d / "patch.safetensors").is_file() and (d / "patch.json").is_file()
    meta = json.loads((d / "patch.json").read_text())
    assert meta["bytes"] == (d / "patch.safetensors").stat().st_size and meta["n_neurons"] == 5
    loaded = NeuronPatch.load(d)
    assert loaded.alpha == 1.5 and loaded.provenance["scorer"] == "test"
    direct = tiny_model("llama", seed=0)
    patch.apply(direct)
    loaded.apply(target)
    assert _same(state_copy(direct), state_copy(target))


def test_alpha_amplifies(pair):
    donor, target = pair
    t0 = MLPNeurons(target).read(0, [1])
    d0 = MLPNeurons(donor).read(0, [1])
    NeuronPatch.extract(donor, target, {0: [1]}, alpha=2.0).apply(target)
    got = MLPNeurons(target).read(0, [1])
    for k in got:
        assert torch.allclose(got[k], t0[k] + 2 * (d0[k] - t0[k]))


def test_patch_cast_applies_to_a_copy_in_another_precision(pair):
    """The search tries float32 patches on a bf16 copy of the target: the cast patch applies there, writes the bf16
    patched values, reverts that copy bit-exact, and leaves the float32 patch as it was."""
    from copy import deepcopy

    donor, target = pair
    patch = NeuronPatch.extract(donor, target, IDX, alpha=2.0)
    work = deepcopy(target).to(torch.bfloat16)
    with pytest.raises(PatchError, match="float32 slices, the model is bfloat16"):
        patch.apply(work)
    before = state_copy(work)
    half = patch.to(torch.bfloat16)
    assert half.dtype == "bfloat16" and patch.dtype == "float32" and half.alpha == 2.0 and half.units == patch.units
    half.apply(work)
    got = MLPNeurons(work).read(0, [1])
    want = patch.patched_values(0)
    assert all(torch.allclose(got[k].float(), want[k][IDX[0].index(1)].float(), rtol=0.02, atol=1e-3) for k in got)
    half.revert(work)
    assert _same(before, state_copy(work))


def test_transfer_all_reproduces_donor_mlps(pair):
    donor, target = pair
    transfer_all(donor, target).apply(target)
    sd, st = donor.state_dict(), target.state_dict()
    for k in sd:
        if ".mlp." in k:
            assert torch.equal(sd[k], st[k]), k
        else:
            assert not torch.equal(sd[k], st[k]) or "norm" in k, k  # attention, embeddings stay the target's


def test_fingerprint_mismatch_refused_before_compute(pair):
    donor, _ = pair
    other = tiny_model("llama", intermediate_size=128)
    before = state_copy(other)
    with pytest.raises(PatchError, match="different architectures"):
        NeuronPatch.extract(donor, other, IDX)
    patch = NeuronPatch.extract(donor, tiny_model("llama"), IDX)
    with pytest.raises(PatchError, match="patch is for"):
        patch.apply(other)
    assert _same(before, other.state_dict())


def test_apply_twice_and_wrong_model_refused(pair):
    donor, target = pair
    patch = NeuronPatch.extract(donor, target, IDX)
    patch.apply(target)
    snap = state_copy(target)
    with pytest.raises(PatchError, match="already applied"):
        patch.apply(target)
    assert _same(snap, target.state_dict())
    stranger = tiny_model("llama", seed=7)
    snap2 = state_copy(stranger)
    with pytest.raises(PatchError, match="not the patch's target"):
        patch.apply(stranger)
    with pytest.raises(PatchError, match="not applied"):
        patch.revert(stranger)
    assert _same(snap2, stranger.state_dict())


def test_damaged_files_refused(pair, tmp_path):
    donor, target = pair
    d = NeuronPatch.extract(donor, target, IDX).save(tmp_path / "p")
    st = d / "patch.safetensors"
    raw = st.read_bytes()
    st.write_bytes(raw[:-10])
    with pytest.raises(PatchError, match="truncated"):
        NeuronPatch.load(d)
    st.write_bytes(raw)
    meta = json.loads((d / "patch.json").read_text())
    meta["sha256"] = "0" * 64
    (d / "patch.json").write_text(json.dumps(meta))
    with pytest.raises(PatchError, match="sha256"):
        NeuronPatch.load(d)
    (d / "patch.json").write_text("{not json")
    with pytest.raises(PatchError, match="damaged"):
        NeuronPatch.load(d)
    with pytest.raises(PatchError, match="not a patch folder"):
        NeuronPatch.load(tmp_path / "nothing")


def test_nan_donor_refused(pair):
    donor, target = pair
    with torch.no_grad():
        donor.model.layers[1].mlp.down_proj.weight[3, 95] = float("nan")
    before = state_copy(target)
    with pytest.raises(PatchError, match="NaN"):
        NeuronPatch.extract(donor, target, IDX)
    assert _same(before, target.state_dict())


@pytest.mark.parametrize("bad", [{5: [1]}, {0: [96]}, {0: [-1]}, {0: [2, 2]}, {0: []}])
def test_bad_indices_refused(pair, bad):
    with pytest.raises(PatchError):
        NeuronPatch.extract(*pair, bad)


def test_compose_disjoint_and_overlap(pair):
    donor, target = pair
    a = NeuronPatch.extract(donor, target, {0: [1, 2]})
    b = NeuronPatch.extract(donor, target, {0: [0, 7], 1: [3]}, alpha=2.0)
    both = NeuronPatch.compose([a, b])
    assert both.indices[0].tolist() == [0, 1, 2, 7] and both.n_neurons == 5
    t2 = tiny_model("llama", seed=0)
    a.apply(target)
    b.apply(target)
    both.apply(t2)
    assert _same(state_copy(target), state_copy(t2))
    c = NeuronPatch.extract(donor, tiny_model("llama", seed=0), {0: [2, 3]})
    with pytest.raises(PatchError, match="overlap in 1 neurons"):
        NeuronPatch.compose([a, c])
    assert a.overlap(c) == {0: [2]}


@pytest.mark.parametrize("model_type", ["gpt2", "phi3", "gpt_neox", "gemma3_text"])
def test_other_families(model_type):
    donor, target = tiny_model(model_type, seed=1), tiny_model(model_type, seed=0)
    before = state_copy(target)
    patch = NeuronPatch.extract(donor, target, {1: [0, 10, 95]})
    patch.apply(target)
    assert not _same(before, target.state_dict())
    patch.revert(target)
    assert _same(before, target.state_dict())


MIXED = {"mlp": {0: [1, 5], 1: [95]}, "head": {1: [0, 3]}, "kv": {0: [1]}}
GAMMA = {"mlp": {0: [0.5, 2.0], 1: [3.0]}, "head": {1: [1.0, 0.25]}, "kv": {0: [1.5]}}


def test_mixed_neuron_head_patch_with_per_unit_gamma_round_trips(tmp_path):
    from cnt.arch import units

    donor, target = gqa_model(1), gqa_model(0)
    before = state_copy(target)
    patch = NeuronPatch.extract(donor, target, MIXED, gamma=GAMMA, alpha=1.0)
    assert patch.n_units("head") == 2 and patch.n_units("kv") == 1 and patch.n_neurons == 3
    per_head, per_kv = 2 * 16 * 64, 2 * 16 * 64
    assert patch.n_params == 3 * 3 * 64 + 2 * per_head + per_kv
    patch.apply(target)
    for kind, per_layer in MIXED.items():  # each unit moved by its own gamma
        for layer, idx in per_layer.items():
            got = units(target, kind).read(layer, idx)
            t0 = units(gqa_model(0), kind).read(layer, idx)
            d0 = units(donor, kind).read(layer, idx)
            g = torch.tensor(GAMMA[kind][layer])
            for k in got:
                shape = (-1,) + (1,) * (got[k].dim() - 1)
                assert torch.allclose(got[k], t0[k] + g.view(shape) * (d0[k] - t0[k])), (kind, layer, k)
    direct = state_copy(target)
    loaded = NeuronPatch.load(patch.save(tmp_path / "p"))
    assert torch.equal(loaded.gamma["head"][1], torch.tensor([1.0, 0.25]))
    with pytest.raises(PatchError, match="already applied"):
        loaded.apply(target)
    loaded.revert(target)
    assert _same(before, state_copy(target))  # revert bit-exact
    loaded.apply(target)
    assert _same(direct, state_copy(target))  # save -> load -> apply equals direct apply
    meta = json.loads((tmp_path / "p" / "patch.json").read_text())
    assert meta["units"] == {"mlp": 3, "head": 2, "kv": 1} and meta["per_unit_gamma"] is True
    assert meta["param_fraction"] == pytest.approx(patch.n_params / sum(p.numel() for p in target.parameters()))


def test_global_alpha_is_the_special_case_of_per_unit_gamma():
    donor, target = gqa_model(1), gqa_model(0)
    a = NeuronPatch.extract(donor, target, MIXED, alpha=2.0)
    gam = {k: {layer: [1.0] * len(i) for layer, i in v.items()} for k, v in MIXED.items()}
    b = NeuronPatch.extract(donor, target, MIXED, alpha=2.0, gamma=gam)
    t2 = gqa_model(0)
    a.apply(target)
    b.apply(t2)
    assert _same(state_copy(target), state_copy(t2))


def test_gamma_is_checked_and_follows_unsorted_indices():
    donor, target = gqa_model(1), gqa_model(0)
    with pytest.raises(PatchError, match="finite and in"):
        NeuronPatch.extract(donor, target, {0: [1]}, gamma={0: [float("nan")]})
    with pytest.raises(PatchError, match="2 amplitudes for 1 units"):
        NeuronPatch.extract(donor, target, {0: [1]}, gamma={0: [1.0, 2.0]})
    with pytest.raises(PatchError, match=r"head layer 0: unit indices must lie in \[0, 4\)"):
        NeuronPatch.extract(donor, target, {"head": {0: [4]}})
    p = NeuronPatch.extract(donor, target, {0: [9, 2]}, gamma={0: [3.0, 0.5]})
    assert p.indices[0].tolist() == [2, 9] and p.gamma["mlp"][0].tolist() == [0.5, 3.0]


def test_a_version_1_patch_file_still_loads_and_applies(pair, tmp_path):
    """Format version 1 (PR before per-unit gamma and heads): tensors ``layers.{l}.*``, a fingerprint without heads."""
    import hashlib

    from safetensors.torch import save_file

    donor, target = pair
    patch = NeuronPatch.extract(donor, target, IDX, alpha=1.5)
    d = tmp_path / "v1"
    d.mkdir()
    tensors = {name.replace("mlp.", "layers.", 1): t for name, t in patch._tensors().items()}
    save_file(tensors, str(d / "patch.safetensors"))
    fp = patch.fingerprint.mlp_only().to_dict()
    assert "attention" not in fp
    meta = {"format": "cnt.NeuronPatch", "format_version": 1, "fingerprint": fp, "donor": "d", "target": "t",
            "alpha": 1.5, "provenance": {}, "target_total_params": patch.target_total_params,
            "sha256": hashlib.sha256((d / "patch.safetensors").read_bytes()).hexdigest()}
    (d / "patch.json").write_text(json.dumps(meta))
    old = NeuronPatch.load(d)
    assert old.fingerprint.attention is None and old.n_neurons == 5
    direct = tiny_model("llama", seed=0)
    patch.apply(direct)
    old.apply(target)
    assert _same(state_copy(direct), state_copy(target))
    old.revert(target)
    assert _same(state_copy(tiny_model("llama", seed=0)), state_copy(target))
