"""Hugging Face safetensors -> one GGUF file, streamed.

Every tensor's name, shape and type is known before a byte of data is read, so the file is laid
out as header, metadata and tensor table first, then each tensor's data in order, read, transformed
and quantized a block of rows at a time: peak memory is about one block, never the model.
Types written here in numpy: f32, f16, bf16, q8_0, q4_0, q4_1, q5_0, q5_1 (rows split across
threads); k-quants are made from a 16-bit file by llama.cpp's own quantizer (quantize.py).
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bp_common.errors import BpError
from bp_common.weights import QUANTIZED_DTYPES, open_reader, weight_files

from .families import (SKIPPED_SUFFIXES, Family, Hparams, model_arch, permute_rows, qk_heads, tensor_name,
                       write_hparams)
from .vocab import Vocab

NUMPY_TYPES = ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1")
BLOCK_BYTES = 64 << 20          # float32 bytes of rows handled at once
PARALLEL_MIN = 1 << 20          # elements below which threads cost more than they give


def ggml_type(quant: str):
    import gguf
    return gguf.GGMLQuantizationType[quant.upper()]


def file_type(quant: str) -> int:
    import gguf
    return int(gguf.LlamaFileType.ALL_F32 if quant == "f32" else gguf.LlamaFileType[f"MOSTLY_{quant.upper()}"])


@dataclass
class Planned:
    name: str                   # GGUF tensor name
    shape: tuple[int, ...]      # numpy order (rows, cols)
    qtype: object               # gguf.GGMLQuantizationType
    hf_name: str | None = None  # None for computed tensors (array holds the data)
    array: np.ndarray | None = None
    permute_heads: int | None = None
    norm_offset: bool = False
    fallback: bool = False      # written in another type than asked because of its row length

    @property
    def nbytes(self) -> int:
        from gguf.quants import quant_shape_to_byte_shape
        return int(np.prod(quant_shape_to_byte_shape(self.shape, self.qtype), dtype=np.int64))

    @property
    def numel(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))


class Source:
    """A model directory's weights: which file holds each tensor, opened lazily."""

    def __init__(self, model_dir: Path, allow_pickle: bool = False):
        self.dir = model_dir
        self.files, self.pickle = weight_files(model_dir)
        if self.pickle and not allow_pickle:
            raise BpError("INPUT_PICKLE_REFUSED", f"{model_dir} holds only pickle weights",
                          hint="convert them to safetensors, or pass --allow-pickle for files you trust")
        self.infos = {}
        self.file_of = {}
        self._readers = {}
        for f in self.files:
            r = open_reader(f, self.pickle)
            for name, info in r.tensors.items():
                if info.dtype in QUANTIZED_DTYPES:
                    raise BpError("EXPORT_BASE_UNSUPPORTED", f"{model_dir}: tensor {name} is stored as {info.dtype}",
                                  hint="export the full-precision (16/32-bit) model")
                self.infos[name] = info
                self.file_of[name] = f
            if self.pickle:
                self._readers[f] = r
            else:
                r.close()
        if not self.infos:
            raise BpError("EXPORT_WEIGHTS_INVALID", f"{model_dir}: the weight files hold no tensors")

    def rows(self, name: str, r0: int = 0, r1: int | None = None) -> np.ndarray:
        f = self.file_of[name]
        if f not in self._readers:
            self._readers[f] = open_reader(f, self.pickle)
        return self._readers[f].rows_f32(name, r0, r1)

    @property
    def size_bytes(self) -> int:
        return sum(f.stat().st_size for f in self.files)

    def close(self) -> None:
        for r in self._readers.values():
            r.close()
        self._readers.clear()


def embedding_rows(src: Source) -> int:
    for name, info in src.infos.items():
        if name.endswith("embed_tokens.weight"):
            return int(info.shape[0])
    raise BpError("EXPORT_WEIGHTS_INVALID", f"{src.dir}: no embed_tokens tensor")


def choose_type(quant: str, shape: tuple[int, ...]):
    """(GGML type, fell back?) for a tensor: 1-D stay f32; rows not a multiple of the block size
    fall back to f16 (f32 when even that does not fit)."""
    import gguf
    from gguf.constants import GGML_QUANT_SIZES
    if len(shape) < 2 or quant == "f32":
        return gguf.GGMLQuantizationType.F32, False
    want = ggml_type(quant)
    block = GGML_QUANT_SIZES[want][0]
    if shape[-1] % block == 0:
        return want, False
    return gguf.GGMLQuantizationType.F16, True


