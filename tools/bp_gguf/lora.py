"""A PEFT LoRA adapter as a GGUF LoRA (general.type = adapter), for llama.cpp's --lora and Ollama's ADAPTER.

Each `lora_A`/`lora_B` pair becomes `<gguf tensor>.lora_a` [r, in] and `.lora_b` [out, r]. llama.cpp
scales B·A by alpha / r with r read from each tensor, so any per-module scale PEFT uses (rsLoRA,
rank or alpha patterns) that differs from that is folded into B. For llama-family bases the rows of
q/k's B get the same rope permutation as the base weights. DoRA and trained embeddings or heads
(modules_to_save) have no GGUF LoRA form and are refused.
"""
from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path

import numpy as np

from bp_common.errors import BpError
from bp_common.weights import SafetensorsReader

from .families import Family, Hparams, model_arch, permute_rows, qk_heads, tensor_name

_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.default)?\.weight$")


def read_adapter(adapter_dir: Path) -> tuple[dict, SafetensorsReader]:
    cfg_path = adapter_dir / "adapter_config.json"
    try:
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise BpError("INPUT_NOT_FOUND", f"{adapter_dir} is not a PEFT adapter (adapter_config.json: {exc})") from None
    st = adapter_dir / "adapter_model.safetensors"
    if not st.is_file():
        raise BpError("INPUT_NOT_FOUND", f"{adapter_dir} has no adapter_model.safetensors",
                      hint="bp-gguf reads adapters saved as safetensors only")
    if cfg.get("peft_type", "LORA") != "LORA":
        raise BpError("EXPORT_ADAPTER_UNSUPPORTED", f"{adapter_dir} is a {cfg.get('peft_type')} adapter, not LoRA")
    if cfg.get("use_dora"):
        raise BpError("EXPORT_ADAPTER_UNSUPPORTED", "a DoRA adapter has no GGUF LoRA form (its magnitude vector "
                      "rescales whole weight columns)", hint="merge it with bp-merge, then convert the merged model")
    if cfg.get("modules_to_save"):
        raise BpError("EXPORT_ADAPTER_UNSUPPORTED", f"the adapter trains whole modules ({cfg['modules_to_save']}), "
                      "which a GGUF LoRA cannot carry", hint="merge it with bp-merge, then convert the merged model")
    return cfg, SafetensorsReader(st)


def module_scale(cfg: dict, module: str, r: int) -> float:
    """PEFT's scale for one module: alpha / r (or / sqrt(r) with rsLoRA), with rank/alpha patterns."""
    alpha = float(cfg.get("lora_alpha") or r)
    for pattern, value in (cfg.get("alpha_pattern") or {}).items():
        if re.search(pattern, module):
            alpha = float(value)
    return alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r


def write_lora_gguf(path: Path, adapter_dir: Path, family: Family, hp: Hparams, name: str) -> dict:
    """Write the adapter as a GGUF LoRA (f32) to path; return what was written."""
    import gguf
    cfg, reader = read_adapter(adapter_dir)
    try:
        pairs: dict[str, dict[str, str]] = {}
        for key in reader.tensors:
            m = _KEY.match(key)
            if not m:
                raise BpError("EXPORT_ADAPTER_UNSUPPORTED", f"adapter tensor {key} is not a LoRA A/B matrix",
                              hint="merge it with bp-merge, then convert the merged model")
            pairs.setdefault(m["module"], {})[m["ab"]] = key
        name_map = gguf.get_tensor_name_map(model_arch(family), hp.layers)
        r_max = max(int(reader.tensors[p["A"]].shape[0]) for p in pairs.values() if "A" in p)
        alpha = float(cfg.get("lora_alpha") or r_max)
        planned = []
        for module, p in sorted(pairs.items()):
            if set(p) != {"A", "B"}:
                missing = "".join(sorted({"A", "B"} - set(p)))
                raise BpError("EXPORT_WEIGHTS_INVALID", f"adapter module {module} lacks lora_{missing}")
            gname = tensor_name(name_map, module + ".weight")
            if gname is None:
                raise BpError("EXPORT_ADAPTER_MISMATCH", f"adapter module {module} has no GGUF tensor in the "
                              f"{family.arch} architecture")
            a_shape, b_shape = reader.tensors[p["A"]].shape, reader.tensors[p["B"]].shape
            planned.append((module, gname, p, tuple(a_shape), tuple(b_shape)))
        w = gguf.GGUFWriter(str(path), family.arch)
        w.add_type(gguf.GGUFType.ADAPTER)
        w.add_string(gguf.Keys.Adapter.TYPE, "lora")
        w.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
        w.add_name(name)
        for _, gname, _, a_shape, b_shape in planned:
            w.add_tensor_info(gname + ".lora_a", a_shape, np.dtype(np.float32), 4 * int(np.prod(a_shape)))
            w.add_tensor_info(gname + ".lora_b", b_shape, np.dtype(np.float32), 4 * int(np.prod(b_shape)))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        fout = w.fout[0]
        for module, gname, p, a_shape, b_shape in planned:
            r = a_shape[0]
            a = reader.rows_f32(p["A"])
            b = reader.rows_f32(p["B"])
            if not (np.isfinite(a).all() and np.isfinite(b).all()):
                raise BpError("EXPORT_WEIGHTS_INVALID", f"adapter module {module} holds NaN or Inf values")
            fold = module_scale(cfg, module, r) / (alpha / r)
            if abs(fold - 1.0) > 1e-12:
                b = b * np.float32(fold)
            heads = qk_heads(family, hp, module + ".")
            if heads:
                b = permute_rows(b, heads)
            for arr in (a, b):
                w.write_padding(fout, fout.tell())
                fout.write(np.ascontiguousarray(arr, dtype=np.float32).tobytes())
                w.write_padding(fout, arr.nbytes)
        fout.flush()
        os.fsync(fout.fileno())
        w.close()
    finally:
        reader.close()
    return {"modules": len(planned), "alpha": alpha, "rank": r_max}
