"""bp_common.vram against real tensors: predicted bytes vs what torch actually holds."""
from __future__ import annotations

import json
from dataclasses import replace

import pytest
from hypothesis import given, settings as hsettings, strategies as st

from bp_common import vram

# Real configs (as published on the hub) and their exact parameter counts.
REAL = {
    "Qwen2.5-7B": ({"model_type": "qwen2", "hidden_size": 3584, "intermediate_size": 18944,
                    "num_attention_heads": 28, "num_hidden_layers": 28, "num_key_value_heads": 4,
                    "vocab_size": 152064, "tie_word_embeddings": False}, 7_615_616_512),
    "Llama-3.2-1B": ({"model_type": "llama", "hidden_size": 2048, "intermediate_size": 8192,
                      "num_attention_heads": 32, "num_hidden_layers": 16, "num_key_value_heads": 8,
                      "vocab_size": 128256, "tie_word_embeddings": True, "head_dim": 64}, 1_235_814_400),
    "Mistral-7B-v0.3": ({"model_type": "mistral", "hidden_size": 4096, "intermediate_size": 14336,
                         "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 8,
                         "vocab_size": 32768, "tie_word_embeddings": False}, 7_248_023_552),
    "Qwen3-0.6B": ({"model_type": "qwen3", "hidden_size": 1024, "intermediate_size": 3072,
                    "num_attention_heads": 16, "num_hidden_layers": 28, "num_key_value_heads": 8, "head_dim": 128,
                    "vocab_size": 151936, "tie_word_embeddings": True}, 596_049_920),
    "gemma-2-2b": ({"model_type": "gemma2", "hidden_size": 2304, "intermediate_size": 9216,
                    "num_attention_heads": 8, "num_hidden_layers": 26, "num_key_value_heads": 4, "head_dim": 256,
                    "vocab_size": 256000}, 2_614_341_888),
    "Phi-3-mini": ({"model_type": "phi3", "hidden_size": 3072, "intermediate_size": 8192,
                    "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 32,
                    "vocab_size": 32064, "tie_word_embeddings": False}, 3_821_079_552),
}


@pytest.mark.parametrize("name", sorted(REAL))
def test_exact_parameter_counts_of_real_models(name):
    cfg, count = REAL[name]
    assert vram.shape_from_config(cfg).params == count


def test_recorded_preset_shapes_give_published_counts():
    from bp_common.presets import MODEL_PRESETS
    published = {"qwen2.5-7b": 7_615_616_512, "qwen2.5-3b": 3_085_938_688, "llama-3.2-3b": 3_212_749_824,
                 "llama-3.2-1b": 1_235_814_400, "mistral-7b": 7_248_023_552, "llama-3.1-8b": 8_030_261_248,
                 "qwen2.5-14b": 14_770_033_664, "qwen2.5-32b": 32_763_876_352}
    for name, count in published.items():
        assert vram.shape_from_config(MODEL_PRESETS[name].config).params == count, name


@pytest.mark.parametrize("arch,kw", [("llama", {}), ("qwen2", {}), ("mistral", {}), ("qwen3", {}), ("gemma2", {}),
                                     ("phi3", {}), ("llama", {"tie": True})])
def test_counts_equal_the_tiny_models_real_tensors(arch, kw, tiny_model_factory):
    from safetensors.numpy import load_file
    path = tiny_model_factory(arch, **kw)
    cfg = json.loads((path / "config.json").read_text())
    real = sum(t.size for t in load_file(str(path / "model.safetensors")).values())
    assert vram.shape_from_config(cfg).params == real


def _count_after_one_step(model_dir, mode: str, r: int = 8):
    """Bytes of weights, adapter, gradients and optimizer state after one real AdamW step."""
    import torch
    from transformers import AutoModelForCausalLM
    torch.manual_seed(0)
    kw = {}
    if mode == "qlora":
        from transformers import BitsAndBytesConfig
        kw["quantization_config"] = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                       bnb_4bit_use_double_quant=True,
                                                       bnb_4bit_compute_dtype=torch.float32)
        kw["device_map"] = "cpu"
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32, **kw)
    if mode != "full":
        from peft import LoraConfig, get_peft_model
        model = get_peft_model(model, LoraConfig(r=r, lora_alpha=2 * r, target_modules="all-linear",
                                                 task_type="CAUSAL_LM"))
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=1e-4)
    ids = torch.randint(0, 500, (2, 16))
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    nbytes = lambda t: t.numel() * t.element_size()
    frozen = sum(nbytes(p) for p in model.parameters() if not p.requires_grad)
    if mode == "qlora":
        import bitsandbytes as bnb
        for m in model.modules():
            if isinstance(m, bnb.nn.Linear4bit):
                qs = m.weight.quant_state
                frozen += nbytes(qs.absmax) + nbytes(qs.code) + 4
                state2 = getattr(qs, "state2", None)  # bitsandbytes >= 0.50 raises instead of returning None
                if state2 is not None:
                    frozen += nbytes(state2.absmax) + nbytes(state2.code)
    got = {"weights": frozen + (sum(nbytes(p) for p in trainable) if mode == "full" else 0),
           "adapter": 0 if mode == "full" else sum(nbytes(p) for p in trainable),
           "gradients": sum(nbytes(p.grad) for p in trainable),
           "optimizer": sum(nbytes(v) for st in opt.state.values() for v in st.values() if torch.is_tensor(v))}
    return got


