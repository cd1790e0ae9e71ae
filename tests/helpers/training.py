"""Shared pieces of the bp-train tests: a prepared dataset of the example chats, greedy answers.

Each prepared dataset is built once per test session (cached by model and split) with bp-prep's
own pipeline (bp_common.dataprep), so bp-train reads exactly what bp-prep writes.
"""
from __future__ import annotations

import functools
import json
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CHATS = [ROOT / "examples" / f"chat-{f}.jsonl" for f in ("openai", "sharegpt", "alpaca")]
TRAIN_PROMPT = "What does the cat say?"
TRAIN_ANSWER = "The cat says meow."


@functools.lru_cache(maxsize=None)
def prepared(model_dir: str, heldout_ratio: float = 0.1, files: tuple[str, ...] | None = None) -> Path:
    """A bp-prep output directory of the example chats rendered for model_dir."""
    from bp_common.dataprep import PrepOptions, prepare
    out = Path(tempfile.mkdtemp(prefix="bp-train-data-")) / "data"
    prepare([str(f) for f in (files or CHATS)], out, model_dir,
            options=PrepOptions(heldout_ratio=heldout_ratio, seed=0))
    return out


def greedy_answer(base_dir, adapter_dir, prompt: str = TRAIN_PROMPT, max_new_tokens: int = 16) -> str:
    """The base + adapter's greedy answer to one user message, with the model's chat template."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tok = AutoTokenizer.from_pretrained(str(adapter_dir))
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(base_dir)), str(adapter_dir))
    model.eval()
    enc = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False)
    return tok.decode(out[0][enc["input_ids"].shape[1]:], skip_special_tokens=True).strip()


def events_of(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
