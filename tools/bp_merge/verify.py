"""Parity check: the merged model must compute what the base plus the adapter (through PEFT) computes.

Both sides run in float32 on a short probe conversation rendered with the chat template, so
the check measures the merged weights (including their rounding to the output dtype), not the
arithmetic of a low-precision forward pass. The reference and the merged model are loaded one
after the other, so the check needs memory for one float32 copy of the model.

For bf16/f16 output the allowed difference is the larger of a fixed share of the largest logit
and twice what rounding the *base alone* to that dtype changes (its "dtype floor"): some models
(random ones, or ones with large activations) cannot be stored in bf16 without moving their
logits, and a merge must not be blamed for that, only for adding more.
"""
from __future__ import annotations

import gc
from pathlib import Path

import numpy as np

from bp_common.errors import BpError

# Largest |Δlogit| allowed, as a fraction of the largest |logit| of the reference.
TOLERANCE = {"f32": 1e-4, "f16": 0.02, "bf16": 0.05}
PROBE = [{"role": "user", "content": "What does the cat say? Answer in one short sentence."},
         {"role": "assistant", "content": "The cat says meow."}]
PROBE_TEXT = "The quick brown fox jumps over the lazy dog. What does the cat say? The cat says meow."


def probe_ids(model_dir: Path, trust_remote_code: bool = False, max_tokens: int = 96) -> tuple[list[int], str]:
    """Token ids of the probe: a chat exchange through the template, or plain text without one."""
    from bp_common.errors import BpError
    from bp_common.models import load_tokenizer, read_config
    try:
        tok = load_tokenizer(model_dir, trust_remote_code=trust_remote_code)
    except BpError:  # no tokenizer shipped with the base: probe with plain token ids
        vocab = int(read_config(model_dir).get("vocab_size") or 64)
        return list(range(1, min(vocab, max_tokens + 1))), "token_ids"
    text = None
    if getattr(tok, "chat_template", None):
        try:
            text = tok.apply_chat_template(PROBE, tokenize=False)
        except Exception:  # some templates refuse a role or order; plain text still probes the weights
            text = None
    source = "chat_template" if text else "text"
    ids = tok(text or PROBE_TEXT, add_special_tokens=text is None)["input_ids"]
    return list(ids)[:max_tokens], source


def reference_logits(base_dir: Path, adapters: list, ids: list[int], allow_pickle: bool = False,
                     trust_remote_code: bool = False, dtype: str = "f32") -> tuple[np.ndarray, float]:
    """Logits of the float32 base with the adapters applied by PEFT (weights as per-adapter scales),
    and the dtype floor: max |Δlogit| of the base alone when its weights are rounded to `dtype`."""
    import torch
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer

    from bp_common.models import load_causal_lm
    model = load_causal_lm(base_dir, dtype=torch.float32, allow_pickle=allow_pickle,
                           trust_remote_code=trust_remote_code)
    names = [f"a{i}" for i in range(len(adapters))]
    model = PeftModel.from_pretrained(model, str(adapters[0].path), adapter_name=names[0])
    for name, ad in zip(names[1:], adapters[1:]):
        model.load_adapter(str(ad.path), adapter_name=name)
    if len(adapters) > 1 or adapters[0].weight != 1.0:
        model.base_model.set_adapter(names)
        for module in model.modules():
            if isinstance(module, LoraLayer):
                for name, ad in zip(names, adapters):
                    if name in module.scaling:
                        module.scaling[name] *= ad.weight
    model.eval()
    x = torch.tensor([ids])
    try:
        with torch.no_grad():
            ref = model(x).logits[0].float().numpy()
            floor = 0.0
            if dtype != "f32":
                with model.disable_adapter():
                    plain = model(x).logits[0].float()
                    low = {"bf16": torch.bfloat16, "f16": torch.float16}[dtype]
                    for p in model.parameters():
                        p.data = p.data.to(low).float()
                    floor = float((model(x).logits[0].float() - plain).abs().max())
        return ref, floor
    finally:
        del model
        gc.collect()


def merged_logits(model_dir: Path, ids: list[int], trust_remote_code: bool = False) -> np.ndarray:
    import torch

    from bp_common.models import load_causal_lm
    model = load_causal_lm(model_dir, dtype=torch.float32, trust_remote_code=trust_remote_code)
    model.eval()
    try:
        with torch.no_grad():
            return model(torch.tensor([ids])).logits[0].float().numpy()
    finally:
        del model
        gc.collect()


def compare_logits(ref: np.ndarray, got: np.ndarray, dtype: str, floor: float = 0.0) -> dict:
    """max |Δlogit|, top-1 agreement and the verdict for the output dtype (floor: see the module doc).

    A position whose top-1 token differs fails only when the reference prefers its own token by
    more than the tolerance: a near-tie may flip under rounding without changing the model.
    """
    diff = np.abs(ref.astype(np.float64) - got.astype(np.float64))
    finite = bool(np.isfinite(got).all())
    max_diff = float(diff.max()) if finite else float("inf")
    scale = float(np.abs(ref).max())
    tol = max(TOLERANCE[dtype] * max(1.0, scale), 2.0 * floor)
    ref_top = ref.argmax(-1)
    got_top = got.argmax(-1)
    agree = ref_top == got_top
    rows = np.arange(ref.shape[0])
    margins = ref[rows, ref_top] - ref[rows, got_top]
    decisive = int(np.sum(~agree & (margins > tol)))
    return {"max_abs_diff": max_diff, "top1": float(agree.mean()), "positions": int(ref.shape[0]),
            "max_abs_logit": scale, "tolerance": tol, "relative_tolerance": TOLERANCE[dtype], "dtype_floor": floor,
            "top1_decisive_mismatches": decisive,
            "passed": finite and max_diff <= tol and decisive == 0}


def verify_merge(base_dir: Path, adapters: list, model_dir: Path, dtype: str, allow_pickle: bool = False,
                 trust_remote_code: bool = False, reporter=None) -> dict:
    """Run the parity check; return the `verify` record or raise EXPORT_MERGE_MISMATCH."""
    import warnings

    from bp_common.models import quiet_transformers
    quiet_transformers()
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning, module="peft")
    ids, source = probe_ids(model_dir, trust_remote_code)
    if reporter is not None:
        reporter.info(f"verifying: {len(ids)} probe tokens ({source}) through base + adapter (PEFT) and the merge")
    ref, floor = reference_logits(base_dir, adapters, ids, allow_pickle, trust_remote_code, dtype)
    got = merged_logits(model_dir, ids, trust_remote_code)
    result = compare_logits(ref, got, dtype, floor)
    result["probe"] = source
    if not result["passed"]:
        raise BpError("EXPORT_MERGE_MISMATCH",
                      f"merged logits differ from base + adapter by up to {result['max_abs_diff']:.4g} "
                      f"(tolerance {result['tolerance']:.4g} for {dtype}); top-1 agreement {result['top1']:.0%}",
                      details=result)
    return result
