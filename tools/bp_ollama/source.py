"""What bp-ollama registers: a GGUF file, found from a gguf manifest, a directory or a plain path,
together with the manifest chain behind it (training sequence length, the Hugging Face model
directories that hold the chat template and generation_config.json)."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from bp_common import manifest as mf
from bp_common.errors import BpError

from .ggufmeta import GgufMeta, is_gguf, read_gguf_meta

TOOL = "bp-ollama"


@dataclass
class Source:
    gguf: Path | None = None                 # the GGUF to register: a model, or a LoRA adapter
    meta: GgufMeta | None = None
    manifest: mf.Manifest | None = None      # the manifest it came from (gguf or ollama)
    entry: dict | None = None                # the gguf manifest's files[] entry
    chain: list[mf.Manifest] = field(default_factory=list)
    modelfile: Path | None = None            # an ollama manifest's Modelfile (from `bp-ollama modelfile -o`)
    modelfile_text: str | None = None        # or its text (from `bp-ollama modelfile` without -o)

    @property
    def is_adapter(self) -> bool:
        return self.meta is not None and self.meta.kind == "adapter"

    def inputs(self) -> list[dict]:
        return [self.manifest.ref()] if self.manifest is not None else []

    def describe(self) -> str:
        if self.modelfile is not None:
            return str(self.modelfile)
        if self.modelfile_text is not None:
            return "the Modelfile text of an ollama manifest"
        return str(self.gguf) if self.gguf else "(none)"


def resolve_source(arg: str | None, quant: str | None = None, optional: bool = False) -> Source | None:
    """Read the input: `-`/stdin, a gguf or ollama manifest (file or directory), a .gguf file, or a
    directory of .gguf files. With optional, an absent or empty input gives None."""
    if arg is None and optional:
        if not mf.stdin_has_data():
            return None
        import sys
        data = sys.stdin.buffer.read()
        if not data.strip():
            return None
        return _from_manifest(mf.check_kind(mf.parse(data, "<stdin>"), ("gguf", "ollama"), TOOL), quant)
    inp = mf.read_input(arg, ("gguf", "ollama"), TOOL)
    if inp.is_manifest:
        return _from_manifest(inp.manifest, quant)
    return from_path(Path(inp.path), quant)


def from_path(path: Path, quant: str | None = None) -> Source:
    """A Source for a plain .gguf file or a directory holding .gguf files."""
    if not path.exists():
        raise BpError("INPUT_NOT_FOUND", f"{path} does not exist")
    if path.is_dir():
        found = sorted(path.glob("*.gguf"))
        if quant:
            found = [f for f in found if quant.lower() in f.name.lower()]
        if len(found) != 1:
            names = ", ".join(f.name for f in sorted(path.glob("*.gguf"))) or "none"
            raise BpError("INPUT_INVALID", f"{path} holds {len(found)} matching .gguf files ({names}); "
                          "name one file, or pick one with -q")
        path = found[0]
    if not is_gguf(path):
        raise BpError("INPUT_INVALID", f"{path} is not a GGUF file (no GGUF magic)",
                      hint="pass a .gguf file or bp-gguf's manifest")
    meta = read_gguf_meta(path)
    return Source(gguf=meta.path, meta=meta)


def _verify_failed(entry: dict) -> bool:
    v = entry.get("verify")
    if v is False:
        return True
    return isinstance(v, dict) and (v.get("ok") is False or v.get("passed") is False)


def pick_entry(m: mf.Manifest, quant: str | None) -> dict:
    """The files[] entry to register: the one of -q QUANT, else the first verified model file."""
    files = [f for f in (m.get("files") or []) if isinstance(f, dict) and f.get("path")]
    if not files:
        raise BpError("INPUT_MANIFEST_INVALID", "the gguf manifest lists no files")
    if quant:
        chosen = [f for f in files if str(f.get("quant", "")).lower() == quant.lower()]
        if not chosen:
            have = ", ".join(str(f.get("quant")) for f in files)
            raise BpError("INPUT_INVALID", f"the gguf manifest has no {quant} file (it has: {have})")
        return chosen[0]
    ok = [f for f in files if not _verify_failed(f)] or files
    models = [f for f in ok if f.get("type", "model") == "model"]
    return (models or ok)[0]


def _from_manifest(m: mf.Manifest, quant: str | None) -> Source:
    if m.kind == "ollama":
        rel = m.get("modelfile")
        if not rel:
            if isinstance(m.get("text"), str):
                return Source(manifest=m, chain=mf.chain(m), modelfile_text=m["text"])
            raise BpError("INPUT_MANIFEST_INVALID", "the ollama manifest holds no Modelfile",
                          hint="write one with bp-ollama modelfile -o DIR")
        path = m.path(rel)
        if not path.is_file():
            raise BpError("INPUT_NOT_FOUND", f"the Modelfile {path} named by the ollama manifest does not exist")
        return Source(manifest=m, chain=mf.chain(m), modelfile=path)
    entry = pick_entry(m, quant)
    path = m.path(entry["path"])
    if not path.is_file():
        raise BpError("INPUT_NOT_FOUND", f"{path} (named by the gguf manifest) does not exist")
    meta = read_gguf_meta(path)
    if entry.get("type") == "adapter" and meta.kind != "adapter":
        meta.kind = "adapter"
    return Source(gguf=meta.path, meta=meta, manifest=m, entry=entry, chain=mf.chain(m))


# -- the chain behind a GGUF -------------------------------------------------------------------

def training_seq_len(chain: list[mf.Manifest]) -> tuple[int | None, str | None]:
    """The sequence length the model was trained at (hyperparameters.seq_len), nearest first."""
    for m in chain:
        hp = m.get("hyperparameters")
        if isinstance(hp, dict) and isinstance(hp.get("seq_len"), int) and hp["seq_len"] > 0:
            return hp["seq_len"], f"{m.kind} manifest {m.get('root')}"
    return None, None


def model_dirs(chain: list[mf.Manifest]) -> list[Path]:
    """Local Hugging Face directories in the chain: merged model, adapter, base, dataset's model."""
    dirs: list[Path] = []

    def add(p: Path | None):
        if p is not None and p.is_dir() and p.resolve() not in dirs:
            dirs.append(p.resolve())

    for m in chain:
        for key in ("model_dir", "adapter_dir"):
            if isinstance(m.get(key), str):
                try:
                    add(m.path(m[key]))
                except BpError:
                    pass
        for key in ("base_model", "model", "base"):
            value = m.get(key)
            if isinstance(value, str) and value and "\n" not in value:
                p = Path(value).expanduser()
                if p.is_absolute() or p.exists():
                    add(p)
    return dirs


