"""A loopback HTTP server that speaks Ollama's model-management API, for tests and the demo.

It implements what docs/api.md documents and what Ollama's server code does for these endpoints
(server/routes.go, server/create.go at ollama fb30760), so clients are tested against the real
protocol, not against our own assumptions:

- HEAD /api/blobs/:digest   200 when stored, 404 when not, 400 for a malformed digest
- POST /api/blobs/:digest   201 after storing a body whose sha256 is the digest; 400 "digest
                            mismatch" otherwise; 200 without reading when already stored
- POST /api/create          {model, from | files, adapters, template, system, parameters, license,
                            messages, stream}; NDJSON progress ending in {"status": "success"}; an
                            error before any progress is {"error"} with its HTTP status, one after
                            it is an {"error"} line; stream:false answers one object
- GET  /api/tags            {"models": [{name, model, modified_at, size, digest, details}]}
- POST /api/show            {template, system, parameters (Ollama's text form), license, details,
                            model_info, modelfile, capabilities}; 404 {"error"} when missing
- DELETE /api/delete        200, or 404 {"error": "model 'x' not found"}
- GET  /api/version, GET /  the version; "Ollama is running"

Stored GGUF blobs are read with gguf-py for details and model_info. Not implemented: pulling from
a registry (a `from` that is not local fails as an offline Ollama would), Ollama's guess of a
template from the GGUF's Jinja template, quantization, safetensors conversion, inference.

Fault injection for tests: `server.create_error = ("after", n, message)` streams n progress lines
and then an error line; `("status", code, message)` answers the create with that HTTP status.
Every request is recorded in `server.requests` as (method, path, json-or-size).

Run it alone (the demo does): python tests/ollama_server.py [--port 11434] [--root DIR]
"""
from __future__ import annotations

import argparse
import datetime as _dt
import hashlib
import json
import re
import shutil
import signal
import sys
import tempfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

DIGEST_RE = re.compile(r"^sha256[:-][0-9a-fA-F]{64}$")
VERSION = "0.0.0-bp-test"
_PART_OK = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")
_NAMESPACE_OK = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_-]*$")


# -- names, as Ollama parses them (types/model/name.go) ----------------------------------------------

def parse_name(s: str) -> dict | None:
    """host/namespace/model:tag with Ollama's defaults; None when not valid."""
    name = {"host": "registry.ollama.ai", "namespace": "library", "model": "", "tag": "latest"}
    if s.rfind(":") > s.rfind("/"):
        s, _, tag = s.rpartition(":")
        name["tag"] = tag
    parts = s.split("/")
    if len(parts) > 3:
        parts = ["/".join(parts[:-2])] + parts[-2:]
    name["model"] = parts[-1]
    if len(parts) >= 2:
        name["namespace"] = parts[-2]
    if len(parts) == 3:
        name["host"] = parts[0]
    ok = (0 < len(name["model"]) <= 80 and _PART_OK.match(name["model"])
          and 0 < len(name["tag"]) <= 80 and _PART_OK.match(name["tag"])
          and 0 < len(name["namespace"]) <= 80 and _NAMESPACE_OK.match(name["namespace"]))
    return name if ok else None


def display(name: dict) -> str:
    prefix = ""
    if name["host"] != "registry.ollama.ai":
        prefix = f"{name['host']}/{name['namespace']}/"
    elif name["namespace"] != "library":
        prefix = f"{name['namespace']}/"
    return f"{prefix}{name['model']}:{name['tag']}"


def valid_path(p: str) -> bool:
    """Go's io/fs.ValidPath."""
    if p == ".":
        return True
    return bool(p) and not p.startswith("/") and not p.endswith("/") and \
        all(e not in ("", ".", "..") for e in p.split("/"))


# -- Go's %#v, for /api/show's parameters text ------------------------------------------------------

