"""What goes into the Modelfile: FROM/ADAPTER, TEMPLATE, stops, num_ctx, temperature, SYSTEM, LICENSE.

Precedence for each setting: a flag on the command line, then the user's `--modelfile`, then what
bp-ollama derives from the model (its chat template, its EOS tokens, the training sequence length).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from bp_common.errors import BpError

from . import modelfile as mfile
from .ggufmeta import is_gguf, read_gguf_meta
from .gotemplate import Translation, Untranslatable, translate
from .source import (Source, hf_chat_template, hf_eos_ids, hf_special_tokens, hf_token_texts, model_dirs,
                     training_seq_len)

# num_ctx when the chain has no training sequence length: the model's context length, capped here
# so a 128k-context model does not reserve a 128k KV cache on a small GPU.
DEFAULT_NUM_CTX_CAP = 4096
DEFAULT_TEMPERATURE = 0.7


@dataclass
class Options:
    """The command-line settings that shape a Modelfile (None = not given)."""
    system: str | None = None
    num_ctx: int | None = None
    temperature: float | None = None
    stops: list[str] = field(default_factory=list)
    template_file: Path | None = None
    license_file: Path | None = None
    base: str | None = None


@dataclass
class Derived:
    commands: list[mfile.Command]
    template_source: str | None = None        # where TEMPLATE came from
    num_ctx_source: str | None = None
    translation: Translation | None = None
    warnings: list[str] = field(default_factory=list)

    def value(self, name: str) -> str | None:
        return mfile.get(self.commands, name)

    def parameters(self) -> dict:
        _req, _f, _a = mfile.create_request([c for c in self.commands if c[0] not in ("model", "adapter")],
                                            None)
        return _req.get("parameters", {})


def find_chat_template(source: Source) -> tuple[str | None, str | None]:
    """The model's Jinja chat template and where it was found: the GGUF, else a model dir in the chain."""
    if source.meta is not None and source.meta.chat_template:
        return source.meta.chat_template, f"GGUF {source.gguf.name}"
    for d in model_dirs(source.chain):
        t = hf_chat_template(d)
        if t:
            return t, f"model directory {d}"
    return None, None


def translate_for(source: Source, jinja: str) -> Translation:
    """Translate with the special tokens and BOS behaviour of the runtime that will load the GGUF."""
    meta = source.meta
    specials: dict[str, str] = {}
    for d in model_dirs(source.chain):
        specials = {**hf_special_tokens(d), **specials}
    tokens: tuple[str, ...] = ()
    add_bos = False
    if meta is not None and meta.token_texts:
        specials.update(meta.specials())
        tokens = meta.control_tokens()
        add_bos = meta.add_bos
    return translate(jinja, specials, add_bos=add_bos, tokens=tokens)


def stop_strings(source: Source, end_of_turn: str | None) -> list[str]:
    """The template's end-of-turn text plus the text of every EOS id (generation_config, GGUF)."""
    stops: list[str] = []

    def add(text):
        if text and text not in stops and text.strip():
            stops.append(text)

    add(end_of_turn)
    meta = source.meta
    dirs = model_dirs(source.chain)
    ids: list[int] = []
    for d in dirs:
        ids += [i for i in hf_eos_ids(d) if i not in ids]
    if meta is not None:
        ids += [meta.special_ids[k] for k in ("eos", "eot", "eom") if k in meta.special_ids
                and meta.special_ids[k] not in ids]
    for tid in ids:
        text = meta.text_of(tid) if meta is not None and meta.token_texts else None
        if text is None:
            for d in dirs:
                text = hf_token_texts(d, [tid]).get(tid)
                if text:
                    break
        add(text)
    return stops


def default_num_ctx(source: Source) -> tuple[int, str]:
    seq, where = training_seq_len(source.chain)
    if seq:
        return seq, f"training sequence length ({where})"
    ctx = source.meta.context_length if source.meta is not None else None
    if ctx:
        if ctx > DEFAULT_NUM_CTX_CAP:
            return DEFAULT_NUM_CTX_CAP, f"the model's context length {ctx}, capped at {DEFAULT_NUM_CTX_CAP}"
        return ctx, "the model's context length"
    return DEFAULT_NUM_CTX_CAP, "default (no training length or context length known)"


