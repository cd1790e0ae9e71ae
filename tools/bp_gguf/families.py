"""What each supported model family needs in a GGUF: llama.cpp architecture, hyperparameter keys,
tensor transforms (the Q/K permutation for llama's rope, Gemma's norm offset) and tensor names.

Families are chosen from config.json's `architectures`, never guessed from a name. An architecture
not listed here is refused before any work, with the list of supported ones.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from bp_common.errors import BpError


@dataclass(frozen=True)
class Family:
    name: str              # our name (the tiny-model arch names)
    arch: str              # GGUF general.architecture
    permute_qk: bool       # llama.cpp's "normal" rope wants rotary pairs adjacent; HF stores two halves
    norm_offset: bool      # Gemma's RMSNorm multiplies by (1 + w): llama.cpp wants 1 + w stored
    adapters_in_ollama: bool  # Ollama's ADAPTER converter takes this family


FAMILIES = {
    "LlamaForCausalLM": Family("llama", "llama", True, False, True),
    "MistralForCausalLM": Family("mistral", "llama", True, False, True),
    "Qwen2ForCausalLM": Family("qwen2", "qwen2", False, False, False),
    "Qwen3ForCausalLM": Family("qwen3", "qwen3", False, False, False),
    "Gemma2ForCausalLM": Family("gemma2", "gemma2", False, True, True),
    "Phi3ForCausalLM": Family("phi3", "phi3", False, False, False),
}
# Tensors a checkpoint may carry that llama.cpp recomputes.
SKIPPED_SUFFIXES = ("rotary_emb.inv_freq", "attn.masked_bias", "attn.bias")


def supported() -> str:
    return ", ".join(f"{k} ({v.name})" for k, v in FAMILIES.items())


def family_of(config: dict, where: str) -> Family:
    """The family for a config.json, or EXPORT_UNSUPPORTED_ARCH naming the supported ones."""
    archs = config.get("architectures") or []
    for a in archs:
        if a in FAMILIES:
            return FAMILIES[a]
    got = ", ".join(archs) or f"model_type {config.get('model_type')!r} with no architectures"
    raise BpError("EXPORT_UNSUPPORTED_ARCH", f"{where}: {got} cannot be exported to GGUF by bp-gguf",
                  hint=f"supported: {supported()}", details={"architectures": archs})


def model_arch(family: Family):
    import gguf
    for key, name in gguf.MODEL_ARCH_NAMES.items():
        if name == family.arch:
            return key
    raise BpError("EXPORT_UNSUPPORTED_ARCH", f"this gguf library does not know the {family.arch} architecture")


class Hparams:
    """The numbers from config.json the writer and the transforms need."""

    def __init__(self, config: dict):
        c = self.config = config
        self.hidden = int(c["hidden_size"])
        self.layers = int(c["num_hidden_layers"])
        self.heads = int(c["num_attention_heads"])
        self.kv_heads = int(c.get("num_key_value_heads") or self.heads)
        self.head_dim = int(c.get("head_dim") or self.hidden // self.heads)
        self.intermediate = int(c["intermediate_size"])
        self.context = int(c.get("max_position_embeddings") or 4096)
        self.eps = float(c.get("rms_norm_eps") or c.get("layer_norm_eps") or 1e-6)
        self.vocab = int(c["vocab_size"])
        rope = dict(c.get("rope_parameters") or {})
        scaling = c.get("rope_scaling") or {}
        self.rope = {**scaling, **rope}
        self.rope_theta = float(self.rope.get("rope_theta") or c.get("rope_theta") or 10000.0)
        self.rope_type = self.rope.get("rope_type") or self.rope.get("type") or "default"


def write_hparams(w, family: Family, hp: Hparams, name: str) -> list[tuple[str, "np.ndarray"]]:
    """Add the architecture's keys to the writer; return extra tensors some settings need (rope_freqs)."""
    import gguf
    c = hp.config
    w.add_name(name)
    w.add_context_length(hp.context)
    w.add_embedding_length(hp.hidden)
    w.add_block_count(hp.layers)
    w.add_feed_forward_length(hp.intermediate)
    w.add_head_count(hp.heads)
    w.add_head_count_kv(hp.kv_heads)
    w.add_layer_norm_rms_eps(hp.eps)
    w.add_rope_freq_base(hp.rope_theta)
    w.add_key_length(hp.head_dim)
    w.add_value_length(hp.head_dim)
    extra: list[tuple[str, np.ndarray]] = []
    if family.arch == "llama":
        w.add_vocab_size(hp.vocab)
        w.add_rope_dimension_count(hp.head_dim)
    if family.arch == "gemma2":
        if c.get("attn_logit_softcapping") is not None:
            w.add_attn_logit_softcapping(float(c["attn_logit_softcapping"]))
        if c.get("final_logit_softcapping") is not None:
            w.add_final_logit_softcapping(float(c["final_logit_softcapping"]))
        w.add_sliding_window(int(c.get("sliding_window") or hp.context))
    if family.arch == "phi3":
        w.add_rope_dimension_count(int(hp.head_dim * float(c.get("partial_rotary_factor") or 1.0)))
        w.add_sliding_window(int(c.get("sliding_window") or 0))
        if c.get("original_max_position_embeddings"):
            w.add_rope_scaling_orig_ctx_len(int(c["original_max_position_embeddings"]))
    rt = hp.rope_type
    if rt == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(float(hp.rope["factor"]))
    elif rt == "yarn":
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(float(hp.rope["factor"]))
        w.add_rope_scaling_orig_ctx_len(int(hp.rope.get("original_max_position_embeddings") or hp.context))
    elif rt == "llama3":
        extra.append(("rope_freqs.weight", llama3_rope_factors(hp)))
    elif rt != "default":
        raise BpError("EXPORT_UNSUPPORTED_ARCH", f"rope type {rt!r} cannot be written to GGUF by bp-gguf",
                      hint="supported rope types: default, linear, yarn, llama3")
    return extra


