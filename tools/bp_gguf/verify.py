"""Proof that a GGUF is the model: reload it in llama.cpp and compare with transformers.

1. Tokenization: probe strings (and a chat-rendered conversation) tokenized by llama.cpp must give
   exactly the Hugging Face tokenizer's ids.
2. Logits: the probe's logits at every position, llama.cpp with an f32 KV cache against transformers
   in float32: max |Δ|, the same relative to the largest logit, top-1 agreement, and the KL
   divergence of the file's next-token distribution from the original's (mean and worst position,
   as llama.cpp's perplexity --kl-divergence reports it: unlike top-1 it does not jump when a
   near-tie flips, so it ranks quantisations smoothly).
3. Greedy text: a short greedy continuation from both (reported, not gated).

Thresholds depend on the type. A failure is EXPORT_VERIFY_FAILED for that file.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

# Gate per type: float types by relative max |Δlogit| (to the largest |logit|) and top-1; quantized
# types by top-1. The limits catch broken files (a wrong permutation, norm offset or tokenizer gives
# errors of the order of the logits and top-1 near chance), not rounding: a deep random model
# amplifies f16 rounding to a few per cent of the largest logit, and a tiny or untrained model has
# near-ties a good file may flip. The measured numbers are always in the manifest.
REL_LIMIT = {"f32": 1e-2, "f16": 0.1, "bf16": 0.2}
FLOAT_TOP1 = {"f32": 0.98, "f16": 0.9, "bf16": 0.85}
TOP1_LIMIT = {"q8_0": 0.85, "q6_k": 0.8, "q5_k_m": 0.7, "q5_k_s": 0.7, "q5_0": 0.7, "q5_1": 0.7,
              "q4_k_m": 0.5, "q4_k_s": 0.5, "q4_0": 0.5, "q4_1": 0.5, "q3_k_s": 0.4, "q3_k_m": 0.4,
              "q3_k_l": 0.4, "q2_k": 0.2}
GREEDY_TOKENS = 12
PROBE_TEXTS = (
    "The quick brown fox jumps over the lazy dog. 0123456789 1,234.56 -- (a) [b] {c} <d> \"quoted\" 'single'",
    "Hello world!\n\nTwo newlines, a\ttab,   three spaces and trailing space ",
    "Unicode: café naïve Zürich — “curly” … 東京 😀 ünïcödé",
    "def f(x):\n    return x ** 2  # square\n",
    "I'm sure they've said it's what we'd do; you'll see.",
)
PROBE_CHAT = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "What does the cat say?"},
    {"role": "assistant", "content": "The cat says meow."},
    {"role": "user", "content": "And what does the dog say? Answer in one short sentence, please."},
]


class Reference:
    """The Hugging Face side, loaded once per run: tokenizer, float32 model, probe ids and logits."""

    def __init__(self, model_dir: Path, trust_remote_code: bool = False):
        import torch
        from bp_common.models import load_causal_lm, load_tokenizer, quiet_transformers
        quiet_transformers()
        self.tok = load_tokenizer(model_dir, trust_remote_code=trust_remote_code)
        self.model = load_causal_lm(model_dir, dtype=torch.float32, trust_remote_code=trust_remote_code).eval()
        self.texts = list(PROBE_TEXTS)
        self.chat = None
        if getattr(self.tok, "chat_template", None):
            try:
                self.chat = self.tok.apply_chat_template(PROBE_CHAT, tokenize=False, add_generation_prompt=True)
            except Exception:  # a template that refuses a system turn, say: try without it
                try:
                    self.chat = self.tok.apply_chat_template(PROBE_CHAT[1:], tokenize=False,
                                                             add_generation_prompt=True)
                except Exception:
                    self.chat = None
        if self.chat:
            self.texts.append(self.chat)
        self.text_ids = [self.tok(t, add_special_tokens=False)["input_ids"] for t in self.texts]
        self.with_specials = self.tok(PROBE_TEXTS[0])["input_ids"]  # BOS/EOS as the tokenizer adds them
        # The logit probe: the chat prompt (with BOS when the tokenizer adds one) and the plain texts.
        probe = self.tok(self.chat or PROBE_TEXTS[0])["input_ids"]
        for ids in self.text_ids[:3]:
            probe = probe + ids
        self.probe = probe[:256]
        with torch.no_grad():
            self.logits = self.model(torch.tensor([self.probe])).logits[0].float().numpy()
            gen_prompt = self.probe[:64]
            out = self.model.generate(torch.tensor([gen_prompt]), attention_mask=torch.ones(1, len(gen_prompt),
                                      dtype=torch.long), max_new_tokens=GREEDY_TOKENS, do_sample=False,
                                      min_new_tokens=GREEDY_TOKENS, pad_token_id=self.tok.pad_token_id or 0)
        self.gen_prompt = gen_prompt
        self.greedy = out[0][len(gen_prompt):].tolist()

    def close(self) -> None:
        self.model = None


def compare(ref: Reference, gguf_path: Path, quant: str, lora: Path | None = None, ref_logits=None) -> dict:
    """Check one GGUF against the reference; returns the verify record (ok, numbers, reasons)."""
    from bp_common.llamacpp import Model
    logits_ref = ref.logits if ref_logits is None else ref_logits
    with Model(gguf_path, n_ctx=max(512, len(ref.probe) + 32), lora=lora) as m:
        mismatched = [i for i, (t, ids) in enumerate(zip(ref.texts, ref.text_ids)) if m.tokenize(t) != ids]
        specials_ok = m.tokenize(PROBE_TEXTS[0], special=False, add_bos=True) == ref.with_specials
        got = m.logits(ref.probe)
        greedy = m.greedy(ref.gen_prompt, GREEDY_TOKENS) if lora is None else None
    diff = np.abs(got - logits_ref)
    scale = float(np.abs(logits_ref).max()) or 1.0
    top1 = float((got.argmax(-1) == logits_ref.argmax(-1)).mean())
    kld = kl_divergence(logits_ref, got)
    rec = {"ok": True, "quant": quant, "positions": len(ref.probe), "max_abs_diff": float(diff.max()),
           "rel_diff": float(diff.max()) / scale, "top1": top1, "kld_mean": float(kld.mean()),
           "kld_max": float(kld.max()), "greedy_match": None if greedy is None else greedy == ref.greedy,
           "tokenization_ok": not mismatched and specials_ok, "specials_ok": specials_ok, "probe_strings": len(ref.texts), "kv_cache": "f32", "reasons": []}
    if not specials_ok:
        rec["reasons"].append("BOS/EOS are not added as the Hugging Face tokenizer adds them")
    if mismatched:
        rec["reasons"].append(f"tokenization differs from transformers on {len(mismatched)} probe string(s)")
        rec["mismatched_probes"] = [ref.texts[i][:60] for i in mismatched]
    if quant in REL_LIMIT:
        rec["limit"] = {"rel_diff": REL_LIMIT[quant], "top1": FLOAT_TOP1[quant]}
        if rec["rel_diff"] > REL_LIMIT[quant]:
            rec["reasons"].append(f"relative logit difference {rec['rel_diff']:.2e} > {REL_LIMIT[quant]:g}")
        if top1 < FLOAT_TOP1[quant]:
            rec["reasons"].append(f"top-1 agreement {top1:.0%} < {FLOAT_TOP1[quant]:.0%}")
    else:
        limit = TOP1_LIMIT.get(quant, 0.3)
        rec["limit"] = {"top1": limit}
        if top1 < limit:
            rec["reasons"].append(f"top-1 agreement {top1:.0%} < {limit:.0%}")
    rec["ok"] = not rec["reasons"]
    return rec


def kl_divergence(ref_logits: np.ndarray, logits: np.ndarray) -> np.ndarray:
    """KL(P_ref || P) in nats at each position (rows of logits), computed in float64."""
    def log_softmax(x):
        x = np.asarray(x, np.float64)
        x = x - x.max(-1, keepdims=True)
        return x - np.log(np.exp(x).sum(-1, keepdims=True))
    lp, lq = log_softmax(ref_logits), log_softmax(logits)
    return np.maximum((np.exp(lp) * (lp - lq)).sum(-1), 0.0)  # >= 0; rounding can give -1e-17


def adapter_reference_logits(ref: Reference, adapter_dir: Path, allow_pickle: bool) -> np.ndarray:
    """Logits of the reference model with a PEFT adapter applied (not merged)."""
    import torch
    from peft import PeftModel
    if not (adapter_dir / "adapter_model.safetensors").is_file() and not allow_pickle:
        from bp_common.errors import BpError
        raise BpError("INPUT_PICKLE_REFUSED", f"{adapter_dir} has no adapter_model.safetensors")
    model = PeftModel.from_pretrained(ref.model, str(adapter_dir), is_trainable=False).eval()
    with torch.no_grad():
        out = model(torch.tensor([ref.probe])).logits[0].float().numpy()
    ref.model = model.unload() if hasattr(model, "unload") else ref.model
    return out
