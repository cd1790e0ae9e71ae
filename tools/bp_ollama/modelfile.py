"""Modelfiles: write them, read them exactly as Ollama does, and turn them into an /api/create request.

A Modelfile is a list of commands `(name, args)`: "model" (FROM), "adapter", "template", "system",
"license", "message" ("role: text"), or a parameter name ("stop", "num_ctx", ...), in the order
they appear. `parse_modelfile` is a port of Ollama's parser (parser/parser.go): no escape
sequences, values quoted with "..." or \"\"\"...\"\"\", and every character that is not printable
silently dropped, which is why `check_text` refuses control characters before anything is written.
`create_request` does what `ollama create -f` does on the client side (parser.CreateRequest): a
FROM or ADAPTER that names an existing file becomes a blob to upload, anything else a model name.
"""
from __future__ import annotations

from pathlib import Path

from bp_common.errors import BpError

COMMANDS = ("from", "license", "template", "system", "adapter", "draft", "renderer", "parser", "parameter",
            "message", "requires")
MESSAGE_ROLES = ("system", "user", "assistant")
MULTILINE = ("template", "system", "license", "message")

# Ollama's Options and Runner fields (api/types.go): the parameters a Modelfile may set, by type.
PARAMETER_TYPES = {
    "num_ctx": int, "num_batch": int, "num_gpu": int, "main_gpu": int, "use_mmap": bool, "num_thread": int,
    "draft_num_predict": int, "num_keep": int, "seed": int, "num_predict": int, "top_k": int, "top_p": float,
    "min_p": float, "typical_p": float, "repeat_last_n": int, "temperature": float, "repeat_penalty": float,
    "presence_penalty": float, "frequency_penalty": float, "stop": list,
}
DEPRECATED_PARAMETERS = ("penalize_newline", "low_vram", "f16_kv", "logits_all", "vocab_only", "use_mlock",
                         "mirostat", "mirostat_tau", "mirostat_eta")

Command = tuple[str, str]


# -- validation ---------------------------------------------------------------------------------

def check_text(value: str, what: str, multiline: bool = False) -> str:
    """Refuse characters Ollama's Modelfile parser would drop or misread; returns value.

    Multi-line values (TEMPLATE, SYSTEM, LICENSE, MESSAGE) may hold newlines and tabs; nothing
    may hold other control characters (a carriage return included) or unprintable ones.
    """
    if not isinstance(value, str):
        raise BpError("INPUT_INVALID", f"{what} must be text")
    for i, ch in enumerate(value):
        if ch.isprintable() or (ch == " "):
            continue
        if multiline and ch in "\n\t":
            continue
        raise BpError("INPUT_INVALID", f"{what} contains the control character {ch!r} at position {i}; "
                      "Ollama's Modelfile parser would drop it silently",
                      hint="remove control characters" + ("" if multiline else " and line breaks"),
                      details={"what": what, "position": i, "character": hex(ord(ch))})
    return value


# -- writing ------------------------------------------------------------------------------------

def quote(value: str, force: bool = False) -> str:
    """A value as the parser reads it back: bare when safe, else "..." or \"\"\"...\"\"\"."""
    if not force and value and value.strip() == value and "\n" not in value and '"' not in value \
            and "\t" not in value:
        return value
    if "\n" in value or '"' in value:
        return '"""' + value + '"""'
    return '"' + value + '"'


def format_command(cmd: Command) -> str:
    name, args = cmd
    if name == "model":
        return f"FROM {quote(args)}"
    if name in ("template", "system", "license"):
        return f"{name.upper()} {quote(args, force=True)}"
    if name in ("adapter", "draft", "renderer", "parser", "requires"):
        return f"{name.upper()} {quote(args)}"
    if name == "message":
        role, _, text = args.partition(": ")
        return f"MESSAGE {role} {quote(text, force=True)}"
    return f"PARAMETER {name} {quote(args, force=name == 'stop')}"


def format_modelfile(commands: list[Command], header: str | None = None) -> str:
    """Modelfile text for commands; raises INPUT_INVALID when a value cannot be written faithfully."""
    for name, args in commands:
        check_text(args, name.upper() if name != "model" else "FROM",
                   multiline=name in MULTILINE)
    lines = [f"# {line}".rstrip() for line in (header or "").splitlines()]
    text = "\n".join(lines + [format_command(c) for c in commands]) + "\n"
    back = parse_modelfile(text, require_from=False)
    if back != list(commands):
        bad = next((c for c, b in zip(commands, back + [None] * len(commands)) if c != b), commands[-1])
        raise BpError("INPUT_INVALID", f"{bad[0].upper()} cannot be written in a Modelfile so that Ollama "
                      "reads it back unchanged (a value holding \"\"\" cannot be quoted)",
                      details={"command": bad[0]})
    return text


