"""Translate a model's Jinja chat template into an Ollama Go TEMPLATE, and find its end-of-turn text.

Ollama only recognises a chat template when it is close to one it ships; for others (Qwen2.5,
Qwen3, fine-tunes with their own template) the model gets no turn markers at all. So we derive
the TEMPLATE from the model's own Jinja template:

1. Render probe conversations whose message texts are unique markers, with the same Jinja engine
   transformers' `apply_chat_template` uses.
2. Cut the renderings at the markers and recover each role's prefix and suffix, the generation
   prompt, what is written when there is no system message, and where the system text goes: a
   turn of its own (ChatML, Llama 3), the start of the first user turn (Gemma 3, and Gemma's
   template, which refuses a system turn), or the last user turn (Mistral `[INST]`).
3. Hold the result in a small `TurnFormat`. `go_template` writes it as a Go template over Ollama's
   `.System` and `.Messages`; `render_format` is the same logic in Python.
4. Before a translation is returned, `render_format` must reproduce the Jinja rendering of several
   ordinary conversations exactly; otherwise the translation is refused, naming why.

The leading BOS token is left to the runtime when the GGUF says the tokenizer adds it
(`tokenizer.ggml.add_bos_token`), as Ollama's own templates do; writing it in the template as
well would give the model two BOS tokens.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

PLACEMENTS = ("turn", "first_user", "last_user", "none")

# Message texts of the probe conversations: plain words no template rewrites or trims.
MARK = {"s": "Qz7SystemMark", "u1": "Qz7UserOneMark", "a1": "Qz7AssistantOneMark",
        "u2": "Qz7UserTwoMark", "a2": "Qz7AssistantTwoMark", "u3": "Qz7UserThreeMark"}

# Ordinary conversations every translation must reproduce exactly.
CHECK_SYSTEM = "You are a helpful assistant. Answer briefly."
CHECK_TURNS = [
    ("user", "What does a cat say?"), ("assistant", "The cat says meow."),
    ("user", "And a dog?"), ("assistant", "The dog says woof."),
    ("user", "And an owl?"),
]


class Untranslatable(Exception):
    """The chat template cannot be expressed as an Ollama Go template; the message says why."""


class TemplateRefused(Exception):
    """The Jinja template raised while rendering (raise_exception, bad roles, ...)."""


@dataclass
class TurnFormat:
    """How a conversation is written, piece by piece (see render_format for the exact logic)."""
    bos: str = ""                # written first: the template's BOS when the runtime does not add one
    no_system: str = ""          # written when there is no system message (Qwen2.5's default prompt)
    placement: str = "turn"      # where the system text goes: one of PLACEMENTS
    system_prefix: str = ""      # turn: opens the system turn; first_user/last_user: inside the user turn
    system_suffix: str = ""      # turn: closes the system turn
    system_join: str = ""        # first_user/last_user: between the system text and the user's text
    user_prefix: str = ""
    user_suffix: str = ""
    assistant_prefix: str = ""
    assistant_suffix: str = ""   # left off when the assistant message is the last one (a prefill)
    generation: str = ""         # after the last message when it is not the assistant's

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Translation:
    template: str                       # the Go template for Ollama's TEMPLATE
    format: TurnFormat
    end_of_turn: str | None             # the text that closes an assistant turn (a stop string)
    system_supported: bool              # False when the Jinja template refuses a system message
    warnings: list[str] = field(default_factory=list)


# -- rendering ---------------------------------------------------------------------------------

def render_jinja(template: str, messages: list[dict], specials: dict, add_generation_prompt: bool = True) -> str:
    """Render with the Jinja environment transformers' apply_chat_template uses (no tokenizer needed).

    specials: bos_token, eos_token, ... as apply_chat_template passes them. Raises TemplateRefused.
    """
    from transformers.utils.chat_template_utils import render_jinja_template
    try:
        out, _ = render_jinja_template([messages], chat_template=template,
                                       add_generation_prompt=add_generation_prompt, **specials)
    except Exception as exc:  # jinja2 errors, raise_exception(), TypeError on odd templates
        text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise TemplateRefused(text) from None
    return out[0]


def collate(messages: list[dict]) -> tuple[str, list[dict]]:
    """Ollama's view of a chat: system texts joined by a blank line, same-role neighbours merged."""
    system: list[str] = []
    out: list[dict] = []
    for m in messages:
        role, content = m.get("role", ""), m.get("content", "") or ""
        if role == "system":
            system.append(content)
        if out and out[-1]["role"] == role and role != "tool":
            out[-1] = {"role": role, "content": out[-1]["content"] + "\n\n" + content}
        else:
            out.append({"role": role, "content": content})
    return "\n\n".join(system), out


