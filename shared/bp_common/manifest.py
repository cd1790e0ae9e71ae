"""Manifests: the one JSON object each tool prints on stdout and writes to `<output>/manifest.json`.

A manifest's paths are relative to its `root`. A reader resolves them against `root`, or,
when `root` no longer exists (the run was moved), against the directory the manifest file
was read from. See docs/reference/manifests.md.
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import os
import sys
from pathlib import Path
from typing import Iterable

import orjson

from . import __version__
from .errors import BpError, UpstreamFailure
from .io import atomic_write
from .redact import redact_obj

SCHEMA_VERSION = 1
KINDS = ("dataset", "vram", "adapter", "model", "gguf", "ollama", "eval", "report", "error")
MANIFEST_NAME = "manifest.json"

# The command line of the running tool (set by cli.run_main); recorded in every manifest so
# a model card can print the commands that rebuild a result.
CURRENT_COMMAND: list[str] | None = None


class Manifest(dict):
    """A manifest dict that knows where it was read from, to resolve relative paths."""

    source: Path | None = None

    @property
    def kind(self) -> str:
        return self["kind"]

    @property
    def base_dir(self) -> Path | None:
        """The directory relative paths resolve against: root if it exists, else the file's own dir."""
        root = self.get("root")
        if root and Path(root).is_dir():
            return Path(root)
        if self.source is not None:
            return self.source.parent
        return Path(root) if root else None

    def path(self, rel: str | os.PathLike) -> Path:
        """Resolve a path field of this manifest."""
        rel = Path(rel)
        if rel.is_absolute():
            return rel
        base = self.base_dir
        if base is None:
            raise BpError("INPUT_MANIFEST_INVALID", f"{self.kind} manifest has no root to resolve {rel}")
        return base / rel

    def ref(self) -> dict:
        """The entry another manifest puts in its `inputs` to point at this one."""
        ref = {"kind": self["kind"], "id": self.get("id"), "root": str(self.base_dir) if self.base_dir else None}
        return ref


def utc_now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def content_id(digests: Iterable[str]) -> str:
    """The manifest id: sha256 over the outputs' content digests, first 16 hex characters."""
    h = hashlib.sha256()
    for d in digests:
        h.update(str(d).encode())
        h.update(b"\n")
    return h.hexdigest()[:16]


def new_manifest(kind: str, tool: str, root: Path | str | None, *, digests: Iterable[str] = (),
                 inputs: Iterable[dict] = (), **fields) -> Manifest:
    """Build a manifest with the common fields filled in; `fields` are the kind-specific ones."""
    if kind not in KINDS:
        raise ValueError(f"unknown manifest kind {kind!r}")
    m = Manifest(schema_version=SCHEMA_VERSION, kind=kind, tool=tool, tool_version=__version__,
                 created_at=utc_now(), id=content_id(digests),
                 root=str(Path(root).resolve()) if root is not None else None,
                 inputs=list(inputs))
    if CURRENT_COMMAND is not None:
        m["command"] = list(CURRENT_COMMAND)
    m.update(fields)
    return m


def dumps(obj, pretty: bool = False) -> bytes:
    opts = orjson.OPT_SERIALIZE_NUMPY | orjson.OPT_NON_STR_KEYS
    if pretty:
        opts |= orjson.OPT_INDENT_2
    return orjson.dumps(redact_obj(obj), option=opts, default=_default)


def _default(obj):
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "item"):
        return obj.item()
    raise TypeError(f"not JSON serializable: {type(obj).__name__}")


def write_manifest(manifest: dict, out_dir: Path | str) -> Path:
    """Write `<out_dir>/manifest.json` atomically."""
    path = Path(out_dir) / MANIFEST_NAME
    atomic_write(path, dumps(manifest, pretty=True) + b"\n")
    return path


def emit(manifest: dict, stream=None) -> None:
    """Print the manifest as one JSON line on stdout (the only thing a tool prints there)."""
    stream = stream or sys.stdout
    data = dumps(manifest).decode() + "\n"
    stream.write(data)
    stream.flush()


def parse(text: str | bytes, source: str = "<stdin>", path: Path | None = None) -> Manifest:
    """Parse and check one manifest; an error envelope raises UpstreamFailure."""
    try:
        obj = orjson.loads(text)
    except orjson.JSONDecodeError as exc:
        raise BpError("INPUT_MANIFEST_INVALID", f"{source} is not JSON: {exc}") from None
    if not isinstance(obj, dict) or "kind" not in obj or "schema_version" not in obj:
        raise BpError("INPUT_MANIFEST_INVALID", f"{source} is not a bp-* manifest (no kind/schema_version)")
    version = obj["schema_version"]
    if not isinstance(version, int) or version < 1:
        raise BpError("INPUT_MANIFEST_INVALID", f"{source}: schema_version must be a positive integer")
    if obj["kind"] == "error":
        raise UpstreamFailure(obj)
    if version > SCHEMA_VERSION:
        raise BpError("INPUT_MANIFEST_VERSION",
                      f"{source} has schema_version {version}; this tool reads up to {SCHEMA_VERSION}")
    if obj["kind"] not in KINDS:
        raise BpError("INPUT_MANIFEST_INVALID", f"{source}: unknown manifest kind {obj['kind']!r}")
    m = Manifest(obj)
    m.source = path.resolve() if path is not None else None
    return m


