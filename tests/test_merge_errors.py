"""bp-merge's failures: each has its documented code and exit status, and none leaves an output
directory (or a .partial, or a lock) behind. Also: re-runs are no-ops, --force redoes."""
from __future__ import annotations

import json
import shutil

import pytest

from helpers.peft_adapters import make_adapter, run_merge


@pytest.fixture(scope="module")
def adapter(tiny_llama, tmp_path_factory):
    return make_adapter(tiny_llama, tmp_path_factory.mktemp("err-adapter") / "a", target_modules="all-linear")


def copy_model(src, dst):
    shutil.copytree(src, dst)
    return dst


def assert_nothing_published(out):
    assert not out.exists(), "an output directory was left behind"
    assert not out.with_name(out.name + ".partial").exists()
    assert not out.with_name(out.name + ".lock").exists()


def assert_error(rc, env, code, exit_code):
    assert env["kind"] == "error" and env["code"] == code, env
    assert rc == exit_code == env["exit_code"]


def test_truncated_base_shard(adapter, tiny_llama, tmp_path):
    base = copy_model(tiny_llama, tmp_path / "base")
    st = base / "model.safetensors"
    st.write_bytes(st.read_bytes()[:-4096])
    out = tmp_path / "out"
    rc, env = run_merge(adapter, "--base", base, "-o", out)
    assert_error(rc, env, "EXPORT_WEIGHTS_INVALID", 65)
    assert "truncated" in env["message"] and env["details"]["file"] == str(st)
    assert_nothing_published(out)


