"""Ollama model names: checked before they reach a Modelfile, an HTTP request or a manifest."""
from __future__ import annotations

import re

from bp_common.errors import BpError

# The original system's rule, kept: a letter or digit first, then letters, digits and . _ : -
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")
# Ollama's own limits on each part (types/model/name.go): at most 80 characters, no ':' in a part.
_PART_MAX = 80


def check_name(name: str, what: str = "model name") -> str:
    """Return name when Ollama would accept it as `model[:tag]`; INPUT_NAME_INVALID otherwise."""
    shown = name.encode("unicode_escape").decode() if isinstance(name, str) else repr(name)
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise BpError("INPUT_NAME_INVALID", f"{what} {shown!r} is not allowed",
                      hint="use letters, digits and . _ : - (at most 128), starting with a letter or digit",
                      details={"name": shown})
    model, sep, tag = name.partition(":")
    if sep and (not tag or ":" in tag or not re.match(r"^[A-Za-z0-9_]", tag)):
        raise BpError("INPUT_NAME_INVALID", f"{what} {name!r}: the tag after ':' must be one non-empty word "
                      "starting with a letter, digit or _", details={"name": name})
    if len(model) > _PART_MAX or len(tag) > _PART_MAX:
        raise BpError("INPUT_NAME_INVALID", f"{what} {name!r}: Ollama allows at most {_PART_MAX} characters "
                      "before and after ':'", details={"name": name})
    return name


def full_name(name: str) -> str:
    """`name:latest` when no tag is given, as Ollama stores and lists it."""
    return name if ":" in name else f"{name}:latest"


def same_model(a: str, b: str) -> bool:
    """Ollama matches names without regard to case, and `x` means `x:latest`."""
    return full_name(a).lower() == full_name(b).lower()