def plan_tensors(src: Source, family: Family, hp: Hparams, quant: str, extra: list[tuple[str, np.ndarray]]):
    """Every tensor of the output, in order, with its GGUF name, shape and type. Raises before any
    work when a tensor has no GGUF name (the checkpoint is not the architecture it claims)."""
    import gguf
    name_map = gguf.get_tensor_name_map(model_arch(family), hp.layers)
    tied = bool(hp.config.get("tie_word_embeddings", family.arch == "gemma2"))
    plan: list[Planned] = []
    unknown = []
    for hf_name, info in src.infos.items():
        if hf_name.endswith(SKIPPED_SUFFIXES):
            continue
        if hf_name == "lm_head.weight" and (tied or family.arch == "gemma2"):
            continue
        name = tensor_name(name_map, hf_name)
        if name is None:
            unknown.append(hf_name)
            continue
        shape = tuple(int(d) for d in info.shape)
        qtype, fell = choose_type(quant, shape)
        plan.append(Planned(name, shape, qtype, hf_name=hf_name, permute_heads=qk_heads(family, hp, hf_name),
                            norm_offset=family.norm_offset and name.endswith("_norm.weight"), fallback=fell))
    if unknown:
        raise BpError("EXPORT_UNSUPPORTED_ARCH", f"{len(unknown)} tensor(s) have no GGUF name for the {family.arch} "
                      f"architecture, e.g. {unknown[0]}", hint="the checkpoint does not match its config.json",
                      details={"tensors": unknown[:20]})
    for name, arr in extra:
        import gguf as g
        plan.append(Planned(name, tuple(arr.shape), g.GGMLQuantizationType.F32, array=arr))
    names = [p.name for p in plan]
    if "token_embd.weight" not in names:
        raise BpError("EXPORT_WEIGHTS_INVALID", f"{src.dir}: no token embedding among the tensors")
    return plan


def _quantize(x: np.ndarray, qtype, threads: int) -> np.ndarray:
    from gguf.quants import quantize
    if x.ndim < 2 or x.size < PARALLEL_MIN or threads < 2:
        return quantize(x, qtype)
    parts = np.array_split(x, min(threads, x.shape[0]), axis=0)
    with ThreadPoolExecutor(threads) as pool:
        return np.concatenate(list(pool.map(lambda p: quantize(p, qtype), parts)), axis=0)


def _blocks(t: Planned, src: Source, hp: Hparams):
    """The tensor's float32 data, transformed, a block of rows at a time."""
    if t.array is not None:
        yield t.array.astype(np.float32)
        return
    rows = t.shape[0] if t.shape else 1
    row_bytes = 4 * max(1, t.numel // max(1, rows))
    step = max(1, BLOCK_BYTES // row_bytes)
    if t.permute_heads:  # permute whole heads: a block holds a multiple of one head's rows
        per_head = rows // t.permute_heads
        step = max(per_head, step // per_head * per_head)
    if len(t.shape) < 2:
        step = rows
    for r0 in range(0, rows, step):
        x = src.rows(t.hf_name, r0, min(rows, r0 + step)) if t.shape else src.rows(t.hf_name)
        if not np.isfinite(x).all():
            raise BpError("EXPORT_WEIGHTS_INVALID", f"tensor {t.hf_name} holds NaN or Inf values",
                          hint="the model is damaged (a diverged run?): export an earlier checkpoint")
        if t.permute_heads:
            x = permute_rows(x, x.shape[0] // (rows // t.permute_heads))
        if t.norm_offset:
            x = x + 1.0
        yield x


def general_name(name: str, vocab: Vocab) -> str:
    """general.name, minus a trap: llama.cpp applies Phi-3 token attributes to any model whose name
    contains "phi3"/"phi-3", and fails to load it unless the vocabulary has Phi-3's special tokens."""
    low = name.lower()
    if ("phi3" in low or "phi-3" in low) and not {"</s>", "<unk>", "<s>", "<|endoftext|>"} <= set(vocab.tokens):
        return low.replace("phi-3", "phi_3").replace("phi3", "phi_3")
    return name


def write_gguf(path: Path, src: Source, family: Family, hp: Hparams, vocab: Vocab, quant: str, name: str,
               threads: int | None = None, progress=None) -> dict:
    """Write one GGUF of type `quant` (one of NUMPY_TYPES) to path; return what was written."""
    import gguf
    threads = threads or max(1, len(os.sched_getaffinity(0)))
    w = gguf.GGUFWriter(str(path), family.arch)
    try:
        extra = write_hparams(w, family, hp, general_name(name, vocab))
        w.add_file_type(file_type(quant))
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        vocab.write(w)
        plan = plan_tensors(src, family, hp, quant, extra)
        for t in plan:
            w.add_tensor_info(t.name, t.shape, np.dtype(np.float32), t.nbytes, raw_dtype=t.qtype)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        fout = w.fout[0]
        for t in plan:
            w.write_padding(fout, fout.tell())
            written = 0
            for x in _blocks(t, src, hp):
                q = _quantize(np.ascontiguousarray(x), t.qtype, threads)
                fout.write(q.tobytes())
                written += q.nbytes
            if written != t.nbytes:
                raise BpError("EXPORT_FAILED", f"tensor {t.name}: wrote {written} bytes, planned {t.nbytes}")
            w.write_padding(fout, t.nbytes)
            if progress:
                progress(t)
        fout.flush()
        os.fsync(fout.fileno())
    finally:
        w.close()
    return {"tensors": len(plan), "params": sum(t.numel for t in plan),
            "fallbacks": [t.name for t in plan if t.fallback]}