def render_format(fmt: TurnFormat, messages: list[dict]) -> str:
    """What Ollama renders for `messages` with go_template(fmt): the same logic, in Python."""
    system, msgs = collate(messages)
    out = [fmt.bos]
    if not system:
        out.append(fmt.no_system)
    system_written = False
    for i, m in enumerate(msgs):
        last = i == len(msgs) - 1
        role, content = m["role"], m["content"]
        if role == "system" and fmt.placement == "turn":
            out += [fmt.system_prefix, content, fmt.system_suffix]
        elif role == "user":
            out.append(fmt.user_prefix)
            if system and ((fmt.placement == "first_user" and not system_written)
                           or (fmt.placement == "last_user" and last)):
                out += [fmt.system_prefix, system, fmt.system_join]
            system_written = True
            out += [content, fmt.user_suffix]
            if last:
                out.append(fmt.generation)
        elif role == "assistant":
            out += [fmt.assistant_prefix, content]
            if not last:
                out.append(fmt.assistant_suffix)
    return "".join(out)


def _literal(text: str) -> str:
    """Text for a Go template: literal, except `{{`, which would open an action."""
    return text.replace("{{", '{{ "{{" }}')


def go_template(fmt: TurnFormat) -> str:
    """The Go template (Ollama's `.System` / `.Messages`) that renders like render_format(fmt).

    Literal text always sits right before a plain `{{`, never before a trimming `{{-`, so no
    whitespace of the model's format is eaten; the layout newlines are trimmed away.
    """
    L = _literal
    head = L(fmt.bos) + (f"{{{{ if not .System }}}}{L(fmt.no_system)}{{{{ end }}}}" if fmt.no_system else "")
    lines = [head] if head else []
    if fmt.placement == "first_user":
        lines.append("{{- $sys := false }}")
    lines.append("{{- range $i, $_ := .Messages }}")
    lines.append("{{- $last := eq (len (slice $.Messages $i)) 1 }}")
    if fmt.placement == "turn":
        lines.append(f'{{{{- if eq .Role "system" }}}}{L(fmt.system_prefix)}{{{{ .Content }}}}'
                     f'{L(fmt.system_suffix)}{{{{ end }}}}')
    user = f'{{{{- if eq .Role "user" }}}}{L(fmt.user_prefix)}'
    if fmt.placement == "first_user":
        user += (f"{{{{ if and $.System (not $sys) }}}}{L(fmt.system_prefix)}{{{{ $.System }}}}"
                 f"{L(fmt.system_join)}{{{{ end }}}}{{{{ $sys = true }}}}")
    elif fmt.placement == "last_user":
        user += (f"{{{{ if and $last $.System }}}}{L(fmt.system_prefix)}{{{{ $.System }}}}"
                 f"{L(fmt.system_join)}{{{{ end }}}}")
    user += f"{{{{ .Content }}}}{L(fmt.user_suffix)}"
    if fmt.generation:
        user += f"{{{{ if $last }}}}{L(fmt.generation)}{{{{ end }}}}"
    lines.append(user + "{{ end }}")
    asst = f'{{{{- if eq .Role "assistant" }}}}{L(fmt.assistant_prefix)}{{{{ .Content }}}}'
    if fmt.assistant_suffix:
        asst += f"{{{{ if not $last }}}}{L(fmt.assistant_suffix)}{{{{ end }}}}"
    lines.append(asst + "{{ end }}")
    lines.append("{{- end }}")
    return "\n".join(lines)


# -- recovering the format from probe renderings ----------------------------------------------------

def _cut(text: str, markers: list[str], what: str) -> list[str]:
    """Split text at each marker (each must appear once, in this order): len(markers)+1 pieces."""
    pieces, pos = [], 0
    for mk in markers:
        n = text.count(mk)
        if n != 1:
            raise Untranslatable(f"{what}: the template writes a message's text {n} times, not once "
                                 "(it drops, repeats or rewrites message text)")
        idx = text.index(mk)
        if idx < pos:
            raise Untranslatable(f"{what}: the template writes the messages out of order")
        pieces.append(text[pos:idx])
        pos = idx + len(mk)
    pieces.append(text[pos:])
    return pieces


