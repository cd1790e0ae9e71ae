"""Rendering conversations with a model's own chat template, and finding the assistant tokens.

bp-prep, bp-train and bp-eval all tokenize conversations here, so "loss on assistant tokens"
means the same thing in the data report, in training and in evaluation.

Mask modes (how assistant tokens are located):
- "template": the chat template marks them with `{% generation %}` blocks (our tiny models,
  TRL's *_training templates), or TRL knows a marked training variant of this exact template.
- "derived": no markers, but the template is prefix-preserving, so each assistant turn's span
  is the text between render(messages[:i], generation prompt) and render(messages[:i+1]).
- "unavailable": neither works (e.g. a template that rewrites earlier turns); loss then falls
  back to the whole sequence and tools warn.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

MASK_MODES = ("template", "derived", "unavailable")
_GEN_MARKER = re.compile(r"\{%-?\s*generation\s*-?%\}")

PROBE = [
    {"role": "user", "content": "Probe question one?"},
    {"role": "assistant", "content": "Probe answer one."},
    {"role": "user", "content": "Probe question two?"},
    {"role": "assistant", "content": "Probe answer two."},
]


class ChatError(ValueError):
    """The template could not render these messages (raise_exception, bad roles, ...)."""


@dataclass
class Encoded:
    """One tokenized conversation: ids and a 0/1 mask of assistant tokens (None = unknown)."""
    input_ids: list[int]
    assistant_mask: list[int] | None
    text: str
    mode: str
    problems: list[str] = field(default_factory=list)

    @property
    def n_assistant(self) -> int:
        return sum(self.assistant_mask) if self.assistant_mask else 0


def template_of(tokenizer) -> str | None:
    t = getattr(tokenizer, "chat_template", None)
    if isinstance(t, dict):  # named templates: the default one
        t = t.get("default") or next(iter(t.values()), None)
    return t or None


def has_generation_markers(template: str | None) -> bool:
    return bool(template) and bool(_GEN_MARKER.search(template))


def render(tokenizer, messages: list[dict], add_generation_prompt: bool = False, chat_template: str | None = None,
           **kwargs) -> str:
    """The template's text for `messages` (no tokenization)."""
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt,
                                             chat_template=chat_template, **kwargs)
    except Exception as exc:  # jinja2 TemplateError, raise_exception(), TypeError on odd content
        raise ChatError(str(exc).splitlines()[0] if str(exc) else type(exc).__name__) from None


def _cached(tokenizer, name: str, key, compute):
    """Memoise a per-tokenizer answer that depends only on `key` (the template, special tokens)."""
    slot = getattr(tokenizer, "_bp_cache", None)
    if slot is None:
        slot = {}
        try:
            tokenizer._bp_cache = slot
        except AttributeError:
            return compute()
    hit = slot.get(name)
    if hit is not None and hit[0] == key:
        return hit[1]
    value = compute()
    slot[name] = (key, value)
    return value


def training_template(tokenizer) -> str | None:
    """A template with generation markers that renders like the model's: its own, or TRL's variant."""
    own = template_of(tokenizer)
    if own is None:
        return None
    if has_generation_markers(own):
        return own

    def compute():
        try:
            from trl.chat_template_utils import get_training_chat_template
            patched = get_training_chat_template(tokenizer)
        except Exception:
            return None
        return patched if patched and has_generation_markers(patched) else None
    return _cached(tokenizer, "training_template", own, compute)


def _prefix_spans(tokenizer, messages: list[dict], chat_template: str | None = None):
    """Render and find each assistant turn's char span by prefix rendering.

    Returns (full text, [(start, end)], all_turns) or None. When the template rewrites earlier
    turns once later ones exist (Qwen3 drops old reasoning, Mistral moves the system text), only
    the final assistant turn is recoverable: then all_turns is False and only it is returned.
    """
    full = render(tokenizer, messages, chat_template=chat_template)
    eot = end_of_turn_token(tokenizer)
    turns = [i for i, m in enumerate(messages) if m.get("role") == "assistant"]

    def span(i: int, whole: str):
        before = render(tokenizer, messages[:i], add_generation_prompt=True, chat_template=chat_template) if i else ""
        upto = whole if i == len(messages) - 1 else render(tokenizer, messages[: i + 1], chat_template=chat_template)
        if not upto.startswith(before):
            return None
        start, end = len(before), len(upto)
        # Stop after the end-of-turn marker: what follows it (a separator, or the EOS some
        # templates write only at the very end, like Phi-3's) belongs to the next turn.
        seg = upto[start:end]
        if eot and eot in seg:
            end = start + seg.rindex(eot) + len(eot)
        else:
            end = start + len(seg.rstrip())
        return (start, end) if whole.startswith(upto[:end]) else None

    spans = [span(i, full) for i in turns]
    if spans and all(sp is not None for sp in spans):
        return full, spans, True
    if turns and turns[-1] == len(messages) - 1 and spans[-1] is not None:
        return full, [spans[-1]], False
    return None