def read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def hf_chat_template(model_dir: Path) -> str | None:
    """A model directory's chat template: chat_template.jinja, else tokenizer_config.json."""
    jinja = model_dir / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8") or None
    t = read_json(model_dir / "tokenizer_config.json").get("chat_template")
    if isinstance(t, list):  # named templates: the default one
        named = {x.get("name"): x.get("template") for x in t if isinstance(x, dict)}
        t = named.get("default") or next(iter(named.values()), None)
    return t if isinstance(t, str) and t else None


def hf_special_tokens(model_dir: Path) -> dict[str, str]:
    """bos_token / eos_token / unk_token / pad_token texts from tokenizer_config.json."""
    cfg = read_json(model_dir / "tokenizer_config.json")
    out = {}
    for key in ("bos_token", "eos_token", "unk_token", "pad_token"):
        v = cfg.get(key)
        if isinstance(v, dict):
            v = v.get("content")
        if isinstance(v, str) and v:
            out[key] = v
    return out


def hf_eos_ids(model_dir: Path) -> list[int]:
    """Every EOS id in generation_config.json (an int or a list)."""
    v = read_json(model_dir / "generation_config.json").get("eos_token_id")
    ids = v if isinstance(v, list) else [v]
    return [i for i in ids if isinstance(i, int) and i >= 0]


def hf_token_texts(model_dir: Path, ids: list[int]) -> dict[int, str]:
    """Texts of token ids from tokenizer.json (added tokens first, then the vocabulary)."""
    tj = read_json(model_dir / "tokenizer.json")
    out: dict[int, str] = {}
    for t in tj.get("added_tokens") or []:
        if isinstance(t, dict) and t.get("id") in ids:
            out[t["id"]] = t.get("content")
    missing = set(ids) - set(out)
    vocab = (tj.get("model") or {}).get("vocab")
    if missing and isinstance(vocab, dict):
        for text, tid in vocab.items():
            if tid in missing:
                out[tid] = text
    return out


@dataclass
class Inputs:
    """Everything a Modelfile is derived from."""
    source: Source | None                    # the GGUF to read (None: the user's Modelfile names it)
    user: list = field(default_factory=list)  # the user's Modelfile commands
    user_dir: Path | None = None             # where the user's relative paths start
    origin: Source | None = None             # what the output manifest names as its input


def read_inputs(arg: str | None, quant: str | None, modelfile: str | None) -> Inputs:
    """The input (manifest, GGUF, or the output of `bp-ollama modelfile`) and the user's --modelfile."""
    from .modelfile import ModelfileError, parse_modelfile, read_modelfile
    user, user_dir = [], None
    if modelfile:
        user, user_dir = read_modelfile(modelfile), Path(modelfile).resolve().parent
    source = resolve_source(arg, quant, optional=bool(modelfile))
    if source is not None and (source.modelfile is not None or source.modelfile_text is not None):
        if modelfile:  # an ollama manifest: its Modelfile is the user's Modelfile
            raise BpError("CONFIG_INVALID_SETTING", "the input is an ollama manifest with its own Modelfile; "
                          "pass either it or --modelfile, not both")
        if source.modelfile is not None:
            return Inputs(None, read_modelfile(source.modelfile), source.modelfile.parent, source)
        try:
            commands = parse_modelfile(source.modelfile_text)
        except ModelfileError as exc:
            raise BpError("INPUT_MANIFEST_INVALID", f"the ollama manifest's Modelfile text: {exc}") from None
        return Inputs(None, commands, Path.cwd(), source)
    return Inputs(source, user, user_dir, source)
