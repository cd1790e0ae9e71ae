"""A tiny model with confident predictions, for measuring what quantisation costs.

The tiny models are random. With bp_common.tinymodel's std-0.2 weights the network is chaotic (any
rounding flips the top token), and with a real model's std-0.02 init the logits are nearly flat
(the top token is decided in the fourth decimal): neither says anything about quantisation quality.
A trained model is confident where its data is predictable, and that is where agreement between a
quantised file and the original is meaningful. So: the same architecture, layer weights rescaled to a
real model's init scale, trained briefly (AdamW, 300 steps of 8 rows) on the example chats' text and
the project's own prose (prose.txt: docs/*.md and README.md, frozen, in 400-character pieces). The prose matters: a
model trained on the chats alone is peaked on them and flat elsewhere, and its quantised files
differ from it by a KL divergence ten times a real model's (q8_0 ~2e-3, q4_0 ~0.2); with the prose
the numbers fall to what llama.cpp reports for 7-8B models (q8_0 ~4e-4, q6_k ~2e-3, q4_0 ~3e-2).
No file that holds bp-gguf's verification probe strings is read (they live in verify.py).
Deterministic for a seed and a checkout; a few seconds for hidden 64, under a minute for hidden
256 on 2 CPUs.
"""
from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

from helpers.training import CHATS

PROSE = Path(__file__).with_name("prose.txt")  # the docs, frozen: editing them must not change these models
PIECE = 400  # characters of prose per training row


def _texts() -> list[str]:
    rows = []
    for f in sorted(CHATS):
        rows += [json.dumps(json.loads(line), ensure_ascii=False) for line in f.read_text().splitlines() if line.strip()]
    for text in PROSE.read_text(encoding="utf-8").split("\x0c")[1:]:  # part 0 is the file's header
        rows += [text[i:i + PIECE] for i in range(0, len(text), PIECE)]
    return rows


def trained_copy(model_dir: Path, out: Path, steps: int = 300, lr: float = 3e-3, seed: int = 0,
                 max_tokens: int = 128, batch: int = 8) -> Path:
    """Write to `out` a copy of the model at `model_dir` trained briefly; return `out`.

    Returns at once when `out` already holds a model (session caches)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    if (out / "config.json").exists():
        return out
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    ids = [tok(t)["input_ids"][:max_tokens] for t in _texts()]
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    torch.manual_seed(seed)
    rng = random.Random(seed)
    with torch.no_grad():  # layer weights to a real model's init scale (0.2 -> 0.02); embeddings kept
        for name, p in model.named_parameters():
            if p.dim() == 2 and "embed" not in name:
                p.mul_(0.1)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    for _ in range(steps):
        rows = rng.sample(ids, batch)
        width = max(map(len, rows))
        x = torch.tensor([r + [pad] * (width - len(r)) for r in rows])
        labels = torch.tensor([r + [-100] * (width - len(r)) for r in rows])
        mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
        model(input_ids=x, attention_mask=mask, labels=labels).loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(str(tmp))
    for f in model_dir.iterdir():  # tokenizer, chat template, generation config: as the base has them
        if f.is_file() and ("token" in f.name or f.suffix == ".jinja" or f.name in (
                "generation_config.json", "special_tokens_map.json", "chat_template.json")):
            shutil.copy(f, tmp / f.name)
    tmp.rename(out)
    return out