def _mask_from_spans(tokenizer, text: str, spans: list[tuple[int, int]]) -> tuple[list[int], list[int]]:
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    mask = []
    for s, e in offsets:
        mask.append(1 if any(s < se and e > ss for ss, se in spans) and e > s else 0)
    return ids, mask


def mask_mode(tokenizer) -> str:
    """How assistant tokens will be found for this tokenizer's template (see module doc)."""
    if template_of(tokenizer) is None:
        return "unavailable"
    tmpl = training_template(tokenizer)
    try:
        if tmpl and render(tokenizer, PROBE, chat_template=tmpl) == render(tokenizer, PROBE):
            return "template"
        return "derived" if _prefix_spans(tokenizer, PROBE) else "unavailable"
    except ChatError:
        try:  # templates that refuse multi-turn or odd probes: try one turn
            return "derived" if _prefix_spans(tokenizer, PROBE[:2]) else "unavailable"
        except ChatError:
            return "unavailable"


def tokenize_conversation(tokenizer, messages: list[dict], mode: str | None = None,
                          tools: list | None = None) -> Encoded:
    """Render `messages` with the model's template and mark the assistant tokens.

    Raises ChatError when the template refuses the messages.
    """
    mode = mode or mask_mode(tokenizer)
    kwargs = {"tools": tools} if tools else {}
    if mode == "template":
        tmpl = training_template(tokenizer)
        text = render(tokenizer, messages, chat_template=tmpl, **kwargs)
        # The model's own template carries the markers itself: nothing to compare against.
        own = text if tmpl == template_of(tokenizer) else render(tokenizer, messages, **kwargs)
        if text == own:
            try:
                out = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True,
                                                    return_assistant_tokens_mask=True, chat_template=tmpl, **kwargs)
            except Exception as exc:
                raise ChatError(str(exc).splitlines()[0]) from None
            enc = Encoded(list(out["input_ids"]), list(out["assistant_masks"]), text, "template")
            return _check(tokenizer, enc)
        mode = "derived"  # the marked variant renders differently for this row: derive instead
    if mode == "derived":
        got = _prefix_spans(tokenizer, messages) if not kwargs else None
        if got is not None:
            text, spans, all_turns = got
            ids, mask = _mask_from_spans(tokenizer, text, spans)
            enc = Encoded(ids, mask, text, "derived")
            if not all_turns:
                enc.problems.append("history_rewritten:last_turn_only")
            return _check(tokenizer, enc)
    text = render(tokenizer, messages, **kwargs)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return _check(tokenizer, Encoded(list(ids), None, text, "unavailable"))


IGNORE_INDEX = -100  # the label of a token that carries no loss (PyTorch's cross-entropy default)


def marker_spans(text: str, response: str, instruction: str | None = None) -> list[tuple[int, int]]:
    """Character spans of assistant text found by literal markers: from the end of each `response`
    marker to the next `instruction` marker (or the end of the text)."""
    spans, pos = [], 0
    while response:
        i = text.find(response, pos)
        if i < 0:
            break
        start = i + len(response)
        j = text.find(instruction, start) if instruction else -1
        end = j if j >= 0 else len(text)
        if end > start:
            spans.append((start, end))
        pos = max(end, start)
    return spans


def tokenize_with_markers(tokenizer, messages: list[dict], response_template: str,
                          instruction_template: str | None = None, tools: list | None = None) -> Encoded:
    """Render with the model's template and mark as assistant tokens the text after each
    `response_template` up to the next `instruction_template` (for templates whose other modes fail)."""
    text = render(tokenizer, messages, **({"tools": tools} if tools else {}))
    ids, mask = _mask_from_spans(tokenizer, text, marker_spans(text, response_template, instruction_template))
    return _check(tokenizer, Encoded(ids, mask, text, "markers"))


