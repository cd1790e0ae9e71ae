"""A small client for Ollama's HTTP API (docs/api.md): blobs, create, show, tags, delete, version.

Plain http.client, no dependency. Connection attempts are retried a few times with backoff (a
daemon that is still starting); nothing is retried once a request has reached the server.
Errors come back as `{"error": "..."}` with an HTTP status, or, once a streamed response has
begun, as an NDJSON line; both become BpErrors with Ollama's message.
"""
from __future__ import annotations

import http.client
import json
import os
import socket
import ssl
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from bp_common.errors import BpError
from bp_common.redact import redact

DEFAULT_PORT = 11434
_CHUNK = 1 << 20


@dataclass(frozen=True)
class Host:
    scheme: str
    host: str
    port: int
    path: str = ""

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}{self.path}"


def parse_host(value: str) -> Host:
    """An Ollama host the way Ollama reads OLLAMA_HOST: `[scheme://]host[:port][/path]`.

    No scheme means http and port 11434; `http://host` means port 80 and `https://host` 443, as in
    Ollama's own client. 0.0.0.0 and :: (bind-all addresses) are reached through loopback.
    """
    raw = (value or "").strip()
    if any(not ch.isprintable() or ch.isspace() for ch in raw):
        raise BpError("INPUT_INVALID", f"--host {raw!r} contains spaces or control characters")
    scheme, sep, hostport = raw.partition("://")
    default_port = DEFAULT_PORT
    if not sep:
        scheme, hostport = "http", raw
    elif scheme == "http":
        default_port = 80
    elif scheme == "https":
        default_port = 443
    else:
        raise BpError("INPUT_INVALID", f"--host {redact(raw)}: only http:// and https:// are supported")
    hostport, slash, path = hostport.partition("/")
    if "@" in hostport:
        raise BpError("INPUT_INVALID", f"--host {redact(raw)}: credentials in the URL are not supported")
    host, port = hostport, None
    if hostport.startswith("["):
        end = hostport.find("]")
        if end < 0:
            raise BpError("INPUT_INVALID", f"--host {raw}: unbalanced [ in an IPv6 address")
        host, rest = hostport[1:end], hostport[end + 1:]
        if rest.startswith(":"):
            port = rest[1:]
        elif rest:
            raise BpError("INPUT_INVALID", f"--host {raw}: unexpected text after the IPv6 address")
    elif hostport.count(":") == 1:
        host, port = hostport.split(":")
    if port is not None:
        if not port.isdigit() or not 0 < int(port) < 65536:
            raise BpError("INPUT_INVALID", f"--host {raw}: port must be 1-65535")
        port = int(port)
    host = host or "127.0.0.1"
    if host == "0.0.0.0":
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    return Host(scheme, host, port or default_port, ("/" + path).rstrip("/") if slash else "")


