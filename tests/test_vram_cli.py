"""bp-vram as a command: pipes from bp-prep into bp-vram, doctor, errors, fallbacks."""
from __future__ import annotations

import json
import os
import subprocess

from conftest import ROOT, tool_cmd

EXAMPLES = [str(ROOT / "examples" / f) for f in ("chat-openai.jsonl", "chat-alpaca.jsonl")]


def test_prep_pipe_into_vram_passes_the_dataset_on(tiny_llama, tmp_path):
    prep = " ".join(tool_cmd("bp-prep") + EXAMPLES + ["--model", str(tiny_llama), "-o", str(tmp_path / "data")])
    cmd = f"{prep} | {' '.join(tool_cmd('bp-vram'))} --vram-gb 8 --mode lora"
    r = subprocess.run(["bash", "-c", cmd], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    m = json.loads(r.stdout)
    ds = json.loads((tmp_path / "data" / "manifest.json").read_text())
    assert m["kind"] == "vram" and m["inputs"][0] == {"kind": "dataset", "id": ds["id"], "root": ds["root"]}
    assert m["seq_len"] == ds["lengths"]["p95"] and m["model"] == ds["model"]
    assert m["fits"] is True and m["batch_size"] * m["grad_accum"] >= 16
    from safetensors.numpy import load_file
    assert m["params"] == sum(t.size for t in load_file(str(tiny_llama / "model.safetensors")).values())
    assert set(m["components"]) >= {"weights", "adapter", "gradients", "optimizer", "activations", "logits",
                                     "reference", "cuda_context"}


def test_does_not_fit_gives_suggestions_and_a_multi_gpu_plan(tmp_path, run_tool):
    cfg = {"model_type": "qwen2", "hidden_size": 3584, "intermediate_size": 18944, "num_attention_heads": 28,
           "num_hidden_layers": 28, "num_key_value_heads": 4, "vocab_size": 152064, "tie_word_embeddings": False}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    r = run_tool("bp-vram", tmp_path, "--mode", "full", "--vram-gb", "24", "-o", tmp_path / "plan")
    assert r.rc == 0, r
    m = r.json
    assert m["params"] == 7_615_616_512 and m["fits"] is False and m["max_batch_size"] == 0
    assert any("--mode lora" in s and "(fits)" in s for s in m["suggestions"])
    assert m["plan"]["gpus"] >= 2 and m["plan"]["per_gpu_gb"] < m["total_gb"]
    assert m["full_ft_ceiling_b"] == {"pure_gpu": 5, "offload": 7, "applied": 5, "overridden": False}
    assert m["full_ft_allowed"] is False
    assert json.loads((tmp_path / "plan" / "manifest.json").read_text())["id"] == m["id"]
    r = run_tool("bp-vram", tmp_path, "--mode", "full", "--vram-gb", "24", "--full-ft-ceiling", "8")
    assert r.json["full_ft_allowed"] is True and r.json["full_ft_ceiling_b"]["overridden"] is True


def test_unsupported_architecture_is_refused(tmp_path, run_tool):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt_neox", "hidden_size": 8}))
    r = run_tool("bp-vram", tmp_path)
    assert r.rc == 64 and r.json["code"] == "INPUT_INVALID" and "gpt_neox" in r.json["message"]


def test_hub_id_offline_falls_back_to_a_labelled_name_guess(tmp_path, run_tool):
    r = run_tool("bp-vram", "someorg/Thing-3B-Instruct", "--vram-gb", "24",
                 env={"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")})
    assert r.rc == 0, r
    assert r.json["shape_source"] == "name" and 3e9 <= r.json["params"] < 4e9
    assert "guess" in r.stderr and r.json["notes"]


def test_doctor_reports_this_machine(run_tool):
    r = run_tool("bp-vram", "doctor")
    assert r.rc == 0, r
    m = r.json
    assert m["kind"] == "report" and m["subject"] == "doctor"
    assert set(m["features"]) == {"bitsandbytes_4bit", "bitsandbytes_8bit_optimizers", "llama_cpp",
                                  "flash_attention", "nccl"}
    assert m["features"]["llama_cpp"]["ok"] is True  # installed by scripts/bootstrap
    assert m["packages"]["torch"] and m["python"]["version"]
    assert "bp-vram" in m["bp_tools"]["tools"]
    assert isinstance(m["gpus"], list) and "cache" in m["huggingface"]


def test_startup_does_not_import_torch(tiny_llama):
    code = ("import sys\nfrom bp_vram import cli\n"
            f"rc = __import__('bp_common.cli', fromlist=['x']).run_main('bp-vram', cli.get_parser, cli.run, "
            f"[{str(tiny_llama)!r}, '--vram-gb', '8'])\n"
            "assert rc == 0\nassert 'torch' not in sys.modules and 'numpy' not in sys.modules, 'heavy import'\n")
    r = subprocess.run([os.environ.get("PYTHON", __import__("sys").executable), "-c", code], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr


def test_preset_offline_uses_its_recorded_shape(tmp_path, run_tool):
    r = run_tool("bp-vram", "llama-3.2-1b", "--mode", "qlora", "--vram-gb", "16",
                 env={"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")})
    assert r.rc == 0, r
    assert r.json["shape_source"] == "preset" and r.json["params"] == 1_235_814_400
    assert r.json["seq_len"] == 2048 and r.json["lora_r"] == 64