def _read_text_file(path: Path, what: str) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise BpError("INPUT_NOT_FOUND", f"{what} {path} does not exist") from None
    except UnicodeDecodeError:
        raise BpError("INPUT_INVALID", f"{what} {path} is not UTF-8 text") from None


def derive(source: Source | None, opts: Options, user: list[mfile.Command] | None = None,
           user_dir: Path | None = None) -> Derived:
    """The Modelfile commands for a source, flags and an optional user Modelfile (see the module doc)."""
    user = list(user or [])
    user_dir = user_dir or Path.cwd()
    warnings: list[str] = []
    if source is None:
        source = _source_named_by(user, user_dir)
    commands = _from_lines(source, opts, user, user_dir, warnings)
    template, template_source, translation = _template(source, opts, user, warnings)
    if template is not None:
        commands.append(("template", template))
    params, num_ctx_source = _parameters(source, opts, user, translation)
    commands += params
    commands += _texts(source, opts, user)
    for name, args in commands:  # validate every value before anything is written or sent
        mfile.check_text(args, "FROM" if name == "model" else name.upper(), multiline=name in mfile.MULTILINE)
        if name in mfile.PARAMETER_TYPES:
            mfile.parameter_value(name, args)
    return Derived(commands, template_source, num_ctx_source, translation, warnings)


def _source_named_by(user: list[mfile.Command], user_dir: Path) -> Source:
    """A user Modelfile alone (`ollama create -f` style): its FROM may be a GGUF bp-ollama can read."""
    user_from = mfile.get(user, "model")
    if user_from is None:
        raise BpError("INPUT_EMPTY", "no input: pass a gguf manifest or file, pipe one, or --modelfile FILE",
                      hint="bp-gguf ... | bp-ollama create NAME")
    p = mfile.local_path(user_from, user_dir)
    if p is not None and p.is_file() and is_gguf(p):
        meta = read_gguf_meta(p)
        return Source(gguf=meta.path, meta=meta)
    return Source()


def _from_lines(source: Source, opts: Options, user: list[mfile.Command], user_dir: Path,
                warnings: list[str]) -> list[mfile.Command]:
    """FROM (the input GGUF, a base model for an adapter, or the user's FROM) and ADAPTER."""
    user_from, user_adapter = mfile.get(user, "model"), mfile.get(user, "adapter")
    if source.is_adapter:
        base = opts.base or user_from or _manifest_base(source)
        if not base:
            raise BpError("CONFIG_INVALID_SETTING",
                          f"{source.gguf.name} is a LoRA adapter: name the Ollama model it applies to with --base NAME",
                          hint="e.g. --base llama3.2 (the base must be the model the adapter was trained on)")
        if user_adapter is not None:
            warnings.append("the Modelfile's ADAPTER is replaced by the input adapter")
        return [("model", _absolute_if_local(base, user_dir)), ("adapter", str(source.gguf))]
    if source.gguf is not None:
        if user_from is not None and mfile.local_path(user_from, user_dir).resolve() != source.gguf:
            warnings.append(f"the Modelfile's FROM {user_from} is replaced by the input {source.gguf}")
        return [("model", str(source.gguf))]
    lines = [("model", _absolute_if_local(user_from, user_dir))]
    if user_adapter is not None:
        lines.append(("adapter", _absolute_if_local(user_adapter, user_dir)))
    return lines