class OllamaClient:
    """Talks to one Ollama server. Every failure is a BpError (OLLAMA_* codes)."""

    def __init__(self, host: str | Host, timeout: float = 600.0, connect_timeout: float = 5.0,
                 retries: int = 3, backoff_s: float = 0.25):
        self.host = host if isinstance(host, Host) else parse_host(host)
        self.timeout = timeout
        self.connect_timeout = min(connect_timeout, timeout)
        self.retries = max(1, retries)
        self.backoff_s = backoff_s

    # -- connections --------------------------------------------------------------------------
    def _connect(self) -> http.client.HTTPConnection:
        """An open connection; connection errors are retried with backoff, then OLLAMA_UNAVAILABLE."""
        last: Exception | None = None
        for attempt in range(self.retries):
            if attempt:
                time.sleep(self.backoff_s * 2 ** (attempt - 1))
            if self.host.scheme == "https":
                conn = http.client.HTTPSConnection(self.host.host, self.host.port, timeout=self.connect_timeout,
                                                   context=ssl.create_default_context())
            else:
                conn = http.client.HTTPConnection(self.host.host, self.host.port, timeout=self.connect_timeout)
            try:
                conn.connect()
            except (OSError, http.client.HTTPException) as exc:
                last = exc
                conn.close()
                continue
            conn.sock.settimeout(self.timeout)
            return conn
        reason = getattr(last, "strerror", None) or str(last) or type(last).__name__
        raise BpError("OLLAMA_UNAVAILABLE", f"no Ollama server answered at {self.host.url} "
                      f"({reason}, {self.retries} attempts)",
                      details={"host": self.host.url, "attempts": self.retries})

    def _send(self, method: str, path: str, body: bytes | None = None,
              headers: dict | None = None) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
        conn = self._connect()
        try:
            conn.request(method, self.host.path + path, body=body, headers=headers or {})
            return conn, conn.getresponse()
        except (OSError, http.client.HTTPException) as exc:
            conn.close()
            raise self._lost(exc, f"{method} {path}") from None

    def _lost(self, exc: Exception, what: str) -> BpError:
        if isinstance(exc, (socket.timeout, TimeoutError)):
            return BpError("OLLAMA_UNAVAILABLE", f"{what}: no answer from {self.host.url} within {self.timeout:g} s",
                           hint="a slow server: raise --timeout")
        return BpError("OLLAMA_UNAVAILABLE", f"{what}: the connection to {self.host.url} was lost "
                       f"({type(exc).__name__}: {exc})")

    def _json(self, method: str, path: str, payload: dict | None = None, expect_body: bool = True):
        body = json.dumps(payload).encode() if payload is not None else None
        headers = {"Content-Type": "application/json"} if body is not None else {}
        conn, resp = self._send(method, path, body, headers)
        try:
            data = resp.read()
        except (OSError, http.client.HTTPException) as exc:
            raise self._lost(exc, f"{method} {path}") from None
        finally:
            conn.close()
        if resp.status >= 400:
            raise self._http_error(resp.status, data, f"{method} {path}")
        if not expect_body:
            return None
        try:
            return json.loads(data) if data.strip() else {}
        except ValueError:
            raise BpError("OLLAMA_SERVER_ERROR", f"{method} {path}: {self.host.url} did not answer with JSON; "
                          "is it an Ollama server?") from None

    def _http_error(self, status: int, data: bytes, what: str, create: bool = False) -> BpError:
        message = ollama_error(data)
        if message is None:  # not Ollama's {"error": ...}: something else answers at this address
            text = error_message(data)
            return BpError("OLLAMA_SERVER_ERROR", f"{what}: {self.host.url} answered HTTP {status} without "
                           f"Ollama's error object{': ' + text if text else ''}; is it an Ollama server?",
                           details={"status": status, "host": self.host.url})
        details = {"status": status, "host": self.host.url, "ollama_error": message}
        if status == 404:
            return BpError("OLLAMA_NOT_FOUND", f"{what}: {message}", details=details)
        if 400 <= status < 500:
            return BpError("OLLAMA_BAD_REQUEST", f"{what}: Ollama refused the request: {message}", details=details)
        if create:
            return BpError("OLLAMA_CREATE_FAILED", f"{what}: {message}", details=details)
        return BpError("OLLAMA_SERVER_ERROR", f"{what}: {message}", details=details)

    # -- endpoints ----------------------------------------------------------------------------
    def version(self) -> str:
        return str(self._json("GET", "/api/version").get("version", ""))

    def has_blob(self, digest: str) -> bool:
        """HEAD /api/blobs/<digest>: 200 present, 404 missing."""
        conn, resp = self._send("HEAD", f"/api/blobs/{digest}")
        try:
            data = resp.read()
        finally:
            conn.close()
        if resp.status == 200:
            return True
        if resp.status == 404:
            return False
        raise self._http_error(resp.status, data, f"HEAD /api/blobs/{digest}")

    def push_blob(self, digest: str, path: Path, on_bytes: Callable[[int], None] | None = None) -> None:
        """POST the file's bytes to /api/blobs/<digest>; the server checks the digest (400 on mismatch)."""
        size = os.path.getsize(path)
        conn = self._connect()
        try:
            conn.putrequest("POST", self.host.path + f"/api/blobs/{digest}")
            conn.putheader("Content-Type", "application/octet-stream")
            conn.putheader("Content-Length", str(size))
            conn.endheaders()
            with open(path, "rb") as fh:
                while True:
                    chunk = fh.read(_CHUNK)
                    if not chunk:
                        break
                    conn.send(chunk)
                    if on_bytes is not None:
                        on_bytes(len(chunk))
            resp = conn.getresponse()
            data = resp.read()
        except (OSError, http.client.HTTPException) as exc:
            raise self._lost(exc, f"uploading {Path(path).name}") from None
        finally:
            conn.close()
        if resp.status not in (200, 201):
            raise self._http_error(resp.status, data, f"uploading {Path(path).name}")

    def create(self, request: dict) -> Iterator[dict]:
        """POST /api/create with streaming on: yields each progress object until "success"."""
        body = json.dumps({**request, "stream": True}).encode()
        conn, resp = self._send("POST", "/api/create", body, {"Content-Type": "application/json"})
        try:
            if resp.status >= 400:
                raise self._http_error(resp.status, resp.read(), "create", create=True)
            done = False
            while True:
                try:
                    line = resp.readline()
                except (OSError, http.client.HTTPException) as exc:
                    raise self._lost(exc, "create") from None
                if not line:
                    break
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except ValueError:
                    raise BpError("OLLAMA_SERVER_ERROR", f"create: a progress line is not JSON: {line[:200]!r}") \
                        from None
                if isinstance(obj, dict) and obj.get("error"):
                    raise BpError("OLLAMA_CREATE_FAILED", f"create: {obj['error']}",
                                  details={"host": self.host.url, "ollama_error": obj["error"]})
                yield obj
                if isinstance(obj, dict) and obj.get("status") == "success":
                    done = True
            if not done:
                raise BpError("OLLAMA_CREATE_FAILED", "create: the server closed the stream before \"success\"")
        finally:
            conn.close()

    def show(self, name: str) -> dict:
        return self._json("POST", "/api/show", {"model": name})

    def tags(self) -> list[dict]:
        models = self._json("GET", "/api/tags").get("models")
        return models if isinstance(models, list) else []

    def delete(self, name: str) -> None:
        self._json("DELETE", "/api/delete", {"model": name}, expect_body=False)


def ollama_error(data: bytes) -> str | None:
    """The message of Ollama's {"error": "..."} body, or None when the body is something else."""
    try:
        obj = json.loads(data.decode("utf-8", errors="replace"))
    except ValueError:
        return None
    return obj["error"] if isinstance(obj, dict) and isinstance(obj.get("error"), str) else None


def error_message(data: bytes) -> str:
    """Ollama's {"error": "..."} message, or the body's first line."""
    text = data.decode("utf-8", errors="replace").strip()
    try:
        obj = json.loads(text)
        if isinstance(obj, dict) and isinstance(obj.get("error"), str):
            return obj["error"]
    except ValueError:
        pass
    return text.splitlines()[0][:300] if text else ""
