"""llama.cpp through llama-cpp-python: the one place bp-* tools load a GGUF, tokenize, score, generate
and run llama.cpp's own quantizer.

llama-cpp-python is an optional extra (it compiles llama.cpp when installed). Everything here imports
it lazily; `available()` says whether it is there and `require()` turns its absence into a clear
error with the install hint. Logits are compared with an f32 KV cache: llama.cpp's default f16 cache
alone moves logits by ~1e-2, which would hide a conversion bug.
"""
from __future__ import annotations

import contextlib
import ctypes
import functools
import importlib.util
import os
from pathlib import Path

from .errors import BpError

INSTALL_HINT = ("install llama-cpp-python: scripts/bootstrap does it, or "
                "CMAKE_ARGS=-DLLAVA_BUILD=OFF pip install 'backpropagate-tools[llama]' (compiles llama.cpp, ~3 min)")
GGML_TYPE_F32 = 0

# llama.cpp's file types (enum llama_ftype) for the types its quantizer makes from a 16-bit GGUF.
FTYPES = {"q4_0": 2, "q4_1": 3, "q8_0": 7, "q5_0": 8, "q5_1": 9, "q2_k": 10, "q3_k_s": 11, "q3_k_m": 12,
          "q3_k_l": 13, "q4_k_s": 14, "q4_k_m": 15, "q5_k_s": 16, "q5_k_m": 17, "q6_k": 18}


def available() -> bool:
    """True when llama-cpp-python is installed and its native library loads."""
    if importlib.util.find_spec("llama_cpp") is None:
        return False
    try:
        import llama_cpp  # noqa: F401
    except (ImportError, OSError):
        return False
    return True


def require(what: str, code: str = "DEP_MISSING"):
    """The llama_cpp module, or BpError(code) saying what needed it and how to install it."""
    if not available():
        raise BpError(code, f"{what} needs llama-cpp-python, which is not installed (or does not load)",
                      hint=INSTALL_HINT)
    import llama_cpp
    return llama_cpp


@functools.lru_cache(maxsize=1)
def fp16_kernel():
    """llama.cpp's vectorised float32 -> float16 conversion (ggml_cpu_fp32_to_fp16) as a function
    (x, out) of a C-contiguous float32 array and a float16 array of the same size; None without
    llama-cpp-python. It rounds exactly as numpy's cast does (to nearest even, subnormals, overflow
    to inf: tests/test_gguf.py checks it bit for bit) about 20 times faster, and ctypes releases the
    GIL while it runs. Loaded from the library file: importing llama_cpp loads every backend."""
    import numpy as np
    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or not spec.submodule_search_locations:
        return None
    libdir = Path(next(iter(spec.submodule_search_locations))) / "lib"
    for name in ("libggml-cpu.so", "libggml-cpu.dylib", "ggml-cpu.dll"):
        if (libdir / name).is_file():
            try:
                fn = ctypes.CDLL(str(libdir / name)).ggml_cpu_fp32_to_fp16
            except (OSError, AttributeError):
                return None
            fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
            fn.restype = None

            def convert(x, out) -> None:
                if x.dtype != np.float32 or out.dtype != np.float16 or x.size != out.size \
                        or not (x.flags.c_contiguous and out.flags.c_contiguous):
                    raise ValueError("fp16_kernel needs C-contiguous float32 in and float16 out of one size")
                fn(x.ctypes.data, out.ctypes.data, x.size)
            return convert
    return None


@contextlib.contextmanager
def native_quiet(enabled: bool = True):
    """Silence llama.cpp's C-level logging (it writes to fd 2 directly) unless debugging."""
    if not enabled or os.environ.get("BACKPROPAGATE_LOG_LEVEL", "").lower() == "debug":
        yield
        return
    import sys
    try:
        sys.stderr.flush()
    except (OSError, ValueError):
        pass
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def threads() -> int:
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1))


class Model:
    """A GGUF loaded in llama.cpp on the CPU (optionally with a GGUF LoRA applied), for exact work:
    f32 KV cache, no flash attention, logits for every position.

    n_ctx: context to allocate (logits take n_ctx × n_vocab floats).
    """

    def __init__(self, path: Path | str, *, n_ctx: int = 512, lora: Path | str | None = None,
                 n_threads: int | None = None):
        llama_cpp = require("loading a GGUF")
        self.path = Path(path)
        kw = dict(model_path=str(self.path), n_ctx=n_ctx, n_batch=min(n_ctx, 512), n_threads=n_threads or threads(),
                  logits_all=True, type_k=GGML_TYPE_F32, type_v=GGML_TYPE_F32, flash_attn=False, n_gpu_layers=0,
                  verbose=False, seed=0)
        if lora is not None:
            kw["lora_path"] = str(lora)
        try:
            with native_quiet():
                self.llm = llama_cpp.Llama(**kw)
        except (ValueError, RuntimeError, OSError) as exc:
            raise BpError("EXPORT_VERIFY_FAILED", f"llama.cpp could not load {self.path}"
                          + (f" with the adapter {lora}" if lora else "") + f": {str(exc).splitlines()[0]}",
                          details={"file": str(self.path)}) from None
        self.n_ctx = n_ctx

    @property
    def n_vocab(self) -> int:
        return int(self.llm.n_vocab())

    def tokenize(self, text: str, *, special: bool = True, add_bos: bool = False) -> list[int]:
        """Token ids of text as llama.cpp tokenizes it (special: control tokens in the text are parsed)."""
        return list(self.llm.tokenize(text.encode("utf-8"), add_bos=add_bos, special=special))

    def detokenize(self, ids: list[int]) -> str:
        return self.llm.detokenize(list(ids)).decode("utf-8", errors="replace")

    def logits(self, ids: list[int]):
        """float32 [len(ids), n_vocab]: the logits after each position."""
        import numpy as np
        if len(ids) > self.n_ctx:
            raise ValueError(f"{len(ids)} tokens do not fit the {self.n_ctx}-token context")
        self.llm.reset()
        self.llm.eval(list(ids))
        return np.array(self.llm.scores[:len(ids)], dtype=np.float32)

    def greedy(self, ids: list[int], max_new_tokens: int, stop_ids=()) -> list[int]:
        """Greedy continuation (no penalties), up to and including the first stop id."""
        out: list[int] = []
        stops = set(stop_ids)
        if max_new_tokens <= 0:
            return out
        for tok in self.llm.generate(list(ids), top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0,
                                     reset=True):
            out.append(int(tok))
            if tok in stops or len(out) >= max_new_tokens or len(ids) + len(out) >= self.n_ctx:
                break
        return out

    def close(self) -> None:
        llm, self.llm = getattr(self, "llm", None), None
        if llm is not None:
            llm.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def quantize(src: Path | str, dst: Path | str, quant: str, n_threads: int | None = None) -> None:
    """Quantize a 16/32-bit GGUF to `quant` (a key of FTYPES) with llama.cpp's own quantizer.

    Raises DEP_QUANTIZER_MISSING without llama-cpp-python and EXPORT_FAILED when the quantizer fails.
    """
    llama_cpp = require(f"{quant} (a llama.cpp quant type)", "DEP_QUANTIZER_MISSING")
    if quant not in FTYPES:
        raise BpError("INPUT_INVALID", f"llama.cpp's quantizer does not make {quant}")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = FTYPES[quant]
    params.nthread = n_threads or threads()
    with native_quiet():
        rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    if rc != 0:
        raise BpError("EXPORT_FAILED", f"llama.cpp's quantizer failed making {quant} from {src} (status {rc})",
                      hint="run again with --verbose; check free disk space")
