"""bp-train --mode full on the tiny model: the loss halves, the output is a plain Hugging Face model directory
(kind model) that transformers loads and bp-merge passes through; the ceiling refusal, --offload without CUDA, and
--reasoning-trace."""
from __future__ import annotations

import json
import math
import statistics

import pytest

from bp_common.errors import BpError
from bp_train.config import TrainConfig
from bp_train.trainer import check_offload, train
from helpers.training import prepared

STEPS = 60


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, tiny_llama):
    out = tmp_path_factory.mktemp("full") / "run"
    events = []
    m = train(TrainConfig(output=str(out), data=str(prepared(str(tiny_llama))), mode="full", steps=STEPS, lr=1e-3,
                          lr_scheduler="constant", save_steps=30, log_steps=10), on_event=events.append)
    return m, events, out


def test_full_fine_tuning_halves_the_loss_and_writes_a_model_directory(full_run, tiny_llama):
    import torch
    from transformers import AutoModelForCausalLM
    m, events, out = full_run
    losses = [v for _s, v in m["loss_history"]]
    assert statistics.mean(losses[-5:]) <= 0.5 * statistics.mean(losses[:5]), (losses[:5], losses[-5:])
    assert m["kind"] == "model" and m["model_dir"] == "model" and "adapter_dir" not in m
    assert m["method"] == "sft" and m["mode"] == "full" and m["method_settings"]["mode"] == "full"
    names = {p.name for p in (out / "model").iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "chat_template.jinja"} <= names
    assert not (out / "adapter").exists()
    trained = AutoModelForCausalLM.from_pretrained(str(out / "model"))
    base = AutoModelForCausalLM.from_pretrained(str(tiny_llama))
    assert m["params"] == trained.num_parameters() == base.num_parameters()
    changed = [n for (n, a), (_n, b) in zip(trained.named_parameters(), base.named_parameters())
               if not torch.equal(a, b)]
    assert len(changed) > len(list(base.named_parameters())) // 2
    assert m["heldout_loss"] is not None and m["heldout_loss"] < losses[0]
    assert [e for e in events if e["event"] == "save"] and events[-1]["event"] == "done"
    assert events[-1]["model"] == str(out / "model")


def test_bp_merge_passes_the_model_manifest_through(full_run, run_tool, tmp_path):
    m, _events, out = full_run
    r = run_tool("bp-merge", out, "-o", tmp_path / "merged")
    assert r.rc == 0, r
    assert r.json["id"] == m["id"] and r.json["kind"] == "model"


def test_a_short_full_run_at_the_defaults_takes_a_tenth_of_the_lora_rate(tiny_llama, tmp_path):
    m = train(TrainConfig(output=str(tmp_path / "a"), data=str(prepared(str(tiny_llama))), mode="full", steps=3,
                          save_steps=0))
    hp = m["hyperparameters"]
    assert hp["lr"] == pytest.approx(5e-5) and "a tenth" in hp["chosen"]["lr"]["reason"]
    assert all(math.isfinite(v) for _s, v in m["loss_history"])


def test_a_model_above_the_ceiling_is_refused_with_exit_64(tiny_llama, run_tool, tmp_path):
    out = tmp_path / "out"
    r = run_tool("bp-train", prepared(str(tiny_llama)), "--model", tiny_llama, "--mode", "full",
                 "--full-ft-ceiling", "0.0001", "-o", out)
    assert r.rc == 64, r
    env = r.json
    assert env["code"] == "TRAIN_FULL_FT_TOO_LARGE" and "--mode lora" in env["hint"]
    assert env["details"]["params"] > 1e5 and env["details"]["ceiling_b"] == 0.0001
    assert not out.exists()


def test_offload_without_cuda_fails_fast_with_exit_69(tiny_llama, run_tool, tmp_path):
    out = tmp_path / "out"
    r = run_tool("bp-train", prepared(str(tiny_llama)), "--mode", "full", "--offload", "-o", out,
                 env={"CUDA_VISIBLE_DEVICES": ""})
    assert r.rc == 69, r
    assert r.json["code"] == "DEP_NCCL_MISSING" and "--mode lora" in r.json["hint"]
    assert not out.exists()


def test_offload_needs_both_cuda_and_nccl():
    for cuda, nccl in ((False, True), (True, False), (False, False)):
        with pytest.raises(BpError) as e:
            check_offload(cuda, nccl)
        assert e.value.code == "DEP_NCCL_MISSING" and e.value.details == {"cuda": cuda, "nccl": nccl}
    check_offload(True, True)


def test_reasoning_trace_keeps_think_spans_and_raises_the_default_length(tiny_llama, tmp_path):
    data = tmp_path / "think.jsonl"
    rows = [{"messages": [{"role": "user", "content": f"What is {i} plus {i}?"},
                          {"role": "assistant", "content": f"<think>{i} and {i} make {2 * i}.</think>It is {2 * i}."}]}
            for i in range(24)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    events = []
    m = train(TrainConfig(output=str(tmp_path / "a"), data=str(data), model=str(tiny_llama), steps=2, save_steps=0,
                          reasoning_trace=True), on_event=events.append)
    assert m["seq_len"] == 512 and m["method_settings"]["reasoning_trace"] is True  # the tiny model's context
    assert "--reasoning-trace" in m["hyperparameters"]["chosen"]["seq_len"]["reason"]
    lines = [e["message"] for e in events if e["event"] == "log"]
    assert any("carry <think> spans" in x and "24 keep them" in x for x in lines), lines
    plain = train(TrainConfig(output=str(tmp_path / "b"), data=str(data), model=str(tiny_llama), steps=1,
                              save_steps=0, seq_len=256, reasoning_trace=True))
    assert plain["seq_len"] == 256
