"""The llama.cpp engine: a GGUF file scored and sampled through bp_common.llamacpp, with the Hugging
Face tokenizer of the model it came from, so the token ids (and therefore the numbers) are the same
ones the transformers engine sees. f32 KV cache, so an f32 GGUF's loss matches transformers' to ~1e-6.
"""
from __future__ import annotations

import numpy as np

from bp_common.errors import BpError

from .engines import cut_at_stop, tokenizer_dir
from .scoring import IGNORE

DEFAULT_CTX = 4096


class LlamaCppEngine:
    backend = "llama.cpp"
    max_batch_tokens = 8192  # examples are evaluated one at a time; this only groups progress

    def __init__(self, subject, *, n_ctx: int | None = None, trust_remote_code: bool = False):
        from bp_common.llamacpp import Model, require
        from bp_common.models import load_tokenizer
        require("scoring a GGUF file")
        if subject.tokenizer is None:
            raise BpError("INPUT_USAGE", f"{subject.path}: no tokenizer to go with the GGUF",
                          hint="pass --tokenizer MODEL_DIR (the model the GGUF was made from)")
        tdir = tokenizer_dir(subject.tokenizer)
        self.tokenizer = load_tokenizer(tdir, trust_remote_code=trust_remote_code)
        trained = _context_length(subject.path)
        self.max_len = int(n_ctx or min(trained or DEFAULT_CTX, DEFAULT_CTX))
        self.model = Model(subject.path, n_ctx=self.max_len)
        if self.model.n_vocab < len(self.tokenizer):
            raise BpError("INPUT_INVALID", f"{subject.path} has {self.model.n_vocab} tokens but the tokenizer "
                          f"{len(self.tokenizer)}: they are not the same model")
        self.generation_config = _generation_config(tdir)

    def nll(self, batch) -> list[tuple[float, int]]:
        out = []
        for ex in batch:
            ids = list(ex.ids)
            labels = np.asarray(ex.labels[1:])
            keep = labels != IGNORE
            if not keep.any():
                out.append((0.0, 0))
                continue
            logits = self.model.logits(ids)[:-1][keep].astype(np.float64)
            targets = labels[keep]
            m = logits.max(axis=1, keepdims=True)
            lse = (m[:, 0] + np.log(np.exp(logits - m).sum(axis=1)))
            out.append((float((lse - logits[np.arange(len(targets)), targets]).sum()), int(keep.sum())))
        return out

    def generate(self, prompts: list[list[int]], *, max_new_tokens: int, stop_ids: list[int], temperature: float,
                 top_p: float, seed: int, batch_size: int) -> list[tuple[list[int], str]]:
        results = []
        for i, p in enumerate(prompts):
            if temperature <= 0:
                new = self.model.greedy(p, max_new_tokens, stop_ids)
            else:
                llm = self.model.llm
                llm.set_seed(seed + i)
                new = []
                for tok in llm.generate(list(p), temp=temperature, top_p=top_p, top_k=0, min_p=0.0,
                                        repeat_penalty=1.0, reset=True):
                    new.append(int(tok))
                    if tok in stop_ids or len(new) >= max_new_tokens or len(p) + len(new) >= self.max_len:
                        break
            results.append(cut_at_stop(new, stop_ids))
        return results

    def close(self) -> None:
        if self.model is not None:
            self.model.close()
            self.model = None


def _context_length(path) -> int | None:
    import gguf
    reader = gguf.GGUFReader(str(path))
    arch = reader.get_field("general.architecture")
    if arch is None:
        return None
    f = reader.get_field(f"{bytes(arch.parts[-1]).decode()}.context_length")
    return int(f.parts[-1][0]) if f is not None else None


def _generation_config(tdir) -> dict:
    from pathlib import Path
    p = Path(tdir) / "generation_config.json"
    if p.is_file():
        import json
        try:
            return json.loads(p.read_text(encoding="utf-8"))
        except ValueError:
            return {}
    return {}
