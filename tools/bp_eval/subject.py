"""What is evaluated: a base or merged model, a base + adapter, or a GGUF file, and where its tokenizer is.

Found from the positional input as DESIGN.md has it: a manifest (stdin, file, directory) of kind
model, adapter, gguf or dataset (a dataset manifest means "its model": the base it was rendered
for), or a plain path: a model directory or hub id, a PEFT adapter directory, a .gguf file.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from bp_common.errors import BpError
from bp_common.manifest import Manifest, find_in_chain, read_input
from bp_common.models import ref_near

KINDS = ("model", "adapter", "gguf", "dataset")


@dataclass
class Subject:
    kind: str                       # "model", "adapter" or "gguf"
    path: Path | str                # model directory (or hub id), adapter directory, or .gguf file
    tokenizer: Path | str | None    # the HF model directory whose tokenizer and chat template are used
    base: str | None = None         # adapter: its base model
    manifest: Manifest | None = None
    quant: str | None = None        # gguf: the file's quant type

    @property
    def backend(self) -> str:
        return "llama.cpp" if self.kind == "gguf" else "transformers"

    def describe(self) -> dict:
        """The eval manifest's `model` field."""
        out = {"kind": self.kind, "path": str(self.path), "backend": self.backend,
               "tokenizer": str(self.tokenizer) if self.tokenizer is not None else None}
        if self.base is not None:
            out["base"] = str(self.base)
        if self.quant is not None:
            out["quant"] = self.quant
        if self.manifest is not None:
            out["manifest"] = self.manifest.ref()
        return out

    def identity(self) -> dict:
        """What a re-run must match to reuse a result: the manifest's id, else the files' digests."""
        if self.manifest is not None and self.manifest.kind != "dataset":
            return {"manifest_id": self.manifest.get("id"), "path": str(self.path), "quant": self.quant}
        ident = {"kind": self.kind, "files": files_digest(self.path)}
        if self.base is not None:
            ident["base"] = files_digest(self.base)
        return ident


def resolve_subject(spec: str | None, tool: str, *, base: str | None = None, quant: str | None = None,
                    tokenizer: str | None = None) -> Subject:
    """The Subject the positional input names (see the module doc)."""
    inp = read_input(spec, KINDS, tool)
    if inp.is_manifest:
        return subject_from_manifest(inp.manifest, base, quant, tokenizer)
    return subject_from_path(inp.path, base, tokenizer)


def subject_from_manifest(m: Manifest, base: str | None, quant: str | None, tokenizer: str | None) -> Subject:
    if m.kind == "model":
        if not m.get("model_dir"):
            raise BpError("INPUT_MANIFEST_INVALID", "the model manifest has no model_dir")
        d = m.path(m["model_dir"])
        return Subject("model", d, tokenizer or d, manifest=m)
    if m.kind == "adapter":
        if not m.get("adapter_dir"):
            raise BpError("INPUT_MANIFEST_INVALID", "the adapter manifest has no adapter_dir")
        d = m.path(m["adapter_dir"])
        b = base or ref_near(m.get("base_model"), m.base_dir)
        if not b:
            raise BpError("INPUT_USAGE", "the adapter manifest names no base model", hint="pass --base MODEL")
        return Subject("adapter", d, tokenizer or adapter_tokenizer(d, b), base=b, manifest=m)
    if m.kind == "dataset":
        if not m.get("model"):
            raise BpError("INPUT_USAGE", "the dataset manifest names no model (bp-prep ran without --model)",
                          hint="pass the model to evaluate: bp-eval MODEL --data DATASET")
        return Subject("model", m["model"], tokenizer or m["model"], manifest=m)
    return gguf_subject(m, quant, tokenizer)


