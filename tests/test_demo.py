"""scripts/demo end to end: the README's first command works, and the tuned model learned its data."""
from __future__ import annotations

import json
import os
import subprocess

import pytest

from conftest import ROOT
from helpers.training import TRAIN_ANSWER, TRAIN_PROMPT, greedy_answer


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "out"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OLLAMA_", "BACKPROPAGATE_OLLAMA"))}
    env["OLLAMA_HOST"] = "http://127.0.0.1:9"  # the discard port: nothing answers, the demo must say so
    proc = subprocess.run([str(ROOT / "scripts" / "demo"), str(out)], capture_output=True, text=True, env=env,
                          timeout=1200)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return out, proc


def test_the_demo_ends_with_a_summary_and_says_no_ollama_server_answered(demo):
    out, proc = demo
    assert proc.stdout == ""  # everything for people goes to stderr
    assert "== summary" in proc.stderr and "no Ollama server answered" in proc.stderr
    assert (out / "ollama" / "Modelfile").is_file()


def test_the_tuned_model_gives_its_training_answer(demo):
    out, proc = demo
    adapter = json.loads((out / "adapter.json").read_text())
    assert adapter["kind"] == "adapter" and adapter["final_loss"] < adapter["loss_history"][0][1] / 4
    assert greedy_answer(out / "base", out / "adapter" / "adapter", TRAIN_PROMPT) == TRAIN_ANSWER
    assert f"after:  {TRAIN_ANSWER}" in proc.stderr


def test_the_demo_writes_verified_gguf_files_and_chats_through_llama_cpp(demo):
    out, proc = demo
    gguf = json.loads((out / "gguf.json").read_text())
    assert [f["quant"] for f in gguf["files"]] == ["f16", "q8_0"]
    for f in gguf["files"]:
        assert f["verify"]["ok"] and f["verify"]["tokenization_ok"], f
        assert (out / "gguf" / f["path"]).is_file()
    chat = (out / "chat.txt").read_text().splitlines()
    assert chat[:2] == ["Q: What does the cat say?", f"A: {TRAIN_ANSWER}"]
    assert f"A: {TRAIN_ANSWER}" in proc.stderr
    assert gguf["files"][0]["path"] in (out / "ollama" / "Modelfile").read_text()