def training_example(tokenizer, row: dict, mode: str | None = None, *, train_on_all: bool = False,
                     response_template: str | None = None,
                     instruction_template: str | None = None) -> tuple[list[int], list[int], Encoded | None]:
    """(input_ids, labels, encoding) of one dataset row, as training and held-out evaluation score it.

    row: `{"messages": [...], "tools"?: [...]}` (loss on assistant tokens) or `{"text": "..."}`
    (loss on every token, EOS appended). Labels are the ids, with IGNORE_INDEX on tokens that
    carry no loss. train_on_all puts loss on every token; response_template (and
    instruction_template) locate assistant text by literal markers instead of `mode`. A mask
    that cannot be found (mode "unavailable") means loss on every token. Raises ChatError when
    the template refuses the row, KeyError when it has neither messages nor text.
    """
    if "messages" not in row:
        ids = list(tokenizer(row["text"], add_special_tokens=True)["input_ids"])
        if tokenizer.eos_token_id is not None and (not ids or ids[-1] != tokenizer.eos_token_id):
            ids.append(tokenizer.eos_token_id)
        return ids, list(ids), None
    tools = row.get("tools")
    if response_template:
        enc = tokenize_with_markers(tokenizer, row["messages"], response_template, instruction_template, tools)
    else:
        enc = tokenize_conversation(tokenizer, row["messages"], mode, tools=tools)
    if train_on_all or enc.assistant_mask is None:
        return enc.input_ids, list(enc.input_ids), enc
    labels = [i if m else IGNORE_INDEX for i, m in zip(enc.input_ids, enc.assistant_mask)]
    return enc.input_ids, labels, enc


def end_of_turn_token(tokenizer) -> str | None:
    """The special token that closes an assistant turn (e.g. <|im_end|>, <|eot_id|>, <end_of_turn>)."""
    cached = getattr(tokenizer, "_bp_eot", "unset")
    if cached != "unset":
        return cached
    eot = None
    marker = "Xq7Zend"
    try:
        text = render(tokenizer, [{"role": "user", "content": "hi"}, {"role": "assistant", "content": marker}])
    except ChatError:
        text = ""
    if marker in text:
        after = text[text.rindex(marker) + len(marker):]
        specials = sorted(set(tokenizer.all_special_tokens) | set(getattr(tokenizer, "added_tokens_encoder", {})),
                          key=len, reverse=True)
        for tok in specials:
            if tok and after.startswith(tok):
                eot = tok
                break
    if eot is None:
        eot = tokenizer.eos_token
    try:
        tokenizer._bp_eot = eot
    except AttributeError:
        pass
    return eot


def stop_token_ids(tokenizer, generation_config: dict | None = None) -> list[int]:
    """Ids that end generation: the end-of-turn token, the tokenizer's EOS, generation_config's EOS ids."""
    ids: list[int] = []
    for tok in (end_of_turn_token(tokenizer), tokenizer.eos_token):
        if tok is not None:
            i = tokenizer.convert_tokens_to_ids(tok)
            if isinstance(i, int) and i >= 0 and i not in ids:
                ids.append(i)
    eos = (generation_config or {}).get("eos_token_id")
    for i in ([eos] if isinstance(eos, int) else list(eos or [])):
        if i not in ids:
            ids.append(i)
    return ids


def bos_expected(tokenizer) -> bool:
    """Does the template itself write the BOS token at the start of a conversation?"""
    bos = tokenizer.bos_token
    if not bos:
        return False

    def compute():
        try:
            return render(tokenizer, PROBE[:2]).startswith(bos)
        except ChatError:
            return False
    return _cached(tokenizer, "bos_expected", (template_of(tokenizer), bos), compute)


def _check(tokenizer, enc: Encoded) -> Encoded:
    """Record problems that silently ruin training: an unlabelled end of turn, zero or double BOS."""
    bos_id = tokenizer.bos_token_id
    if bos_id is not None:
        n_bos = sum(1 for i in enc.input_ids if i == bos_id)
        if n_bos != (1 if bos_expected(tokenizer) else 0):
            enc.problems.append(f"bos_count:{n_bos}")
    if enc.assistant_mask is not None:
        masked = [i for i, m in enumerate(enc.assistant_mask) if m]
        if not masked:
            enc.problems.append("no_assistant_tokens")
        else:
            # The last labelled run (the final assistant turn) must contain the end-of-turn token.
            end = masked[-1]
            start = end
            while start > 0 and enc.assistant_mask[start - 1]:
                start -= 1
            ends = {tokenizer.convert_tokens_to_ids(t) for t in (end_of_turn_token(tokenizer), tokenizer.eos_token) if t}
            if not any(enc.input_ids[i] in ends for i in range(start, end + 1)):
                enc.problems.append("eos_not_labelled")
    return enc


def pad_is_eos(tokenizer) -> bool:
    """True when padding and EOS share an id: a collator that masks pad ids would mask EOS too."""
    return tokenizer.pad_token_id is not None and tokenizer.pad_token_id == tokenizer.eos_token_id
