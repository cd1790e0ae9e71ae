"""Safetensors files read and written one tensor (or one block of rows) at a time.

Reading maps the file and copies only the rows asked for, then tells the kernel to drop those
pages from this process, so resident memory stays near one block however large the model is.
Writing lays out the header first (every shape and dtype is known before any math runs) and
then appends each tensor's bytes in order, hashing as it goes. Neither side imports torch.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bp_common.errors import BpError
from bp_common.weights import (DTYPES, QUANTIZED_DTYPES, PickleReader, SafetensorsReader, TensorInfo,  # noqa: F401
                               itemsize, read_header, to_f32)

OUT_DTYPES = {"bf16": "BF16", "f16": "F16", "f32": "F32"}


def from_f32(x: np.ndarray, dtype: str) -> np.ndarray:
    """float32 -> the output dtype's stored form. bf16 rounds to nearest even, as torch does."""
    if dtype == "F32":
        return np.ascontiguousarray(x, dtype=np.float32)
    if dtype == "F16":
        with np.errstate(over="ignore"):  # overflow becomes inf; the caller checks and names the tensor
            return x.astype(np.float16)
    if dtype == "BF16":
        u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
        r = u >> 16
        r &= 1
        r += 0x7FFF
        r += u
        r >>= 16
        return r.astype(np.uint16)
    raise ValueError(f"unsupported output dtype {dtype}")


# -- writing --------------------------------------------------------------------------------

@dataclass(frozen=True)
class OutTensor:
    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * itemsize(self.dtype)


class SafetensorsWriter:
    """Writes one safetensors file whose tensors are all declared up front.

    Call `write(array)` for the tensors in declaration order, in as many row blocks as you
    like; `close()` checks every byte arrived. The sha256 of the file is computed on the way.
    """

    def __init__(self, path: Path | str, tensors: list[OutTensor], metadata: dict | None = None):
        self.path = Path(path)
        self.tensors = tensors
        header: dict = {"__metadata__": {"format": "pt", **(metadata or {})}}
        offset = 0
        for t in tensors:
            header[t.name] = {"dtype": t.dtype, "shape": list(t.shape), "data_offsets": [offset, offset + t.nbytes]}
            offset += t.nbytes
        self.data_bytes = offset
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)  # keep tensor data 8-byte aligned
        self._sha = hashlib.sha256()
        self._fh = open(self.path, "wb")
        self._put(struct.pack("<Q", len(blob)) + blob)
        self.size = 8 + len(blob) + offset
        self._written = 0

    def _put(self, data) -> None:
        self._fh.write(data)
        self._sha.update(data)

    def write(self, arr: np.ndarray) -> None:
        data = memoryview(np.ascontiguousarray(arr)).cast("B")
        if self._written + len(data) > self.data_bytes:
            raise RuntimeError(f"{self.path.name}: more bytes than declared")
        self._put(data)
        self._written += len(data)

    def close(self) -> str:
        """Flush, check the byte count and return the file's sha256."""
        self._fh.flush()
        os.fsync(self._fh.fileno())
        self._fh.close()
        if self._written != self.data_bytes:
            raise RuntimeError(f"{self.path.name}: wrote {self._written} of {self.data_bytes} data bytes")
        return self._sha.hexdigest()

    def abort(self) -> None:
        try:
            self._fh.close()
        except OSError:
            pass


_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B?)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40, "K": 10**3, "M": 10**6, "G": 10**9,
          "T": 10**12}


def parse_size(text: str) -> int:
    """'5GB' -> 5_000_000_000; '500MiB', '2G', '1048576' too (HF's max_shard_size syntax)."""
    m = _SIZE.match(str(text))
    unit = (m.group(2) or "").upper() if m else None
    if not m or unit not in _UNITS:
        raise BpError("INPUT_INVALID", f"--max-shard-size {text!r} is not a size like 5GB, 500MB or 2GiB")
    value = int(float(m.group(1)) * _UNITS[unit])
    if value <= 0:
        raise BpError("INPUT_INVALID", "--max-shard-size must be positive")
    return value


def plan_shards(tensors: list[OutTensor], max_bytes: int) -> list[list[OutTensor]]:
    """Split tensors (in order) into shards of at most max_bytes; a larger tensor gets its own shard."""
    shards: list[list[OutTensor]] = [[]]
    size = 0
    for t in tensors:
        if shards[-1] and size + t.nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += t.nbytes
    return [s for s in shards if s]


def shard_names(n: int) -> list[str]:
    if n == 1:
        return ["model.safetensors"]
    return [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