def read_manifest(path: Path | str) -> Manifest:
    """Read a manifest file, or `<dir>/manifest.json` when given a directory."""
    path = Path(path)
    if path.is_dir():
        path = path / MANIFEST_NAME
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise BpError("INPUT_NOT_FOUND", f"no manifest at {path}") from None
    except OSError as exc:
        from .errors import from_os_error
        raise from_os_error(exc, f"reading {path}") from exc
    return parse(data, str(path), path)


def check_kind(m: Manifest, expect: Iterable[str], tool: str) -> Manifest:
    expect = tuple(expect)
    if m.kind not in expect:
        raise BpError("INPUT_MANIFEST_KIND",
                      f"{tool} takes a {' or '.join(expect)} manifest, got a {m.kind} manifest",
                      details={"got": m.kind, "expected": list(expect)})
    return m


def stdin_has_data() -> bool:
    try:
        return not sys.stdin.isatty()
    except (AttributeError, ValueError):
        return False


class Input:
    """What a tool was given: a manifest (from stdin, a file or a directory) or a plain path/id."""

    def __init__(self, manifest: Manifest | None = None, path: str | None = None):
        self.manifest = manifest
        self.path = path

    @property
    def is_manifest(self) -> bool:
        return self.manifest is not None

    def __repr__(self) -> str:
        return f"Input(manifest={self.manifest.kind if self.manifest else None}, path={self.path!r})"


def read_input(arg: str | None, expect: Iterable[str], tool: str, allow_plain: bool = True) -> Input:
    """Resolve a tool's positional input following DESIGN.md.

    `-` or nothing with stdin not a TTY: a manifest on stdin. A `.json` file or a directory
    holding manifest.json: that manifest. Anything else: a plain path or hub id (when
    allow_plain), returned as is for the tool to interpret.
    """
    expect = tuple(expect)
    if arg in (None, "-"):
        if arg is None and not stdin_has_data():
            raise BpError("INPUT_EMPTY", f"{tool} needs an input: a path, or a manifest piped on stdin")
        data = sys.stdin.buffer.read()
        if not data.strip():
            raise BpError("INPUT_EMPTY", "stdin was empty: the previous tool printed nothing",
                          hint="run the previous step on its own to see its error")
        return Input(manifest=check_kind(parse(data, "<stdin>"), expect, tool))
    p = Path(arg)
    if p.is_dir() and (p / MANIFEST_NAME).is_file():
        return Input(manifest=check_kind(read_manifest(p), expect, tool))
    if p.is_file() and p.suffix == ".json" and _looks_like_manifest(p):
        return Input(manifest=check_kind(read_manifest(p), expect, tool))
    if not allow_plain:
        if not p.exists():
            raise BpError("INPUT_NOT_FOUND", f"{arg} does not exist")
        raise BpError("INPUT_MANIFEST_INVALID", f"{arg} is not a bp-* manifest or a directory holding one")
    return Input(path=arg)


def _looks_like_manifest(p: Path) -> bool:
    try:
        with open(p, "rb") as fh:
            head = fh.read(4096)
    except OSError:
        return False
    return b'"schema_version"' in head and b'"kind"' in head


def load_inputs(m: Manifest) -> list[Manifest]:
    """Read the manifests a manifest names in its `inputs` (those still on disk)."""
    found = []
    for ref in m.get("inputs", []) or []:
        root = ref.get("root")
        if not root:
            continue
        p = Path(root) / MANIFEST_NAME
        if p.is_file():
            try:
                found.append(read_manifest(p))
            except BpError:
                continue
    return found


def chain(m: Manifest, limit: int = 16) -> list[Manifest]:
    """The manifest and every ancestor reachable through `inputs`, nearest first."""
    out, queue, seen = [], [m], set()
    while queue and len(out) < limit:
        cur = queue.pop(0)
        key = (cur.get("kind"), cur.get("id"), cur.get("root"))
        if key in seen:
            continue
        seen.add(key)
        out.append(cur)
        queue.extend(load_inputs(cur))
    return out


def find_in_chain(m: Manifest, kind: str) -> Manifest | None:
    for x in chain(m):
        if x.kind == kind:
            return x
    return None


def reuse(out_dir: Path | str, fingerprint: str, force: bool) -> Manifest | None:
    """The existing manifest when `out_dir` already holds a result of the same inputs and settings.

    Makes a re-run a no-op (Makefiles, cron). With force, or a different fingerprint, None.
    """
    if force:
        return None
    p = Path(out_dir) / MANIFEST_NAME
    if not p.is_file():
        return None
    try:
        m = read_manifest(p)
    except (BpError, UpstreamFailure):
        return None
    return m if m.get("fingerprint") == fingerprint else None


def fingerprint(*parts) -> str:
    """A stable digest of inputs and settings (any JSON-serialisable values)."""
    return hashlib.sha256(orjson.dumps(parts, option=orjson.OPT_SORT_KEYS, default=_default)).hexdigest()[:16]
