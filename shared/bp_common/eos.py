"""Where a model's turn ends: the chat template's end-of-turn token and every EOS id to stop on.

Models tuned on a chat template stop at the template's turn terminator (`<|im_end|>`,
`<|eot_id|>`, `<end_of_turn>`), which is often not the tokenizer's `eos_token`. A merged model,
a GGUF and an Ollama Modelfile must all list it, or generation never ends. This module reads
the model directory's JSON and Jinja files only: no torch, no transformers.
"""
from __future__ import annotations

import json
from pathlib import Path

# Distinctive strings that survive any template: what follows the assistant's one is the terminator.
_USER = "bpUserProbe"
_ASSISTANT = "bpAssistantProbe"


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def read_chat_template(model_dir: Path | str) -> str | None:
    """The default chat template of a model or adapter directory, or None."""
    d = Path(model_dir)
    jinja = d / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    for source in (_read_json(d / "tokenizer_config.json"), _read_json(d / "chat_template.json")):
        tpl = source.get("chat_template")
        if isinstance(tpl, str):
            return tpl
        if isinstance(tpl, list):  # named templates: [{"name": "default", "template": "..."}]
            named = {t.get("name"): t.get("template") for t in tpl if isinstance(t, dict)}
            if named.get("default"):
                return named["default"]
    return None


def _token_text(value) -> str | None:
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def special_tokens(model_dir: Path | str) -> dict[str, int]:
    """Added/special token text -> id, from tokenizer.json and tokenizer_config.json."""
    d = Path(model_dir)
    found: dict[str, int] = {}
    for tok in _read_json(d / "tokenizer.json").get("added_tokens") or []:
        if isinstance(tok, dict) and isinstance(tok.get("content"), str) and isinstance(tok.get("id"), int):
            found[tok["content"]] = tok["id"]
    for tid, tok in (_read_json(d / "tokenizer_config.json").get("added_tokens_decoder") or {}).items():
        text = _token_text(tok)
        if text is not None and str(tid).isdigit():
            found.setdefault(text, int(tid))
    return found


def token_id(model_dir: Path | str, text: str) -> int | None:
    """The id of one token's text (special tokens first, then the BPE vocabulary)."""
    ids = special_tokens(model_dir)
    if text in ids:
        return ids[text]
    vocab = ((_read_json(Path(model_dir) / "tokenizer.json").get("model") or {}).get("vocab"))
    if isinstance(vocab, dict) and isinstance(vocab.get(text), int):
        return vocab[text]
    return None


def render_chat_template(template: str, messages: list[dict], add_generation_prompt: bool = False,
                         **variables) -> str:
    """Render a Hugging Face chat template the way transformers does (sandboxed Jinja)."""
    import jinja2
    from jinja2 import nodes
    from jinja2.ext import Extension, loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Generation(Extension):
        """`{% generation %}…{% endgeneration %}` marks assistant text; rendering ignores it."""
        tags = {"generation"}

        def parse(self, parser):
            next(parser.stream)
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return nodes.Scope(body)

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def strftime_now(fmt):
        import datetime
        return datetime.datetime.now().strftime(fmt)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[Generation, loopcontrols])
    env.filters["tojson"] = lambda x, indent=None, ensure_ascii=False: json.dumps(x, indent=indent,
                                                                                    ensure_ascii=ensure_ascii)
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    return env.from_string(template).render(messages=messages, add_generation_prompt=add_generation_prompt,
                                            **variables)


def template_variables(model_dir: Path | str) -> dict:
    """bos_token / eos_token etc. as templates expect them."""
    cfg = _read_json(Path(model_dir) / "tokenizer_config.json")
    out = {}
    for key in ("bos_token", "eos_token", "unk_token", "pad_token"):
        text = _token_text(cfg.get(key))
        if text is not None:
            out[key] = text
    return out


def end_of_turn_token(model_dir: Path | str) -> str | None:
    """The special token the chat template writes after an assistant message, or None.

    Renders a user/assistant exchange and returns the first special token that follows the
    assistant's text (`<|im_end|>` for ChatML, `<|eot_id|>` for Llama 3, `</s>` for Mistral).
    """
    template = read_chat_template(model_dir)
    if not template:
        return None
    messages = [{"role": "user", "content": _USER}, {"role": "assistant", "content": _ASSISTANT}]
    try:
        text = render_chat_template(template, messages, **template_variables(model_dir))
    except Exception:  # a template that refuses this exchange tells us nothing
        return None
    at = text.rfind(_ASSISTANT)
    if at < 0:
        return None
    rest = text[at + len(_ASSISTANT):]
    best = None
    for token in special_tokens(model_dir):
        pos = rest.find(token)
        if pos >= 0 and (best is None or pos < best[0] or pos == best[0] and len(token) > len(best[1])):
            best = (pos, token)
    return best[1] if best else None


def _ids(value) -> list[int]:
    if isinstance(value, int):
        return [value]
    if isinstance(value, list):
        return [v for v in value if isinstance(v, int)]
    return []


def eos_token_ids(model_dir: Path | str) -> list[int]:
    """Every id generation should stop on: generation_config's, config's, the tokenizer's
    eos_token and the template's end-of-turn token, in that order, without repeats."""
    d = Path(model_dir)
    ids = _ids(_read_json(d / "generation_config.json").get("eos_token_id"))
    ids += _ids(_read_json(d / "config.json").get("eos_token_id"))
    for text in (_token_text(_read_json(d / "tokenizer_config.json").get("eos_token")), end_of_turn_token(d)):
        if text is not None:
            tid = token_id(d, text)
            if tid is not None:
                ids.append(tid)
    return list(dict.fromkeys(ids))