def _unsafe_cut(s: str, k: int, tokens: tuple[str, ...]) -> bool:
    """True when cutting s at k would split a special token or an unclosed <...> / [...] tag."""
    head = s[:k]
    for tok in tokens:
        start = s.find(tok)
        while start != -1:
            if start < k < start + len(tok):
                return True
            start = s.find(tok, start + 1)
    return head.rfind("<") > head.rfind(">") or head.rfind("[") > head.rfind("]")


def _common_prefix(texts: list[str], tokens: tuple[str, ...]) -> str:
    """The longest common prefix of texts that ends on a token boundary."""
    first = texts[0]
    k = 0
    while k < len(first) and all(len(t) > k and t[k] == first[k] for t in texts):
        k += 1
    while k > 0 and any(_unsafe_cut(t, k, tokens) for t in texts):
        k -= 1
    return first[:k]


def _tail(text: str, marker: str, what: str) -> str:
    n = text.count(marker)
    if n != 1:
        raise Untranslatable(f"{what}: the template writes a message's text {n} times, not once "
                             "(it drops, repeats or rewrites message text)")
    return text[text.index(marker) + len(marker):]


def _msgs(*pairs) -> list[dict]:
    return [{"role": r, "content": c} for r, c in pairs]


def translate(template: str, specials: dict, add_bos: bool, tokens: tuple[str, ...] = ()) -> Translation:
    """Translate a Jinja chat template; raises Untranslatable with the reason when it cannot.

    specials: the special-token texts apply_chat_template would pass (bos_token, eos_token, ...).
    add_bos: the runtime's tokenizer adds BOS itself (then a leading BOS is left out of the template).
    tokens: special-token texts, so recovered pieces never split one.
    """
    specials = {k: v for k, v in specials.items() if isinstance(v, str)}
    # Only tokens the template can write matter: its literal text, or a special token variable.
    tokens = tuple(sorted({t for t in tokens if t and t in template} | set(specials.values()) - {""},
                          key=len, reverse=True))
    warnings: list[str] = []
    M = MARK

    def render(pairs, gen=True):
        return render_jinja(template, _msgs(*pairs), specials, add_generation_prompt=gen)

    conv = [("user", M["u1"]), ("assistant", M["a1"]), ("user", M["u2"]), ("assistant", M["a2"]),
            ("user", M["u3"])]
    try:
        text = render(conv)
        tail_u = _tail(render(conv[:3], gen=False), M["u2"], "a conversation ending with a user turn")
        tail_a = _tail(render(conv[:4], gen=False), M["a2"], "a conversation ending with an assistant turn")
    except TemplateRefused as exc:
        raise Untranslatable(f"the template refuses a plain user/assistant conversation: {exc}") from None
    n = _cut(text, [M[k] for k in ("u1", "a1", "u2", "a2", "u3")], "a user/assistant conversation")
    if n[1] != n[3] or n[2] != n[4]:
        raise Untranslatable("the text between turns changes from one turn to the next "
                             "(the template treats turns by position, which a Go template over .Messages "
                             "cannot follow)")

    fmt = TurnFormat()
    fmt.user_suffix = _common_prefix([n[1], tail_u, n[5]], tokens)
    fmt.assistant_prefix = n[1][len(fmt.user_suffix):]
    fmt.generation = n[5][len(fmt.user_suffix):]
    fmt.assistant_suffix = _common_prefix([n[2], tail_a], tokens)
    fmt.user_prefix = n[2][len(fmt.assistant_suffix):]
    if not n[0].endswith(fmt.user_prefix):
        raise Untranslatable("the first user turn does not start the way later user turns do")
    lead = n[0][:len(n[0]) - len(fmt.user_prefix)]
    bos = specials.get("bos_token") or ""
    lead_bos = bos if bos and lead.startswith(bos) else ""
    fmt.bos = "" if (lead_bos and add_bos) else lead_bos
    fmt.no_system = lead[len(lead_bos):]
    if add_bos and not lead_bos and bos:
        warnings.append(f"the runtime adds the BOS token {bos!r} but the chat template does not start with it; "
                        "the model will see one more token than in training")

    system_supported = _find_system_placement(fmt, render, conv, n, lead, lead_bos, warnings)
    _verify(fmt, template, specials, lead_bos if add_bos else "", system_supported)
    _check_content_kept(render, warnings)
    if "strftime_now" in template:
        warnings.append("the chat template writes today's date; the TEMPLATE keeps the date of this translation")
    return Translation(go_template(fmt), fmt, end_of_turn(fmt, tokens), system_supported, warnings)


