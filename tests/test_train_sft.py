"""bp-train on the tiny model, in-process: the loss falls, the adapter answers, presets apply, the manifest
and the events say what happened, and failures end runs the documented way."""
from __future__ import annotations

import json
import statistics

import pytest

from bp_common.errors import BpError
from bp_train import runs
from bp_train.config import TrainConfig
from bp_train.trainer import Faults, train
from helpers.training import TRAIN_ANSWER, TRAIN_PROMPT, events_of, greedy_answer, prepared

# A random tiny model needs a large learning rate to learn in a few hundred steps.
LR = 5e-3


def halved(manifest, by_step: int | None = None) -> bool:
    """The mean of the last ten logged losses (up to by_step) is at most half the mean of the first ten."""
    losses = [v for s, v in manifest["loss_history"] if by_step is None or s <= by_step]
    return statistics.mean(losses[-10:]) <= 0.5 * statistics.mean(losses[:10])


# The loss must halve within 200 steps; learning the answers word for word takes the tiny model longer.
STEPS = 600


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, tiny_llama):
    out = tmp_path_factory.mktemp("lora") / "adapter"
    events = []
    cfg = TrainConfig(output=str(out), data=str(prepared(str(tiny_llama))), steps=STEPS, lr=LR,
                      lr_scheduler="constant", lora_dropout=0.0, save_steps=300, eval_steps=300, log_steps=20)
    from bp_common.progress import Reporter
    reporter = Reporter("bp-train", level="error", events_file=str(out.parent / "events.jsonl"))
    manifest = train(cfg, on_event=events.append, reporter=reporter)
    reporter.close()
    return cfg, manifest, events, out


def test_lora_loss_halves_and_the_adapter_answers_a_training_prompt(lora_run, tiny_llama):
    _cfg, m, _events, out = lora_run
    assert m["steps"] == STEPS and halved(m, by_step=200), m["loss_history"][:3] + m["loss_history"][-3:]
    assert greedy_answer(tiny_llama, out / "adapter", TRAIN_PROMPT) == TRAIN_ANSWER


def test_manifest_carries_what_downstream_tools_read(lora_run, tiny_llama):
    cfg, m, _events, out = lora_run
    assert m["kind"] == "adapter" and m["adapter_dir"] == "adapter" and m["method"] == "sft"
    assert m["base_model"] == str(tiny_llama.resolve())
    assert m["base_model_digest"]["config"] and set(m["base_model_digest"]["weights"]) == {"model.safetensors"}
    assert len(m["loss_history"]) == 100 and m["loss_history"][0][0] == 1 and m["loss_history"][-1][0] == STEPS
    assert m["final_loss"] == m["loss_history"][-1][1]
    hp = m["hyperparameters"]
    for key in ("mode", "method", "lora_r", "lora_alpha", "lr", "seq_len", "seed", "batch_size", "grad_accum",
                "targets"):
        assert key in hp
    assert hp["lr"] == LR and hp["lora_r"] == 16 and hp["chosen"]["lora_r"]["reason"] == "default"
    assert m["tokens_seen"]["input"] > m["tokens_seen"]["loss"] > 0
    assert m["device"]["kind"] == "cpu" and m["peak_memory"]["rss_bytes"] > 0 and m["duration_s"] > 0
    assert m["dataset"]["id"] == json.loads((prepared(str(tiny_llama)) / "manifest.json").read_text())["id"]
    assert m["heldout_loss"] is not None and m["heldout_loss"] < m["loss_history"][0][1]
    assert json.loads((out / "manifest.json").read_text())["id"] == m["id"]
    adapter = out / "adapter"
    names = {p.name for p in adapter.iterdir()}
    assert {"adapter_model.safetensors", "adapter_config.json", "tokenizer.json", "chat_template.jinja"} <= names
    assert not [n for n in names if n.endswith((".bin", ".pt", ".pth", ".partial"))]
    assert json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"] == m["base_model"]
    record = runs.find(out, m["run_id"])
    assert record["status"] == "completed" and record["steps"] == STEPS and record["config"]["lr"] == LR


def test_events_reach_the_callback_and_the_events_file_in_order(lora_run):
    _cfg, m, events, out = lora_run
    names = [e["event"] for e in events if e["event"] != "log"]
    assert names[0] == "start" and names[-1] == "done"
    steps = [e["step"] for e in events if e["event"] == "step"]
    assert steps == [1] + list(range(20, STEPS + 1, 20))
    assert [e["step"] for e in events if e["event"] == "save"] == [300, 600]
    evals = [e for e in events if e["event"] == "eval"]
    assert [e["step"] for e in evals] == [300, 600] and evals[-1]["heldout_loss"] == m["heldout_loss"]
    step = next(e for e in events if e["event"] == "step" and e["step"] == STEPS)
    assert {"loss", "lr", "tokens_per_s", "eta_s", "tokens_seen"} <= set(step)
    from_file = [e for e in events_of(out.parent / "events.jsonl") if e["event"] != "log"]
    assert [(e["event"], e.get("step")) for e in from_file] == [(e["event"], e.get("step")) for e in events
                                                                if e["event"] != "log"]


def test_rerun_with_the_same_inputs_and_settings_is_a_no_op(lora_run):
    cfg, m, _events, _out = lora_run
    again = train(cfg)
    assert again["id"] == m["id"] and again["created_at"] == m["created_at"]


