"""bp-train's method-aware defaults, resolved without training: learning rate, beta, gamma, KTO weights,
full fine-tuning's ceiling, and the warnings that go with explicit values far from them."""
from __future__ import annotations

import pytest

from bp_common.errors import BpError
from bp_train.config import (DeviceFacts, TrainConfig, check_full_ft_size, kto_weights, lr_warning, resolve,
                             simpo_warning)

CPU = DeviceFacts("cpu")


def hp_for(rows=500, device=CPU, labels=None, **kw):
    return resolve(TrainConfig(output="x", **kw), train_rows=rows, device=device, labels=labels)


@pytest.mark.parametrize("kw, lr, beta, gamma, weights", [
    (dict(method="orpo"), 8e-6, 0.1, None, (None, None)),
    (dict(method="simpo"), 1e-6, 2.0, 1.0, (None, None)),
    (dict(method="kto"), 1e-6, 0.1, None, (1.0, 1.0)),
    (dict(method="dpo"), 1e-6, 0.1, None, (None, None)),          # 60 / 50 labels: ratio 1.2 is in [1, 4/3]
    (dict(method="orpo", mode="qlora"), 8e-6, 0.1, None, (None, None)),
    (dict(method="sft", mode="full"), 5e-5, None, None, (None, None)),  # a tenth of 5e-4 (500 rows)
    (dict(method="sft"), 5e-4, None, None, (None, None)),
])
def test_defaults_per_method_when_flags_are_omitted(kw, lr, beta, gamma, weights):
    hp = hp_for(labels=(60, 50), **kw)
    assert hp.lr == pytest.approx(lr)
    assert (hp.beta, hp.gamma) == (beta, gamma)
    assert (hp.desirable_weight, hp.undesirable_weight) == weights
    reasons = {c.name: c.reason for c in hp.chosen}
    assert "lr" in reasons and (beta is None or "default" in reasons["beta"])
    assert not hp.warnings


def test_an_explicit_learning_rate_wins_with_a_warning_when_far_off():
    hp = hp_for(method="orpo", lr=2e-4)
    assert hp.lr == 2e-4 and "lr" not in {c.name for c in hp.chosen}
    assert any("--lr 0.0002" in w and "8e-06" in w for w in hp.warnings)
    assert not hp_for(method="orpo", lr=2e-5).warnings           # within 10x of 8e-6
    assert lr_warning("simpo", "lora", 1e-4, 500) and not lr_warning("sft", "lora", 3e-4, 500)
    assert lr_warning("sft", "full", 2e-4, 5000) is None and lr_warning("sft", "full", 1e-2, 5000)


def test_presets_do_not_multiply_full_fine_tuning_and_do_multiply_preference_rates():
    assert hp_for(mode="full", preset="quality").lr == pytest.approx(5e-5)
    assert hp_for(method="orpo", preset="quality").lr == pytest.approx(8e-5)


def test_explicit_knobs_win():
    hp = hp_for(method="simpo", beta=2.5, gamma=0.5)
    assert (hp.beta, hp.gamma) == (2.5, 0.5) and not hp.warnings
    assert hp_for(method="kto", beta=0.3, labels=(10, 10)).beta == 0.3


def test_simpo_warns_when_gamma_over_beta_leaves_the_papers_range():
    assert simpo_warning(2.0, 1.0) is None and simpo_warning(2.0, 2.0) is None
    assert "outside" in simpo_warning(1.0, 3.0) and "outside" in simpo_warning(2.0, 0.0)
    assert any("gamma/beta" in w for w in hp_for(method="simpo", beta=0.5).warnings)


@pytest.mark.parametrize("n_d, n_u, d, u", [
    (30, 70, 70 / 30, 1.0),            # too few desirable: raise their weight to a ratio of 1
    (200, 50, 1.0, 3.0),               # too many desirable: raise the undesirable weight to 4/3
    (60, 50, 1.0, 1.0),                # 1.2 is in range: untouched
    (50, 50, 1.0, 1.0),
])
def test_kto_weights_are_rebalanced_into_one_to_four_thirds(n_d, n_u, d, u):
    w = kto_weights(n_d, n_u)
    assert (w.desirable, w.undesirable) == (pytest.approx(d), pytest.approx(u))
    assert 1.0 - 1e-9 <= w.ratio <= 4 / 3 + 1e-9 and not w.capped and w.warning is None
    assert f"{n_d} desirable / {n_u} undesirable" in w.line


def test_kto_rebalancing_factor_is_capped_at_ten_and_says_so():
    w = kto_weights(5, 500)
    assert w.desirable == 10.0 and w.capped and w.ratio == pytest.approx(0.1)
    assert "capped at 10" in w.line and "too unbalanced" in w.warning


