"""Dataset rows in, one normalised shape out: file readers, per-row format detection, normalisation.

Readers turn a source (a .jsonl/.json/.csv/.parquet/.txt/.md file, JSONL on stdin, a local
Hugging Face dataset directory or a hub dataset id) into `(location, object)` records. Each
record is then recognised (`detect_row`) and normalised (`normalise_row`) into one of four
kinds, each in TRL's conversational shape:

    sft         {"messages": [...], "tools"?: [...]}
    preference  {"prompt": [...], "chosen": [...], "rejected": [...], "messages": prompt + chosen}
    kto         {"prompt": [...], "completion": [...], "label": bool}
    text        {"text": "..."}

A record that cannot be read or normalised raises `RowError(kind, message)`; the caller
decides whether that is fatal (the default) or a dropped row (--skip-invalid).
No torch or transformers here: only the `datasets` reader imports a heavy package, lazily.
"""
from __future__ import annotations

import codecs
import csv
import hashlib
import io
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import orjson

from .errors import BpError

FORMATS = ("openai", "sharegpt", "alpaca", "chatml", "prompt_completion", "text", "preference", "kto")
KINDS = ("sft", "preference", "kto", "text")
# Which training views a row of each kind supports (a raw-text row trains as plain language modelling).
KIND_VIEWS = {"sft": ("sft",), "preference": ("sft", "preference"), "kto": ("kto",), "text": ("sft",)}
FILE_TYPES = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".csv": "csv", ".parquet": "parquet",
              ".txt": "text", ".md": "text"}

# Role names seen in the wild, mapped to the four roles chat templates know.
ROLES = {
    "system": "system", "developer": "system",
    "user": "user", "human": "user",
    "assistant": "assistant", "gpt": "assistant", "model": "assistant",
    "tool": "tool", "function": "tool", "observation": "tool", "ipython": "tool",
}
CANONICAL_ROLES = frozenset(("system", "user", "assistant", "tool"))
# Message keys kept besides role and content (tool calls and reasoning survive normalisation).
MESSAGE_KEYS = ("name", "tool_calls", "tool_call_id", "reasoning_content")
# CSV cells that may hold JSON (message lists) and are decoded when they look like it.
JSON_COLUMNS = ("messages", "conversations", "chosen", "rejected", "prompt", "completion", "tools", "history")
KNOWN_FIELDS = frozenset(JSON_COLUMNS + ("instruction", "input", "output", "system", "label", "text"))
CHATML_START, CHATML_END = "<|im_start|>", "<|im_end|>"