# -- reading: a port of Ollama's parser ---------------------------------------------------------

_NIL, _NAME, _VALUE, _PARAMETER, _MESSAGE, _COMMENT = range(6)


class ModelfileError(ValueError):
    def __init__(self, message: str, line: int = 0):
        super().__init__(f"(line {line}): {message}" if line > 0 else message)
        self.line = line


def _is_space(r: str) -> bool:
    return r in " \t"


def _is_newline(r: str) -> bool:
    return r in "\r\n"


def _is_alpha(r: str) -> bool:
    return ("a" <= r <= "z") or ("A" <= r <= "Z")


def _is_printable(r: str) -> bool:
    return r == " " or r.isprintable()


def _unquote(s: str) -> tuple[str, bool]:
    if s[:3] == '"""':
        if len(s) >= 6 and s[-3:] == '"""':
            return s[3:-3], True
        return "", False
    if s[:1] == '"':
        if len(s) >= 2 and s[-1] == '"':
            return s[1:-1], True
        return "", False
    return s, True


def _next_state(r: str, cs: int) -> tuple[int, str]:
    if cs == _NIL:
        if r == "#":
            return _COMMENT, ""
        if _is_space(r) or _is_newline(r):
            return _NIL, ""
        return _NAME, r
    if cs == _NAME:
        if _is_alpha(r):
            return _NAME, r
        if _is_space(r):
            return _VALUE, ""
        raise ModelfileError("command must be one of \"from\", \"license\", \"template\", \"system\", \"adapter\", "
                             "\"draft\", \"renderer\", \"parser\", \"parameter\", \"message\", or \"requires\"")
    if cs == _VALUE:
        if _is_newline(r) or _is_space(r):
            return _NIL, r
        return _VALUE, r
    if cs == _PARAMETER:
        if _is_alpha(r) or r.isdigit() and r.isascii() or r == "_":
            return _PARAMETER, r
        if _is_space(r):
            return _VALUE, ""
        raise ModelfileError("unexpected EOF")
    if cs == _MESSAGE:
        if _is_alpha(r):
            return _MESSAGE, r
        if _is_space(r):
            return _VALUE, ""
        raise ModelfileError("unexpected EOF")
    if cs == _COMMENT:
        return (_NIL, "") if _is_newline(r) else (_COMMENT, "")
    raise ModelfileError("")


def parse_modelfile(text: str, require_from: bool = True) -> list[Command]:
    """Commands of a Modelfile, read as Ollama reads them. Raises ModelfileError (with the line)."""
    if text.startswith("\ufeff"):
        text = text[1:]
    commands: list[Command] = []
    name, buf, role, curr, line = "", [], "", _NIL, 1
    for r in text:
        if _is_newline(r):
            line += 1
        try:
            nxt, r = _next_state(r, curr)
        except ModelfileError as exc:
            raise ModelfileError(str(exc), line) from None
        if nxt != curr:
            if curr == _NAME:
                word = "".join(buf)
                if word.lower() not in COMMANDS:
                    raise ModelfileError(
                        "command must be one of \"from\", \"license\", \"template\", \"system\", \"adapter\", "
                        "\"draft\", \"renderer\", \"parser\", \"parameter\", \"message\", or \"requires\"", line)
                low = word.lower()
                if low == "from":
                    name = "model"
                elif low == "parameter":
                    nxt = _PARAMETER
                elif low == "message":
                    nxt = _MESSAGE
                    name = low
                else:
                    name = low
            elif curr == _PARAMETER:
                name = "".join(buf)
            elif curr == _MESSAGE:
                word = "".join(buf)
                if word not in MESSAGE_ROLES:
                    raise ModelfileError('message role must be one of "system", "user", or "assistant"', line)
                role = word
            elif curr == _VALUE:
                value, ok = _unquote("".join(buf).strip(" \t\r\n"))
                if not ok or _is_space(r):
                    buf.append(r)
                    continue
                if role:
                    value, role = f"{role}: {value}", ""
                commands.append((name, value))
            buf = []
            curr = nxt
        if r and _is_printable(r):
            buf.append(r)
    if curr == _VALUE:
        value, ok = _unquote("".join(buf).strip(" \t\r\n"))
        if not ok:
            raise ModelfileError(f"unexpected EOF: {''.join(buf)}")
        if role:
            value = f"{role}: {value}"
        commands.append((name, value))
    elif curr not in (_NIL, _COMMENT):
        raise ModelfileError("unexpected EOF")
    if require_from and not any(n == "model" for n, _ in commands):
        raise ModelfileError("no FROM line")
    return commands


