"""Safetensors files read and written one tensor (or one block of rows) at a time.

Reading maps the file and copies only the rows asked for, then tells the kernel to drop those
pages from this process, so resident memory stays near one block however large the model is.
Writing lays out the header first (every shape and dtype is known before any math runs) and
then appends each tensor's bytes in order, hashing as it goes. Neither side imports torch.
"""
from __future__ import annotations

import hashlib
import json
import mmap
import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bp_common.errors import BpError

# safetensors dtype name -> (numpy dtype used to hold the raw bytes, is floating point)
DTYPES: dict[str, tuple[str, bool]] = {
    "F64": ("<f8", True), "F32": ("<f4", True), "F16": ("<f2", True), "BF16": ("<u2", True),
    "I64": ("<i8", False), "I32": ("<i4", False), "I16": ("<i2", False), "I8": ("i1", False),
    "U64": ("<u8", False), "U32": ("<u4", False), "U16": ("<u2", False), "U8": ("u1", False),
    "BOOL": ("?", False),
}
# Float8 and friends mean the checkpoint is stored quantized: not a base we can merge into.
QUANTIZED_DTYPES = ("F8_E4M3", "F8_E5M2", "F8_E8M0", "F4", "F6_E2M3", "F6_E3M2")
OUT_DTYPES = {"bf16": "BF16", "f16": "F16", "f32": "F32"}
_PAGE = mmap.PAGESIZE
HEADER_LIMIT = 100 << 20  # a header larger than this is corrupt, not a model


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int  # absolute byte offset in the file
    end: int

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def is_float(self) -> bool:
        return DTYPES.get(self.dtype, ("", False))[1]

    @property
    def rows(self) -> int:
        return self.shape[0] if self.shape else 1

    @property
    def row_bytes(self) -> int:
        return (self.end - self.begin) // max(1, self.rows)


def itemsize(dtype: str) -> int:
    return np.dtype(DTYPES[dtype][0]).itemsize


