"""Registering a model with Ollama over HTTP, and reading back what it holds.

register(): sha256 each local file, upload only the blobs the server lacks (HEAD, then POST),
POST /api/create with the template, parameters and system prompt, stream its progress, then
confirm with /api/show that the server holds what was sent. A create that fails, or a model that
does not hold what was sent, is removed again: nothing is left half-registered.
"""
from __future__ import annotations

import ast
import functools
import hashlib
from dataclasses import dataclass, field
from pathlib import Path

from bp_common.errors import BpError
from bp_common.io import sha256_file
from bp_common.progress import Reporter

from . import modelfile as mfile
from .client import OllamaClient
from .names import full_name, same_model


@dataclass
class Registration:
    name: str
    request: dict
    blobs: dict[str, str] = field(default_factory=dict)      # file name -> digest
    uploaded: list[str] = field(default_factory=list)        # digests sent this time
    model_digest: str | None = None                          # Ollama's digest of the registered model
    show: dict = field(default_factory=dict)


def file_digest(path: Path) -> str:
    """`sha256:<hex>` of a file; hashed once per run however often it is asked for."""
    st = Path(path).stat()
    return _digest(str(Path(path).resolve()), st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=64)
def _digest(path: str, size: int, mtime_ns: int) -> str:
    return "sha256:" + sha256_file(path)


def upload_blobs(client: OllamaClient, files: dict[str, Path], r: Reporter, reg: Registration) -> dict[str, str]:
    """Digest of each file, uploading those the server does not have yet."""
    digests = {}
    for fname, path in files.items():
        digest = file_digest(path)
        digests[fname] = digest
        reg.blobs[fname] = digest
        if client.has_blob(digest):
            r.info(f"blob {digest[:19]}… ({fname}) is already on the server")
            continue
        size = path.stat().st_size
        with r.task(f"upload {fname}", total=size, unit="B") as task:
            client.push_blob(digest, path, on_bytes=task.advance)
        reg.uploaded.append(digest)
        r.event("upload", file=fname, digest=digest, bytes=size)
    return digests


def model_digest(client: OllamaClient, name: str) -> str | None:
    for m in client.tags():
        if same_model(str(m.get("name") or m.get("model") or ""), name):
            return m.get("digest")
    return None


def register(client: OllamaClient, name: str, commands: list[mfile.Command], r: Reporter) -> Registration:
    """Create `name` from Modelfile commands (absolute FROM/ADAPTER paths); see the module doc."""
    request, files, adapters = mfile.create_request(commands, None)
    reg = Registration(name=name, request=request)
    if files:
        request["files"] = upload_blobs(client, files, r, reg)
    if adapters:
        request["adapters"] = upload_blobs(client, adapters, r, reg)
    before = model_digest(client, name)
    try:
        for ev in client.create({"model": name, **request}):
            fields = {k: ev[k] for k in ("digest", "total", "completed") if k in ev}
            r.event("create", status=ev.get("status", ""), **fields)
    except BpError:
        _rollback(client, name, before, r)
        raise
    reg.show = client.show(name)
    problems = check_registered(reg.show, request)
    if problems:
        _remove(client, name, r)
        raise BpError("OLLAMA_CREATE_FAILED", f"{name} was created but does not hold what was sent: "
                      + "; ".join(problems) + "; it was removed again", details={"problems": problems})
    reg.model_digest = model_digest(client, name)
    return reg


def _rollback(client: OllamaClient, name: str, before: str | None, r: Reporter) -> None:
    """After a failed create: remove the model if this attempt left one behind."""
    try:
        after = model_digest(client, name)
    except BpError:
        return
    if after is not None and after != before:
        _remove(client, name, r)


def _remove(client: OllamaClient, name: str, r: Reporter) -> None:
    try:
        client.delete(name)
        r.warn(f"removed {full_name(name)} again")
    except BpError as exc:
        r.warn(f"could not remove {full_name(name)}: {exc.message}")


def parse_show_parameters(text: str) -> dict:
    """/api/show's `parameters` text (`key value` lines, Go-quoted strings) as a dict; stop is a list."""
    out: dict = {}
    for line in (text or "").splitlines():
        key, _, raw = line.strip().partition(" ")
        raw = raw.strip()
        if not key:
            continue
        try:
            value = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            value = raw
        if key == "stop":
            out.setdefault("stop", []).append(value)
        else:
            out[key] = value
    return out


def check_registered(shown: dict, request: dict) -> list[str]:
    """Differences between what /api/show reports and what was sent (empty when they agree)."""
    problems = []
    if "template" in request and shown.get("template") != request["template"]:
        problems.append("its template differs from the one sent")
    if request.get("system") and shown.get("system") != request["system"]:
        problems.append("its system prompt differs from the one sent")
    have = parse_show_parameters(shown.get("parameters", ""))
    for key, want in (request.get("parameters") or {}).items():
        got = have.get(key)
        if key == "stop":
            missing = [s for s in want if s not in (got or [])]
            if missing:
                problems.append(f"stop strings missing: {missing}")
        elif isinstance(want, float) and isinstance(got, (int, float)):
            if abs(got - want) > 1e-6 * max(1.0, abs(want)):
                problems.append(f"{key} is {got}, not {want}")
        elif got != want:
            problems.append(f"{key} is {got!r}, not {want!r}")
    return problems


def template_digest(template: str | None) -> str | None:
    return "sha256:" + hashlib.sha256(template.encode("utf-8")).hexdigest() if template is not None else None
