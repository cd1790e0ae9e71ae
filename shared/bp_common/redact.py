"""Secret redaction for everything a tool prints or writes (messages, envelopes, manifests)."""
from __future__ import annotations

import re

MASK = "***"

_PATTERNS = [
    # Authorization headers and bearer tokens.
    (re.compile(r"(?i)\b(bearer)\s+[A-Za-z0-9._~+/=-]{4,}"), r"\1 " + MASK),
    # Hugging Face, OpenAI-style, GitHub, GitLab and AWS key ids.
    (re.compile(r"\bhf_[A-Za-z0-9]{8,}"), "hf_" + MASK),
    (re.compile(r"\bsk-[A-Za-z0-9_-]{8,}"), "sk-" + MASK),
    (re.compile(r"\bgh[psour]_[A-Za-z0-9]{20,}"), "gh_" + MASK),
    (re.compile(r"\bglpat-[A-Za-z0-9_-]{8,}"), "glpat-" + MASK),
    (re.compile(r"\bAKIA[0-9A-Z]{12,}"), "AKIA" + MASK),
    # JSON web tokens: three base64url segments starting with eyJ.
    (re.compile(r"\beyJ[A-Za-z0-9_-]{5,}\.[A-Za-z0-9_-]{5,}\.[A-Za-z0-9_-]{5,}"), MASK),
    # Credentials inside URLs: scheme://user:password@host
    (re.compile(r"([a-zA-Z][a-zA-Z0-9+.-]*://)[^/\s:@]+:[^/\s@]+@"), r"\1" + MASK + "@"),
    # key=value / key: value for secret-looking keys.
    # The value must look like a credential (8+ token characters with a digit), so that
    # prose such as "end-of-turn token: <|im_end|>" survives.
    (re.compile(r"(?i)(?<![A-Za-z])(password|passwd|pwd|secret|token|api[_-]?key)(\s*[=:]\s*)(\"?)"
                r"(?=[A-Za-z0-9_\-./+=]*\d)[A-Za-z0-9_\-./+=]{8,}"),
     r"\1\2\3" + MASK),
]


def redact(text: str) -> str:
    """Return text with tokens, passwords and URL credentials masked."""
    if not text:
        return text
    for pattern, repl in _PATTERNS:
        text = pattern.sub(repl, text)
    return text


def redact_obj(obj):
    """Redact every string inside a JSON-like structure (dicts, lists, strings)."""
    if isinstance(obj, str):
        return redact(obj)
    if isinstance(obj, dict):
        return {k: redact_obj(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [redact_obj(v) for v in obj]
    return obj
