"""Tiny real models built locally in seconds, for the demo, the tests and the benchmarks.

A byte-level BPE tokenizer trained on the bundled example data, a randomly initialised
model (initializer_range 0.2, so LoRA can visibly learn), a ChatML chat template with
`{% generation %}` markers, saved as safetensors + tokenizer + generation_config.
Nothing is downloaded. Deterministic for a seed.
"""
from __future__ import annotations

import json
from pathlib import Path

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<pad>"]
ARCHS = ("llama", "qwen2", "mistral", "qwen3", "gemma2", "phi3")

# ChatML, with generation markers around what the assistant says (for assistant-only loss).
CHATML_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['role'] == 'assistant' %}"
    "{% generation %}{{- message['content'] + '<|im_end|>' }}{% endgeneration %}{{- '\\n' }}"
    "{%- else %}"
    "{{- message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def repo_root() -> Path:
    return Path(__file__).resolve().parents[2]


def example_texts(examples_dir: Path | None = None) -> list[str]:
    """Every string in the example JSONL files: the tokenizer's training corpus."""
    examples_dir = Path(examples_dir) if examples_dir else repo_root() / "examples"
    files = sorted(examples_dir.glob("*.jsonl"))
    if not files:
        raise FileNotFoundError(f"no example data in {examples_dir}; run scripts/make-examples")
    texts: list[str] = []

    def walk(obj):
        if isinstance(obj, str):
            texts.append(obj)
        elif isinstance(obj, dict):
            for v in obj.values():
                walk(v)
        elif isinstance(obj, list):
            for v in obj:
                walk(v)

    for f in files:
        for line in f.read_text(encoding="utf-8").splitlines():
            if line.strip():
                walk(json.loads(line))
    # Role names and template pieces appear in rendered text: teach them to the tokenizer.
    texts += ["system\n", "user\n", "assistant\n"] * 20
    return texts


def build_tokenizer(texts: list[str], vocab_size: int = 1024):
    """A byte-level BPE tokenizer (GPT-2 style) wrapped as PreTrainedTokenizerFast."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|im_end|>",
                                   pad_token="<pad>", unk_token=None,
                                   additional_special_tokens=["<|im_start|>"])
    fast.chat_template = CHATML_TEMPLATE
    fast.model_max_length = 512
    return fast


def build_config(arch: str, vocab_size: int, hidden: int, intermediate: int, layers: int, heads: int,
                 kv_heads: int, bos: int, eos: int, pad: int, max_pos: int = 512, tie: bool | None = None):
    """A transformers config for one of ARCHS at the given size."""
    import transformers as tf
    if arch not in ARCHS:
        raise ValueError(f"arch must be one of {', '.join(ARCHS)}")
    head_dim = hidden // heads
    common = dict(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=intermediate,
                  num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                  max_position_embeddings=max_pos, initializer_range=0.2, rms_norm_eps=1e-6,
                  bos_token_id=bos, eos_token_id=eos, pad_token_id=pad)
    if arch == "llama":
        cfg = tf.LlamaConfig(head_dim=head_dim, tie_word_embeddings=bool(tie), **common)
    elif arch == "qwen2":
        cfg = tf.Qwen2Config(tie_word_embeddings=bool(tie), **common)
    elif arch == "mistral":
        cfg = tf.MistralConfig(head_dim=head_dim, sliding_window=None, tie_word_embeddings=bool(tie), **common)
    elif arch == "qwen3":
        cfg = tf.Qwen3Config(head_dim=head_dim, tie_word_embeddings=bool(tie), **common)
    elif arch == "gemma2":
        cfg = tf.Gemma2Config(head_dim=head_dim, query_pre_attn_scalar=head_dim, sliding_window=max_pos,
                              final_logit_softcapping=30.0, attn_logit_softcapping=50.0,
                              tie_word_embeddings=True if tie is None else tie, **common)
    else:  # phi3: fused qkv_proj and gate_up_proj
        common.pop("rms_norm_eps")
        cfg = tf.Phi3Config(rms_norm_eps=1e-6, tie_word_embeddings=bool(tie), **common)
    cfg.architectures = [type(cfg).__name__.replace("Config", "ForCausalLM")]
    return cfg


def make_tiny_model(out: Path | str, arch: str = "llama", hidden: int = 64, intermediate: int = 128,
                    layers: int = 2, heads: int = 4, kv_heads: int = 2, seed: int = 0,
                    vocab_size: int = 1024, examples_dir: Path | None = None, tie: bool | None = None,
                    chat_template: str | None = None, dtype: str = "float32") -> Path:
    """Build and save a tiny model directory; returns its path.

    out: directory to create (parents too). arch: one of ARCHS. The tokenizer is trained on
    the example datasets; weights are random with initializer_range 0.2.
    """
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer(example_texts(examples_dir), vocab_size)
    if chat_template is not None:
        tok.chat_template = chat_template
    ids = {t: tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    cfg = build_config(arch, len(tok), hidden, intermediate, layers, heads, kv_heads,
                       bos=ids["<|endoftext|>"], eos=ids["<|im_end|>"], pad=ids["<pad>"], tie=tie)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=getattr(torch, dtype))
    model.eval()
    model.generation_config = GenerationConfig(
        bos_token_id=ids["<|endoftext|>"], eos_token_id=[ids["<|im_end|>"], ids["<|endoftext|>"]],
        pad_token_id=ids["<pad>"], do_sample=False)
    model.save_pretrained(str(out), safe_serialization=True)
    tok.save_pretrained(str(out))
    return out


def main(argv: list[str] | None = None) -> int:
    import argparse
    p = argparse.ArgumentParser(prog="make-tiny-model",
                                description="Build a tiny random model + tokenizer from examples/ (no downloads).")
    p.add_argument("out", help="output directory")
    p.add_argument("--arch", choices=ARCHS, default="llama", help="model family")
    p.add_argument("--hidden", type=int, default=64, help="hidden size")
    p.add_argument("--intermediate", type=int, default=128, help="MLP size")
    p.add_argument("--layers", type=int, default=2, help="number of layers")
    p.add_argument("--heads", type=int, default=4, help="attention heads")
    p.add_argument("--kv-heads", type=int, default=2, help="key/value heads (GQA)")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    a = p.parse_args(argv)
    path = make_tiny_model(a.out, a.arch, a.hidden, a.intermediate, a.layers, a.heads, a.kv_heads, a.seed)
    print(json.dumps({"model_dir": str(path.resolve()), "arch": a.arch, "hidden": a.hidden}))
    return 0
