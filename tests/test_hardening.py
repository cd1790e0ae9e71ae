"""Promises under abuse: hard kills, concurrent cron runs, secrets in logs and envelopes."""
from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import subprocess
import time
from pathlib import Path

import pytest

from conftest import ROOT, tool_cmd

EXAMPLES = [str(ROOT / "examples" / f) for f in ("chat-openai.jsonl", "chat-sharegpt.jsonl", "chat-alpaca.jsonl")]
KILLS = int(os.environ.get("BP_TEST_KILLS", "4"))  # scripts/bench/kill runs 20


def digest_tree(d: Path) -> dict:
    """sha256 of every file under d except the manifest and model card (they record times and paths)."""
    return {str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(d.rglob("*")) if p.is_file() and p.name not in ("manifest.json", "README.md") and p.suffix != ".lock"}


def assert_complete_or_absent(out: Path, check) -> bool:
    """After a kill: nothing under the final name, or a complete result. True when complete."""
    if not out.exists():
        return False
    m = out / "manifest.json"
    if not m.exists():
        finals = [p for p in out.rglob("*") if p.is_file() and ".partial" not in str(p)]
        # A directory that holds no manifest may only hold partial work.
        assert not [p for p in finals if p.suffix in (".safetensors", ".gguf", ".jsonl", ".json")], finals
        return False
    json.loads(m.read_text())
    check(out)
    return True


def kill_at_random_moments(cmd: list[str], out: Path, seconds: float, seed: int, check, n: int = KILLS):
    rng = random.Random(seed)
    for i in range(n):
        p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(0, seconds))  # the random moment of the kill; not synchronisation
        p.send_signal(signal.SIGKILL)
        p.wait()
        assert_complete_or_absent(out, check)


@pytest.fixture(scope="module")
def merge_inputs(tiny_256, tmp_path_factory):
    from helpers.peft_adapters import make_adapter
    d = tmp_path_factory.mktemp("kill-merge")
    return make_adapter(tiny_256, d / "adapter", r=8, lora_alpha=16), tiny_256