def end_of_turn(fmt: TurnFormat, tokens: tuple[str, ...] = ()) -> str | None:
    """The text that closes an assistant turn: the first special token of its suffix, else all of it."""
    closing = fmt.assistant_suffix.strip()
    if not closing:
        return None
    first = next((t for t in tokens if closing.startswith(t)), None)
    return first or closing


def _find_system_placement(fmt: TurnFormat, render, conv, n, lead: str, lead_bos: str,
                           warnings: list[str]) -> bool:
    """Fill in where the system text goes; False when the template refuses a system message."""
    M = MARK
    try:
        text = render([("system", M["s"])] + conv)
    except TemplateRefused:
        # Gemma's template: a system turn is an error. Put the system text where Gemma 3 does.
        fmt.placement, fmt.system_prefix, fmt.system_join = "first_user", "", "\n\n"
        warnings.append("the chat template refuses a system message; a system prompt is written at the start "
                        "of the first user turn, followed by a blank line (as Gemma 3's template does)")
        return False
    if text.count(M["s"]) == 0:
        fmt.placement = "none"
        warnings.append("the chat template ignores system messages; so does the TEMPLATE")
        return True
    order = sorted(M, key=lambda k: text.find(M[k]))
    if order == ["s", "u1", "a1", "u2", "a2", "u3"]:
        y = _cut(text, [M[k] for k in order], "a conversation with a system message")
        if y[2:] != n[1:]:
            raise Untranslatable("a system message changes how the later turns are written")
        if y[0].startswith(lead + fmt.user_prefix):
            fmt.placement = "first_user"
            fmt.system_prefix = y[0][len(lead + fmt.user_prefix):]
            fmt.system_join = y[1]
        elif y[1].endswith(fmt.user_prefix) and y[0].startswith(lead_bos):
            fmt.placement = "turn"
            fmt.system_prefix = y[0][len(lead_bos):]
            fmt.system_suffix = y[1][:len(y[1]) - len(fmt.user_prefix)]
        else:
            raise Untranslatable("the system message is written neither as a turn of its own nor inside "
                                 "the first user turn")
        return True
    if order == ["u1", "a1", "u2", "a2", "s", "u3"]:
        y = _cut(text, [M[k] for k in order], "a conversation with a system message")
        if y[:4] != n[:4] or y[6] != n[5] or not y[4].startswith(n[4]):
            raise Untranslatable("a system message changes how the other turns are written")
        fmt.placement = "last_user"
        fmt.system_prefix = y[4][len(n[4]):]
        fmt.system_join = y[5]
        return True
    raise Untranslatable("the template moves the system message to a place bp-ollama cannot express "
                         f"(order of the rendered messages: {', '.join(order)})")


def _verify(fmt: TurnFormat, template: str, specials: dict, strip_bos: str, system_supported: bool) -> None:
    """render_format must equal the Jinja rendering of ordinary conversations, byte for byte."""
    cases = [CHECK_TURNS[:1], CHECK_TURNS[:3], CHECK_TURNS]
    if system_supported and fmt.placement != "none":
        cases += [[("system", CHECK_SYSTEM)] + c for c in cases]
    for pairs in cases:
        messages = _msgs(*pairs)
        try:
            want = render_jinja(template, messages, specials, add_generation_prompt=True)
        except TemplateRefused as exc:
            raise Untranslatable(f"the template refuses an ordinary conversation: {exc}") from None
        if strip_bos and want.startswith(strip_bos):
            want = want[len(strip_bos):]
        got = render_format(fmt, messages)
        if got != want:
            at = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))
            roles = "/".join(r for r, _ in pairs)
            raise Untranslatable(f"the recovered format does not reproduce the template for a {roles} "
                                 f"conversation: they differ at character {at}: template "
                                 f"{want[max(0, at - 20):at + 20]!r}, translation {got[max(0, at - 20):at + 20]!r}")


def _check_content_kept(render, warnings: list[str]) -> None:
    padded = "  Qz7Padded  "
    try:
        text = render([("user", padded)])
    except TemplateRefused:
        return
    if padded not in text:
        warnings.append("the chat template trims message text; Ollama passes message text as sent")
