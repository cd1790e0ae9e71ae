"""Held-out loss: rows tokenized and masked as bp-train trains on them, scored token by token.

A conversation is rendered with the model's chat template and its assistant tokens found by
bp_common.chat (template markers, or derived by prefix rendering); those tokens carry the loss,
the rest are IGNORE. A raw-text row carries loss on every token, EOS appended. The loss of a row
is the sum of -log p(token | the tokens before it) over its loss tokens (next-token, shifted);
the data's loss is the sum over rows divided by the number of loss tokens (a token-weighted
mean), and perplexity is exp(loss).
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

IGNORE = -100  # label of a token that carries no loss (PyTorch's cross-entropy default)


@dataclass
class Example:
    row: int              # EvalRow.index
    ids: list[int]
    labels: list[int]     # ids, with IGNORE where there is no loss

    @property
    def n_loss(self) -> int:
        return sum(1 for x in self.labels[1:] if x != IGNORE)


@dataclass
class Encoded:
    examples: list[Example]
    modes: Counter = field(default_factory=Counter)      # mask mode per conversation row
    truncated: int = 0
    skipped: Counter = field(default_factory=Counter)    # reason -> rows without loss


def encode_view(tokenizer, view: dict, mode: str | None) -> tuple[list[int], list[int], str]:
    """(input_ids, labels, mask mode) of one row as training scores it.

    view: {"messages": [...], "tools"?: [...]} or {"text": "..."}. With mask mode "unavailable"
    every token carries loss (as in training). Raises chat.ChatError when the template refuses it.
    """
    from bp_common import chat
    if "messages" not in view:
        ids = list(tokenizer(view["text"], add_special_tokens=True)["input_ids"])
        if tokenizer.eos_token_id is not None and (not ids or ids[-1] != tokenizer.eos_token_id):
            ids.append(tokenizer.eos_token_id)
        return ids, list(ids), "text"
    enc = chat.tokenize_conversation(tokenizer, view["messages"], mode, tools=view.get("tools"))
    if enc.assistant_mask is None:
        return enc.input_ids, list(enc.input_ids), enc.mode
    labels = [i if m else IGNORE for i, m in zip(enc.input_ids, enc.assistant_mask)]
    return enc.input_ids, labels, enc.mode


def encode_rows(tokenizer, rows, max_len: int, mode: str | None = None) -> Encoded:
    """Examples for every row that has loss tokens; longer rows keep their first max_len tokens."""
    from bp_common import chat
    mode = mode or chat.mask_mode(tokenizer)
    out = Encoded([])
    for row in rows:
        if not row.has_loss:
            continue
        try:
            ids, labels, used = encode_view(tokenizer, row.loss_view(), mode)
        except chat.ChatError:
            out.skipped["template_failed"] += 1
            continue
        if len(ids) > max_len:
            ids, labels = ids[:max_len], labels[:max_len]
            out.truncated += 1
        ex = Example(row.index, ids, labels)
        if ex.n_loss == 0:
            out.skipped["no_loss_tokens"] += 1
            continue
        out.modes[used] += 1
        out.examples.append(ex)
    return out


def batches(examples: list[Example], batch_size: int, max_tokens: int) -> list[list[Example]]:
    """Examples grouped by length (little padding), at most batch_size rows and max_tokens padded tokens each."""
    order = sorted(examples, key=lambda e: len(e.ids))
    out, cur = [], []
    for ex in order:
        width = max([len(ex.ids)] + [len(c.ids) for c in cur])
        if cur and (len(cur) >= batch_size or width * (len(cur) + 1) > max_tokens):
            out.append(cur)
            cur = []
        cur.append(ex)
    if cur:
        out.append(cur)
    return out


def score_examples(engine, examples: list[Example], batch_size: int, reporter=None) -> dict[int, tuple[float, int]]:
    """{row index: (summed negative log-likelihood, loss tokens)} for every example."""
    out: dict[int, tuple[float, int]] = {}
    groups = batches(examples, batch_size, engine.max_batch_tokens)
    task = reporter.task("loss", total=len(examples), unit="row") if reporter is not None else None
    if task is not None:
        task.__enter__()
    try:
        for group in groups:
            for ex, res in zip(group, engine.nll(group)):
                out[ex.row] = res
            if task is not None:
                task.advance(len(group))
    finally:
        if task is not None:
            task.__exit__(None, None, None)
    return out


def data_loss(scores: dict[int, tuple[float, int]]) -> tuple[float | None, int]:
    """(token-weighted mean loss, loss tokens) over scored rows."""
    nll = sum(s for s, _ in scores.values())
    n = sum(k for _, k in scores.values())
    return (nll / n if n else None), n