def test_kto_explicit_weights_are_kept_and_warned_about_out_of_range():
    w = kto_weights(30, 70, desirable=1.0, undesirable=1.0)
    assert (w.desirable, w.undesirable) == (1.0, 1.0) and "outside [1, 4/3]" in w.warning
    hp = hp_for(method="kto", labels=(30, 70), desirable_weight=2.5)
    assert hp.desirable_weight == 2.5 and not hp.warnings and "as given" in hp.notes[0]
    hp = hp_for(method="kto", labels=(30, 70))
    assert hp.desirable_weight == pytest.approx(70 / 30) and "rebalanced" in hp.notes[0]


def test_kto_micro_batch_is_at_least_two():
    hp = resolve(TrainConfig(output="x", method="kto"), train_rows=100, device=DeviceFacts("cuda", gpu_gb=8.0),
                 labels=(50, 50))
    assert hp.batch_size == 2 and "KL" in {c.name: c.reason for c in hp.chosen}["batch_size"]


def test_full_fine_tuning_on_a_gpu_checkpoints_and_uses_8bit_adam():
    small = hp_for(mode="full", device=DeviceFacts("cuda", gpu_gb=16.0, bf16=True))
    big = hp_for(mode="full", device=DeviceFacts("cuda", gpu_gb=80.0, bf16=True))
    assert (small.optim, small.gradient_checkpointing, small.full_ft_ceiling_b) == ("paged_adamw_8bit", True, 4)
    assert (big.optim, big.full_ft_ceiling_b) == ("adamw_8bit", 10)
    cpu = hp_for(mode="full")
    assert (cpu.optim, cpu.gradient_checkpointing, cpu.full_ft_ceiling_b) == ("adamw_torch", False, None)
    assert hp_for(mode="full", full_ft_ceiling=0.5).full_ft_ceiling_b == 0.5


@pytest.mark.parametrize("gpu_gb, offload, params, hint", [
    (24.0, False, 6e9, "--offload fits"),       # pure GPU 5 B, offload 7 B
    (16.0, False, 5e9, "--mode lora"),          # 4 B either way
    (24.0, True, 8e9, "--mode lora"),           # above the offload ceiling too
])
def test_the_ceiling_refusal_names_what_would_fit(gpu_gb, offload, params, hint):
    with pytest.raises(BpError) as e:
        check_full_ft_size(int(params), gpu_gb=gpu_gb, offload=offload, override=None)
    assert e.value.code == "TRAIN_FULL_FT_TOO_LARGE" and e.value.exit_code == 64 and hint in e.value.hint
    assert check_full_ft_size(int(params), gpu_gb=gpu_gb, offload=offload, override=100.0) == 100.0


@pytest.mark.parametrize("gpu_gb, pure, offload", [(16, 4, 4), (24, 5, 7), (32, 6, 8), (48, 10, 16), (80, 10, 16)])
def test_ceiling_table_is_the_handbooks(gpu_gb, pure, offload):
    assert check_full_ft_size(int(pure * 1e9), gpu_gb=gpu_gb, offload=False, override=None) == pure
    assert check_full_ft_size(int(offload * 1e9), gpu_gb=gpu_gb, offload=True, override=None) == offload


def test_reasoning_trace_raises_only_a_default_sequence_length():
    assert hp_for(reasoning_trace=True).seq_len == 8192
    assert resolve(TrainConfig(output="x", reasoning_trace=True), train_rows=10, device=CPU,
                   max_positions=4096).seq_len == 4096
    assert hp_for(reasoning_trace=True, seq_len=1024).seq_len == 1024
    assert hp_for().seq_len == 2048


def test_the_fingerprint_of_an_sft_run_ignores_the_new_settings_at_their_defaults(tiny_llama, monkeypatch):
    from types import SimpleNamespace
    from bp_train import trainer
    seen = []
    monkeypatch.setattr(trainer, "fingerprint", lambda *a: seen.append(a[-1]) or str(len(seen)))
    src = SimpleNamespace(dataset={"id": "d1"})
    trainer.run_fingerprint(TrainConfig(output="x"), src, tiny_llama, str(tiny_llama))
    trainer.run_fingerprint(TrainConfig(output="x", method="orpo", beta=0.2, reasoning_trace=True), src, tiny_llama,
                            str(tiny_llama))
    assert not set(seen[0]) & set(trainer.LATER_SETTINGS)   # what an SFT run hashed before these settings existed
    assert seen[1]["beta"] == 0.2 and seen[1]["reasoning_trace"] is True and "gamma" not in seen[1]
