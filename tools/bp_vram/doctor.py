"""`bp-vram doctor`: one JSON report of this machine, for bug reports and cron logs."""
from __future__ import annotations

import contextlib
import io
import os
import platform
import sys
from importlib import metadata

from bp_common import __version__

from .gpus import list_gpus

PACKAGES = ("torch", "transformers", "peft", "trl", "accelerate", "bitsandbytes", "datasets", "gguf",
            "huggingface-hub", "llama-cpp-python", "safetensors", "tokenizers", "nvidia-ml-py", "liger-kernel",
            "flash-attn")


def _version(pkg: str) -> str | None:
    try:
        return metadata.version(pkg)
    except metadata.PackageNotFoundError:
        return None


def _probe(fn) -> dict:
    """Run a feature check quietly: {"ok": bool, "detail": str}."""
    sink = io.StringIO()
    try:
        with contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
            detail = fn()
        return {"ok": True, "detail": detail or ""}
    except Exception as exc:  # each probe reports its own failure; the doctor never fails
        return {"ok": False, "detail": f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"}


def _torch_info() -> dict:
    import torch
    info = {"cuda_available": torch.cuda.is_available(), "cuda_version": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
            "threads": torch.get_num_threads()}
    if info["cuda_available"]:
        info["bf16"] = torch.cuda.is_bf16_supported()
    return info


def _bnb_4bit():
    import torch
    import bitsandbytes as bnb
    layer = bnb.nn.Linear4bit(64, 64, quant_type="nf4", compute_dtype=torch.float32)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    layer = layer.to(device)
    layer(torch.randn(2, 64, device=device))
    return f"nf4 forward on {device}"


def _bnb_8bit_optim():
    import torch
    import bitsandbytes as bnb
    p = torch.nn.Parameter(torch.randn(4096, device="cuda" if torch.cuda.is_available() else "cpu"))
    p.grad = torch.randn_like(p)
    bnb.optim.AdamW8bit([p]).step()
    return "AdamW8bit step"


def _llama_cpp():
    import llama_cpp
    return f"llama-cpp-python {llama_cpp.__version__}"


def _flash_attn():
    import flash_attn
    return f"flash-attn {flash_attn.__version__}"


def _nccl():
    import torch.distributed as dist
    if not dist.is_nccl_available():
        raise RuntimeError("torch was built without NCCL")
    return "available"


def _hf() -> dict:
    from huggingface_hub import constants
    return {"cache": str(constants.HF_HUB_CACHE), "offline": bool(constants.HF_HUB_OFFLINE),
            "token_set": bool(os.environ.get("HF_TOKEN") or os.path.exists(constants.HF_TOKEN_PATH))}


def doctor_report() -> dict:
    """Python, packages, torch/CUDA, each GPU, optional features and the HF cache."""
    tools = sorted(ep.name for ep in metadata.entry_points(group="console_scripts") if ep.name.startswith("bp-"))
    report = {"bp_tools": {"version": __version__, "tools": tools},
              "python": {"version": platform.python_version(), "executable": sys.executable,
                         "platform": platform.platform()},
              "packages": {p: _version(p) for p in PACKAGES},
              "cpu_count": os.cpu_count(), "gpus": list_gpus()}
    try:
        report["torch"] = _torch_info()
    except Exception as exc:  # torch missing or broken: say so, keep going
        report["torch"] = {"error": f"{type(exc).__name__}: {exc}"}
    report["features"] = {"bitsandbytes_4bit": _probe(_bnb_4bit), "bitsandbytes_8bit_optimizers": _probe(_bnb_8bit_optim),
                          "llama_cpp": _probe(_llama_cpp), "flash_attention": _probe(_flash_attn),
                          "nccl": _probe(_nccl)}
    report["huggingface"] = _hf()
    return report


def doctor_table(r: dict) -> str:
    """A readable summary of the report for a terminal."""
    lines = [f"bp-* {r['bp_tools']['version']}  python {r['python']['version']}  {r['python']['platform']}"]
    t = r.get("torch", {})
    lines.append(f"torch {r['packages'].get('torch')}  cuda {t.get('cuda_version')}  "
                 f"cuda available: {t.get('cuda_available')}")
    if r["gpus"]:
        for g in r["gpus"]:
            lines.append(f"  GPU {g['index']}: {g['name']}  {g['free_gb']}/{g['total_gb']} GB free  "
                         f"{g.get('temp_c')} °C  {g.get('power_w')}/{g.get('power_limit_w')} W  driver {g['driver']}")
    else:
        lines.append("  no GPU found (CPU only)")
    for name, f in r["features"].items():
        lines.append(f"  {'ok ' if f['ok'] else 'no '} {name}: {f['detail']}")
    hf = r["huggingface"]
    lines.append(f"HF cache {hf['cache']}  offline {hf['offline']}  token {'set' if hf['token_set'] else 'not set'}")
    return "\n".join(lines)