class RowError(Exception):
    """One record that cannot be used: `kind` is a short machine name, the message says why."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind
        self.message = message


# -- sources ---------------------------------------------------------------------------------

@dataclass
class Source:
    """One input as given on the command line, opened and hashed but not yet parsed."""
    name: str                      # as given: a path, "-", or a hub dataset id
    type: str                      # jsonl, json, csv, parquet, text, stdin, hf
    sha256: str                    # content digest (files), or the datasets fingerprint (hf)
    path: str | None = None        # absolute path for local files and directories
    size: int | None = None
    loc_name: str = "line"         # what a location number counts: "line" or "row"
    data: bytes | None = field(default=None, repr=False)
    dataset: object = field(default=None, repr=False)

    def describe(self) -> dict:
        out = {"path": self.path or self.name, "type": self.type, "sha256": self.sha256}
        if self.size is not None:
            out["size"] = self.size
        return out

    def records(self) -> Iterator[tuple[int, object]]:
        """(location, object) pairs; an unparseable record comes as (location, RowError)."""
        return READERS[self.type](self)


def open_source(spec: str, split: str = "train", stdin=None) -> Source:
    """Open one input: read and hash a file, read stdin, or load a datasets dataset.

    spec: a file path, "-" (JSONL on stdin), a local dataset directory, or a hub dataset id.
    Raises BpError with INPUT_NOT_FOUND, DATASET_EMPTY, DATASET_ENCODING, HUB_* codes.
    """
    if spec == "-":
        stream = stdin if stdin is not None else sys.stdin.buffer
        data = stream.read()
        if isinstance(data, str):
            data = data.encode("utf-8")
        src = Source("-", "stdin", hashlib.sha256(data).hexdigest(), path=None, size=len(data), data=data)
        _check_not_empty(src)
        return src
    p = Path(spec).expanduser()
    if p.is_dir():
        return _open_dataset_dir(spec, p, split)
    if p.exists():
        ftype = FILE_TYPES.get(p.suffix.lower())
        if ftype is None:
            raise BpError("INPUT_INVALID", f"{spec}: unsupported file type {p.suffix or '(no extension)'!r}",
                          hint="use .jsonl, .json, .csv, .parquet, .txt or .md, or a dataset directory")
        try:
            data = p.read_bytes()
        except OSError as exc:
            from .errors import from_os_error
            raise from_os_error(exc, f"reading {spec}") from exc
        src = Source(spec, ftype, hashlib.sha256(data).hexdigest(), path=str(p.resolve()), size=len(data),
                     loc_name="line" if ftype in ("jsonl", "csv") else "row", data=data)
        _check_not_empty(src)
        return src
    from .models import HF_ID
    if HF_ID.match(spec):
        return _open_hub_dataset(spec, split)
    raise BpError("INPUT_NOT_FOUND", f"{spec} does not exist",
                  hint="check the path; hub datasets are named owner/name")


def _check_not_empty(src: Source) -> None:
    # isspace() stops at the first other byte; strip() would copy the whole file to find out.
    if src.type != "parquet" and (not src.data or src.data.isspace()):
        raise BpError("DATASET_EMPTY", f"{src.name} is empty", hint="check the file; an upstream step may have failed")


def decode_text(data: bytes, name: str) -> str:
    """UTF-8 text of a file, or DATASET_ENCODING naming what it looks like instead (binary, UTF-16, Latin-1)."""
    _refuse_utf16_or_binary(data, name)
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        byte = data[exc.start]
        raise BpError("DATASET_ENCODING", f"{name} is not UTF-8: byte 0x{byte:02x} at line {line} "
                      "(Latin-1 or Windows-1252?)", hint=f"re-encode it: iconv -f LATIN1 -t UTF-8 {name} > out",
                      details={"file": name, "line": line}) from None


def check_text(data: bytes, name: str) -> None:
    """decode_text's checks, for readers that parse the bytes themselves.

    ASCII is valid UTF-8 and isascii() is a quick scan, so plain-ASCII files skip building
    the whole file's text only to drop it; only the binary and UTF-16 checks apply to them.
    """
    if data.isascii():
        _refuse_utf16_or_binary(data, name)
    else:
        decode_text(data, name)


def _refuse_utf16_or_binary(data: bytes, name: str) -> None:
    if data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE, codecs.BOM_UTF32_LE, codecs.BOM_UTF32_BE)) \
            or _looks_utf16(data):
        raise BpError("DATASET_ENCODING", f"{name} is UTF-16 text, not UTF-8",
                      hint=f"re-encode it: iconv -f UTF-16 -t UTF-8 {name} > out", details={"file": name})
    if b"\x00" in data[:65536]:
        raise BpError("DATASET_ENCODING", f"{name} is a binary file, not text",
                      hint="pass a .jsonl/.json/.csv/.txt file, or .parquet by its extension",
                      details={"file": name})


def _looks_utf16(data: bytes) -> bool:
    head = data[:512]
    if len(head) < 4:
        return False
    zeros_odd = head[1::2].count(0)
    zeros_even = head[0::2].count(0)
    half = len(head) // 2
    return zeros_odd > 0.4 * half and zeros_even < 0.05 * half or zeros_even > 0.4 * half and zeros_odd < 0.05 * half


def _read_jsonl(src: Source) -> Iterator[tuple[int, object]]:
    check_text(src.data, src.name)  # one UTF-8 check for the whole file, with a line number on failure
    data = src.data[3:] if src.data.startswith(codecs.BOM_UTF8) else src.data
    loads = orjson.loads
    for n, line in enumerate(data.split(b"\n"), 1):
        if not line or line.isspace():
            continue
        try:
            yield n, loads(line)
        except orjson.JSONDecodeError as exc:
            yield n, RowError("invalid_json", f"not valid JSON: {str(exc).split(':')[0]}")


def _read_json(src: Source) -> Iterator[tuple[int, object]]:
    text = decode_text(src.data, src.name)
    try:
        obj = orjson.loads(text)
    except orjson.JSONDecodeError as exc:
        raise BpError("DATASET_PARSE_FAILED", f"{src.name} is not valid JSON: {exc}",
                      hint="fix the file (a .json file is one document; use .jsonl for one row per line)",
                      details={"file": src.name}) from None
    rows = json_rows(obj, src.name)
    if not rows:
        raise BpError("DATASET_EMPTY", f"{src.name} holds no rows")
    yield from enumerate(rows, 1)


def json_rows(obj, name: str) -> list:
    """The rows of a .json document: an array, one row object, columns of equal length, or named arrays."""
    if isinstance(obj, list):
        return obj
    if not isinstance(obj, dict):
        raise BpError("DATASET_FORMAT_UNKNOWN", f"{name} holds a JSON {type(obj).__name__}, not rows",
                      hint="a .json dataset is an array of rows, or an object of arrays")
    lists = {k: v for k, v in obj.items() if isinstance(v, list)}
    if lists and len(lists) == len(obj):
        lengths = {len(v) for v in lists.values()}
        # Columns: {"instruction": [...], "output": [...]} (pandas orient="list").
        if len(lengths) == 1 and set(obj) <= KNOWN_FIELDS and all(
                not v or not isinstance(v[0], dict) or k not in ("messages", "conversations") for k, v in obj.items()):
            keys = list(obj)
            return [dict(zip(keys, vals)) for vals in zip(*obj.values())]
    if detect_row(obj) is not None:
        return [obj]
    if lists and len(lists) == len(obj):
        # Named arrays ({"train": [...], "test": [...]}): every array's rows, in order.
        return [row for v in lists.values() for row in v]
    raise BpError("DATASET_FORMAT_UNKNOWN", f"{name}: a JSON object with keys {', '.join(sorted(obj)[:8])} "
                  "is neither a row nor an object of arrays", hint="see docs/datasets.md for the accepted shapes")


def _read_csv(src: Source) -> Iterator[tuple[int, object]]:
    text = decode_text(src.data, src.name)
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = next(reader)
    except StopIteration:
        raise BpError("DATASET_EMPTY", f"{src.name} is empty") from None
    except csv.Error as exc:
        raise BpError("DATASET_PARSE_FAILED", f"{src.name}: bad CSV header: {exc}") from None
    header = [h.strip() for h in header]
    if not any(header):
        raise BpError("DATASET_FORMAT_UNKNOWN", f"{src.name} has no CSV header row",
                      hint="the first line must name the columns (e.g. instruction,input,output)")
    n_rows = 0
    while True:
        line = reader.line_num + 1
        try:
            cells = next(reader)
        except StopIteration:
            break
        except csv.Error as exc:
            yield line, RowError("invalid_csv", f"bad CSV: {exc}")
            continue
        if not cells or all(not c.strip() for c in cells):
            continue
        n_rows += 1
        if len(cells) > len(header):
            yield line, RowError("invalid_csv", f"{len(cells)} cells but the header names {len(header)} columns")
            continue
        yield line, {k: _csv_cell(k, v) for k, v in zip(header, cells) if k}
    if n_rows == 0:
        raise BpError("DATASET_EMPTY", f"{src.name} has a header but no rows")


def _csv_cell(column: str, value: str):
    """CSV has no types: decode JSON message lists, and true/false/1/0 labels."""
    if column == "label":
        low = value.strip().lower()
        if low in ("true", "1"):
            return True
        if low in ("false", "0"):
            return False
        return value
    if column in JSON_COLUMNS and value[:1] in ("[", "{"):
        try:
            return orjson.loads(value)
        except orjson.JSONDecodeError:
            return value
    return value


def _read_parquet(src: Source) -> Iterator[tuple[int, object]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise BpError("DATASET_ENGINE_MISSING", "reading .parquet needs pyarrow") from None
    try:
        table = pq.read_table(io.BytesIO(src.data))
    except Exception as exc:  # pyarrow raises ArrowInvalid, OSError, ...
        raise BpError("DATASET_PARSE_FAILED", f"{src.name} is not a readable parquet file: "
                      f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
    if table.num_rows == 0:
        raise BpError("DATASET_EMPTY", f"{src.name} has no rows")
    yield from enumerate(table.to_pylist(), 1)


def _read_text(src: Source) -> Iterator[tuple[int, object]]:
    text = decode_text(src.data, src.name)
    if not text.strip():
        raise BpError("DATASET_EMPTY", f"{src.name} is empty")
    yield 1, text


def _read_dataset(src: Source) -> Iterator[tuple[int, object]]:
    yield from enumerate(iter(src.dataset), 1)


READERS: dict[str, Callable[[Source], Iterator[tuple[int, object]]]] = {
    "jsonl": _read_jsonl, "stdin": _read_jsonl, "json": _read_json, "csv": _read_csv,
    "parquet": _read_parquet, "text": _read_text, "hf": _read_dataset,
}


def _pick_split(ds, split: str, name: str):
    from datasets import DatasetDict
    if isinstance(ds, DatasetDict):
        if split not in ds:
            raise BpError("INPUT_INVALID", f"{name} has no split {split!r} (it has: {', '.join(ds)})",
                          hint="pass --split NAME")
        ds = ds[split]
    if len(ds) == 0:
        raise BpError("DATASET_EMPTY", f"{name} (split {split}) has no rows")
    return ds


def _open_dataset_dir(spec: str, p: Path, split: str) -> Source:
    """A directory written by Dataset.save_to_disk, or one holding data files datasets can load."""
    try:
        import datasets
    except ImportError:
        raise BpError("DATASET_ENGINE_MISSING", "reading a dataset directory needs the datasets package",
                      hint="pip install datasets") from None
    datasets.disable_progress_bars()
    saved = (p / "dataset_info.json").is_file() or (p / "dataset_dict.json").is_file() or (p / "state.json").is_file()
    try:
        ds = datasets.load_from_disk(str(p)) if saved else datasets.load_dataset(str(p))
    except FileNotFoundError as exc:
        raise BpError("INPUT_NOT_FOUND", f"{spec}: no dataset files found ({str(exc).splitlines()[0]})") from None
    except Exception as exc:  # datasets raises many types for unreadable directories
        raise BpError("DATASET_PARSE_FAILED", f"{spec}: cannot load the dataset directory: "
                      f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
    ds = _pick_split(ds, split, spec)
    h = hashlib.sha256()
    for f in sorted(x for x in p.rglob("*") if x.is_file() and not x.name.startswith(".")):
        h.update(str(f.relative_to(p)).encode() + b"\0")
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return Source(spec, "hf", h.hexdigest(), path=str(p.resolve()), loc_name="row", dataset=ds)


def _open_hub_dataset(spec: str, split: str) -> Source:
    """A dataset on the Hugging Face hub (HF_DATASETS_OFFLINE / HF_HUB_OFFLINE honoured by datasets)."""
    try:
        import datasets
    except ImportError:
        raise BpError("DATASET_ENGINE_MISSING", "reading a hub dataset needs the datasets package",
                      hint="pip install datasets") from None
    datasets.disable_progress_bars()
    try:
        ds = datasets.load_dataset(spec, split=split)
    except (FileNotFoundError, ValueError) as exc:
        text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        if "split" in text.lower() and "train" not in text.lower():
            raise BpError("INPUT_INVALID", f"{spec}: {text}", hint="pass --split NAME") from None
        raise BpError("HUB_NOT_FOUND", f"dataset {spec} is not on the hub or not in the local cache: {text}") from None
    except ConnectionError as exc:
        from .envvars import get as env
        if "Offline" in str(exc) or env("HF_DATASETS_OFFLINE") or env("HF_HUB_OFFLINE"):
            raise BpError("HUB_NOT_FOUND", f"dataset {spec} is not in the local cache, and offline mode is on "
                          "(HF_DATASETS_OFFLINE / HF_HUB_OFFLINE)") from None
        raise BpError("HUB_UNREACHABLE", f"dataset {spec}: {str(exc).splitlines()[0]}") from None
    except Exception as exc:
        name = type(exc).__name__
        if "NotFound" in name or "Offline" in name or "LocalEntry" in name:
            raise BpError("HUB_NOT_FOUND", f"dataset {spec} is not in the local cache and the hub is not "
                          "reachable (offline mode or no network)") from None
        if "Gated" in name or "Unauthorized" in name:
            raise BpError("HUB_AUTH", f"dataset {spec}: access refused") from None
        raise BpError("HUB_UNREACHABLE", f"dataset {spec}: {name}: {str(exc).splitlines()[0] if str(exc) else ''}") \
            from None
    ds = _pick_split(ds, split, spec)
    fp = getattr(ds, "_fingerprint", None) or hashlib.sha256(spec.encode()).hexdigest()
    return Source(spec, "hf", str(fp), path=None, loc_name="row", dataset=ds)


# -- detection -------------------------------------------------------------------------------

def detect_row(obj) -> str | None:
    """The format of one record by its signature keys, or None when nothing is recognised."""
    if isinstance(obj, str):
        return "chatml" if CHATML_START in obj and CHATML_END in obj else "text"
    if not isinstance(obj, dict):
        return None
    # Preference and KTO first: their rows may also carry "messages" (bp-prep's own output does).
    if "chosen" in obj or "rejected" in obj:
        return "preference"
    if "label" in obj and ("completion" in obj or "prompt" in obj):
        return "kto"
    if "messages" in obj:
        return "openai"
    if "conversations" in obj:
        return "sharegpt"
    if "instruction" in obj or ("output" in obj and "input" in obj):
        return "alpaca"
    if "prompt" in obj and "completion" in obj:
        return "prompt_completion"
    if "text" in obj:
        t = obj["text"]
        return "chatml" if isinstance(t, str) and CHATML_START in t and CHATML_END in t else "text"
    return None


def majority_format(counts: dict[str, int]) -> str | None:
    """The most common detected format (ties broken by FORMATS order), or None."""
    best = None
    for fmt in FORMATS:
        if counts.get(fmt, 0) > 0 and (best is None or counts[fmt] > counts[best]):
            best = fmt
    return best


# -- normalisation ---------------------------------------------------------------------------

def normalise_row(obj, fmt: str, warnings: list[str]) -> tuple[str, dict]:
    """(kind, data) for one record read as `fmt`; appends warning names to `warnings`.

    Raises RowError when the record does not fit the format.
    """
    if type(obj) is not dict:
        if not isinstance(obj, (dict, str)):
            raise RowError("invalid_type", f"a row must be a JSON object or string, got {_tname(obj)}")
        if fmt in ("preference", "kto"):
            raise RowError("invalid_type", f"a {fmt} row must be a JSON object, got {_tname(obj)}")
    return _NORMALISERS[fmt](obj, warnings)


def _tname(v) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean", int: "number", float: "number",
            type(None): "null"}.get(type(v), type(v).__name__)


def _openai(obj, warnings):
    if isinstance(obj, str):
        raise RowError("missing_field", "missing field 'messages'")
    msgs = messages_of(obj.get("messages", _MISSING), "messages", warnings)
    data = {"messages": msgs}
    tools = obj.get("tools")
    if tools:
        if not isinstance(tools, list):
            raise RowError("invalid_type", f"'tools' must be an array, got {_tname(tools)}")
        data["tools"] = tools
    return "sft", data


def _sharegpt(obj, warnings):
    if isinstance(obj, str):
        raise RowError("missing_field", "missing field 'conversations'")
    msgs = messages_of(obj.get("conversations", _MISSING), "conversations", warnings)
    system = obj.get("system")
    if isinstance(system, str) and system.strip() and not (msgs and msgs[0]["role"] == "system"):
        msgs.insert(0, {"role": "system", "content": system})
    data = {"messages": msgs}
    tools = obj.get("tools")
    if tools:
        if isinstance(tools, str):
            try:
                tools = orjson.loads(tools)
            except orjson.JSONDecodeError:
                raise RowError("invalid_value", "'tools' is a string that is not JSON") from None
        if not isinstance(tools, list):
            raise RowError("invalid_type", f"'tools' must be an array, got {_tname(tools)}")
        data["tools"] = tools
    return "sft", data


def _alpaca(obj, warnings):
    if isinstance(obj, str):
        raise RowError("missing_field", "missing fields 'instruction' and 'output'")
    instruction = _required_str(obj, "instruction")
    output = _required_str(obj, "output")
    extra = obj.get("input")
    if extra is not None and not isinstance(extra, str):
        raise RowError("invalid_type", f"'input' must be a string, got {_tname(extra)}")
    msgs = []
    system = obj.get("system")
    if system is not None:
        if not isinstance(system, str):
            raise RowError("invalid_type", f"'system' must be a string, got {_tname(system)}")
        if system.strip():
            msgs.append({"role": "system", "content": system})
    history = obj.get("history")
    if history:
        if not isinstance(history, list):
            raise RowError("invalid_type", "'history' must be an array of [question, answer] pairs")
        for pair in history:
            if not (isinstance(pair, list) and len(pair) == 2 and all(isinstance(x, str) for x in pair)):
                raise RowError("invalid_type", "'history' must be an array of [question, answer] string pairs")
            msgs += [{"role": "user", "content": pair[0]}, {"role": "assistant", "content": pair[1]}]
    user = instruction + ("\n\n" + extra if extra and extra.strip() else "")
    msgs += [{"role": "user", "content": user}, {"role": "assistant", "content": output}]
    return "sft", {"messages": msgs}


def _chatml(obj, warnings):
    text = obj if isinstance(obj, str) else obj.get("text")
    if not isinstance(text, str):
        raise RowError("missing_field", "a chatml row is a string, or an object with a 'text' string")
    return "sft", {"messages": parse_chatml(text, warnings)}


def parse_chatml(text: str, warnings: list[str]) -> list[dict]:
    """Messages of a ChatML string: <|im_start|>role\\ncontent<|im_end|> blocks."""
    msgs = []
    pos = 0
    while True:
        start = text.find(CHATML_START, pos)
        if start < 0:
            if text[pos:].strip():
                warnings.append("chatml_text_outside_turns")
            break
        if text[pos:start].strip():
            warnings.append("chatml_text_outside_turns")
        end = text.find(CHATML_END, start)
        if end < 0:
            raise RowError("invalid_chatml", f"{CHATML_START} at character {start} is never closed by {CHATML_END}")
        block = text[start + len(CHATML_START):end]
        role, sep, content = block.partition("\n")
        if not sep:
            role, content = block, ""
        mapped = ROLES.get(role.strip().lower())
        if mapped is None:
            raise RowError("unknown_role", f"unknown role {role.strip()!r} in a ChatML turn")
        msgs.append({"role": mapped, "content": content})
        pos = end + len(CHATML_END)
    if not msgs:
        raise RowError("invalid_chatml", "no ChatML turns found")
    return msgs


def _prompt_completion(obj, warnings):
    if isinstance(obj, str):
        raise RowError("missing_field", "missing fields 'prompt' and 'completion'")
    prompt = _turns(obj, "prompt", "user", warnings, required=True)
    completion = _turns(obj, "completion", "assistant", warnings, required=True)
    return "sft", {"messages": prompt + completion}


def _text(obj, warnings):
    text = obj if isinstance(obj, str) else obj.get("text", _MISSING)
    if text is _MISSING:
        raise RowError("missing_field", "missing field 'text'")
    if not isinstance(text, str):
        raise RowError("invalid_type", f"'text' must be a string, got {_tname(text)}")
    return "text", {"text": text}


def _preference(obj, warnings):
    missing = [k for k in ("chosen", "rejected") if k not in obj or obj[k] is None]
    if missing:
        raise RowError("missing_field", f"a preference row needs 'chosen' and 'rejected'; missing "
                       f"{' and '.join(repr(m) for m in missing)}")
    chosen = _turns(obj, "chosen", "assistant", warnings, required=True)
    rejected = _turns(obj, "rejected", "assistant", warnings, required=True)
    if "prompt" in obj and obj["prompt"] is not None:
        prompt = _turns(obj, "prompt", "user", warnings, required=False)
    else:
        # No prompt: conversations share their opening turns (Anthropic HH style); split them off.
        n = 0
        while n < min(len(chosen), len(rejected)) - 1 and chosen[n] == rejected[n]:
            n += 1
        prompt, chosen, rejected = chosen[:n], chosen[n:], rejected[n:]
        warnings.append("implicit_prompt" if prompt else "no_prompt")
    for name, turns in (("chosen", chosen), ("rejected", rejected)):
        if turns[-1]["role"] != "assistant":
            raise RowError("invalid_value", f"'{name}' must end with an assistant turn, "
                           f"ends with {turns[-1]['role']!r}")
    if chosen == rejected:
        warnings.append("chosen_equals_rejected")
    return "preference", {"prompt": prompt, "chosen": chosen, "rejected": rejected, "messages": prompt + chosen}


def _kto(obj, warnings):
    if "completion" not in obj or obj["completion"] is None:
        raise RowError("missing_field", "a KTO row needs 'completion' and 'label'; missing 'completion'")
    if "label" not in obj:
        raise RowError("missing_field", "a KTO row needs 'completion' and 'label'; missing 'label'")
    prompt = _turns(obj, "prompt", "user", warnings, required=False) if obj.get("prompt") is not None else []
    completion = _turns(obj, "completion", "assistant", warnings, required=True)
    return "kto", {"prompt": prompt, "completion": completion, "label": kto_label(obj["label"])}


def kto_label(value) -> bool:
    """A KTO label: true/false, or the integers 1/0. Floats (1.0), strings ("yes") and 2 are refused."""
    if value is True or value is False:
        return value
    if type(value) is int and value in (0, 1):
        return bool(value)
    raise RowError("invalid_label", f"KTO label must be true/false or 1/0, got {_tname(value)} {value!r}")


_NORMALISERS = {"openai": _openai, "sharegpt": _sharegpt, "alpaca": _alpaca, "chatml": _chatml,
                "prompt_completion": _prompt_completion, "text": _text, "preference": _preference, "kto": _kto}
_MISSING = object()


def _required_str(obj: dict, key: str) -> str:
    v = obj.get(key, _MISSING)
    if v is _MISSING or v is None:
        raise RowError("missing_field", f"missing field {key!r}")
    if not isinstance(v, str):
        raise RowError("invalid_type", f"{key!r} must be a string, got {_tname(v)}")
    return v


def _turns(obj: dict, key: str, default_role: str, warnings, required: bool) -> list[dict]:
    """A field that is either a string (one turn of default_role) or a message list."""
    v = obj.get(key, _MISSING)
    if v is _MISSING or v is None:
        if required:
            raise RowError("missing_field", f"missing field {key!r}")
        return []
    if isinstance(v, str):
        if not required and not v.strip():
            return []  # an optional prompt given as "" means no prompt
        return [{"role": default_role, "content": v}]
    if isinstance(v, dict):
        v = [v]
    msgs = messages_of(v, key, warnings)
    return msgs


def messages_of(items, field_name: str, warnings: list[str]) -> list[dict]:
    """Normalise a list of turns ({role|from, content|value, ...}) to [{"role", "content", ...}]."""
    if items is _MISSING:
        raise RowError("missing_field", f"missing field {field_name!r}")
    if not isinstance(items, list):
        raise RowError("invalid_type", f"{field_name!r} must be an array of turns, got {_tname(items)}")
    if not items:
        raise RowError("empty_messages", f"{field_name!r} is empty")
    # Fast path: turns already in the normalised shape are kept as they are (no copies).
    for item in items:
        if not (type(item) is dict and len(item) == 2 and type(item.get("content")) is str
                and type(item.get("role")) is str and item["role"] in CANONICAL_ROLES):
            break
    else:
        return items
    out = []
    for i, item in enumerate(items):
        if type(item) is dict and len(item) == 2:
            # Fast path: the common {"role": ..., "content": "..."} turn.
            role, content = item.get("role"), item.get("content")
            if type(role) is str and type(content) is str:  # a list or object role is _message's error
                mapped = ROLES.get(role)
                if mapped is not None:
                    out.append({"role": mapped, "content": content})
                    continue
            role, content = item.get("from"), item.get("value")
            if type(role) is str and type(content) is str:  # a list or object role is _message's error
                mapped = ROLES.get(role)
                if mapped is not None:
                    out.append({"role": mapped, "content": content})
                    continue
        out.append(_message(item, i, field_name, warnings))
    return out


def _message(item, i: int, field_name: str, warnings: list[str]) -> dict:
    where = f"{field_name}[{i}]"
    if not isinstance(item, dict):
        raise RowError("invalid_type", f"{where} must be an object, got {_tname(item)}")
    role = item.get("role", item.get("from"))
    if role is None:
        raise RowError("missing_field", f"{where} has no 'role' (or 'from')")
    if not isinstance(role, str):
        raise RowError("invalid_type", f"{where}: role must be a string, got {_tname(role)}")
    content = item.get("content", item.get("value"))
    key = role.strip().lower()
    if key in ("function_call", "tool_call"):
        # ShareGPT tool call: the value is {"name", "arguments"} as JSON text.
        call = content
        if isinstance(call, str):
            try:
                call = orjson.loads(call)
            except orjson.JSONDecodeError:
                raise RowError("invalid_value", f"{where}: a {key} turn must hold JSON with name and arguments") \
                    from None
        calls = call if isinstance(call, list) else [call]
        return {"role": "assistant", "content": "", "tool_calls": [_tool_call(c, where) for c in calls]}
    mapped = ROLES.get(key)
    if mapped is None:
        raise RowError("unknown_role", f"{where}: unknown role {role!r} (known: {', '.join(sorted(ROLES))}, "
                       "function_call)")
    msg = {"role": mapped, "content": _content(content, where, item)}
    for k in MESSAGE_KEYS:
        if k in item and item[k] is not None:
            msg[k] = item[k]
    if "tool_calls" in msg:
        calls = msg["tool_calls"]
        if not isinstance(calls, list):
            raise RowError("invalid_type", f"{where}: tool_calls must be an array")
        msg["tool_calls"] = [_tool_call(c, where) for c in calls]
    if item.get("function_call") is not None:  # OpenAI's legacy single call
        msg["tool_calls"] = msg.get("tool_calls", []) + [_tool_call(item["function_call"], where)]
    extra = set(item) - {"role", "from", "content", "value", "function_call", "weight", "loss", *MESSAGE_KEYS}
    if extra:
        warnings.append("dropped_message_keys")
    return msg


def _content(content, where: str, item: dict) -> str:
    if isinstance(content, str):
        return content
    if content is None:
        if item.get("tool_calls") or item.get("function_call"):
            return ""
        raise RowError("missing_field", f"{where} has no 'content' (or 'value')")
    if isinstance(content, list):
        # OpenAI content parts: text parts are joined; images and audio are not supported.
        texts = []
        for part in content:
            if isinstance(part, str):
                texts.append(part)
            elif isinstance(part, dict) and part.get("type", "text") == "text" and isinstance(part.get("text"), str):
                texts.append(part["text"])
            else:
                kind = part.get("type") if isinstance(part, dict) else _tname(part)
                raise RowError("unsupported_content", f"{where}: content part of type {kind!r} is not text")
        return "".join(texts)
    raise RowError("invalid_type", f"{where}: content must be a string, got {_tname(content)}")


def _tool_call(call, where: str) -> dict:
    if not isinstance(call, dict):
        raise RowError("invalid_type", f"{where}: a tool call must be an object")
    fn = call.get("function", call)
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
        raise RowError("invalid_value", f"{where}: a tool call needs a function name")
    args = fn.get("arguments", {})
    if isinstance(args, str):
        try:
            parsed = orjson.loads(args) if args.strip() else {}
            args = parsed if isinstance(parsed, dict) else args
        except orjson.JSONDecodeError:
            pass
    out = {"type": "function", "function": {"name": fn["name"], "arguments": args}}
    if isinstance(call.get("id"), str):
        out["id"] = call["id"]
    return out


# -- what a row says about itself --------------------------------------------------------------

def conversations_of(kind: str, data: dict) -> list[list[dict]]:
    """The conversations a row trains on (preference rows: prompt+chosen and prompt+rejected)."""
    if kind == "sft":
        return [data["messages"]]
    if kind == "preference":
        return [data["messages"], data["prompt"] + data["rejected"]]
    if kind == "kto":
        return [data["prompt"] + data["completion"]]
    return []


def row_text(kind: str, data: dict) -> str:
    """All the words of a row, roles left out: for near-duplicate and contamination checks."""
    if kind == "text":
        return data["text"]
    if kind == "preference":
        parts = data["prompt"] + data["chosen"] + data["rejected"]
    elif kind == "kto":
        parts = data["prompt"] + data["completion"]
    else:
        parts = data["messages"]
    return "\n".join(m["content"] for m in parts)


# Key text of a plain turn starts with its role and this separator (neither is whitespace).
_ROLE_KEYS = {role: role + "\x01" for role in CANONICAL_ROLES}
# One blake2b state per kind, copied per row: cheaper than passing digest_size and person each time.
_KEY_HASHES = {kind: hashlib.blake2b(digest_size=16, person=kind.encode()) for kind in KINDS}


def exact_key(kind: str, data: dict) -> bytes:
    """A stable 16-byte digest of a normalised row, whitespace runs collapsed (never Python's hash()).

    Rows that differ only in whitespace (runs of spaces, tabs, newlines; leading or trailing
    space in a turn) are duplicates; roles, words, case, tool calls and labels still count.
    """
    key = None
    if kind == "text":
        key = _collapse_ws(data["text"])
    elif kind == "sft" and len(data) == 1:
        key = _plain_turns_key(data["messages"])
    if key is None:
        # Anything else (tool calls, tools, preference, KTO): canonical JSON, whitespace collapsed inside strings.
        raw = orjson.dumps(data).decode()
        raw = raw.replace("\\n", " ").replace("\\t", " ").replace("\\r", " ")
        key = " ".join(raw.split()).replace('":" ', '":"').replace(' ",', '",').replace(' "}', '"}').replace(' "]', '"]')
    h = _KEY_HASHES.get(kind)
    h = h.copy() if h is not None else hashlib.blake2b(digest_size=16, person=kind.encode())
    h.update(key.encode("utf-8", "surrogatepass"))
    return h.digest()


def _collapse_ws(text: str) -> str:
    """" ".join(text.split()), without splitting and joining text that has nothing to collapse.

    str.isprintable() is False for every character str.split() treats as whitespace except " "
    (they are all in Unicode categories Cc, Zs, Zl or Zp), so printable text needs collapsing
    only when it has a double, leading or trailing space. Most turns have none of these.
    """
    if text.isprintable() and "  " not in text and text[:1] != " " and text[-1:] != " ":
        return text
    return " ".join(text.split())


def _plain_turns_key(msgs: list) -> str | None:
    """The key text of turns that hold only role and content, or None when some turn holds more.

    Roles and turns are joined by separators that are not whitespace: the key is
    " ".join("\x00".join(role + "\x01" + content.strip() ...).split()). Canonical roles hold no
    whitespace, so that equals collapsing each content alone, and most contents need no collapsing.
    """
    parts = []
    odd_roles = False
    for m in msgs:
        if len(m) != 2:
            return None
        prefix = _ROLE_KEYS.get(m["role"])
        if prefix is None:  # a role outside the four (unnormalised input): collapse the whole key below
            prefix, odd_roles = m["role"] + "\x01", True
        text = m["content"]
        # _collapse_ws(text), inlined: this runs for every turn of every row.
        if not text.isprintable() or "  " in text or text[:1] == " " or text[-1:] == " ":
            text = " ".join(text.split())
        parts.append(prefix + text)
    key = "\x00".join(parts)
    # Collapsing again is a no-op on collapsed contents; it only tidies whitespace in odd roles.
    return " ".join(key.split()) if odd_roles else key
