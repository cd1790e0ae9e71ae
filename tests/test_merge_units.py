"""bp-merge's pieces, called directly: safetensors streaming, bf16 rounding, the tensor math against
PEFT's own merge, block-size independence, combinations, and the end-of-turn token."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from bp_common.errors import BpError
from bp_merge.adapters import open_adapter, scaling
from bp_merge.base import open_base
from bp_merge.merge import plan_merge, write_weights
from bp_merge.shards import (OutTensor, SafetensorsReader, SafetensorsWriter, from_f32, parse_size, plan_shards,
                             read_header, to_f32)
from helpers.peft_adapters import make_adapter


@pytest.fixture(scope="module")
def adapters(tiny_llama, tmp_path_factory):
    d = tmp_path_factory.mktemp("unit-adapters")
    return {
        "lora": make_adapter(tiny_llama, d / "lora", target_modules="all-linear"),
        "lora2": make_adapter(tiny_llama, d / "lora2", seed=1, target_modules=["q_proj", "v_proj"], r=2,
                              lora_alpha=4),
        "dora": make_adapter(tiny_llama, d / "dora", target_modules=["q_proj", "down_proj"], use_dora=True),
        "dora_emb": make_adapter(tiny_llama, d / "dora_emb", target_modules=["embed_tokens"], use_dora=True),
        "mts": make_adapter(tiny_llama, d / "mts", target_modules=["q_proj"], modules_to_save=["lm_head"]),
    }


def peft_merged_state(base, adapter_dir):
    """PEFT's own merge_and_unload, as a name -> float32 array dict (the reference for untied models)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    merged = PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload()
    return {k: v.detach().numpy() for k, v in merged.state_dict().items()}


def merged_state(tmp_path, base, adapter_dirs, weights=None, chunk_bytes=64 << 20, dtype="f32"):
    b = open_base(str(base))
    ads = [open_adapter(a, w) for a, w in zip(adapter_dirs, weights or [1.0] * len(adapter_dirs))]
    plan = plan_merge(b, ads)
    out = tmp_path / f"out-{len(list(tmp_path.iterdir()))}"
    out.mkdir()
    shards = write_weights(plan, b, out, dtype, 1 << 40, chunk_bytes=chunk_bytes)
    r = SafetensorsReader(out / shards[0]["path"])
    return {k: to_f32(r.raw(k), r.tensors[k].dtype) for k in r.tensors}, plan


def test_bf16_rounding_matches_torch_bit_for_bit():
    import torch
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.standard_normal(100_000).astype(np.float32) * 10.0 ** rng.integers(-30, 30, 100_000),
                        np.array([0.0, -0.0, 1.0, 3.0e38, -3.0e38, 1e-40, np.inf, -np.inf], dtype=np.float32)])
    # ties: values exactly halfway between two bf16 numbers round to even
    x = np.concatenate([x, (np.arange(1, 2000, dtype=np.uint32) << 16 | 0x8000).view(np.float32)])
    ours = from_f32(x, "BF16")
    ref = torch.from_numpy(x).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    assert np.array_equal(ours, ref)
    assert np.array_equal(to_f32(ours, "BF16"), torch.from_numpy(x).to(torch.bfloat16).float().numpy())


def test_writer_output_is_read_by_safetensors_and_hash_is_the_files(tmp_path):
    import hashlib

    from safetensors.numpy import load_file
    a = np.arange(12, dtype=np.float32).reshape(3, 4)
    b = np.array([1, 2, 3], dtype=np.int64)
    w = SafetensorsWriter(tmp_path / "x.safetensors", [OutTensor("a", "F32", (3, 4)), OutTensor("b", "I64", (3,))])
    w.write(a[:2])
    w.write(a[2:])
    w.write(b)
    digest = w.close()
    assert digest == hashlib.sha256((tmp_path / "x.safetensors").read_bytes()).hexdigest()
    got = load_file(str(tmp_path / "x.safetensors"))
    assert np.array_equal(got["a"], a) and np.array_equal(got["b"], b)
    r = SafetensorsReader(tmp_path / "x.safetensors")
    assert np.array_equal(r.rows_f32("a", 1, 3), a[1:3])


