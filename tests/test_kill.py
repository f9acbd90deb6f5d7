"""Writers killed mid-write (SIGKILL in a subprocess, at several points of the write): the earlier version stays
loadable and bit-identical — or the new one is there whole — and the next write leaves no temporary behind."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cnt import atomic

FRACTIONS = (0.0, 0.05, 0.3, 0.6, 0.9, 1.5)  # of one write's duration (0: at once; a loaded machine writes at
# another speed than the one it was timed at, and the check below needs some kill to land before the swap)
SIZE = dict(hidden_size=128, intermediate_size=2048, num_hidden_layers=2)  # a patch of every neuron: 12 MB

# A child that builds its output, says "ready", and on "go" writes it over an earlier version.
CHILD = r"""
import sys, torch
from cnt.tiny import tiny_model
sys.path.insert(0, sys.argv[4])
from test_kill import writer
what, out = sys.argv[1], sys.argv[2]
write = writer(what, int(sys.argv[3]))
print("ready", flush=True)
sys.stdin.readline()
t0 = __import__("time").time()
write(out)
print("done", __import__("time").time() - t0, flush=True)
"""


def writer(what: str, seed: int):
    """What the writer writes: a patch folder (every neuron of a donor made with ``seed``), or a model folder as
    `cnt apply --out`, the zoo and conversions write it."""
    from cnt.tiny import tiny_model
    from cnt.transfer import transfer_all

    target, donor = tiny_model("llama", seed=0, **SIZE), tiny_model("llama", seed=seed, **SIZE)
    if what == "patch":
        patch = transfer_all(donor, target)
        return patch.save

    def write(out):
        with atomic.folder(out) as tmp:
            donor.save_pretrained(tmp)
    return write


def _digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def _child(what: str, out: Path, seed: int) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-c", CHILD, what, str(out), str(seed), str(Path(__file__).parent)],
                            stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, env=env)
    assert proc.stdout.readline().strip() == "ready"
    return proc


def _write_whole(what: str, out: Path, seed: int) -> float:
    proc = _child(what, out, seed)
    proc.stdin.write("go\n")
    proc.stdin.flush()
    line = proc.stdout.readline().split()
    proc.wait(timeout=120)
    assert line[0] == "done", line
    return float(line[1])


def _load(what: str, out: Path):
    if what == "patch":
        from cnt.transfer import NeuronPatch

        return NeuronPatch.load(out)  # (its checksum covers patch.json and the tensors together)
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(out))


def _same_version(a: dict, b: dict) -> bool:
    """The same files with the same bytes, but for patch.json (it records when it was created)."""
    return set(a) == set(b) and all(a[k] == b[k] for k in a if k != "patch.json")


@pytest.mark.parametrize("what", ["patch", "model"])
def test_a_killed_write_leaves_the_earlier_version_whole(what, tmp_path):
    out = tmp_path / "out"
    earlier = writer(what, seed=1)
    earlier(out)
    old = _digest(out)
    seconds = _write_whole(what, tmp_path / "timing", seed=2)  # how long one write takes here
    new = _digest(tmp_path / "timing")
    assert new != old
    outcomes = []
    for f in FRACTIONS:
        proc = _child(what, out, seed=2)
        proc.stdin.write("go\n")
        proc.stdin.flush()
        time.sleep(f * seconds)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
        now = _digest(out)
        assert now == old or _same_version(now, new), f"killed at {f:.2f} of the write: the folder is neither version"
        _load(what, out)  # and it loads
        outcomes.append("old" if now == old else "new")
        if now != old:  # start the next kill from the earlier version again
            earlier(out)
    assert "old" in outcomes  # some kills landed before the swap (the property under test was exercised)
    atomic.sweep(tmp_path)
    assert not [p for p in tmp_path.iterdir() if atomic.TMP_MARK in p.name or atomic.OLD_MARK in p.name]


@pytest.mark.slow
def test_a_killed_conversion_leaves_the_cached_model_whole(tmp_path):
    """`cnt prepare --force` of the embedded SmolLM2 (about 40 s) killed at several points, in a fresh cache that
    holds an earlier good conversion: the cached folder stays that conversion, verified against its file record."""
    env = {**os.environ, "CNT_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "cnt.cli", "prepare", "--force", "smollm2-135m-instruct"]
    t0 = time.time()
    subprocess.run(cmd, env=env, check=True, capture_output=True)
    seconds = time.time() - t0
    folder = tmp_path / "cache" / "models" / "smollm2-135m-instruct"
    old = _digest(folder)
    for f in (0.5, 0.85, 0.95):
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(f * seconds)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
        now = _digest(folder)
        assert set(now) == set(old) and now["model.safetensors"] == old["model.safetensors"], f
    done = subprocess.run([sys.executable, "-m", "cnt.cli", "prepare", "--verify", "smollm2-135m-instruct"], env=env,
                          capture_output=True, text=True)
    assert done.returncode == 0 and "verified" in done.stdout, done.stdout + done.stderr
    subprocess.run(cmd, env=env, check=True, capture_output=True)  # the next conversion sweeps the killed ones' temps
    assert not [p for p in folder.parent.iterdir() if atomic.TMP_MARK in p.name]