def go_quote(s: str) -> str:
    out = ['"']
    for ch in s:
        if ch in '"\\':
            out.append("\\" + ch)
        elif ch == "\n":
            out.append("\\n")
        elif ch == "\t":
            out.append("\\t")
        elif ch == "\r":
            out.append("\\r")
        elif not ch.isprintable() and ch != " ":
            out.append(f"\\x{ord(ch):02x}" if ord(ch) < 256 else f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    return "".join(out) + '"'


def go_float(f: float) -> str:
    """strconv.FormatFloat(f, 'g', -1, 64): shortest digits, exponent form below 1e-4 or from 1e6."""
    if f == 0:
        return "0"
    for prec in range(1, 18):
        s = f"{f:.{prec - 1}e}"
        if float(s) == f:
            break
    mant, exp = s.split("e")
    exp = int(exp)
    digits = mant.replace("-", "").replace(".", "").rstrip("0") or "0"
    sign = "-" if f < 0 else ""
    if exp < -4 or exp >= 6:
        m = digits[0] + ("." + digits[1:] if len(digits) > 1 else "")
        return f"{sign}{m}e{'-' if exp < 0 else '+'}{abs(exp):02d}"
    if exp >= len(digits) - 1:
        return sign + digits + "0" * (exp - len(digits) + 1)
    if exp >= 0:
        return sign + digits[:exp + 1] + "." + digits[exp + 1:]
    return sign + "0." + "0" * (-exp - 1) + digits


def go_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return go_float(float(v))  # JSON numbers decode to float64 in Ollama
    if isinstance(v, str):
        return go_quote(v)
    return json.dumps(v)


def gguf_info(path: Path) -> dict:
    """general.* and <arch>.* keys of a GGUF, and whether it is an adapter."""
    from gguf import GGUFReader
    reader = GGUFReader(str(path))
    info = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key.startswith("tokenizer.ggml.") and key.endswith(("tokens", "merges",
                                                                                         "token_type", "scores")):
            continue
        try:
            value = field.contents()
        except Exception:
            continue
        if isinstance(value, list) and len(value) > 64:
            value = []
        info[key] = value
    return info


class OllamaTestServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, root: Path | str | None = None, port: int = 0):
        self._own_root = root is None
        self.root = Path(root) if root is not None else Path(tempfile.mkdtemp(prefix="ollama-test-"))
        (self.root / "blobs").mkdir(parents=True, exist_ok=True)
        self.models: dict[str, dict] = {}          # lower-case display name -> model record
        self.requests: list[tuple[str, str, object]] = []
        self.create_error: tuple | None = None
        self.lock = threading.Lock()
        super().__init__(("127.0.0.1", port), Handler)
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def start(self) -> "OllamaTestServer":
        self._thread = threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.02},
                                        name="ollama-test-server", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self.shutdown()
        self.server_close()
        if self._own_root:
            shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    def blob_path(self, digest: str) -> Path:
        return self.root / "blobs" / digest.replace(":", "-")

    def uploads(self) -> list[str]:
        """Digests of blob bodies the server stored (POST /api/blobs answered 201)."""
        return [p for m, p, extra in self.requests if m == "POST" and p.startswith("/api/blobs/") and extra == 201]


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: OllamaTestServer

    def log_message(self, *args):  # quiet
        pass

    # -- plumbing ---------------------------------------------------------------------------
    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            out = bytearray()
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return bytes(out)
                out += self.rfile.read(size)
                self.rfile.readline()
        n = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(n) if n else b""

    def _send(self, status: int, obj=None, text: str | None = None):
        body = b"" if obj is None and text is None else (
            (json.dumps(obj) if obj is not None else text).encode())
        self.send_response(status)
        if obj is not None:
            self.send_header("Content-Type", "application/json; charset=utf-8")
        elif text is not None:
            self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _error(self, status: int, message: str):
        self._send(status, {"error": message})

    def _json_body(self):
        raw = self._body()
        if not raw.strip():
            self._error(400, "missing request body")
            return None
        try:
            obj = json.loads(raw)
        except ValueError as exc:
            self._error(400, f"invalid character in request body: {exc}")
            return None
        if not isinstance(obj, dict):
            self._error(400, "json: cannot unmarshal into Go value of type api.Request")
            return None
        return obj

    def _record(self, extra=None):
        self.server.requests.append((self.command, self.path, extra))

    def _not_found_page(self):
        self._send(404, text="404 page not found")

    # -- routes -----------------------------------------------------------------------------
    def do_HEAD(self):
        if self.path.startswith("/api/blobs/"):
            self._record()
            digest = self.path[len("/api/blobs/"):]
            if not DIGEST_RE.match(digest):
                return self._error(400, "invalid digest format")
            if not self.server.blob_path(digest).is_file():
                return self._error(404, f'blob "{digest}" not found')
            return self._send(200)
        if self.path == "/":
            return self._send(200, text="Ollama is running")
        self._not_found_page()

    def do_GET(self):
        if self.path == "/":
            return self._send(200, text="Ollama is running")
        if self.path == "/api/version":
            return self._send(200, {"version": VERSION})
        if self.path == "/api/tags":
            self._record()
            with self.server.lock:
                models = [self._list_entry(m) for m in self.server.models.values()]
            return self._send(200, {"models": models})
        self._not_found_page()

    def do_DELETE(self):
        if self.path != "/api/delete":
            return self._not_found_page()
        req = self._json_body()
        if req is None:
            return
        self._record(req)
        raw = req.get("model") or req.get("name") or ""
        name = parse_name(raw)
        if name is None:
            return self._error(400, f"name {raw!r} is invalid")
        with self.server.lock:
            if self.server.models.pop(display(name).lower(), None) is None:
                return self._error(404, f"model '{raw}' not found")
        self._send(200)

    def do_POST(self):
        if self.path.startswith("/api/blobs/"):
            return self._push_blob(self.path[len("/api/blobs/"):])
        if self.path == "/api/create":
            return self._create()
        if self.path == "/api/show":
            return self._show()
        self._body()
        self._not_found_page()

    # -- blobs ------------------------------------------------------------------------------
    def _push_blob(self, digest: str):
        if not DIGEST_RE.match(digest):
            self._body()
            self._record(400)
            return self._error(400, "invalid digest format")
        path = self.server.blob_path(digest)
        if path.is_file():
            self._body()
            self._record(200)
            return self._send(200)
        # Stream the body to a temporary file while hashing it, as Ollama's NewLayer does.
        tmp = path.with_name(path.name + f".partial-{threading.get_ident()}")
        h = hashlib.sha256()
        with open(tmp, "wb") as fh:
            if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                data = self._body()
                h.update(data)
                fh.write(data)
            else:
                left = int(self.headers.get("Content-Length") or 0)
                while left > 0:
                    chunk = self.rfile.read(min(left, 1 << 20))
                    if not chunk:
                        break
                    left -= len(chunk)
                    h.update(chunk)
                    fh.write(chunk)
        got = "sha256:" + h.hexdigest()
        if got != digest.replace("-", ":", 1):
            tmp.unlink()
            self._record(400)
            return self._error(400, f'digest mismatch, expected "{digest}", got "{got}"')
        tmp.replace(path)
        self._record(201)
        self._send(201)

    # -- create -----------------------------------------------------------------------------
    def _create(self):
        req = self._json_body()
        if req is None:
            return
        self._record(req)
        for fname, digest in (req.get("files") or {}).items():
            if not valid_path(fname):
                return self._error(400, "file path must be relative")
            if not digest:
                return self._error(400, "invalid digest format")
        for digest in (req.get("adapters") or {}).values():
            if not digest:
                return self._error(400, "invalid digest format")
        name = parse_name(req.get("model") or req.get("name") or "")
        if name is None:
            return self._error(400, "invalid model name")
        stream = req.get("stream") is not False
        try:
            out = _Progress(self, stream, self.server.create_error)
            self._build(req, name, out)
        except _Failed as exc:
            out.error(exc.message, exc.status)
            return
        except _Aborted:
            return
        out.finish()

    def _layers_from(self, ref: str, out: "_Progress") -> dict:
        base = parse_name(ref)
        with self.server.lock:
            record = self.server.models.get(display(base).lower()) if base else None
        if record is None:
            out.status("pulling manifest")
            raise _Failed("pull model manifest: file does not exist")
        return json.loads(json.dumps(record))  # a copy

    def _gguf_layers(self, files: dict, out: "_Progress", adapter: bool) -> list[dict]:
        layers = []
        for fname in sorted(files):
            digest = files[fname]
            out.status("parsing GGUF")
            if not DIGEST_RE.match(digest):
                raise _Failed("invalid digest format")
            path = self.server.blob_path(digest)
            if not path.is_file():
                raise _Failed(f"open {path}: no such file or directory")
            with open(path, "rb") as fh:
                if fh.read(4) != b"GGUF":
                    raise _Failed("supplied file was not in GGUF format", 400)
            info = gguf_info(path)
            kind = "adapter" if info.get("general.type") == "adapter" else "model"
            media = "application/vnd.ollama.image." + ("adapter" if adapter or kind == "adapter" else "model")
            out.status(f"using existing layer {digest}")
            layers.append({"mediaType": media, "digest": digest, "size": path.stat().st_size, "from": fname,
                           "info": info})
        return layers

    def _build(self, req: dict, name: dict, out: "_Progress"):
        if req.get("from"):
            record = self._layers_from(str(req["from"]), out)
            layers = record["layers"]
            config = record["config"]
        elif req.get("files") is not None:
            files = req["files"]
            if not files:
                raise _Failed("no files provided to convert", 400)
            if not all(f.endswith(".gguf") or self._is_gguf_blob(d) for f, d in files.items()):
                raise _Failed("unknown type", 400)
            layers = self._gguf_layers(files, out, adapter=False)
            config = {}
        else:
            raise _Failed("neither 'from' or 'files' was specified", 400)
        if req.get("adapters") is not None:
            if len(req["adapters"]) > 1:
                raise _Failed("only one adapter is currently supported", 400)
            layers = [l for l in layers if not l["mediaType"].endswith(".adapter")]
            layers += self._gguf_layers(req["adapters"], out, adapter=True)
        model_layer = next((l for l in layers if l["mediaType"].endswith(".model")), None)
        if model_layer is not None:
            info = model_layer.get("info", {})
            arch = info.get("general.architecture", "")
            config = {"model_format": "gguf", "model_family": arch, "model_families": [arch],
                      "model_type": "", "file_type": str(info.get("general.file_type", ""))}
        parts = {l["mediaType"].rsplit(".", 1)[-1]: l for l in layers}
        if req.get("template"):
            t = req["template"]
            if t.count("{{") != t.count("}}"):
                raise _Failed("template error: unexpected unclosed action", 400)
            parts["template"] = self._text_layer("template", t, out)
        if req.get("system"):
            parts["system"] = self._text_layer("system", req["system"], out)
        licenses = req.get("license")
        if licenses:
            licenses = [licenses] if isinstance(licenses, str) else list(licenses)
            parts["license"] = self._text_layer("license", "\n".join(licenses), out, value=licenses)
        params = dict((parts.get("params") or {}).get("value") or {})
        params.update(req.get("parameters") or {})
        if params:
            parts["params"] = self._text_layer("params", json.dumps(params), out, value=params)
        if req.get("messages"):
            parts["messages"] = self._text_layer("messages", json.dumps(req["messages"]), out,
                                                 value=req["messages"])
        out.status("writing manifest")
        layers = list(parts.values())
        manifest = json.dumps({"layers": [{k: l[k] for k in ("mediaType", "digest", "size")} for l in layers]},
                              sort_keys=True)
        record = {"name": display(name), "layers": layers, "config": config,
                  "digest": hashlib.sha256(manifest.encode()).hexdigest(),
                  "modified_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="microseconds")
                  .replace("+00:00", "Z")}
        with self.server.lock:
            self.server.models[display(name).lower()] = record

    def _is_gguf_blob(self, digest: str) -> bool:
        p = self.server.blob_path(digest) if DIGEST_RE.match(digest or "") else None
        if p is None or not p.is_file():
            return False
        with open(p, "rb") as fh:
            return fh.read(4) == b"GGUF"

    def _text_layer(self, kind: str, text: str, out: "_Progress", value=None) -> dict:
        digest = "sha256:" + hashlib.sha256(text.encode()).hexdigest()
        path = self.server.blob_path(digest)
        out.status(("using existing layer " if path.is_file() else "creating new layer ") + digest)
        path.write_text(text, encoding="utf-8")
        return {"mediaType": f"application/vnd.ollama.image.{kind}", "digest": digest,
                "size": len(text.encode()), "value": text if value is None else value}

    # -- reading models ---------------------------------------------------------------------
    def _find(self, raw: str) -> dict | None:
        name = parse_name(raw)
        if name is None:
            return None
        with self.server.lock:
            return self.server.models.get(display(name).lower())

    def _list_entry(self, m: dict) -> dict:
        c = m["config"]
        return {"name": m["name"], "model": m["name"], "modified_at": m["modified_at"],
                "size": sum(l["size"] for l in m["layers"]), "digest": m["digest"],
                "details": {"parent_model": "", "format": c.get("model_format", ""),
                            "family": c.get("model_family", ""), "families": c.get("model_families"),
                            "parameter_size": c.get("model_type", ""),
                            "quantization_level": c.get("file_type", "")}}

    def _show(self):
        req = self._json_body()
        if req is None:
            return
        self._record(req)
        raw = req.get("model") or req.get("name")
        if not raw:
            return self._error(400, "model is required")
        m = self._find(raw)
        if m is None:
            return self._error(404, f"model '{raw}' not found")
        parts = {l["mediaType"].rsplit(".", 1)[-1]: l for l in m["layers"]}
        params = (parts.get("params") or {}).get("value") or {}
        lines = []
        for k, v in params.items():
            for item in (v if isinstance(v, list) else [v]):
                lines.append(f"{k:<30} {go_value(item)}")
        model = parts.get("model")
        info = {k: v for k, v in (model or {}).get("info", {}).items() if not k.startswith("tokenizer.chat")}
        resp = {"license": "\n".join((parts.get("license") or {}).get("value") or []),
                "modelfile": self._modelfile(m, parts), "parameters": "\n".join(lines),
                "template": (parts.get("template") or {}).get("value", "{{ .Prompt }}"),
                "system": (parts.get("system") or {}).get("value", ""),
                "details": self._list_entry(m)["details"], "model_info": info,
                "capabilities": ["completion"], "modified_at": m["modified_at"]}
        if not resp["system"]:
            del resp["system"]
        if not resp["license"]:
            del resp["license"]
        self._send(200, resp)

    def _modelfile(self, m: dict, parts: dict) -> str:
        lines = ['# Modelfile generated by "ollama show"', "# To build a new Modelfile based on this, replace FROM with:",
                 f"# FROM {m['name']}", ""]
        if "model" in parts:
            lines.append(f"FROM {self.server.blob_path(parts['model']['digest'])}")
        if "adapter" in parts:
            lines.append(f"ADAPTER {self.server.blob_path(parts['adapter']['digest'])}")
        if "template" in parts:
            lines.append(f'TEMPLATE """{parts["template"]["value"]}"""')
        if "system" in parts:
            lines.append(f'SYSTEM """{parts["system"]["value"]}"""')
        for k, v in ((parts.get("params") or {}).get("value") or {}).items():
            for item in (v if isinstance(v, list) else [v]):
                lines.append(f"PARAMETER {k} {item}")
        return "\n".join(lines) + "\n"


