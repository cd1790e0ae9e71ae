"""What bp-ollama needs from a GGUF file's metadata: architecture, kind, context length, chat template,
special tokens and whether the runtime adds BOS. Read with gguf-py's GGUFReader (memory-mapped)."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from bp_common.errors import BpError

# llama.cpp token types (gguf.TokenType): CONTROL and USER_DEFINED are the tokens a chat template uses.
_CONTROL, _USER_DEFINED = 3, 4


@dataclass
class GgufMeta:
    path: Path
    size: int
    arch: str
    kind: str                           # "model" or "adapter" (general.type)
    name: str | None = None
    context_length: int | None = None
    chat_template: str | None = None
    tokenizer_model: str | None = None  # "llama" (SentencePiece), "gpt2" (BPE), ...
    add_bos: bool = False               # the runtime's tokenizer adds BOS by itself
    special_ids: dict[str, int] = field(default_factory=dict)   # bos, eos, eot, eom, unk, pad
    token_texts: dict[int, str] = field(default_factory=dict)   # control/user-defined tokens and specials
    license: str | None = None
    file_type: int | None = None
    adapter_type: str | None = None
    lora_alpha: float | None = None

    def text_of(self, token_id: int) -> str | None:
        """The text of a token id, or None when the id is not in the vocabulary."""
        if token_id in self.token_texts:
            return self.token_texts[token_id]
        text = _token_text(self.path, token_id)
        if text is not None:
            self.token_texts[token_id] = text
        return text

    def special_text(self, which: str) -> str | None:
        tid = self.special_ids.get(which)
        return self.text_of(tid) if tid is not None else None

    def specials(self) -> dict[str, str]:
        """bos_token, eos_token, unk_token, pad_token texts, as apply_chat_template passes them."""
        out = {}
        for which in ("bos", "eos", "unk", "pad"):
            text = self.special_text(which)
            if text is not None:
                out[f"{which}_token"] = text
        return out

    def control_tokens(self) -> tuple[str, ...]:
        return tuple(self.token_texts.values())


def _scalar(reader, key: str):
    f = reader.get_field(key)
    if f is None:
        return None
    value = f.contents()
    return value


def read_gguf_meta(path: Path | str) -> GgufMeta:
    """Read a GGUF file's metadata. Raises INPUT_NOT_FOUND / INPUT_INVALID with the reason."""
    import numpy as np
    from gguf import GGUFReader

    path = Path(path)
    if not path.is_file():
        raise BpError("INPUT_NOT_FOUND", f"{path} does not exist")
    try:
        reader = GGUFReader(str(path))
    except (ValueError, OSError, IndexError) as exc:
        raise BpError("INPUT_INVALID", f"{path} is not a readable GGUF file: {exc}") from None
    arch = _scalar(reader, "general.architecture") or ""
    kind = _scalar(reader, "general.type") or "model"
    tok_model = _scalar(reader, "tokenizer.ggml.model")
    add_bos = _scalar(reader, "tokenizer.ggml.add_bos_token")
    if add_bos is None:  # llama.cpp's default: SentencePiece vocabularies add BOS, BPE ones do not
        add_bos = tok_model == "llama"
    template = _scalar(reader, "tokenizer.chat_template")
    special_ids = {}
    for which in ("bos", "eos", "eot", "eom", "unk", "pad"):
        v = _scalar(reader, f"tokenizer.ggml.{which}_token_id")
        if v is not None:
            special_ids[which] = int(v)
    texts: dict[int, str] = {}
    tokens = reader.get_field("tokenizer.ggml.tokens")
    types = reader.get_field("tokenizer.ggml.token_type")
    if tokens is not None:
        wanted = set(special_ids.values())
        if types is not None:
            type_arr = np.asarray([types.parts[i][0] for i in types.data])
            wanted |= set(np.nonzero((type_arr == _CONTROL) | (type_arr == _USER_DEFINED))[0].tolist())
        n = len(tokens.data)
        for tid in sorted(wanted):
            if 0 <= tid < n:
                texts[tid] = bytes(tokens.parts[tokens.data[tid]]).decode("utf-8", errors="replace")
    ctx = _scalar(reader, f"{arch}.context_length") if arch else None
    alpha = _scalar(reader, "adapter.lora.alpha")
    return GgufMeta(path=path.resolve(), size=path.stat().st_size, arch=arch, kind=str(kind),
                    name=_scalar(reader, "general.name"),
                    context_length=int(ctx) if ctx is not None else None,
                    chat_template=template or None, tokenizer_model=tok_model, add_bos=bool(add_bos),
                    special_ids=special_ids, token_texts=texts, license=_license(reader),
                    file_type=_int_or_none(_scalar(reader, "general.file_type")),
                    adapter_type=_scalar(reader, "adapter.type"),
                    lora_alpha=float(alpha) if alpha is not None else None)


def _license(reader) -> str | None:
    value = _scalar(reader, "general.license")
    if isinstance(value, list):
        value = ", ".join(str(v) for v in value)
    return value or None


def _int_or_none(v):
    return int(v) if v is not None else None


def _token_text(path: Path, token_id: int) -> str | None:
    from gguf import GGUFReader
    tokens = GGUFReader(str(path)).get_field("tokenizer.ggml.tokens")
    if tokens is None or not 0 <= token_id < len(tokens.data):
        return None
    return bytes(tokens.parts[tokens.data[token_id]]).decode("utf-8", errors="replace")


def is_gguf(path: Path | str) -> bool:
    """True when the file starts with the GGUF magic."""
    try:
        with open(path, "rb") as fh:
            return fh.read(4) == b"GGUF"
    except OSError:
        return False
