"""The two engines a model is run with: transformers (model directories, base + PEFT adapter) and
llama.cpp (GGUF files, through bp_common.llamacpp). Both take token ids and give back the same
things, so a number means the same whichever ran it:

  nll(examples)       -> [(summed -log p over the loss tokens, loss tokens)] per example
  generate(prompts, …) -> [(new token ids, "stop" | "length")] per prompt

The Hugging Face tokenizer and chat template are used for both: token ids are made once, by
bp_common.chat, and fed to either engine.
"""
from __future__ import annotations

import contextlib
import warnings

from bp_common.errors import BpError

from .scoring import IGNORE

DTYPES = ("auto", "f32", "bf16", "f16")
CE_CHUNK = 1024  # positions per float32 cross-entropy slice


def torch_dtype(name: str, device: str):
    """The torch dtype for --dtype: auto is float32 on CPU, bfloat16 on a GPU that has it, else float16."""
    import torch
    if name == "auto":
        if device == "cpu":
            return torch.float32
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}[name]


def pick_device() -> str:
    import torch
    return "cuda" if torch.cuda.is_available() else "cpu"


class TransformersEngine:
    """A causal LM from a model directory (or hub id), optionally with a PEFT adapter applied (not merged)."""

    backend = "transformers"

    def __init__(self, subject, *, dtype: str = "auto", allow_pickle: bool = False, trust_remote_code: bool = False,
                 max_batch_tokens: int = 8192):
        import torch
        from bp_common.models import load_causal_lm, load_tokenizer, quiet_transformers, resolve_model
        quiet_transformers()
        self.device = pick_device()
        self.dtype = torch_dtype(dtype, self.device)
        self.max_batch_tokens = max_batch_tokens
        model_ref = subject.base if subject.kind == "adapter" else subject.path
        model_dir = resolve_model(str(model_ref), allow_pickle=allow_pickle)
        self.tokenizer = load_tokenizer(tokenizer_dir(subject.tokenizer), trust_remote_code=trust_remote_code)
        with library_warnings_silenced():
            model = load_causal_lm(model_dir, dtype=self.dtype, allow_pickle=allow_pickle,
                                   trust_remote_code=trust_remote_code)
            if subject.kind == "adapter":
                model = load_adapter(model, subject.path, allow_pickle)
        self.model = model.to(self.device).eval()
        cfg = model.config
        self.max_len = int(getattr(cfg, "max_position_embeddings", None) or 4096)
        self.generation_config = _generation_config_dict(model)
        self.model_dir = model_dir

    def nll(self, batch) -> list[tuple[float, int]]:
        """Summed next-token NLL over each example's loss tokens; logits only where a loss token follows."""
        import torch
        import torch.nn.functional as F
        width = max(len(e.ids) for e in batch)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        ids = torch.full((len(batch), width), pad, dtype=torch.long)
        att = torch.zeros((len(batch), width), dtype=torch.long)
        targets = torch.full((len(batch), width), IGNORE, dtype=torch.long)
        for b, ex in enumerate(batch):
            n = len(ex.ids)
            ids[b, :n] = torch.tensor(ex.ids)
            att[b, :n] = 1
            targets[b, :n - 1] = torch.tensor(ex.labels[1:])  # position t predicts token t+1
        keep = targets != IGNORE
        with torch.inference_mode():
            logits = self._logits(ids.to(self.device), att.to(self.device), keep.to(self.device))
            flat_targets = targets[keep].to(self.device)
            # float32 log-softmax a slice at a time: [kept, vocab] in float32 at once can be gigabytes.
            losses = torch.cat([F.cross_entropy(logits[i:i + CE_CHUNK].float(), flat_targets[i:i + CE_CHUNK],
                                                reduction="none")
                                for i in range(0, logits.shape[0], CE_CHUNK)]).double().cpu()
        rows = keep.nonzero()[:, 0]
        sums = torch.zeros(len(batch), dtype=torch.float64).index_add_(0, rows, losses)
        counts = keep.sum(dim=1)
        return [(float(sums[b]), int(counts[b])) for b in range(len(batch))]

    def _logits(self, ids, att, keep):
        """[number of kept positions, vocab] logits; the lm_head runs only on kept positions when the
        model supports a boolean logits_to_keep (transformers 5), else on all of them."""
        try:
            out = self.model(input_ids=ids, attention_mask=att, logits_to_keep=keep, use_cache=False).logits
            if out.dim() == 2 and out.shape[0] == int(keep.sum()):
                return out
        except (TypeError, ValueError, RuntimeError, IndexError):
            pass
        out = self.model(input_ids=ids, attention_mask=att, use_cache=False).logits
        return out[keep]

    def generate(self, prompts: list[list[int]], *, max_new_tokens: int, stop_ids: list[int], temperature: float,
                 top_p: float, seed: int, batch_size: int) -> list[tuple[list[int], str]]:
        """New tokens per prompt (left-padded batches), cut after the first stop id. Greedy when
        temperature <= 0; else sampling seeded with seed + batch number."""
        import torch
        from transformers import GenerationConfig
        pad = self.tokenizer.pad_token_id
        if pad is None:
            pad = stop_ids[0] if stop_ids else 0
        sample = temperature > 0
        # A fresh config: the model's own generation_config (repetition penalty, top_k, ...) would make
        # numbers differ between engines and between models with different defaults.
        gcfg = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=sample,
                                temperature=temperature if sample else None, top_p=top_p if sample else None,
                                top_k=0 if sample else None, eos_token_id=list(stop_ids) or None, pad_token_id=pad)
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
        results: dict[int, tuple[list[int], str]] = {}
        for bi in range(0, len(order), batch_size):
            idx = order[bi:bi + batch_size]
            width = max(len(prompts[i]) for i in idx)
            ids = torch.full((len(idx), width), pad, dtype=torch.long)
            att = torch.zeros((len(idx), width), dtype=torch.long)
            for b, i in enumerate(idx):
                p = prompts[i]
                ids[b, width - len(p):] = torch.tensor(p)
                att[b, width - len(p):] = 1
            torch.manual_seed(seed + bi // batch_size)
            with torch.inference_mode(), library_warnings_silenced():
                out = self.model.generate(input_ids=ids.to(self.device), attention_mask=att.to(self.device),
                                          generation_config=gcfg)
            for b, i in enumerate(idx):
                results[i] = cut_at_stop(out[b, width:].tolist(), stop_ids, pad)
        return [results[i] for i in range(len(prompts))]

    def close(self) -> None:
        self.model = None


@contextlib.contextmanager
def library_warnings_silenced():
    """transformers' and peft's deprecation notices are about their internals, not the user's run."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        yield


def tokenizer_dir(ref):
    """A directory holding tokenizer files (an adapter directory has no config.json), else resolve a model."""
    from pathlib import Path
    from bp_common.models import resolve_model
    p = Path(str(ref)).expanduser()
    if p.is_dir() and (p / "tokenizer_config.json").is_file():
        return p
    return resolve_model(str(ref), tokenizer_only=True)


def cut_at_stop(new: list[int], stop_ids, pad: int | None = None) -> tuple[list[int], str]:
    """Tokens up to and including the first stop id: (tokens, "stop"), else (tokens, "length")."""
    stops = set(stop_ids)
    for k, t in enumerate(new):
        if t in stops:
            return new[:k + 1], "stop"
    return new, "length"


def load_adapter(model, adapter_dir, allow_pickle: bool):
    """PeftModel on top of the base, weights from safetensors unless --allow-pickle."""
    from pathlib import Path
    d = Path(adapter_dir)
    has_st = (d / "adapter_model.safetensors").is_file()
    if not has_st:
        if (d / "adapter_model.bin").is_file() and not allow_pickle:
            raise BpError("INPUT_PICKLE_REFUSED", f"{d} holds adapter_model.bin (pickle) and no safetensors")
        if not (d / "adapter_model.bin").is_file():
            raise BpError("INPUT_NOT_FOUND", f"{d} has no adapter_model.safetensors")
    from peft import PeftModel
    try:
        return PeftModel.from_pretrained(model, str(d), is_trainable=False)
    except (OSError, ValueError, RuntimeError, KeyError) as exc:
        raise BpError("EXPORT_ADAPTER_MISMATCH", f"the adapter at {d} does not load onto its base: "
                      f"{str(exc).splitlines()[0]}") from None


def _generation_config_dict(model) -> dict:
    gc = getattr(model, "generation_config", None)
    return gc.to_dict() if gc is not None else {}


def open_engine(subject, *, dtype: str = "auto", allow_pickle: bool = False, trust_remote_code: bool = False,
                n_ctx: int | None = None):
    """The engine for a subject: llama.cpp for GGUF files, transformers otherwise."""
    if subject.kind == "gguf":
        from .gguf_engine import LlamaCppEngine
        return LlamaCppEngine(subject, n_ctx=n_ctx, trust_remote_code=trust_remote_code)
    return TransformersEngine(subject, dtype=dtype, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code)