def test_writer_refuses_a_short_tensor(tmp_path):
    w = SafetensorsWriter(tmp_path / "x.safetensors", [OutTensor("a", "F32", (3, 4))])
    w.write(np.zeros((2, 4), dtype=np.float32))
    with pytest.raises(RuntimeError, match="wrote 32 of 48"):
        w.close()


def test_truncated_or_garbled_headers_are_invalid_weights(tiny_llama, tmp_path):
    src = tiny_llama / "model.safetensors"
    data = src.read_bytes()
    for name, blob in [("cut.safetensors", data[:-100]), ("tiny.safetensors", data[:5]),
                       ("garbage.safetensors", b"\xff" * 64)]:
        (tmp_path / name).write_bytes(blob)
        with pytest.raises(BpError) as e:
            read_header(tmp_path / name)
        assert e.value.code == "EXPORT_WEIGHTS_INVALID", name
    tensors, _ = read_header(src)
    assert "model.embed_tokens.weight" in tensors


def test_sizes_and_shard_plans():
    assert parse_size("5GB") == 5 * 10**9 and parse_size("500MiB") == 500 * 2**20 and parse_size("1024") == 1024
    with pytest.raises(BpError):
        parse_size("five gigs")
    ts = [OutTensor(f"t{i}", "F32", (n,)) for i, n in enumerate([10, 10, 30, 5, 5])]
    shards = plan_shards(ts, 80)  # bytes: 40 40 120 20 20
    assert [[t.name for t in s] for s in shards] == [["t0", "t1"], ["t2"], ["t3", "t4"]]


@pytest.mark.parametrize("kind", ["lora", "dora", "mts"])
def test_merged_tensors_equal_peft_merge_and_unload(kind, adapters, tiny_llama, tmp_path):
    ours, plan = merged_state(tmp_path, tiny_llama, [adapters[kind]])
    ref = peft_merged_state(tiny_llama, adapters[kind])
    assert set(ours) == set(ref)
    changed = 0
    for name, value in ours.items():
        assert np.allclose(value, ref[name], rtol=0, atol=2e-6), name
        changed += not np.array_equal(value, to_f32(SafetensorsReader(tiny_llama / "model.safetensors").raw(name),
                                                    "F32"))
    assert changed == plan.merged_modules > 0


def test_dora_on_embeddings_normalises_columns_like_peft(adapters, tiny_llama, tmp_path):
    ours, _ = merged_state(tmp_path, tiny_llama, [adapters["dora_emb"]])
    ref = peft_merged_state(tiny_llama, adapters["dora_emb"])
    assert np.allclose(ours["model.embed_tokens.weight"], ref["model.embed_tokens.weight"], atol=2e-6)


@pytest.mark.parametrize("kind", ["lora", "dora", "dora_emb"])
def test_block_size_does_not_change_a_single_bit(kind, adapters, tiny_llama, tmp_path):
    big, _ = merged_state(tmp_path, tiny_llama, [adapters[kind]], dtype="bf16")
    small, _ = merged_state(tmp_path, tiny_llama, [adapters[kind]], chunk_bytes=1000, dtype="bf16")
    for name in big:
        assert np.array_equal(big[name], small[name]), name


def test_weighted_combination_is_base_plus_weighted_deltas(adapters, tiny_llama, tmp_path):
    ours, plan = merged_state(tmp_path, tiny_llama, [adapters["lora"], adapters["lora2"]], weights=[0.7, 0.3])
    m1 = peft_merged_state(tiny_llama, adapters["lora"])
    m2 = peft_merged_state(tiny_llama, adapters["lora2"])
    base = {k: to_f32(SafetensorsReader(tiny_llama / "model.safetensors").raw(k), "F32") for k in ours}
    for name in ours:
        expect = base[name] + 0.7 * (m1[name] - base[name]) + 0.3 * (m2[name] - base[name])
        assert np.allclose(ours[name], expect, atol=3e-6), name
    assert plan.merged_modules == 14 + 4


def test_dora_and_modules_to_save_refuse_weights(adapters, tiny_llama):
    b = open_base(str(tiny_llama))
    for kind in ("dora", "mts"):
        with pytest.raises(BpError) as e:
            plan_merge(b, [open_adapter(adapters[kind], 0.5)])
        assert e.value.code == "CONFIG_INVALID_SETTING"