def gguf_subject(m: Manifest, quant: str | None, tokenizer: str | None) -> Subject:
    """One model file of a gguf manifest (-q picks it; else the first), tokenizer from the chain."""
    files = [f for f in (m.get("files") or []) if f.get("type", "model") == "model"]
    if not files:
        raise BpError("INPUT_MANIFEST_INVALID", "the gguf manifest lists no model file",
                      hint="an adapter GGUF is evaluated through its base: merge it first (bp-merge)")
    if quant:
        picked = [f for f in files if str(f.get("quant", "")).lower() == quant.lower()]
        if not picked:
            raise BpError("INPUT_INVALID", f"the gguf manifest has no {quant} file "
                          f"(it has: {', '.join(str(f.get('quant')) for f in files)})")
        files = picked
    f = files[0]
    tok = tokenizer or chain_tokenizer(m)
    if tok is None:
        raise BpError("INPUT_USAGE", "cannot find the Hugging Face tokenizer this GGUF was made from",
                      hint="pass --tokenizer MODEL_DIR (the model the GGUF was converted from)")
    return Subject("gguf", m.path(f["path"]), tok, manifest=m, quant=f.get("quant"))


def chain_tokenizer(m: Manifest) -> Path | str | None:
    """The model directory up a manifest chain (gguf <- model <- adapter <- dataset)."""
    model = find_in_chain(m, "model")
    if model is not None and model.get("model_dir") and model.path(model["model_dir"]).is_dir():
        return model.path(model["model_dir"])
    adapter = find_in_chain(m, "adapter")
    if adapter is not None and adapter.get("base_model"):
        return ref_near(adapter["base_model"], adapter.base_dir)
    dataset = find_in_chain(m, "dataset")
    if dataset is not None and dataset.get("model"):
        return dataset["model"]
    return None


def subject_from_path(spec: str, base: str | None, tokenizer: str | None) -> Subject:
    p = Path(spec).expanduser()
    if p.is_file() and p.suffix.lower() == ".gguf":
        if tokenizer is None:
            raise BpError("INPUT_USAGE", f"{spec} is a bare GGUF: bp-eval needs the tokenizer it was made from",
                          hint="pass --tokenizer MODEL_DIR, or give bp-gguf's manifest instead of the file")
        return Subject("gguf", p.resolve(), tokenizer)
    if p.is_dir() and (p / "adapter_config.json").is_file():
        cfg = read_json(p / "adapter_config.json")
        b = base or ref_near(cfg.get("base_model_name_or_path"), p)
        if not b:
            raise BpError("INPUT_USAGE", f"{spec}: adapter_config.json names no base model", hint="pass --base MODEL")
        return Subject("adapter", p.resolve(), tokenizer or adapter_tokenizer(p, b), base=b)
    if p.exists() and not p.is_dir():
        raise BpError("INPUT_INVALID", f"{spec} is neither a model directory, an adapter directory nor a .gguf file")
    return Subject("model", str(p.resolve()) if p.exists() else spec, tokenizer or (str(p.resolve()) if p.exists()
                                                                                    else spec))


def adapter_tokenizer(adapter_dir: Path, base: str) -> Path | str:
    """bp-train saves the tokenizer (and chat template) beside the adapter; else the base's."""
    return adapter_dir if (Path(adapter_dir) / "tokenizer_config.json").is_file() else base


def read_json(path: Path) -> dict:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise BpError("INPUT_NOT_FOUND", f"{path} does not exist") from None
    except (OSError, ValueError) as exc:
        raise BpError("INPUT_INVALID", f"{path} is not valid JSON: {exc}") from None


def files_digest(ref: Path | str) -> str:
    """sha256 (16 hex) over a model's weights and config files, or of one file; a hub id as itself."""
    from bp_common.io import sha256_bytes, sha256_file
    p = Path(ref)
    if p.is_file():
        return sha256_file(p)[:16]
    if not p.is_dir():
        return f"id:{ref}"
    parts = []
    for f in sorted(p.iterdir()):
        if f.is_file() and (f.suffix in (".safetensors", ".json", ".jinja", ".gguf", ".bin")):
            parts.append(f"{f.name}:{sha256_file(f)}")
    return sha256_bytes("\n".join(parts))[:16]
