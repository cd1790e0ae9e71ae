"""Acceptance: merged models reproduce base + adapter (PEFT) for LoRA, DoRA, rsLoRA and QLoRA-trained
adapters, with modules_to_save, tied embeddings and several shards; f32 within 1e-4, bf16 with the
same top-1 token everywhere and max |Δlogit| within 5 % of the largest logit.

Each merge runs bp-merge in-process (its own parity check on), and the test then checks the
published model independently: transformers loads it from disk and PEFT recomputes the adapter.
"""
from __future__ import annotations

import json

import numpy as np
import pytest

from helpers.peft_adapters import adapter_manifest, make_adapter, make_gpt2, make_qlora_adapter
from helpers.peft_adapters import run_merge as merge


def independent_logits(base, adapter_dir, merged_dir):
    """(reference logits of base + adapter through PEFT, logits of the merged model from disk)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from bp_merge.verify import PROBE
    tok = AutoTokenizer.from_pretrained(str(merged_dir))
    ids = torch.tensor([tok(tok.apply_chat_template(PROBE, tokenize=False))["input_ids"]])
    with torch.no_grad():
        ref_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32),
                                              str(adapter_dir))
        ref = ref_model(ids).logits[0].numpy()
        got = AutoModelForCausalLM.from_pretrained(str(merged_dir), dtype=torch.float32)(ids).logits[0].numpy()
    return ref, got


def assert_parity(ref, got, dtype):
    diff = float(np.abs(ref - got).max())
    if dtype == "f32":
        assert diff < 1e-4, diff
    else:
        assert (ref.argmax(-1) == got.argmax(-1)).all(), "top-1 token differs at some probe position"
        assert diff <= 0.05 * float(np.abs(ref).max()), diff
    return diff


@pytest.fixture(scope="session")
def parity_adapters(tiny_llama, tmp_path_factory):
    """Adapters trained for a few steps on the probe conversation, one per variant."""
    d = tmp_path_factory.mktemp("parity-adapters")
    return {
        "lora": make_adapter(tiny_llama, d / "lora", target_modules="all-linear", steps=20),
        "dora": make_adapter(tiny_llama, d / "dora", target_modules="all-linear", use_dora=True, steps=20),
        "rslora": make_adapter(tiny_llama, d / "rslora", target_modules="all-linear", use_rslora=True, r=8,
                               lora_alpha=4, steps=20),
        "qlora": make_qlora_adapter(tiny_llama, d / "qlora", steps=8),
        "modules_to_save": make_adapter(tiny_llama, d / "mts", target_modules=["q_proj", "v_proj"],
                                        modules_to_save=["lm_head"], steps=20),
    }


@pytest.mark.parametrize("dtype", ["f32", "bf16"])
@pytest.mark.parametrize("kind", ["lora", "dora", "rslora", "qlora", "modules_to_save"])
def test_merge_reproduces_the_adapter(kind, dtype, parity_adapters, tiny_llama, tmp_path):
    adapter = parity_adapters[kind]
    rc, m = merge(adapter, "--base", tiny_llama, "-o", tmp_path / "out", "--dtype", dtype)
    assert rc == 0, m
    assert m["kind"] == "model" and m["dtype"] == dtype and m["verify"]["passed"]
    assert m["merged_modules"] > 0 and m["adapters"][0]["variant"] == {"dora": "dora", "rslora": "rslora"}.get(kind,
                                                                                                               "lora")
    model_dir = tmp_path / "out" / m["model_dir"]
    cfg = json.loads((model_dir / "config.json").read_text())
    assert cfg["dtype"] == {"f32": "float32", "bf16": "bfloat16"}[dtype]
    ref, got = independent_logits(tiny_llama, adapter, model_dir)
    diff = assert_parity(ref, got, dtype)
    # the tool's own check measured the same thing
    assert m["verify"]["max_abs_diff"] == pytest.approx(diff, rel=1e-3, abs=1e-6)
    assert m["verify"]["top1"] == 1.0
    assert (m["verify"]["dtype_floor"] > 0) is (dtype != "f32")


def test_qlora_adapter_weights_are_bf16_and_merge_into_the_full_precision_base(parity_adapters, tiny_llama,
                                                                               tmp_path):
    from bp_merge.shards import read_header
    tensors, _ = read_header(parity_adapters["qlora"] / "adapter_model.safetensors")
    assert {t.dtype for t in tensors.values()} == {"BF16"}
    rc, m = merge(parity_adapters["qlora"], "-o", tmp_path / "out", "--dtype", "f32")  # base from adapter_config
    assert rc == 0, m
    assert m["base_model_path"] == str(tiny_llama.resolve())
    assert m["verify"]["max_abs_diff"] < 1e-4


@pytest.fixture(scope="session")
def tied_llama(tiny_model_factory):
    return tiny_model_factory("llama", tie=True)


@pytest.mark.parametrize("case, lora_kw, stays_tied", [
    ("linears", dict(target_modules="all-linear"), True),
    ("modules_to_save_head", dict(target_modules=["q_proj"], modules_to_save=["lm_head"]), False),
    ("lora_on_embedding", dict(target_modules=["embed_tokens", "q_proj"]), False),
    ("tied_lora_on_embedding", dict(target_modules=["embed_tokens", "q_proj"], ensure_weight_tying=True), True),
])
def test_tied_embeddings(case, lora_kw, stays_tied, tied_llama, tmp_path):
    """A tied base stays tied unless the adapter changed head and embedding differently (then PEFT
    ran them apart and only separate tensors reproduce it)."""
    from bp_merge.shards import read_header
    adapter = make_adapter(tied_llama, tmp_path / "adapter", **lora_kw)
    rc, m = merge(adapter, "--base", tied_llama, "-o", tmp_path / "out", "--dtype", "f32")
    assert rc == 0, m
    model_dir = tmp_path / "out" / "model"
    names, _ = read_header(model_dir / "model.safetensors")
    cfg = json.loads((model_dir / "config.json").read_text())
    assert m["tied_embeddings"] is stays_tied and m["untied_head"] is not stays_tied
    assert cfg["tie_word_embeddings"] is stays_tied
    assert ("lm_head.weight" in names) is not stays_tied
    ref, got = independent_logits(tied_llama, adapter, model_dir)
    assert_parity(ref, got, "f32")


def test_gemma2_ties_by_default_and_stays_tied(tiny_model_factory, tmp_path):
    gemma = tiny_model_factory("gemma2")
    adapter = make_adapter(gemma, tmp_path / "adapter", target_modules="all-linear", steps=10)
    rc, m = merge(adapter, "--base", gemma, "-o", tmp_path / "out", "--dtype", "f32")
    assert rc == 0, m
    assert m["tied_embeddings"] is True
    ref, got = independent_logits(gemma, adapter, tmp_path / "out" / "model")
    assert_parity(ref, got, "f32")


@pytest.mark.parametrize("dora", [False, True])
def test_fan_in_fan_out_layers(dora, tiny_llama, tmp_path_factory, tmp_path):
    """GPT-2's Conv1D stores weights transposed: the delta is (B·A)ᵀ and DoRA's norm runs over columns."""
    gpt2 = tmp_path_factory.getbasetemp() / "gpt2"
    if not (gpt2 / "config.json").exists():
        make_gpt2(gpt2, tiny_llama)
    adapter = make_adapter(gpt2, tmp_path / "adapter", target_modules=["c_attn", "c_proj", "c_fc"],
                           fan_in_fan_out=True, use_dora=dora)
    rc, m = merge(adapter, "--base", gpt2, "-o", tmp_path / "out", "--dtype", "f32")
    assert rc == 0, m
    ref, got = independent_logits(gpt2, adapter, tmp_path / "out" / "model")
    assert_parity(ref, got, "f32")


def test_output_split_into_shards_with_an_index(parity_adapters, tiny_llama, tmp_path):
    rc, m = merge(parity_adapters["lora"], "--base", tiny_llama, "-o", tmp_path / "out", "--dtype", "f32",
                  "--max-shard-size", "100KB")
    assert rc == 0, m
    model_dir = tmp_path / "out" / "model"
    index = json.loads((model_dir / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) == len(m["shards"]) >= 5
    assert files == sorted(s["path"].split("/")[-1] for s in m["shards"])
    for s in m["shards"]:
        assert (tmp_path / "out" / s["path"]).stat().st_size == s["size"]
        assert s["size"] <= 100_000 + 4096 or s["tensors"] == 1
    assert index["metadata"]["total_size"] == m["params"] * 4
    ref, got = independent_logits(tiny_llama, parity_adapters["lora"], model_dir)
    assert_parity(ref, got, "f32")


def test_weighted_adapters_verify_against_peft_with_scaled_adapters(parity_adapters, tiny_llama, tmp_path):
    rc, m = merge(parity_adapters["lora"], "--adapter", parity_adapters["rslora"], "--weights", "0.7,0.3",
                  "--base", tiny_llama, "-o", tmp_path / "out", "--dtype", "f32")
    assert rc == 0, m
    assert [a["weight"] for a in m["adapters"]] == [0.7, 0.3] and m["method"] == "combination"
    assert m["verify"]["max_abs_diff"] < 1e-4


def test_adapter_manifest_input_gives_a_model_card_from_the_chain(parity_adapters, tiny_llama, tmp_path):
    import shutil
    run_dir = tmp_path / "runs" / "adapter"
    shutil.copytree(parity_adapters["lora"], run_dir / "adapter")
    adapter_manifest(run_dir, tiny_llama, dataset_root=tmp_path / "runs" / "data")
    rc, m = merge(run_dir, "-o", tmp_path / "runs" / "merged")
    assert rc == 0, m
    assert m["inputs"] == [{"kind": "adapter", "id": "a1d2a3p4t5e6r7x8", "root": str(run_dir)}]
    assert m["method"] == "sft" and m["adapters"][0]["mode"] == "lora"
    card = (tmp_path / "runs" / "merged" / "model" / "README.md").read_text()
    assert card.startswith("---\nbase_model: \"" + str(tiny_llama) + "\"\n")
    for needle in ("d5e7a1b2c3d4e5f6", "| final loss | 0.42 |", "| method | sft |", "▁", "bp-prep data.jsonl",
                   "bp-train -o", "bp-merge ", "max |Δlogit|"):
        assert needle in card, needle
    assert card.index("bp-prep data.jsonl") < card.index("bp-train -o") < card.index("bp-merge ")
    gen = json.loads((tmp_path / "runs" / "merged" / "model" / "generation_config.json").read_text())
    im_end = json.loads((tiny_llama / "tokenizer.json").read_text())
    im_end = next(t["id"] for t in im_end["added_tokens"] if t["content"] == "<|im_end|>")
    assert im_end in gen["eos_token_id"] and m["end_of_turn"] == "<|im_end|>"


def test_lora_bias_is_merged_into_the_base_bias(tiny_qwen2, tmp_path):
    adapter = make_adapter(tiny_qwen2, tmp_path / "adapter", target_modules=["q_proj", "v_proj"], lora_bias=True)
    rc, m = merge(adapter, "--base", tiny_qwen2, "-o", tmp_path / "out", "--dtype", "f32")
    assert rc == 0, m
    ref, got = independent_logits(tiny_qwen2, adapter, tmp_path / "out" / "model")
    assert_parity(ref, got, "f32")


def test_a_base_without_tokenizer_is_probed_with_token_ids(tiny_llama, tmp_path):
    import shutil
    base = tmp_path / "base"
    base.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copyfile(tiny_llama / name, base / name)
    adapter = make_adapter(base, tmp_path / "adapter", target_modules=["q_proj"])
    rc, m = merge(adapter, "--base", base, "-o", tmp_path / "out", "--dtype", "f32")
    assert rc == 0, m
    assert m["verify"]["probe"] == "token_ids" and m["verify"]["max_abs_diff"] < 1e-4
    assert m["chat_template"] is False and m["end_of_turn"] is None
