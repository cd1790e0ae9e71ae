"""Hugging Face safetensors -> GGUF files, streamed.

Every tensor's name, shape and type is known before a byte of data is read, so each file is laid
out as header, metadata and tensor table first, then each tensor's data in order: read, transformed
and converted a block of rows at a time, each block read once and converted to every type the run
writes. Peak memory is a few blocks, never the model. Per file, two background threads write the
converted data (O_DIRECT where the file system allows it) and hash it for the manifest's sha256,
while the next block is read and converted, so a file is written once and never read back.
Types written here: f32, f16 (llama.cpp's vectorised cast when llama-cpp-python is installed,
numpy's otherwise: the same bits), bf16, q8_0, q4_0, q4_1, q5_0, q5_1 (gguf-py's numpy
quantizers; rows split across threads); k-quants are made from a 16-bit file by llama.cpp's own
quantizer (bp_common.llamacpp.quantize).
"""
from __future__ import annotations

import errno
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bp_common.errors import BpError
from bp_common.llamacpp import fp16_kernel
from bp_common.weights import QUANTIZED_DTYPES, open_reader, scratch_array, weight_files

from .families import (SKIPPED_SUFFIXES, Family, Hparams, model_arch, permute_rows, qk_heads, tensor_name,
                       write_hparams)
from .vocab import Vocab

NUMPY_TYPES = ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1")
# 4- and 5-bit files keep the output projection (output.weight, or the tied token embedding that
# serves as it) at 8 bits, as llama.cpp's quantizer does for these types (it uses q6_K, which falls
# back to q8_0 when rows are not a multiple of 256; gguf-py has no q6_K encoder, so always q8_0 here:
# the same bytes as llama.cpp's below 256-multiples, a little larger and no worse above).
OUTPUT_Q8_0 = ("q4_0", "q4_1", "q5_0", "q5_1")
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

    def rows(self, name: str, r0: int = 0, r1: int | None = None, scratch: dict | None = None) -> np.ndarray:
        f = self.file_of[name]
        if f not in self._readers:
            self._readers[f] = open_reader(f, self.pickle)
        return self._readers[f].rows_f32(name, r0, r1, scratch)

    @property
    def size_bytes(self) -> int:
        return sum(f.stat().st_size for f in self.files)

    def close(self) -> None:
        for r in self._readers.values():
            r.close()
        self._readers.clear()


def embedding(src: Source):
    """The token embedding's tensor info (the output projection has its shape, tied or not)."""
    for name, info in src.infos.items():
        if name.endswith("embed_tokens.weight"):
            return info
    raise BpError("EXPORT_WEIGHTS_INVALID", f"{src.dir}: no embed_tokens tensor")


def embedding_rows(src: Source) -> int:
    return int(embedding(src).shape[0])


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
    if quant in OUTPUT_Q8_0:
        out = plan[names.index("output.weight" if "output.weight" in names else "token_embd.weight")]
        if out.qtype == ggml_type(quant):
            out.qtype = gguf.GGMLQuantizationType.Q8_0
    return plan