class _Failed(Exception):
    def __init__(self, message: str, status: int = 500):
        super().__init__(message)
        self.message, self.status = message, status


class _Aborted(Exception):
    """An injected failure already answered."""


class _Progress:
    """Ollama's streamResponse / waitForStream: NDJSON lines, or one object when stream is false."""

    def __init__(self, handler: Handler, stream: bool, inject: tuple | None):
        self.h, self.stream, self.inject = handler, stream, inject
        self.started = False
        self.sent = 0
        if inject and inject[0] == "status":
            self.error(inject[2], inject[1])
            raise _Aborted()

    def _chunk(self, obj: dict):
        data = (json.dumps(obj) + "\n").encode()
        self.h.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
        self.h.wfile.flush()

    def _start(self):
        if not self.started:
            self.h.send_response(200)
            self.h.send_header("Content-Type", "application/x-ndjson")
            self.h.send_header("Transfer-Encoding", "chunked")
            self.h.end_headers()
            self.started = True

    def status(self, text: str):
        if self.inject and self.inject[0] == "after" and self.sent >= self.inject[1]:
            self.error(self.inject[2], 500)
            raise _Aborted()
        self.sent += 1
        if self.stream:
            self._start()
            self._chunk({"status": text})

    def error(self, message: str, status: int = 500):
        if self.stream and self.started:
            self._chunk({"error": message})
            self._end()
        else:
            self.h._error(status, message)

    def finish(self):
        if self.stream:
            self.status("success")
            self._end()
        else:
            self.h._send(200, {"status": "success"})

    def _end(self):
        self.h.wfile.write(b"0\r\n\r\n")
        self.h.wfile.flush()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="A loopback server speaking Ollama's model-management API.")
    ap.add_argument("--port", type=int, default=11434, help="port on 127.0.0.1")
    ap.add_argument("--root", default=None, help="where blobs are kept (default: a temporary directory)")
    a = ap.parse_args(argv)
    server = OllamaTestServer(a.root, a.port)
    print(f"serving Ollama's API at {server.url}", file=sys.stderr)

    def on_term(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
        if server._own_root:
            shutil.rmtree(server.root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