def test_merge_survives_kill_9_and_rerun_matches(merge_inputs, tmp_path):
    adapter, base = merge_inputs
    ref = tmp_path / "ref"
    args = [str(adapter), "--base", str(base), "--dtype", "f32", "--no-verify"]
    t = time.perf_counter()
    r = subprocess.run(tool_cmd("bp-merge") + args + ["-o", str(ref)], capture_output=True, text=True, timeout=300)
    elapsed = time.perf_counter() - t
    assert r.returncode == 0, r.stderr
    want = digest_tree(ref)
    out = tmp_path / "out"

    def check(d):
        assert digest_tree(d) == want
    kill_at_random_moments(tool_cmd("bp-merge") + args + ["-o", str(out)], out, elapsed, seed=10, check=check)
    r = subprocess.run(tool_cmd("bp-merge") + args + ["-o", str(out)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert digest_tree(out) == want


def test_gguf_survives_kill_9_and_rerun_matches(tiny_256, tmp_path):
    """bp-gguf killed while converting, quantizing with llama.cpp or verifying: never a file under its
    final name that is not the finished one; a rerun writes the same bytes as an uninterrupted run."""
    args = [str(tiny_256), "-q", "f16", "-q", "q4_k_m"]
    ref = tmp_path / "ref"
    t = time.perf_counter()
    r = subprocess.run(tool_cmd("bp-gguf") + args + ["-o", str(ref)], capture_output=True, text=True, timeout=300)
    elapsed = time.perf_counter() - t
    assert r.returncode in (0, 3), r.stderr
    want = digest_tree(ref)
    assert any(k.endswith(".gguf") for k in want)
    out = tmp_path / "out"

    def check(d):
        assert digest_tree(d) == want
    kill_at_random_moments(tool_cmd("bp-gguf") + args + ["-o", str(out)], out, elapsed, seed=12, check=check)
    r = subprocess.run(tool_cmd("bp-gguf") + args + ["-o", str(out)], capture_output=True, text=True, timeout=300)
    assert r.returncode in (0, 3), r.stderr
    assert digest_tree(out) == want


def test_prep_survives_kill_9_and_rerun_matches(tiny_llama, tmp_path):
    args = EXAMPLES + ["--model", str(tiny_llama), "--heldout-ratio", "0.1"]
    ref = tmp_path / "ref"
    t = time.perf_counter()
    r = subprocess.run(tool_cmd("bp-prep") + args + ["-o", str(ref)], capture_output=True, text=True, timeout=300)
    elapsed = time.perf_counter() - t
    assert r.returncode == 0, r.stderr
    want = digest_tree(ref)
    out = tmp_path / "out"

    def check(d):
        assert digest_tree(d) == want
    kill_at_random_moments(tool_cmd("bp-prep") + args + ["-o", str(out)], out, elapsed, seed=11, check=check)
    r = subprocess.run(tool_cmd("bp-prep") + args + ["-o", str(out)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert digest_tree(out) == want


def test_two_cron_runs_into_one_output_one_waits_out(tiny_llama, tmp_path):
    """Same output: one proceeds, the other exits 75 at once; different outputs: both finish."""
    args = EXAMPLES + ["--model", str(tiny_llama)]
    out = tmp_path / "shared"
    a = subprocess.Popen(tool_cmd("bp-prep") + args + ["-o", str(out)], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    # Wait until the first run holds the lock (it exists before the output directory does).
    lock = tmp_path / "shared.lock"
    deadline = time.monotonic() + 120
    while not lock.exists() and a.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    b = subprocess.run(tool_cmd("bp-prep") + args + ["-o", str(out)], capture_output=True, text=True, timeout=300)
    a_out, a_err = a.communicate(timeout=300)
    assert a.returncode == 0, a_err
    if lock.exists() or b.returncode == 75:
        assert b.returncode == 75 and json.loads(b.stdout)["code"] == "STATE_LOCKED"
    else:  # the first run had already finished: the second is a no-op re-run
        assert b.returncode == 0 and json.loads(b.stdout)["id"] == json.loads(a_out)["id"]
    procs = [subprocess.Popen(tool_cmd("bp-prep") + args + ["-o", str(tmp_path / f"own{i}")],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    for p in procs:
        p.communicate(timeout=300)
        assert p.returncode == 0


SECRETS = ["hf_abcdefghijklmnopqrstu", "Bearer sekritsekrit123", "https://alice:hunter2pass@example.com/x"]


@pytest.mark.parametrize("secret", SECRETS)
def test_secrets_never_reach_stdout_stderr_or_events(secret, tmp_path):
    """A secret inside a path or a host name must be masked in the envelope, stderr and events."""
    events = tmp_path / "ev.jsonl"
    cases = [tool_cmd("bp-prep") + [f"/nonexistent/{secret}/d.jsonl", "-o", str(tmp_path / "o"),
                                    "--log-format", "json"],
             tool_cmd("bp-ollama") + ["list", "--host", secret if "://" in secret else f"http://{secret}.invalid"]]
    for cmd in cases:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        assert r.returncode != 0
        blob = r.stdout + r.stderr + (events.read_text() if events.exists() else "")
        for part in ("abcdefghijklmnopqrstu", "sekritsekrit123", "hunter2pass"):
            assert part not in blob, (cmd, blob[-500:])


def test_train_survives_kill_9_at_random_moments_and_resume_matches(tiny_llama, tmp_path):
    """Killed again and again, each time continued with --resume auto: the same adapter as one straight run."""
    from safetensors.torch import load_file
    from bp_train import checkpoints
    from helpers.training import prepared
    args = [str(prepared(str(tiny_llama))), "--steps", "24", "--lr", "5e-3", "--save-steps", "3",
            "--lora-dropout", "0.1", "--log-steps", "1", "--resume", "auto"]
    ref = tmp_path / "ref"
    t = time.perf_counter()
    r = subprocess.run(tool_cmd("bp-train") + args + ["-o", str(ref)], capture_output=True, text=True, timeout=600)
    elapsed = time.perf_counter() - t
    assert r.returncode == 0, r.stderr
    out = tmp_path / "out"

    def check(d):
        assert json.loads((d / "manifest.json").read_text())["steps"] == 24

    rng = random.Random(21)
    for _ in range(KILLS):
        p = subprocess.Popen(tool_cmd("bp-train") + args + ["-o", str(out)], stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(0, elapsed))  # the random moment of the kill; not synchronisation
        p.send_signal(signal.SIGKILL)
        p.wait()
        if out.exists():  # every published checkpoint is whole; the adapter appears only with its manifest
            for _step, ckpt in checkpoints.listing(out):
                assert checkpoints.read_meta(ckpt) is not None and (ckpt / "adapter_model.safetensors").exists()
            assert (out / "adapter").exists() <= (out / "manifest.json").exists()
            assert_complete_or_absent(out, check) if (out / "manifest.json").exists() else None
    r = subprocess.run(tool_cmd("bp-train") + args + ["-o", str(out)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    a, b = json.loads((ref / "manifest.json").read_text()), json.loads(r.stdout)
    assert abs(a["final_loss"] - b["final_loss"]) <= 1e-6
    ta = load_file(str(ref / "adapter" / "adapter_model.safetensors"))
    tb = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    assert ta.keys() == tb.keys() and max(float((ta[k] - tb[k]).abs().max()) for k in ta) <= 1e-6