def llama3_rope_factors(hp: Hparams) -> np.ndarray:
    """Llama 3.1's frequency-dependent rope scaling as the per-frequency divisors llama.cpp reads from
    `rope_freqs.weight` (long wavelengths stretched by `factor`, short kept, a smooth ramp between)."""
    r = hp.rope
    factor = float(r.get("factor", 8.0))
    low, high = float(r.get("low_freq_factor", 1.0)), float(r.get("high_freq_factor", 4.0))
    old_ctx = float(r.get("original_max_position_embeddings", 8192))
    low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
    freqs = 1.0 / (hp.rope_theta ** (np.arange(0, hp.head_dim, 2, dtype=np.float64) / hp.head_dim))
    out = []
    for f in freqs:
        wavelen = 2 * math.pi / f
        if wavelen < high_wavelen:
            out.append(1.0)
        elif wavelen > low_wavelen:
            out.append(factor)
        else:
            smooth = (old_ctx / wavelen - low) / (high - low)
            out.append(1.0 / ((1 - smooth) / factor + smooth))
    return np.array(out, dtype=np.float32)


def permute_rows(x: np.ndarray, n_head: int) -> np.ndarray:
    """HF's rotary layout (two halves per head) -> llama.cpp's (adjacent pairs), for q/k rows."""
    rows = x.shape[0]
    rest = x.shape[1:]
    return (x.reshape(n_head, 2, rows // n_head // 2, *rest).swapaxes(1, 2).reshape(x.shape))


def qk_heads(family: Family, hp: Hparams, hf_name: str) -> int | None:
    """Heads to permute this tensor's rows by, or None when it is not permuted."""
    if not family.permute_qk:
        return None
    if ".q_proj." in hf_name:
        return hp.heads
    if ".k_proj." in hf_name:
        return hp.kv_heads
    return None


def tensor_name(name_map, hf_name: str) -> str | None:
    """The GGUF name of an HF tensor, or None when the map does not know it."""
    return name_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