def read_header(path: Path) -> tuple[dict[str, TensorInfo], dict]:
    """Parse a safetensors header and check the file is long enough to hold every tensor.

    Returns (tensors by name, __metadata__). A short, empty or garbled file raises
    EXPORT_WEIGHTS_INVALID naming the file: a truncated download must never merge silently.
    """
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            raw = fh.read(8)
            if len(raw) < 8:
                raise _invalid(path, f"{size} bytes: too short to be safetensors")
            (n,) = struct.unpack("<Q", raw)
            if n > HEADER_LIMIT or 8 + n > size:
                raise _invalid(path, "the header length is larger than the file (truncated or not safetensors)")
            header = json.loads(fh.read(n))
    except FileNotFoundError:
        raise BpError("EXPORT_WEIGHTS_INVALID", f"weight file {path} is missing",
                      hint="the index names a shard that is not there: re-download the model") from None
    except (UnicodeDecodeError, ValueError):
        raise _invalid(path, "the header is not valid JSON") from None
    if not isinstance(header, dict):
        raise _invalid(path, "the header is not a JSON object")
    meta = header.pop("__metadata__", None) or {}
    start = 8 + n
    tensors: dict[str, TensorInfo] = {}
    for name, spec in header.items():
        try:
            dtype, shape, (b, e) = spec["dtype"], tuple(int(d) for d in spec["shape"]), spec["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise _invalid(path, f"tensor {name} has a malformed header entry") from None
        if dtype in DTYPES:
            expect = int(np.prod(shape, dtype=np.int64)) * itemsize(dtype)
            if e - b != expect:
                raise _invalid(path, f"tensor {name}: {e - b} bytes for shape {list(shape)} {dtype}")
        if start + e > size:
            raise _invalid(path, f"tensor {name} ends at byte {start + e} but the file has {size} bytes "
                                 "(truncated)")
        tensors[name] = TensorInfo(name, dtype, shape, start + b, start + e)
    return tensors, meta


def _invalid(path: Path, why: str) -> BpError:
    return BpError("EXPORT_WEIGHTS_INVALID", f"{path}: {why}", details={"file": str(path)})


class SafetensorsReader:
    """Reads rows of tensors from one safetensors file through a read-only memory map."""

    def __init__(self, path: Path | str):
        self.path = Path(path)
        self.tensors, self.metadata = read_header(self.path)
        self._fh = None
        self._mm = None

    def _map(self) -> mmap.mmap:
        if self._mm is None:
            self._fh = open(self.path, "rb")
            self._mm = mmap.mmap(self._fh.fileno(), 0, access=mmap.ACCESS_READ)
        return self._mm

    def raw(self, name: str, row0: int = 0, row1: int | None = None) -> np.ndarray:
        """A copy of rows [row0, row1) of a tensor, in its stored dtype (bf16 as uint16)."""
        info = self.tensors[name]
        row1 = info.rows if row1 is None else row1
        b = info.begin + row0 * info.row_bytes
        e = info.begin + row1 * info.row_bytes
        mm = self._map()
        try:
            out = np.frombuffer(mm, dtype=DTYPES[info.dtype][0], count=(e - b) // itemsize(info.dtype),
                                offset=b).copy()
        except (ValueError, OSError) as exc:  # the file shrank under us
            raise _invalid(self.path, f"cannot read tensor {name}: {exc}") from None
        self._drop(b, e)
        shape = ((row1 - row0),) + info.shape[1:] if info.shape else ()
        return out.reshape(shape)

    def rows_f32(self, name: str, row0: int = 0, row1: int | None = None) -> np.ndarray:
        """Rows of a floating-point tensor as float32 (a fresh array the caller may modify)."""
        return to_f32(self.raw(name, row0, row1), self.tensors[name].dtype)

    def _drop(self, b: int, e: int) -> None:
        # Pages we copied from are clean file pages: dropping them frees our RSS, not the cache.
        start = (b // _PAGE) * _PAGE
        if hasattr(self._mm, "madvise") and e > start:
            try:
                self._mm.madvise(mmap.MADV_DONTNEED, start, e - start)
            except (OSError, ValueError):
                pass

    def close(self) -> None:
        if self._mm is not None:
            self._mm.close()
            self._fh.close()
            self._mm = self._fh = None


class PickleReader:
    """Reads a torch pickle checkpoint (only with --allow-pickle): weights_only, memory-mapped."""

    def __init__(self, path: Path | str):
        import torch
        self.path = Path(path)
        try:
            state = torch.load(str(self.path), map_location="cpu", weights_only=True, mmap=True)
        except Exception as exc:  # torch raises many types for a corrupt zip/pickle
            raise _invalid(self.path, f"cannot read the pickle checkpoint: {str(exc).splitlines()[0]}") from None
        if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
            state = state["state_dict"]
        self._state = {k: v for k, v in state.items() if hasattr(v, "shape")}
        self.tensors = {}
        for k, v in self._state.items():
            dtype = _torch_dtype_name(v.dtype)
            shape = tuple(v.shape)
            n = int(np.prod(shape, dtype=np.int64)) * (itemsize(dtype) if dtype in DTYPES else 1)
            self.tensors[k] = TensorInfo(k, dtype, shape, 0, n)
        self.metadata = {}

    def raw(self, name: str, row0: int = 0, row1: int | None = None) -> np.ndarray:
        import torch
        t = self._state[name]
        t = t[row0:row1] if t.dim() else t
        if t.dtype == torch.bfloat16:
            return t.contiguous().view(torch.int16).numpy().view("<u2").copy()
        return t.contiguous().numpy().copy()

    def rows_f32(self, name: str, row0: int = 0, row1: int | None = None) -> np.ndarray:
        return to_f32(self.raw(name, row0, row1), self.tensors[name].dtype)

    def close(self) -> None:
        self._state = {}


def _torch_dtype_name(dtype) -> str:
    name = str(dtype).replace("torch.", "")
    return {"float64": "F64", "float32": "F32", "float16": "F16", "bfloat16": "BF16", "int64": "I64",
            "int32": "I32", "int16": "I16", "int8": "I8", "uint8": "U8", "bool": "BOOL"}.get(name, name.upper())


def to_f32(raw: np.ndarray, dtype: str) -> np.ndarray:
    """Stored values -> float32. bf16 is the top half of a float32, so widening is exact."""
    if dtype == "BF16":
        return (raw.astype(np.uint32) << 16).view(np.float32)
    if dtype == "F32":
        return raw
    return raw.astype(np.float32)


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
