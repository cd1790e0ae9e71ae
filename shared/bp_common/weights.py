"""Model weights on disk, read one tensor (or one block of rows) at a time, without torch.

Safetensors files are read with positioned reads (preadv) straight into the array returned: only
the rows asked for are read, one copy from the page cache and no memory map whose pages would
count as this process's memory, so resident memory stays near one block however large the model
is. Headers are checked against the file size, so a truncated download is an error
(EXPORT_WEIGHTS_INVALID), never silently short weights. Pickle checkpoints are read only when the
caller allows it (weights_only, memory-mapped). Used by bp-merge and bp-gguf.
"""
from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import BpError

# safetensors dtype name -> (numpy dtype used to hold the raw bytes, is floating point)
DTYPES: dict[str, tuple[str, bool]] = {
    "F64": ("<f8", True), "F32": ("<f4", True), "F16": ("<f2", True), "BF16": ("<u2", True),
    "I64": ("<i8", False), "I32": ("<i4", False), "I16": ("<i2", False), "I8": ("i1", False),
    "U64": ("<u8", False), "U32": ("<u4", False), "U16": ("<u2", False), "U8": ("u1", False),
    "BOOL": ("?", False),
}
# Float8 and friends mean the checkpoint is stored quantized: not a base we can merge into.
QUANTIZED_DTYPES = ("F8_E4M3", "F8_E5M2", "F8_E8M0", "F4", "F6_E2M3", "F6_E3M2")
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


def scratch_array(scratch: dict, role: str, shape: tuple[int, ...], dtype) -> np.ndarray:
    """An uninitialised array of shape and dtype on scratch's one buffer for `role`, grown when too
    small: a loop that is done with each block before the next touches its memory once."""
    dtype = np.dtype(dtype)
    n = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    buf = scratch.get(role)
    if buf is None or buf.nbytes < n:
        buf = scratch[role] = np.empty(max(n, 1), np.uint8)
    return buf[:n].view(dtype).reshape(shape)


def _invalid(path: Path, why: str) -> BpError:
    return BpError("EXPORT_WEIGHTS_INVALID", f"{path}: {why}", details={"file": str(path)})


class SafetensorsReader:
    """Reads rows of tensors from one safetensors file with positioned reads."""

    def __init__(self, path: Path | str):
        self.path = Path(path)
        self.tensors, self.metadata = read_header(self.path)
        self._fd: int | None = None

    def raw(self, name: str, row0: int = 0, row1: int | None = None, scratch: dict | None = None) -> np.ndarray:
        """Rows [row0, row1) of a tensor in its stored dtype (bf16 as uint16): a fresh array, or one
        on scratch's buffer (below).
        scratch: read into scratch_array(scratch, "read", ...) instead, for a caller that is done
        with one block before it asks for the next (touching fresh memory costs more than the read)."""
        info = self.tensors[name]
        row1 = info.rows if row1 is None else row1
        b = info.begin + row0 * info.row_bytes
        e = info.begin + row1 * info.row_bytes
        shape = ((row1 - row0),) + info.shape[1:] if info.shape else ()
        dtype = DTYPES[info.dtype][0]
        out = np.empty(shape, dtype=dtype) if scratch is None else scratch_array(scratch, "read", shape, dtype)
        if self._fd is None:
            self._fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        view = memoryview(out.reshape(-1).view(np.uint8))
        done = 0
        while done < e - b:
            try:
                n = _pread_into(self._fd, view[done:], b + done)
            except OSError as exc:
                raise _invalid(self.path, f"cannot read tensor {name}: {exc}") from None
            if n <= 0:  # the file shrank under us
                raise _invalid(self.path, f"cannot read tensor {name}: the file ends at byte {b + done}")
            done += n
        return out

    def rows_f32(self, name: str, row0: int = 0, row1: int | None = None, scratch: dict | None = None) -> np.ndarray:
        """Rows of a floating-point tensor as float32 (a fresh array the caller may modify, or one
        of scratch's buffers)."""
        return to_f32(self.raw(name, row0, row1, scratch), self.tensors[name].dtype)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def _pread_into(fd: int, buf: memoryview, offset: int) -> int:
    """Read into buf at a file offset; the number of bytes read (0 at end of file)."""
    if hasattr(os, "preadv"):
        return os.preadv(fd, [buf], offset)
    data = os.pread(fd, len(buf), offset)  # platforms without preadv: one extra copy
    buf[:len(data)] = data
    return len(data)


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

    def rows_f32(self, name: str, row0: int = 0, row1: int | None = None, scratch: dict | None = None) -> np.ndarray:
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




def weight_files(path: Path) -> tuple[list[Path], bool]:
    """The weight files of a model directory, in index order; (files, is_pickle)."""
    for index_name, pickle in (("model.safetensors.index.json", False), ("pytorch_model.bin.index.json", True)):
        index = path / index_name
        if index.is_file():
            if pickle and any(path.glob("*.safetensors")):
                continue
            try:
                weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            except (OSError, ValueError, KeyError, TypeError) as exc:
                raise BpError("EXPORT_WEIGHTS_INVALID", f"{index} is not a valid weight index: {exc}") from None
            names = list(dict.fromkeys(weight_map.values()))
            return [path / n for n in names], pickle
    st = sorted(p for p in path.glob("*.safetensors") if not p.name.startswith("adapter_"))
    if len(st) > 1:  # Mistral-style repos carry the same weights twice: consolidated.safetensors is the copy
        st = [p for p in st if not p.name.startswith("consolidated")] or st
    if st:
        return st, False
    from .models import PICKLE_SUFFIXES
    pk = sorted(p for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES and not p.name.startswith(("adapter_",
                                                                                                      "training_")))
    if pk:
        return pk, True
    raise BpError("INPUT_NOT_FOUND", f"{path} has no model weights (*.safetensors)")


def open_reader(path: Path, pickle: bool = False):
    """A reader for one weight file: SafetensorsReader, or PickleReader when pickle is allowed."""
    return PickleReader(path) if pickle else SafetensorsReader(path)