@pytest.mark.parametrize("mode", ["lora", "qlora", "full"])
def test_static_bytes_match_real_tensors_within_1_percent(mode, tiny_256):
    cfg = json.loads((tiny_256 / "config.json").read_text())
    est = vram.estimate(vram.shape_from_config(cfg),
                        vram.Settings(mode=mode, lora_r=8, dtype="f32", adapter_dtype="f32", device="cpu"))
    got = _count_after_one_step(tiny_256, mode)
    for key, real in got.items():
        pred = est.components[key]
        assert abs(pred - real) <= 0.01 * max(real, 1), f"{mode} {key}: predicted {pred}, real {real}"


def _saved_for_backward(model_dir, mode: str, ckpt: bool, b: int = 4, s: int = 64, r: int = 8) -> int:
    import torch
    from transformers import AutoModelForCausalLM
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32, attn_implementation="sdpa")
    if mode == "lora":
        from peft import LoraConfig, get_peft_model
        model = get_peft_model(model, LoraConfig(r=r, lora_alpha=2 * r, target_modules="all-linear",
                                                 lora_dropout=0.0, task_type="CAUSAL_LM"))
    if ckpt:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if mode == "lora":
            model.enable_input_require_grads()
    model.train()
    params = {p.data_ptr() for p in model.parameters()}
    seen = {}

    def pack(t):
        if t.data_ptr() not in params and t.numel() > 1:
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t
    ids = torch.randint(0, 500, (b, s))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(input_ids=ids, labels=ids)
    return sum(seen.values())


@pytest.mark.parametrize("mode", ["lora", "full"])
@pytest.mark.parametrize("ckpt", [False, True], ids=["no-ckpt", "ckpt"])
def test_activations_within_15_percent_of_saved_tensors(mode, ckpt, tiny_256):
    cfg = json.loads((tiny_256 / "config.json").read_text())
    shape = vram.shape_from_config(cfg)
    st_ = vram.Settings(mode=mode, lora_r=8, dtype="f32", batch_size=4, seq_len=64, gradient_checkpointing=ckpt,
                        device="cpu")
    act = vram.activation_bytes(shape, st_)
    predicted = act["saved"] + act["logits"]
    real = _saved_for_backward(tiny_256, mode, ckpt)
    assert abs(predicted - real) <= 0.15 * real, f"predicted {predicted}, saved {real}"


SHAPE = vram.shape_from_config(REAL["Qwen2.5-7B"][0])


@hsettings(max_examples=60, deadline=None)
@given(mode=st.sampled_from(vram.MODES), b=st.integers(1, 16), s=st.integers(64, 8192), r=st.integers(1, 512),
       ckpt=st.booleans(), optim=st.sampled_from(vram.OPTIMIZERS))
def test_memory_is_monotone_in_batch_sequence_and_rank(mode, b, s, r, ckpt, optim):
    base = vram.Settings(mode=mode, batch_size=b, seq_len=s, lora_r=r, gradient_checkpointing=ckpt, optim=optim)
    total = vram.estimate(SHAPE, base).total
    assert vram.estimate(SHAPE, replace(base, batch_size=b + 1)).total >= total
    assert vram.estimate(SHAPE, replace(base, seq_len=s + 64)).total >= total
    assert vram.estimate(SHAPE, replace(base, lora_r=r + 1)).total >= total


@hsettings(max_examples=40, deadline=None)
@given(mode=st.sampled_from(vram.MODES), gpus=st.integers(1, 16), offload=st.booleans())
def test_more_gpus_never_raise_per_gpu_memory(mode, gpus, offload):
    s = vram.Settings(mode=mode, gpus=gpus, offload=offload)
    assert vram.estimate(SHAPE, replace(s, gpus=gpus + 1)).total <= vram.estimate(SHAPE, s).total


def test_memory_is_monotone_in_model_size():
    names = sorted(REAL, key=lambda n: REAL[n][1])
    s = vram.Settings(mode="qlora", batch_size=2, seq_len=1024)
    totals = [vram.estimate(vram.shape_from_config(REAL[n][0]), s).components["weights"] for n in names]
    assert totals == sorted(totals)


def test_handbook_tiers_and_ceilings():
    assert [vram.batch_tier(g) for g in (80, 48, 47, 40, 24, 22.6, 16, 12, 8)] == [8, 8, 8, 6, 4, 4, 2, 1, 1]
    assert vram.full_ft_ceiling(24) == 5 and vram.full_ft_ceiling(24, offload=True) == 7
    assert vram.full_ft_ceiling(80) == 10 and vram.full_ft_ceiling(80, offload=True) == 16
    assert vram.full_ft_ceiling(16) == 4 and vram.full_ft_ceiling(8, offload=True) == 4


def test_plan_finds_the_largest_batch_that_fits():
    s = vram.Settings(mode="qlora", seq_len=2048, batch_size=1, grad_accum=16)
    p = vram.plan(SHAPE, s, vram_gb=24)
    b = p["max_batch_size"]
    assert b >= 1
    assert vram.estimate(SHAPE, replace(s, batch_size=b)).total <= 24 * vram.GIB
    assert vram.estimate(SHAPE, replace(s, batch_size=b + 1)).total > 24 * vram.GIB
    assert p["batch_size"] * p["grad_accum"] >= 16


def test_name_fallback_is_labelled():
    shape = vram.shape_from_name("some-org/Model-7B-Instruct")
    assert 7e9 <= shape.params < 8e9 and shape.source == "name"
    assert vram.estimate(shape, vram.Settings()).notes
