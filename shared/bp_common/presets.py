"""Model and LoRA presets from the handbook: one table that bp-train and bp-vram share."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ModelPreset:
    name: str
    hf_id: str
    lora_r: int
    seq_len: int
    licence: str
    note: str = ""
    lora_alpha: int | None = None  # None: 2 × r
    config: dict | None = None  # the shape fields of the model's config.json, so estimates work offline

    @property
    def alpha(self) -> int:
        return self.lora_alpha if self.lora_alpha is not None else 2 * self.lora_r


MODEL_PRESETS: dict[str, ModelPreset] = {p.name: p for p in [
    ModelPreset("qwen2.5-7b", "Qwen/Qwen2.5-7B-Instruct", 256, 2048, "Apache-2.0",
                config=dict(model_type="qwen2", hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4, vocab_size=152064, tie_word_embeddings=False, max_position_embeddings=32768)),
    ModelPreset("qwen2.5-3b", "Qwen/Qwen2.5-3B-Instruct", 128, 2048, "Qwen Research licence",
                "non-commercial licence: check before shipping",
                config=dict(model_type="qwen2", hidden_size=2048, intermediate_size=11008, num_hidden_layers=36, num_attention_heads=16, num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True, max_position_embeddings=32768)),
    ModelPreset("llama-3.2-3b", "meta-llama/Llama-3.2-3B-Instruct", 128, 2048, "Llama 3.2 Community",
                "gated on the hub: accept the licence and set HF_TOKEN",
                config=dict(model_type="llama", hidden_size=3072, intermediate_size=8192, num_hidden_layers=28, num_attention_heads=24, num_key_value_heads=8, head_dim=128, vocab_size=128256, tie_word_embeddings=True, max_position_embeddings=131072)),
    ModelPreset("llama-3.2-1b", "meta-llama/Llama-3.2-1B-Instruct", 64, 2048, "Llama 3.2 Community",
                "gated on the hub: accept the licence and set HF_TOKEN",
                config=dict(model_type="llama", hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8, head_dim=64, vocab_size=128256, tie_word_embeddings=True, max_position_embeddings=131072)),
    ModelPreset("mistral-7b", "mistralai/Mistral-7B-Instruct-v0.3", 256, 2048, "Apache-2.0",
                config=dict(model_type="mistral", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, vocab_size=32768, tie_word_embeddings=False, max_position_embeddings=32768)),
    ModelPreset("phi-4-mini-3.8b", "microsoft/Phi-4-mini-instruct", 128, 2048, "MIT"),
    ModelPreset("qwen3.5-4b", "Qwen/Qwen3.5-4B-Instruct", 128, 4096, "Apache-2.0"),
    ModelPreset("smollm3-3b", "HuggingFaceTB/SmolLM3-3B", 128, 8192, "Apache-2.0"),
    ModelPreset("llama-3.1-8b", "meta-llama/Llama-3.1-8B-Instruct", 16, 4096, "Llama 3.1 Community",
                "QLoRA fits in about 7-8 GB; gated on the hub", lora_alpha=16,
                config=dict(model_type="llama", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False, max_position_embeddings=131072)),
    ModelPreset("qwen2.5-14b", "Qwen/Qwen2.5-14B-Instruct", 32, 4096, "Apache-2.0",
                "QLoRA about 8.5 GB", lora_alpha=32,
                config=dict(model_type="qwen2", hidden_size=5120, intermediate_size=13824, num_hidden_layers=48, num_attention_heads=40, num_key_value_heads=8, vocab_size=152064, tie_word_embeddings=False, max_position_embeddings=32768)),
    ModelPreset("mistral-small-24b", "mistralai/Mistral-Small-24B-Instruct-2501", 32, 4096, "Apache-2.0",
                "QLoRA about 18 GB", lora_alpha=32),
    ModelPreset("qwen2.5-32b", "Qwen/Qwen2.5-32B-Instruct", 32, 2048, "Apache-2.0",
                "QLoRA about 26 GB: just fits a 32 GB card", lora_alpha=32,
                config=dict(model_type="qwen2", hidden_size=5120, intermediate_size=27648, num_hidden_layers=64, num_attention_heads=40, num_key_value_heads=8, vocab_size=152064, tie_word_embeddings=False, max_position_embeddings=32768)),
]}


@dataclass(frozen=True)
class LoraPreset:
    name: str
    lora_r: int
    lora_alpha: int
    targets: tuple[str, ...] | str
    lr_multiplier: float
    note: str


# The original accepted --lora-preset and ignored it; here a preset really sets rank, alpha,
# targets and the learning-rate multiplier (explicit flags still win).
LORA_PRESETS: dict[str, LoraPreset] = {p.name: p for p in [
    LoraPreset("fast", 16, 32, ("q_proj", "v_proj"), 1.0, "small adapter on attention only: quick, less capacity"),
    LoraPreset("balanced", 64, 128, "all-linear", 1.0, "all linear layers at a moderate rank"),
    LoraPreset("quality", 256, 512, "all-linear", 10.0,
               "LoRA Without Regret recipe: high rank, all-linear, 10x learning rate"),
]}


def resolve_model_name(name: str) -> tuple[str, ModelPreset | None]:
    """A preset name becomes its HF id; anything else is returned unchanged."""
    preset = MODEL_PRESETS.get(name.lower()) if isinstance(name, str) else None
    return (preset.hf_id, preset) if preset else (name, None)