@pytest.mark.parametrize("kw", [dict(mode="qlora"), dict(dora=True)], ids=["qlora-cpu-nf4", "dora"])
def test_qlora_and_dora_loss_halves(tmp_path, tiny_llama, kw):
    m = train(TrainConfig(output=str(tmp_path / "a"), data=str(prepared(str(tiny_llama))), steps=150, lr=LR,
                          lr_scheduler="constant", save_steps=0, **kw))
    assert halved(m), m["loss_history"][:3] + m["loss_history"][-3:]
    cfg = json.loads((tmp_path / "a" / "adapter" / "adapter_config.json").read_text())
    assert cfg["use_dora"] is bool(kw.get("dora"))
    assert m["hyperparameters"]["mode"] == kw.get("mode", "lora")
    if kw.get("mode") == "qlora":
        assert m["hyperparameters"]["compute_dtype"] == "f32"


@pytest.mark.parametrize("preset, r, alpha, targets, multiplier", [
    ("fast", 16, 32, ["q_proj", "v_proj"], 1.0),
    ("quality", 256, 512, "all-linear", 10.0),
])
def test_presets_really_set_the_adapter(tmp_path, tiny_llama, preset, r, alpha, targets, multiplier):
    m = train(TrainConfig(output=str(tmp_path / preset), data=str(prepared(str(tiny_llama))), steps=2,
                          preset=preset, save_steps=0))
    cfg = json.loads((tmp_path / preset / "adapter" / "adapter_config.json").read_text())
    assert (cfg["r"], cfg["lora_alpha"]) == (r, alpha)
    if targets == "all-linear":
        assert {t.rsplit(".", 1)[-1] for t in cfg["target_modules"]} == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                              "down_proj"}
    else:
        assert sorted(cfg["target_modules"]) == targets
    hp = m["hyperparameters"]
    assert hp["preset"] == preset and hp["lr_multiplier"] == multiplier
    assert hp["lr"] == pytest.approx(5e-4 * multiplier)  # < 1,000 rows: 5e-4, times the preset's multiplier


def test_pissa_adapter_is_saved_as_plain_lora_against_the_original_base(tmp_path, tiny_llama):
    """The converted adapter on the untouched base reproduces the trained (residual base + PiSSA) model."""
    import torch
    from peft import PeftModel, set_peft_model_state_dict
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, set_seed
    from bp_train.config import DeviceFacts, resolve
    from bp_train.model import attach_adapter, load_base
    out = tmp_path / "pissa"
    cfg = TrainConfig(output=str(out), data=str(prepared(str(tiny_llama))), steps=6, lr=LR,
                      init_lora_weights="pissa", save_steps=6, keep_checkpoints=1)
    m = train(cfg)
    saved = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert saved["r"] == 2 * m["hyperparameters"]["lora_r"] and saved["init_lora_weights"] is True
    # rebuild the trained model as training saw it: the same seeded PiSSA init, then the step-6 weights
    hp = resolve(cfg, train_rows=10, device=DeviceFacts("cpu"))
    hp.seed = m["hyperparameters"]["seed"]
    set_seed(hp.seed)
    trained = attach_adapter(load_base(tiny_llama, hp, device_kind="cpu", allow_pickle=False,
                                       trust_remote_code=False), hp)
    set_peft_model_state_dict(trained, load_file(str(out / "checkpoints" / "step-6" / "adapter_model.safetensors")))
    plain = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(tiny_llama)), str(out / "adapter"))
    ids = torch.tensor([[1, 50, 60, 70, 80, 90, 100]])
    with torch.no_grad():
        a, b = trained.eval()(input_ids=ids).logits, plain.eval()(input_ids=ids).logits
    assert float((a - b).abs().max()) < 1e-4


def test_out_of_memory_ends_the_run_with_an_oom_event_and_a_failed_record(tmp_path, tiny_llama):
    events = []
    with pytest.raises(BpError) as e:
        train(TrainConfig(output=str(tmp_path / "o"), data=str(prepared(str(tiny_llama))), steps=10, save_steps=0,
                          oom_recovery=False),
              on_event=events.append, faults=Faults(oom_at_step=3))
    assert e.value.code == "RUNTIME_OOM" and e.value.exit_code == 137 and e.value.details["step"] == 3
    assert [ev["step"] for ev in events if ev["event"] == "oom"] == [3]
    assert [ev["event"] for ev in events][-1] == "error"
    record = runs.read_history(tmp_path / "o")[-1]
    assert record["status"] == "failed" and record["failure"]["code"] == "RUNTIME_OOM" and record["steps"] == 2


def test_a_diverging_run_ends_with_train_diverged_and_a_failed_record(tmp_path, tiny_llama):
    with pytest.raises(BpError) as e:
        train(TrainConfig(output=str(tmp_path / "d"), data=str(prepared(str(tiny_llama))), steps=20, save_steps=0),
              faults=Faults(nan_at_step=4))
    assert e.value.code == "TRAIN_DIVERGED" and e.value.exit_code == 65 and "step 4" in e.value.message
    record = runs.read_history(tmp_path / "d")[-1]
    assert record["status"] == "failed" and record["failure"]["code"] == "TRAIN_DIVERGED"