def _template(source: Source, opts: Options, user: list[mfile.Command],
              warnings: list[str]) -> tuple[str | None, str | None, Translation | None]:
    """TEMPLATE: --template FILE, the user's TEMPLATE, or the model's chat template translated.

    The translation is attempted whenever there is a chat template, for its end-of-turn stop.
    """
    jinja, where = find_chat_template(source) if source.gguf is not None else (None, None)
    translation, reason = None, None
    if jinja:
        try:
            translation = translate_for(source, jinja)
        except Untranslatable as exc:
            reason = str(exc)
    if opts.template_file is not None:
        return _read_text_file(opts.template_file, "--template"), f"--template {opts.template_file}", translation
    if mfile.get(user, "template") is not None:
        return mfile.get(user, "template"), "--modelfile", translation
    if translation is not None:
        warnings += translation.warnings
        return translation.template, f"translated from the chat template in {where}", translation
    if jinja:
        raise BpError("OLLAMA_TEMPLATE_UNSUPPORTED", f"the chat template in {where} cannot be translated: {reason}",
                      hint="pass --template FILE with a Go template (see docs/export.md)",
                      details={"reason": reason})
    if source.is_adapter:
        warnings.append("no chat template found for the adapter; the base model's TEMPLATE is kept")
    elif source.gguf is not None:
        chain = " or the model directories of its manifest chain" if source.chain else ""
        raise BpError("CONFIG_NO_CHAT_TEMPLATE", f"no chat template in {source.gguf.name}{chain}",
                      hint="use an instruct model, or pass --template FILE with a Go template")
    return None, None, None


def _parameters(source: Source, opts: Options, user: list[mfile.Command],
                translation: Translation | None) -> tuple[list[mfile.Command], str | None]:
    """PARAMETER stop, num_ctx, temperature, then the user's other parameters in their order."""
    user_params = [(n, a) for n, a in user if n in mfile.PARAMETER_TYPES or n in mfile.DEPRECATED_PARAMETERS]
    derived_stops = stop_strings(source, translation.end_of_turn if translation else None) \
        if source.gguf is not None else []
    stops: list[str] = []
    for s in ([a for n, a in user_params if n == "stop"] or derived_stops) + list(opts.stops):
        if s not in stops:
            stops.append(s)
    params: list[mfile.Command] = [("stop", s) for s in stops]
    num_ctx_source = None
    if opts.num_ctx is not None:
        params.append(("num_ctx", str(opts.num_ctx)))
        num_ctx_source = "--num-ctx"
    elif mfile.get(user, "num_ctx") is not None:
        params.append(("num_ctx", mfile.get(user, "num_ctx")))
        num_ctx_source = "--modelfile"
    elif source.gguf is not None:
        n, num_ctx_source = default_num_ctx(source)
        params.append(("num_ctx", str(n)))
    if opts.temperature is not None:
        params.append(("temperature", _number(opts.temperature)))
    elif mfile.get(user, "temperature") is not None:
        params.append(("temperature", mfile.get(user, "temperature")))
    elif source.gguf is not None:
        params.append(("temperature", _number(DEFAULT_TEMPERATURE)))
    params += [(n, a) for n, a in user_params if n not in ("stop", "num_ctx", "temperature")]
    return params, num_ctx_source


def _texts(source: Source, opts: Options, user: list[mfile.Command]) -> list[mfile.Command]:
    """SYSTEM, LICENSE, MESSAGE and the user's RENDERER / PARSER / REQUIRES."""
    out: list[mfile.Command] = []
    system = opts.system if opts.system is not None else mfile.get(user, "system")
    if system:
        out.append(("system", system))
    if opts.license_file is not None:
        out.append(("license", _read_text_file(opts.license_file, "--license")))
    elif any(n == "license" for n, _ in user):
        out += [(n, a) for n, a in user if n == "license"]
    elif source.meta is not None and source.meta.license:
        out.append(("license", source.meta.license))
    out += [(n, a) for n, a in user if n in ("message", "renderer", "parser", "requires")]
    return out


def _number(v: float) -> str:
    return repr(float(v)).rstrip("0").rstrip(".") if "e" not in repr(float(v)) else repr(float(v))


def _manifest_base(source: Source) -> str | None:
    """An adapter manifest's base, when it is a GGUF file Ollama can take as FROM."""
    base = source.manifest.get("base") if source.manifest is not None else None
    if isinstance(base, str):
        p = Path(base)
        if not p.is_absolute() and source.manifest is not None and source.manifest.base_dir is not None:
            p = source.manifest.base_dir / p
        if p.is_file() and is_gguf(p):
            return str(p.resolve())
    return None


def _absolute_if_local(value: str, base_dir: Path) -> str:
    """A FROM/ADAPTER value that names a local file, made absolute; a model name unchanged."""
    p = mfile.local_path(value, base_dir)
    return str(p.resolve()) if p.exists() else value
