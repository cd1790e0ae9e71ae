"""bp-train settings: presets that really apply, defaults by method, dataset size and device, flags that win."""
from __future__ import annotations

import pytest

from bp_common.errors import BpError
from bp_common.presets import LORA_PRESETS, MODEL_PRESETS
from bp_train.config import DeviceFacts, TrainConfig, batch_tier, resolve

CPU = DeviceFacts("cpu")
GPU16 = DeviceFacts("cuda", gpu_gb=16.0, bf16=True)
GPU80 = DeviceFacts("cuda", gpu_gb=80.0, bf16=True)
T4 = DeviceFacts("cuda", gpu_gb=15.0, bf16=False)


def hp_for(rows=500, device=CPU, **kw):
    return resolve(TrainConfig(output="x", **kw), train_rows=rows, device=device)


def test_fast_preset_sets_rank_alpha_and_attention_targets():
    hp = hp_for(preset="fast")
    assert (hp.lora_r, hp.lora_alpha, hp.targets, hp.lr_multiplier) == (16, 32, ["q_proj", "v_proj"], 1.0)


def test_quality_preset_sets_high_rank_all_linear_and_multiplies_the_learning_rate():
    plain, quality = hp_for(rows=5000), hp_for(rows=5000, preset="quality")
    q = LORA_PRESETS["quality"]
    assert (quality.lora_r, quality.lora_alpha, quality.targets) == (256, 512, "all-linear")
    assert quality.lr_multiplier == q.lr_multiplier == 10.0
    assert quality.lr == pytest.approx(plain.lr * 10.0)
    assert "x 10" in {c.name: c.reason for c in quality.chosen}["lr"]


def test_explicit_flags_win_over_presets():
    hp = hp_for(preset="quality", lora_r=8, lora_alpha=4.0, targets="q_proj", lr=1e-4)
    assert (hp.lora_r, hp.lora_alpha, hp.targets, hp.lr, hp.lr_multiplier) == (8, 4.0, ["q_proj"], 1e-4, 1.0)
    assert {c.name for c in hp.chosen}.isdisjoint({"lora_r", "lora_alpha", "targets", "lr"})


def test_an_explicit_rank_gets_alpha_twice_the_rank_not_the_presets_alpha():
    assert hp_for(preset="fast", lora_r=64).lora_alpha == 128


def test_learning_rate_and_warmup_follow_dataset_size():
    small, mid, large = hp_for(rows=300), hp_for(rows=5000), hp_for(rows=50000)
    assert (small.lr, mid.lr, large.lr) == (5e-4, 2e-4, 1e-4)
    # warmup: 15 %, 10 %, 5 % of the steps of one epoch at an effective batch of 8
    assert small.max_steps == 38 and small.warmup_steps == round(0.15 * 38)
    assert mid.warmup_steps == round(0.10 * mid.max_steps)
    assert large.warmup_steps == round(0.05 * large.max_steps)


def test_steps_override_epochs():
    assert hp_for(rows=800, steps=7).max_steps == 7
    assert hp_for(rows=800, epochs=2.0).max_steps == 200


def test_model_preset_suggests_rank_and_sequence_length():
    preset = MODEL_PRESETS["llama-3.1-8b"]
    hp = resolve(TrainConfig(output="x"), train_rows=100, device=GPU16, model_preset=preset)
    assert (hp.lora_r, hp.lora_alpha, hp.seq_len) == (16, 16, 4096)
    hp = resolve(TrainConfig(output="x", seq_len=1024, lora_r=32), train_rows=100, device=GPU16,
                 model_preset=preset)
    assert (hp.lora_r, hp.seq_len) == (32, 1024)


def test_sequence_length_defaults_to_the_models_context_capped():
    assert resolve(TrainConfig(output="x"), train_rows=10, device=CPU, max_positions=512).seq_len == 512
    assert resolve(TrainConfig(output="x"), train_rows=10, device=CPU, max_positions=131072).seq_len == 2048


@pytest.mark.parametrize("device, optim, dtype", [
    (CPU, "adamw_torch", "f32"),
    (GPU16, "paged_adamw_8bit", "bf16"),
    (T4, "paged_adamw_8bit", "f16"),
    (GPU80, "adamw_torch_fused", "bf16"),
])
def test_optimizer_and_precision_follow_the_device(device, optim, dtype):
    hp = hp_for(device=device)
    assert (hp.optim, hp.dtype) == (optim, dtype)
    assert hp_for(device=device, optim="adamw_torch", dtype="f32").optim == "adamw_torch"


def test_qlora_compute_dtype_is_f32_on_cpu_and_the_training_dtype_on_gpu():
    assert hp_for(mode="qlora").compute_dtype == "f32"
    assert hp_for(mode="qlora", device=GPU16).compute_dtype == "bf16"
    assert hp_for(mode="lora").compute_dtype is None


def test_batch_size_from_the_vram_plan_then_the_tiers():
    assert hp_for(device=GPU16).batch_size == batch_tier(16.0) == 2
    assert hp_for(device=GPU16).grad_accum == 4
    hp = resolve(TrainConfig(output="x"), train_rows=100, device=GPU16, plan={"batch_size": 3, "grad_accum": 5})
    assert (hp.batch_size, hp.grad_accum) == (3, 5)
    hp = resolve(TrainConfig(output="x", batch_size=4), train_rows=100, device=GPU16,
                 plan={"batch_size": 3, "grad_accum": 5})
    assert (hp.batch_size, hp.grad_accum) == (4, 2)
    assert [batch_tier(g) for g in (80, 47, 31, 22.5, 14.5, 13, 4)] == [8, 8, 6, 4, 2, 1, 1]


@pytest.mark.parametrize("kw, words", [
    (dict(method="ppo"), "not available"),
    (dict(mode="full", method="kto"), "--mode full"),
    (dict(offload=True), "--offload"),
    (dict(method="kto", batch_size=1), "--batch-size 2"),
    (dict(method="orpo", gamma=0.5), "--gamma"),
    (dict(method="sft", beta=0.1), "--beta"),
    (dict(method="simpo", beta=0.0), "--beta"),
    (dict(method="kto", desirable_weight=-1.0), "--desirable-weight"),
    (dict(mode="full", full_ft_ceiling=0.0), "--full-ft-ceiling"),
    (dict(init_lora_weights="pissa", mode="qlora"), "full-precision"),
    (dict(lr=2.0), "--lr"),
    (dict(lora_r=0), "--lora-r"),
    (dict(instruction_template="<|user|>"), "--response-template"),
    (dict(train_on_all=True, response_template="x"), "contradict"),
    (dict(batching="sorted"), "--batching"),
])
def test_impossible_settings_are_refused_with_the_flag_named(kw, words):
    with pytest.raises(BpError) as e:
        TrainConfig(output="x", **kw).check()
    assert e.value.code == "CONFIG_INVALID_SETTING" and words in e.value.message


def test_targets_parse_and_reject_garbage():
    assert hp_for(targets="q_proj, v_proj").targets == ["q_proj", "v_proj"]
    with pytest.raises(BpError):
        hp_for(targets="q_proj;rm -rf")
