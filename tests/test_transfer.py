import json

import pytest
import torch

from cnt import NeuronPatch
from cnt.arch import MLPNeurons
from cnt.tiny import tiny_model
from cnt.transfer import PatchError, transfer_all

IDX = {0: [1, 5, 9], 1: [0, 95]}


def _state(m):
    return {k: v.detach().clone() for k, v in m.state_dict().items()}


def _same(a, b):
    return all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture
def pair():
    return tiny_model("llama", seed=1), tiny_model("llama", seed=0)  # donor, target


def test_apply_revert_bit_exact(pair):
    donor, target = pair
    before = _state(target)
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
    assert _same(_state(direct), _state(target))


def test_alpha_amplifies(pair):
    donor, target = pair
    t0 = MLPNeurons(target).read(0, [1])
    d0 = MLPNeurons(donor).read(0, [1])
    NeuronPatch.extract(donor, target, {0: [1]}, alpha=2.0).apply(target)
    got = MLPNeurons(target).read(0, [1])
    for k in got:
        assert torch.allclose(got[k], t0[k] + 2 * (d0[k] - t0[k]))


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
    before = _state(other)
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
    snap = _state(target)
    with pytest.raises(PatchError, match="already applied"):
        patch.apply(target)
    assert _same(snap, target.state_dict())
    stranger = tiny_model("llama", seed=7)
    snap2 = _state(stranger)
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
    with pytest.raises(PatchError, match="truncated or was edited"):
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
    before = _state(target)
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
    assert _same(_state(target), _state(t2))
    c = NeuronPatch.extract(donor, tiny_model("llama", seed=0), {0: [2, 3]})
    with pytest.raises(PatchError, match="overlap in 1 neurons"):
        NeuronPatch.compose([a, c])
    assert a.overlap(c) == {0: [2]}


@pytest.mark.parametrize("model_type", ["gpt2", "phi3", "gpt_neox", "gemma3_text"])
def test_other_families(model_type):
    donor, target = tiny_model(model_type, seed=1), tiny_model(model_type, seed=0)
    before = _state(target)
    patch = NeuronPatch.extract(donor, target, {1: [0, 10, 95]})
    patch.apply(target)
    assert not _same(before, target.state_dict())
    patch.revert(target)
    assert _same(before, target.state_dict())
