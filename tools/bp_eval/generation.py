"""Answers to held-out prompts through the model's own chat template, scored against the references.

A prompt is rendered with `add_generation_prompt=True` (what a chat front end sends), generation
stops at the template's end-of-turn token or an EOS id (bp_common.chat.stop_token_ids), and the
answer is the new tokens decoded without special tokens.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from .metrics import score_answer


@dataclass
class Settings:
    n: int = 100                 # prompts to answer (the first n rows that have one)
    max_new_tokens: int = 128
    temperature: float = 0.0     # <= 0: greedy
    top_p: float = 1.0
    seed: int = 0
    batch_size: int = 8
    metrics: tuple[str, ...] = ()


@dataclass
class Generation:
    row: int
    prompt: list[dict]
    references: list[str]
    output: str
    tokens: int
    stop: str                     # "stop": an end-of-turn/EOS token; "length": max_new_tokens reached
    metrics: dict = field(default_factory=dict)

    def record(self) -> dict:
        return {"row": self.row, "prompt": self.prompt, "references": self.references, "output": self.output,
                "tokens": self.tokens, "stop": self.stop, "metrics": self.metrics}


def prompt_ids(tokenizer, messages: list[dict], tools: list | None = None) -> list[int]:
    """Token ids of messages rendered with the chat template and the assistant's generation prompt."""
    from bp_common import chat
    text = chat.render(tokenizer, messages, add_generation_prompt=True, **({"tools": tools} if tools else {}))
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def decode_answer(tokenizer, ids: list[int], stop_ids) -> str:
    """The answer's text: the stop token left out, special tokens skipped, outer whitespace trimmed."""
    if ids and ids[-1] in set(stop_ids):
        ids = ids[:-1]
    return tokenizer.decode(ids, skip_special_tokens=True).strip()


def generate_for_rows(engine, rows, settings: Settings, reporter=None) -> tuple[list[Generation], Counter]:
    """Answer the first settings.n rows that have a prompt; returns (generations, skipped by reason)."""
    from bp_common import chat
    tok = engine.tokenizer
    stop_ids = chat.stop_token_ids(tok, engine.generation_config)
    picked, prompts, skipped = [], [], Counter()
    for row in rows:
        if len(picked) >= settings.n:
            break
        if row.prompt is None:
            continue
        try:
            ids = prompt_ids(tok, row.prompt, row.tools)
        except chat.ChatError:
            skipped["template_failed"] += 1
            continue
        if len(ids) + settings.max_new_tokens > engine.max_len:
            skipped["prompt_too_long"] += 1
            continue
        picked.append(row)
        prompts.append(ids)
    if not picked:
        return [], skipped
    if reporter is not None:
        reporter.event("generate", prompts=len(picked), max_new_tokens=settings.max_new_tokens,
                       temperature=settings.temperature, seed=settings.seed)
    outs = engine.generate(prompts, max_new_tokens=settings.max_new_tokens, stop_ids=stop_ids,
                           temperature=settings.temperature, top_p=settings.top_p, seed=settings.seed,
                           batch_size=settings.batch_size)
    gens = []
    for row, (new, stop) in zip(picked, outs):
        text = decode_answer(tok, new, stop_ids)
        gens.append(Generation(row.index, row.prompt, row.references, text, len(new), stop,
                               score_answer(text, row.references, settings.metrics, row.patterns)))
    return gens, skipped