def read_modelfile(path: Path | str) -> list[Command]:
    """Read and parse a user's Modelfile; INPUT_NOT_FOUND / INPUT_INVALID with the line on failure."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise BpError("INPUT_NOT_FOUND", f"Modelfile {path} does not exist") from None
    except UnicodeDecodeError:
        raise BpError("INPUT_INVALID", f"Modelfile {path} is not UTF-8 text") from None
    text = text.replace("\r\n", "\n")  # a Modelfile saved on Windows: no carriage returns in values
    for i, ch in enumerate(text):
        if not (ch.isprintable() or ch in " \n\t\ufeff"):
            lineno = text.count("\n", 0, i) + 1
            raise BpError("INPUT_INVALID", f"Modelfile {path}, line {lineno}: control character {ch!r}; "
                          "Ollama would drop it silently", hint="remove control characters")
    try:
        return parse_modelfile(text)
    except ModelfileError as exc:
        raise BpError("INPUT_INVALID", f"Modelfile {path}: {exc}") from None


# -- to an /api/create request -------------------------------------------------------------------

def parameter_value(name: str, raw: str):
    """A parameter's typed value, as Ollama's api.FormatParams converts it."""
    kind = PARAMETER_TYPES.get(name)
    if kind is None:
        raise BpError("INPUT_INVALID", f"unknown parameter '{name}'",
                      hint="see Ollama's Modelfile reference for valid parameters")
    try:
        if kind is int:
            return int(raw, 10)
        if kind is float:
            return float(raw)
        if kind is bool:
            low = raw.strip()
            if low in ("1", "t", "T", "TRUE", "true", "True"):
                return True
            if low in ("0", "f", "F", "FALSE", "false", "False"):
                return False
            raise ValueError(raw)
    except ValueError:
        raise BpError("INPUT_INVALID", f"invalid {kind.__name__} value for parameter {name}: {raw!r}") from None
    return raw


def get(commands: list[Command], name: str) -> str | None:
    """The last value of a command (Ollama keeps the last TEMPLATE/SYSTEM)."""
    values = [a for n, a in commands if n == name]
    return values[-1] if values else None


def local_path(value: str, base_dir: Path | None) -> Path | None:
    """A FROM/ADAPTER value as a path: absolute, ~, or relative to the Modelfile's directory.

    With base_dir None, only absolute paths count as files (a bare word is a model name)."""
    p = Path(value).expanduser()
    if p.is_absolute():
        return p
    return base_dir / p if base_dir is not None else None


def create_request(commands: list[Command], base_dir: Path | None) -> tuple[dict, dict[str, Path], dict[str, Path]]:
    """The /api/create body for commands, plus the local files to upload as blobs.

    base_dir: where relative FROM/ADAPTER paths are taken from (the Modelfile's directory); None
    when every local path is already absolute. Returns (request, files, adapters); files and
    adapters map the request's file names to local paths, whose digests the caller fills in
    after uploading.
    """
    req: dict = {}
    files: dict[str, Path] = {}
    adapters: dict[str, Path] = {}
    params: dict = {}
    licenses: list[str] = []
    messages: list[dict] = []
    for name, args in commands:
        if name == "model":
            path = local_path(args, base_dir)
            if path is not None and path.exists():
                files.update(_files_for(path, "FROM"))
            else:
                req["from"] = args
        elif name == "adapter":
            path = local_path(args, base_dir)
            if path is None or not path.exists():
                raise BpError("INPUT_NOT_FOUND", f"ADAPTER {args} does not exist")
            adapters = _files_for(path, "ADAPTER")
        elif name in ("template", "system", "renderer", "parser", "requires"):
            req[name] = args
        elif name == "license":
            licenses.append(args)
        elif name == "message":
            role, _, text = args.partition(": ")
            messages.append({"role": role, "content": text})
        elif name == "draft":
            raise BpError("INPUT_INVALID", "DRAFT models are not supported by bp-ollama")
        elif name in DEPRECATED_PARAMETERS:
            continue
        else:
            value = parameter_value(name, args)
            if name == "stop":
                params.setdefault("stop", []).append(value)
            else:
                params[name] = value
    if params:
        req["parameters"] = params
    if messages:
        req["messages"] = messages
    if licenses:
        req["license"] = licenses
    return req, files, adapters


def _files_for(path: Path, what: str) -> dict[str, Path]:
    """GGUF files of a FROM/ADAPTER path: the file itself, or the *.gguf files of a directory."""
    if path.is_dir():
        found = sorted(path.glob("*.gguf"))
        if not found:
            raise BpError("INPUT_INVALID", f"{what} {path} is a directory without *.gguf files",
                          hint="bp-ollama registers GGUF files; convert with bp-gguf first")
        return {f.name: f.resolve() for f in found}
    return {path.name: path.resolve()}