def test_index_naming_a_missing_shard(adapter, tiny_llama, tmp_path):
    base = copy_model(tiny_llama, tmp_path / "base")
    (base / "model.safetensors").rename(base / "model-00001-of-00002.safetensors")
    weight_map = {"model.embed_tokens.weight": "model-00001-of-00002.safetensors",
                  "lm_head.weight": "model-00002-of-00002.safetensors"}
    (base / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    out = tmp_path / "out"
    rc, env = run_merge(adapter, "--base", base, "-o", out)
    assert_error(rc, env, "EXPORT_WEIGHTS_INVALID", 65)
    assert_nothing_published(out)


def test_adapter_for_a_different_base(adapter, tiny_256, tmp_path):
    out = tmp_path / "out"
    rc, env = run_merge(adapter, "--base", tiny_256, "-o", out)
    assert_error(rc, env, "EXPORT_ADAPTER_MISMATCH", 65)
    problems = env["details"]["problems"]
    assert len(problems) == 14 and all("do not fit the base weight" in p for p in problems)
    assert_nothing_published(out)


def test_adapter_targeting_modules_the_base_lacks(tiny_llama, tiny_qwen2, tmp_path):
    # qwen2 adapters on q_proj carry a bias the llama base does not have (lora_bias)
    adapter = make_adapter(tiny_qwen2, tmp_path / "a", target_modules=["q_proj"], lora_bias=True)
    out = tmp_path / "out"
    rc, env = run_merge(adapter, "--base", tiny_llama, "-o", out)
    assert_error(rc, env, "EXPORT_ADAPTER_MISMATCH", 65)
    assert "bias" in env["message"]
    assert_nothing_published(out)


def test_missing_base(adapter, tmp_path):
    out = tmp_path / "out"
    rc, env = run_merge(adapter, "--base", tmp_path / "no-such-model", "-o", out)
    assert_error(rc, env, "INPUT_NOT_FOUND", 66)
    assert_nothing_published(out)
    rc, env = run_merge(tmp_path / "no-such-adapter", "--base", tmp_path, "-o", out)
    assert_error(rc, env, "INPUT_NOT_FOUND", 66)
    assert_nothing_published(out)


def test_pickle_only_base_is_refused_unless_allowed(adapter, tiny_llama, tmp_path):
    import torch
    from safetensors.torch import load_file
    base = copy_model(tiny_llama, tmp_path / "base")
    torch.save(load_file(str(base / "model.safetensors")), base / "pytorch_model.bin")
    (base / "model.safetensors").unlink()
    out = tmp_path / "out"
    rc, env = run_merge(adapter, "--base", base, "-o", out)
    assert_error(rc, env, "INPUT_PICKLE_REFUSED", 64)
    assert_nothing_published(out)
    rc, m = run_merge(adapter, "--base", base, "-o", out, "--allow-pickle", "--dtype", "f32")
    assert rc == 0, m
    assert m["verify"]["max_abs_diff"] < 1e-4
    assert sorted(p.name for p in (out / "model").glob("*.safetensors")) == ["model.safetensors"]


def test_quantized_base_is_refused(adapter, tiny_llama, tmp_path):
    base = copy_model(tiny_llama, tmp_path / "base")
    cfg = json.loads((base / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    (base / "config.json").write_text(json.dumps(cfg))
    out = tmp_path / "out"
    rc, env = run_merge(adapter, "--base", base, "-o", out)
    assert_error(rc, env, "EXPORT_BASE_UNSUPPORTED", 64)
    assert_nothing_published(out)


def test_nan_in_the_adapter_is_invalid_weights(tiny_llama, tmp_path):
    from safetensors.torch import load_file, save_file
    a = make_adapter(tiny_llama, tmp_path / "a", target_modules=["q_proj"])
    tensors = load_file(str(a / "adapter_model.safetensors"))
    key = next(k for k in tensors if k.endswith("lora_B.weight"))
    tensors[key][0, 0] = float("nan")
    save_file(tensors, str(a / "adapter_model.safetensors"))
    out = tmp_path / "out"
    rc, env = run_merge(a, "--base", tiny_llama, "-o", out)
    assert_error(rc, env, "EXPORT_WEIGHTS_INVALID", 65)
    assert "NaN" in env["message"]
    assert_nothing_published(out)


def test_parity_failure_publishes_nothing(adapter, tiny_llama, tmp_path, monkeypatch):
    from bp_merge import merge as merge_mod
    rows = merge_mod.Term.rows
    monkeypatch.setattr(merge_mod.Term, "rows", lambda self, r0, r1: rows(self, r0, r1) * 1.05)  # a 5 % bug
    out = tmp_path / "out"
    rc, env = run_merge(adapter, "--base", tiny_llama, "-o", out, "--dtype", "f32")
    assert_error(rc, env, "EXPORT_MERGE_MISMATCH", 65)
    assert env["details"]["max_abs_diff"] > env["details"]["tolerance"]
    assert_nothing_published(out)


def test_disk_space_is_checked_before_writing(adapter, tiny_llama, tmp_path, monkeypatch):
    import bp_common.io
    monkeypatch.setattr(bp_common.io, "free_bytes", lambda path: 1000)
    out = tmp_path / "out"
    rc, env = run_merge(adapter, "--base", tiny_llama, "-o", out)
    assert_error(rc, env, "RUNTIME_DISK_FULL", 74)
    assert env["details"]["needed_bytes"] > 300_000
    assert_nothing_published(out)


def test_rerun_is_a_no_op_and_a_different_result_needs_force(adapter, tiny_llama, tmp_path):
    out = tmp_path / "out"
    rc, first = run_merge(adapter, "--base", tiny_llama, "-o", out, "--no-verify")
    assert rc == 0 and first["verify"] is None
    shard = out / first["shards"][0]["path"]
    stamp = shard.stat().st_mtime_ns
    rc, again = run_merge(adapter, "--base", tiny_llama, "-o", out, "--no-verify")
    assert rc == 0 and again == first and shard.stat().st_mtime_ns == stamp
    rc, env = run_merge(adapter, "--base", tiny_llama, "-o", out, "--no-verify", "--dtype", "f16")
    assert_error(rc, env, "STATE_OUTPUT_EXISTS", 73)
    assert json.loads((out / "manifest.json").read_text())["dtype"] == "bf16"
    rc, forced = run_merge(adapter, "--base", tiny_llama, "-o", out, "--no-verify", "--dtype", "f16", "--force")
    assert rc == 0 and forced["dtype"] == "f16" and forced["id"] != first["id"]
    assert not out.with_name("out.old").exists()


def test_weights_must_match_the_adapters(adapter, tiny_llama, tmp_path):
    rc, env = run_merge(adapter, "--weights", "0.5,0.5", "--base", tiny_llama, "-o", tmp_path / "out")
    assert_error(rc, env, "INPUT_INVALID", 64)
    rc, env = run_merge(adapter, "--base", tiny_llama)
    assert_error(rc, env, "INPUT_USAGE", 2)


def test_values_beyond_float16_range_are_refused_for_f16(adapter, tiny_llama, tmp_path):
    from safetensors.torch import load_file, save_file
    base = copy_model(tiny_llama, tmp_path / "base")
    tensors = load_file(str(base / "model.safetensors"))
    tensors["model.norm.weight"][0] = 1e5  # fine in bf16 and f32, infinite in f16
    save_file(tensors, str(base / "model.safetensors"), metadata={"format": "pt"})
    out = tmp_path / "out"
    rc, env = run_merge(adapter, "--base", base, "-o", out, "--dtype", "f16")
    assert_error(rc, env, "EXPORT_WEIGHTS_INVALID", 65)
    assert env["details"]["tensor"] == "model.norm.weight" and "--dtype bf16" in env["hint"]
    assert_nothing_published(out)