def test_scaling_follows_rslora_and_alpha_pattern():
    assert scaling({"lora_alpha": 16}, "model.layers.0.self_attn.q_proj", 4) == 4.0
    assert scaling({"lora_alpha": 16, "use_rslora": True}, "x.q_proj", 4) == 8.0
    cfg = {"lora_alpha": 16, "alpha_pattern": {"v_proj": 4}}
    assert scaling(cfg, "model.layers.0.self_attn.v_proj", 4) == 1.0
    assert scaling(cfg, "model.layers.0.self_attn.q_proj", 4) == 4.0


def test_unknown_peft_tensors_and_types_are_refused(adapters, tmp_path):
    d = tmp_path / "ia3"
    shutil.copytree(adapters["lora"], d)
    cfg = json.loads((d / "adapter_config.json").read_text())
    (d / "adapter_config.json").write_text(json.dumps({**cfg, "peft_type": "IA3"}))
    with pytest.raises(BpError) as e:
        open_adapter(d)
    assert e.value.code == "EXPORT_ADAPTER_UNSUPPORTED"
    (d / "adapter_config.json").write_text(json.dumps({**cfg, "layer_replication": [[0, 2]]}))
    with pytest.raises(BpError) as e:
        open_adapter(d)
    assert e.value.code == "EXPORT_ADAPTER_UNSUPPORTED"


def test_end_of_turn_token_and_eos_ids(tiny_llama, tmp_path):
    from bp_common.eos import end_of_turn_token, eos_token_ids, special_tokens
    assert end_of_turn_token(tiny_llama) == "<|im_end|>"
    ids = special_tokens(tiny_llama)
    # A Llama-3 style template on the same vocabulary: the turn ends with a token that is not eos_token.
    d = tmp_path / "l3"
    shutil.copytree(tiny_llama, d)
    (d / "chat_template.jinja").write_text(
        "{{ bos_token }}{% for m in messages %}<|im_start|>{{ m['role'] }}\n\n{{ m['content'] }}<pad>"
        "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n\n{% endif %}")
    (d / "generation_config.json").write_text(json.dumps({"eos_token_id": ids["<|endoftext|>"]}))
    assert end_of_turn_token(d) == "<pad>"
    assert eos_token_ids(d) == [ids["<|endoftext|>"], ids["<|im_end|>"], ids["<pad>"]]
    (d / "chat_template.jinja").unlink()
    assert end_of_turn_token(d) is None


def test_compare_logits_tolerances_and_dtype_floor():
    from bp_merge.verify import compare_logits
    rng = np.random.default_rng(0)
    ref = rng.standard_normal((8, 50)).astype(np.float32) * 5
    ref[np.arange(8), np.arange(8)] = 30.0  # a clear top-1 at every position
    assert compare_logits(ref, ref + 5e-5, "f32")["passed"]
    assert not compare_logits(ref, ref + 0.01, "f32")["passed"]
    off = ref + rng.choice([-1, 1], ref.shape) * 0.06 * 30  # 6 % of the largest logit
    assert not compare_logits(ref, off, "bf16")["passed"]
    # ...unless rounding the base alone to bf16 already moves the logits that much
    v = compare_logits(ref, off, "bf16", floor=0.04 * 30)
    assert v["passed"] and v["tolerance"] == pytest.approx(0.08 * 30)
    flipped = ref.copy()
    flipped[3, 40] = 31.0  # a decisive top-1 change at one position
    v = compare_logits(ref, flipped, "bf16")
    assert not v["passed"] and v["top1"] == pytest.approx(7 / 8) and v["top1_decisive_mismatches"] == 1
    near = ref.copy()
    near[5] = 0.0
    near[5, 5], near[5, 6] = 10.0, 10.01
    got = near.copy()
    got[5, 5], got[5, 6] = 10.01, 10.0  # a near-tie flips under rounding: not decisive
    v = compare_logits(near, got, "bf16")
    assert v["passed"] and v["top1"] == pytest.approx(7 / 8) and v["top1_decisive_mismatches"] == 0
    assert not compare_logits(ref, np.full_like(ref, np.nan), "f32")["passed"]


def test_the_merge_path_does_not_import_torch():
    import subprocess
    import sys
    code = ("import sys, bp_merge.cli, bp_merge.merge, bp_merge.result, bp_merge.base, bp_merge.adapters; "
            "assert 'torch' not in sys.modules and 'transformers' not in sys.modules, 'heavy import'")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
