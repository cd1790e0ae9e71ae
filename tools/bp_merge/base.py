"""The base model on disk: its config, its weight files and the table of every tensor in them.

Nothing is loaded here: tensors are read later, block by block, by the merge.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from bp_common.errors import BpError
from bp_common.models import read_config, resolve_model

from bp_common.weights import DTYPES, QUANTIZED_DTYPES, PickleReader, SafetensorsReader, TensorInfo, weight_files

# Names of the input-embedding tensor across common architectures, and of the output head.
EMBED_SUFFIXES = ("embed_tokens.weight", "wte.weight", "word_embeddings.weight", "tok_embeddings.weight",
                  "embed_in.weight")
HEAD_NAME = "lm_head.weight"


@dataclass
class BaseModel:
    """A resolved base model directory and where each of its tensors lives."""

    ref: str  # what the user or the manifest named (path or hub id)
    path: Path
    config: dict
    files: list[Path]
    tensors: dict[str, TensorInfo] = field(default_factory=dict)
    file_of: dict[str, Path] = field(default_factory=dict)
    pickle: bool = False
    _readers: dict = field(default_factory=dict)

    def reader(self, name: str):
        """The open reader for the file holding tensor `name`."""
        path = self.file_of[name]
        if path not in self._readers:
            self._readers[path] = PickleReader(path) if self.pickle else SafetensorsReader(path)
        return self._readers[path]

    def close(self) -> None:
        for r in self._readers.values():
            r.close()
        self._readers.clear()

    @property
    def embed_name(self) -> str | None:
        """The input-embedding tensor (the shortest name with a known suffix), or None."""
        found = sorted((n for n in self.tensors if n.endswith(EMBED_SUFFIXES)), key=len)
        return found[0] if found else None

    @property
    def tied(self) -> bool:
        """True when the output head shares the input embedding's weights."""
        flag = self.config.get("tie_word_embeddings")
        if flag is None:
            text = self.config.get("text_config") or {}
            flag = text.get("tie_word_embeddings")
        if flag is None:  # no explicit setting: a checkpoint without a head ties it to the embedding
            flag = HEAD_NAME not in self.tensors
        return bool(flag) and self.embed_name is not None

    @property
    def size_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.files)


def open_base(ref: str, allow_pickle: bool = False) -> BaseModel:
    """Resolve `ref` (local dir or hub id) and read the header of every weight file.

    Raises INPUT_NOT_FOUND (no such model), INPUT_PICKLE_REFUSED (pickle only, no
    --allow-pickle), EXPORT_BASE_UNSUPPORTED (stored quantized) and EXPORT_WEIGHTS_INVALID
    (a missing, truncated or corrupt shard).
    """
    path = resolve_model(ref, allow_pickle=allow_pickle)
    config = read_config(path)
    quant = config.get("quantization_config")
    if quant:
        method = quant.get("quant_method") or quant.get("load_in_4bit") and "bitsandbytes" or "unknown"
        raise BpError("EXPORT_BASE_UNSUPPORTED",
                      f"{ref} is stored quantized ({method}); merging into rounded weights loses the adapter's "
                      "precision", hint="pass the full-precision base the adapter was trained from (--base)")
    files, pickle = weight_files(path)
    base = BaseModel(ref=str(ref), path=path, config=config, files=files, pickle=pickle)
    for f in files:
        reader = PickleReader(f) if pickle else SafetensorsReader(f)
        for name, info in reader.tensors.items():
            if info.dtype in QUANTIZED_DTYPES or info.dtype not in DTYPES:
                raise BpError("EXPORT_BASE_UNSUPPORTED", f"{ref}: tensor {name} is stored as {info.dtype}",
                              hint="pass the full-precision base the adapter was trained from (--base)")
            base.tensors[name] = info
            base.file_of[name] = f
        if pickle:
            base._readers[f] = reader
        else:
            reader.close()
    if not base.tensors:
        raise BpError("EXPORT_WEIGHTS_INVALID", f"{ref}: the weight files hold no tensors")
    return base