def _encode(x: np.ndarray, qtype, pool: ThreadPoolExecutor | None = None, threads: int = 1,
            scratch: dict | None = None, check: bool = True) -> tuple[np.ndarray, bool]:
    """(the bytes of float32 rows x in GGML type qtype, whether x is all finite; True unchecked
    when check is False: the caller checked this x already). Rows are split
    across threads (numpy's casts, checks and gguf's quantizers release the GIL); the parts are
    written into one output array, never concatenated. scratch: the output is a view of
    scratch_array(scratch, "encode", ...), for a caller that is done with it before the next call."""
    import gguf
    from gguf.quants import quant_shape_to_byte_shape, quantize
    n = 1 if pool is None or x.ndim < 2 or x.size < PARALLEL_MIN else min(threads, x.shape[0])
    edges = [x.shape[0] * i // n for i in range(n + 1)] if x.ndim else [0, 0]
    bounds = list(zip(edges, edges[1:]))
    fp16 = None
    def empty(shape, dtype) -> np.ndarray:
        return np.empty(shape, dtype) if scratch is None else scratch_array(scratch, "encode", tuple(shape), dtype)

    if qtype == gguf.GGMLQuantizationType.F32:
        out = x
    elif qtype == gguf.GGMLQuantizationType.F16:
        out = empty(x.shape, np.float16)
        fp16 = fp16_kernel()
    else:  # quantized types: choose_type gives them only to 2-D tensors
        out = empty(quant_shape_to_byte_shape(x.shape, qtype), np.uint8)

    def part(b: tuple[int, int]) -> bool:
        a, z = b
        chunk = x[a:z] if x.ndim else x
        if fp16 is not None:
            fp16(chunk, out[a:z])
        elif out is not x:
            out[a:z] = quantize(chunk, qtype) if out.dtype == np.uint8 else chunk  # numpy's cast into out
        return not check or bool(np.isfinite(chunk).all())

    if len(bounds) == 1:
        return out, part(bounds[0])
    return out, all(list(pool.map(part, bounds)))


ALIGN = 4096                    # O_DIRECT: file offsets, lengths and buffer addresses are multiples of this
STAGE_BYTES = 8 << 20           # bytes per write to the file
STAGES = 4                      # staging buffers, reused: the most that are queued or being written


def _aligned(n: int) -> np.ndarray:
    raw = np.empty(n + ALIGN, np.uint8)
    skip = -raw.ctypes.data % ALIGN
    return raw[skip:skip + n]


def _pwrite(fd: int, buf, offset: int) -> int:
    return os.pwritev(fd, [buf], offset)


class _Sink:
    """Writes the tensor data of a GGUF whose header, metadata and tensor table are already in the
    file (`start` bytes), and hashes every byte of the file for the manifest, so it is never read back.

    Data is copied into a few aligned staging buffers of STAGE_BYTES; each full one goes to two
    background threads (positioned writes and hashlib release the GIL), one writing it and one
    hashing it, while the next block is read and converted. A durable sink writes with O_DIRECT when
    the file system allows it: no page cache to fill and evict, and the final fsync has no backlog
    to flush (on our test VM, buffered writes of fresh page cache cost 0.06-0.8 s per 200 MB depending on
    the host; direct ones 0.1-0.15 s). Where O_DIRECT is refused (tmpfs, some network file systems) it
    writes through the page cache. A sink that is not durable (the k-quants' 16-bit intermediate,
    read back at once and deleted) writes through the page cache and is not fsynced. An error in
    either thread is raised by the next call here."""

    def __init__(self, path: Path, start: int, alignment: int, durable: bool = True):
        import hashlib
        self.durable, self.alignment = durable, alignment
        with open(path, "rb") as fh:
            header = fh.read(start)
        self.hash = hashlib.sha256(header)
        self.fd = -1
        self.direct = False
        self.path = path
        self._open(path, durable)
        try:
            self._start(header, start)
        except BaseException:
            os.close(self.fd)
            raise

    def _start(self, header: bytes, start: int) -> None:
        import queue
        import threading
        self.pos = start                    # bytes in the file so far, staged ones included
        self.offset = start - start % ALIGN  # file offset of the current stage's first byte
        self.free: queue.Queue = queue.Queue()
        self.made = 0
        self.cur = self._take()
        self.fill = start - self.offset     # the header's unaligned tail is written again from here
        self.cur[:self.fill] = np.frombuffer(header[self.offset:], np.uint8)
        self.hashed = self.fill             # ...but hashed once
        self.error: BaseException | None = None
        self.lock = threading.Lock()
        self.users: dict[int, int] = {}
        self.queues = [queue.Queue(), queue.Queue()]
        self.threads = [threading.Thread(target=self._run, args=(q, f), name=f"gguf-{n}", daemon=True)
                        for q, f, n in zip(self.queues, (self._write_stage, self._hash_stage), ("write", "hash"))]
        try:
            for t in self.threads:
                t.start()
        except BaseException:
            for q in self.queues:
                q.put(None)  # a thread that did start stops
            raise

    def _open(self, path: Path, direct: bool) -> None:
        flags = os.O_WRONLY | getattr(os, "O_CLOEXEC", 0)
        fd = -1
        if direct and hasattr(os, "O_DIRECT"):
            try:
                fd = os.open(path, flags | os.O_DIRECT)
            except OSError:
                fd = -1
        self.direct = fd >= 0
        if fd < 0:
            fd = os.open(path, flags)
        if self.fd >= 0:
            os.close(self.fd)
        self.fd = fd

    def _take(self) -> np.ndarray:
        import queue
        if self.made < STAGES:
            try:
                return self.free.get_nowait()
            except queue.Empty:
                self.made += 1
                return _aligned(STAGE_BYTES)
        return self.free.get()

    def _write_stage(self, item) -> None:
        buf, offset, n, _ = item
        if self.direct and n % ALIGN:  # the last stage: whole blocks, the padding cut off by close()
            pad = -n % ALIGN
            buf[n:n + pad] = 0  # not whatever the buffer held before (the hash thread reads [:n] only)
            n += pad
        done = 0
        mv = memoryview(buf)
        while done < n:
            try:
                k = _pwrite(self.fd, mv[done:n], offset + done)
            except OSError as exc:
                if not self.direct or exc.errno != errno.EINVAL:
                    raise
                self._open(self.path, False)  # O_DIRECT opened but refused here: the page cache then
                continue
            if k <= 0:
                raise OSError(errno.EIO, f"short write to {self.path}")
            if self.direct and k % ALIGN:
                self._open(self.path, False)  # a short direct write leaves an unaligned rest
            done += k

    def _hash_stage(self, item) -> None:
        buf, _, n, skip = item
        self.hash.update(memoryview(buf)[skip:n])

    def _run(self, q, consume) -> None:
        while True:
            item = q.get()
            if item is None:
                return
            try:
                if self.error is None:
                    consume(item)
            except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
                self.error = exc
            finally:
                with self.lock:
                    key = id(item[0])
                    self.users[key] -= 1
                    if not self.users[key]:
                        del self.users[key]
                        self.free.put(item[0])

    def _submit(self, take: bool = True) -> None:
        item = (self.cur, self.offset, self.fill, self.hashed)
        with self.lock:
            self.users[id(self.cur)] = len(self.queues)
        for q in self.queues:
            q.put(item)
        self.offset += self.fill
        self.fill = self.hashed = 0
        if take:
            self.cur = self._take()

    def write(self, data) -> None:
        if self.error is not None:
            raise self.error
        if isinstance(data, np.ndarray):
            src = np.ascontiguousarray(data).reshape(-1).view(np.uint8)
        else:
            src = np.frombuffer(data, np.uint8)
        done, n = 0, src.size
        while done < n:
            k = min(STAGE_BYTES - self.fill, n - done)
            self.cur[self.fill:self.fill + k] = src[done:done + k]
            self.fill += k
            done += k
            if self.fill == STAGE_BYTES:
                self._submit()
                if self.error is not None:
                    raise self.error
        self.pos += n

    def pad(self) -> None:
        n = -self.pos % self.alignment
        if n:
            self.write(bytes(n))

    def _stop(self) -> None:
        for q in self.queues:
            q.put(None)  # a second one (after an interrupted close) is never read: harmless
        for t in self.threads:
            t.join()

    def close(self, abort: bool = False) -> str:
        """Write what is staged, wait for both threads, cut the file to its length, fsync it when
        durable; the file's sha256 (hex). Raises what either thread raised. abort: the file is
        being given up; stop without writing the rest. The file is closed only once both threads
        have stopped, whatever happens here (an interrupt included)."""
        stopped = False
        try:
            if abort and self.error is None:
                self.error = BpError("EXPORT_FAILED", "aborted")
            if self.fill and self.error is None:
                self._submit(take=False)
            self._stop()
            stopped = True
            if abort:
                return ""
            if self.error is not None:
                raise self.error
            os.ftruncate(self.fd, self.pos)
            if self.durable:
                os.fsync(self.fd)
        finally:
            if not stopped:
                if self.error is None:
                    self.error = BpError("EXPORT_FAILED", "interrupted")  # the threads skip what is queued
                self._stop()
            os.close(self.fd)
        return self.hash.hexdigest()


def _blocks(t: Planned, src: Source, hp: Hparams, scratch: dict | None = None):
    """The tensor's float32 data, transformed, a block of rows at a time (read into scratch's
    buffers: each block is done with before the next is read)."""
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
        x = src.rows(t.hf_name, r0, min(rows, r0 + step), scratch) if t.shape else src.rows(t.hf_name)
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


def _abort(sinks: list[_Sink]) -> None:
    """Give up every sink, each whatever the others do (the caller re-raises its own error)."""
    for sink in sinks:
        try:
            sink.close(abort=True)
        except BaseException:  # noqa: BLE001 - the error being handled is the one to report
            pass


def write_ggufs(outputs: list[tuple[Path, str, bool]], src: Source, family: Family, hp: Hparams, vocab: Vocab,
                name: str, threads: int | None = None, progress=None) -> list[dict]:
    """Write one GGUF per (path, type, durable) of outputs (types of NUMPY_TYPES) from one pass over
    the source: each block is read once and converted to every type. Returns what was written, in
    the order of outputs. progress(tensor) is called once per tensor."""
    import contextlib
    import gguf
    if not outputs:
        raise ValueError("write_ggufs: no outputs")
    threads = threads or max(1, len(os.sched_getaffinity(0)))
    with contextlib.ExitStack() as stack:
        writers, plans, sinks = [], [], []
        for path, quant, _durable in outputs:
            w = gguf.GGUFWriter(str(path), family.arch)
            stack.callback(w.close)
            extra = write_hparams(w, family, hp, general_name(name, vocab))
            w.add_file_type(file_type(quant))
            w.add_quantization_version(gguf.GGML_QUANT_VERSION)
            vocab.write(w)
            plan = plan_tensors(src, family, hp, quant, extra)
            for t in plan:
                w.add_tensor_info(t.name, t.shape, np.dtype(np.float32), t.nbytes, raw_dtype=t.qtype)
            writers.append(w)
            plans.append(plan)
        if any([t.name for t in plan] != [t.name for t in plans[0]] for plan in plans):
            raise BpError("EXPORT_FAILED", "the tensor plans of the requested types differ")
        pool = ThreadPoolExecutor(threads, thread_name_prefix="gguf-convert") if threads > 1 else None
        scratch: dict = {}  # sink.write copies each block: the read and converted buffers are reusable
        try:
            for (path, _quant, durable), w in zip(outputs, writers):
                w.write_header_to_file()
                w.write_kv_data_to_file()
                w.write_ti_data_to_file()
                fout = w.fout[0]
                fout.flush()
                sinks.append(_Sink(path, fout.tell(), w.data_alignment, durable))
                sinks[-1].pad()
            for i, t in enumerate(plans[0]):
                written = [0] * len(sinks)
                for x in _blocks(t, src, hp, scratch):
                    x = np.ascontiguousarray(x)
                    for j, (plan, sink) in enumerate(zip(plans, sinks)):
                        q, finite = _encode(x, plan[i].qtype, pool, threads, scratch, check=j == 0)
                        if not finite:
                            raise BpError("EXPORT_WEIGHTS_INVALID", f"tensor {t.hf_name or t.name} holds NaN or Inf values",
                                          hint="the model is damaged (a diverged run?): export an earlier checkpoint")
                        sink.write(q)
                        written[j] += q.nbytes
                for plan, sink, n in zip(plans, sinks, written):
                    if n != plan[i].nbytes:
                        raise BpError("EXPORT_FAILED", f"tensor {t.name}: wrote {n} bytes, planned {plan[i].nbytes}")
                    sink.pad()
                if progress:
                    progress(t)
        except BaseException:
            _abort(sinks)
            raise
        finally:
            if pool is not None:
                pool.shutdown()
        digests: list[str] = []
        try:
            for sink in sinks:
                digests.append(sink.close())
        except BaseException:
            _abort(sinks[len(digests) + 1:])  # the one that raised has closed itself
            raise
    return [{"tensors": len(plan), "params": sum(t.numel for t in plan),
             "fallbacks": [t.name for t in plan if t.fallback], "sha256": sha256}
            for plan, sha256 in zip(plans, digests)]
