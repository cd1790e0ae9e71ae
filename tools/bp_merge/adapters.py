"""PEFT LoRA adapters read from disk: which tensor each one changes, and how.

A saved PEFT LoRA adapter holds, under the prefix `base_model.model.`:
  `<module>.lora_A.weight`, `<module>.lora_B.weight` (and `.lora_B.bias` with lora_bias)
  `<module>.lora_embedding_A`, `<module>.lora_embedding_B` for embedding layers
  `<module>.lora_magnitude_vector` for DoRA
  `<module>.base_layer.<param>` when PEFT saved a base layer (embeddings, bias="all")
  `<module>.<param>` for modules_to_save (a full trained copy of the tensor)
Anything else with an adapter marker is a PEFT feature we do not merge, and is refused.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from bp_common.errors import BpError

from .shards import PickleReader, SafetensorsReader

PREFIX = "base_model.model."
_LORA = re.compile(r"^(?P<mod>.+)\.(?P<part>lora_A\.weight|lora_B\.weight|lora_B\.bias|lora_embedding_A|"
                   r"lora_embedding_B|lora_magnitude_vector(?:\.weight)?)$")
_BASE_LAYER = re.compile(r"^(?P<mod>.+)\.base_layer\.(?P<param>[^.]+)$")
_MODULES_TO_SAVE = re.compile(r"^(?P<mod>.+)\.modules_to_save\.[^.]+\.(?P<param>[^.]+)$")
# Markers of PEFT features that are not plain LoRA/DoRA: refused rather than silently dropped.
_FOREIGN = ("lora_", "token_adapter", "trainable_tokens", "vera_", "hada_", "lokr_", "ia3_", "oft_", "boft_",
            "original_module")
# LoraConfig switches whose adapters cannot be merged as W + scale·B·A.
_UNSUPPORTED_CONFIG = ("use_qalora", "layer_replication", "trainable_token_indices", "alora_invocation_tokens",
                       "use_bdlora", "velora_config", "monteclora_config", "arrow_config", "kasa_config")


@dataclass
class ModuleUpdate:
    """The low-rank update of one module: delta = scale · B·A (transposed for embeddings)."""

    module: str
    A: np.ndarray | None = None  # (r, in) for linear; (r, num_embeddings) for embeddings
    B: np.ndarray | None = None  # (out, r) for linear; (dim, r) for embeddings
    bias: np.ndarray | None = None  # lora_B.bias (lora_bias=True)
    magnitude: np.ndarray | None = None  # DoRA
    embedding: bool = False
    scale: float = 1.0

    @property
    def rank(self) -> int:
        return int(self.A.shape[0])


@dataclass
class Adapter:
    """One adapter directory, its config, its updates and the tensors it replaces outright."""

    path: Path
    config: dict
    weight: float = 1.0
    updates: dict[str, ModuleUpdate] = field(default_factory=dict)
    replacements: dict[str, str] = field(default_factory=dict)  # base tensor name -> key in the adapter file
    reader: object = None

    @property
    def use_dora(self) -> bool:
        return bool(self.config.get("use_dora"))

    @property
    def use_rslora(self) -> bool:
        return bool(self.config.get("use_rslora"))

    @property
    def fan_in_fan_out(self) -> bool:
        return bool(self.config.get("fan_in_fan_out"))

    @property
    def variant(self) -> str:
        return "dora" if self.use_dora else "rslora" if self.use_rslora else "lora"

    def replacement_rows(self, name: str, row0: int = 0, row1: int | None = None) -> np.ndarray:
        return self.reader.rows_f32(self.replacements[name], row0, row1)

    def summary(self) -> dict:
        ranks = sorted({u.rank for u in self.updates.values() if u.A is not None})
        return {"path": str(self.path), "weight": self.weight, "variant": self.variant,
                "r": ranks[0] if len(ranks) == 1 else ranks, "lora_alpha": self.config.get("lora_alpha"),
                "modules": len(self.updates), "modules_to_save": sorted(self.replacements),
                "base_model_name_or_path": self.config.get("base_model_name_or_path")}

    def close(self) -> None:
        if self.reader is not None:
            self.reader.close()


def read_adapter_config(path: Path) -> dict:
    cfg_path = Path(path) / "adapter_config.json"
    if not Path(path).is_dir():
        raise BpError("INPUT_NOT_FOUND", f"adapter directory {path} does not exist")
    try:
        return json.loads(cfg_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise BpError("INPUT_NOT_FOUND", f"{path} has no adapter_config.json: not a PEFT adapter directory") from None
    except (OSError, ValueError) as exc:
        raise BpError("INPUT_INVALID", f"{cfg_path} is not valid JSON: {exc}") from None


def open_adapter(path: Path | str, weight: float = 1.0, allow_pickle: bool = False) -> Adapter:
    """Read an adapter directory: config and LoRA factors (as float32); replaced tensors stay on disk."""
    path = Path(path).absolute()
    config = read_adapter_config(path)
    peft_type = str(config.get("peft_type", "LORA")).upper()
    if peft_type != "LORA":
        raise BpError("EXPORT_ADAPTER_UNSUPPORTED", f"{path} is a {peft_type} adapter; bp-merge merges LoRA, "
                      "rsLoRA and DoRA adapters")
    for key in _UNSUPPORTED_CONFIG:
        if config.get(key):
            raise BpError("EXPORT_ADAPTER_UNSUPPORTED", f"{path}: adapter_config.json sets {key}, which cannot be "
                          "merged as W + scale·B·A", details={"setting": key})
    weights = path / "adapter_model.safetensors"
    if weights.is_file():
        reader = SafetensorsReader(weights)
    elif (path / "adapter_model.bin").is_file():
        if not allow_pickle:
            raise BpError("INPUT_PICKLE_REFUSED", f"{path} holds adapter_model.bin (pickle) and no safetensors")
        reader = PickleReader(path / "adapter_model.bin")
    else:
        raise BpError("INPUT_NOT_FOUND", f"{path} has no adapter_model.safetensors")
    adapter = Adapter(path=path, config=config, weight=float(weight), reader=reader)
    for key in reader.tensors:
        classify_key(adapter, key)
    for mod, upd in adapter.updates.items():
        if upd.A is None or upd.B is None:
            raise BpError("EXPORT_WEIGHTS_INVALID", f"{path}: module {mod} has only one of lora_A / lora_B")
        if upd.A.shape[0] != upd.B.shape[1]:
            raise BpError("EXPORT_WEIGHTS_INVALID", f"{path}: module {mod}: lora_A has rank {upd.A.shape[0]} but "
                          f"lora_B has rank {upd.B.shape[1]}")
        upd.scale = scaling(config, mod, upd.rank)
    if not adapter.updates and not adapter.replacements:
        raise BpError("EXPORT_WEIGHTS_INVALID", f"{path}: the adapter holds no LoRA weights")
    return adapter


def classify_key(adapter: Adapter, key: str) -> None:
    """File one tensor of the adapter under its module (a LoRA part) or as a replacement."""
    if not key.startswith(PREFIX):
        raise BpError("EXPORT_ADAPTER_UNSUPPORTED", f"{adapter.path}: tensor {key} is not under {PREFIX!r}; "
                      "not a PEFT causal-LM adapter layout")
    name = key[len(PREFIX):]
    m = _LORA.match(name)
    if m:
        upd = adapter.updates.setdefault(m["mod"], ModuleUpdate(m["mod"]))
        part = m["part"]
        value = adapter.reader.rows_f32(key)
        if part in ("lora_A.weight", "lora_embedding_A"):
            upd.A = value
        elif part in ("lora_B.weight", "lora_embedding_B"):
            upd.B = value
        elif part == "lora_B.bias":
            upd.bias = value
        else:
            upd.magnitude = value.reshape(-1)
        if part.startswith("lora_embedding"):
            upd.embedding = True
        return
    m = _BASE_LAYER.match(name) or _MODULES_TO_SAVE.match(name)
    if m:
        adapter.replacements[f"{m['mod']}.{m['param']}"] = key
        return
    if any(marker in name for marker in _FOREIGN):
        raise BpError("EXPORT_ADAPTER_UNSUPPORTED", f"{adapter.path}: tensor {key} belongs to a PEFT feature "
                      "bp-merge does not merge", details={"tensor": key})
    adapter.replacements[name] = key  # modules_to_save (or bias="all"): a full trained copy


def scaling(config: dict, module: str, rank: int) -> float:
    """alpha/r, or alpha/sqrt(r) for rsLoRA, with alpha from alpha_pattern where one matches."""
    alpha = config.get("lora_alpha", 8)
    for pattern, value in (config.get("alpha_pattern") or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            alpha = value
            break
    if config.get("use_rslora"):
        return float(alpha) / math.sqrt(rank)
    return float(alpha) / rank
