"""The files beside the weights in `<out>/model/`: config, generation config, tokenizer, model card."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from bp_common.eos import end_of_turn_token, eos_token_ids, read_chat_template
from bp_common.io import atomic_write

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "tokenizer.model", "spiece.model", "vocab.json", "merges.txt", "vocab.txt",
                   "chat_template.jinja", "chat_template.json")
TOKENIZER_DIRS = ("additional_chat_templates",)
# Licence files travel with the weights they govern.
LICENCE_FILES = ("LICENSE", "LICENSE.txt", "LICENSE.md", "NOTICE", "USE_POLICY.md")
TORCH_DTYPE = {"bf16": "bfloat16", "f16": "float16", "f32": "float32"}


def tokenizer_source(candidates: list[Path]) -> Path | None:
    """The first directory holding a tokenizer: the adapter's (what training used), else the base's."""
    for d in candidates:
        if (d / "tokenizer.json").is_file() or (d / "tokenizer.model").is_file() or \
                (d / "tokenizer_config.json").is_file():
            return d
    return None


def copy_tokenizer(source: Path | None, base_dir: Path, out_dir: Path) -> list[str]:
    """Copy tokenizer files and chat templates (from source), and licence files (from the base)."""
    copied = []
    if source is not None:
        for name in TOKENIZER_FILES:
            if (source / name).is_file():
                shutil.copyfile(source / name, out_dir / name)
                copied.append(name)
        for name in TOKENIZER_DIRS:
            if (source / name).is_dir():
                shutil.copytree(source / name, out_dir / name)
                copied.append(name)
    for name in LICENCE_FILES:
        if (base_dir / name).is_file():
            shutil.copyfile(base_dir / name, out_dir / name)
            copied.append(name)
    return copied


def write_config(config: dict, out_dir: Path, dtype: str, untied: bool) -> dict:
    """config.json with the output dtype, and tie_word_embeddings off when the head was split."""
    cfg = json.loads(json.dumps(config))
    cfg["dtype"] = TORCH_DTYPE[dtype]
    if "torch_dtype" in cfg:
        cfg["torch_dtype"] = TORCH_DTYPE[dtype]
    if untied:
        cfg["tie_word_embeddings"] = False
        if isinstance(cfg.get("text_config"), dict) and "tie_word_embeddings" in cfg["text_config"]:
            cfg["text_config"]["tie_word_embeddings"] = False
    atomic_write(out_dir / "config.json", json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    return cfg


def write_generation_config(base_dir: Path, out_dir: Path, config: dict) -> dict:
    """generation_config.json from the base, with eos_token_id listing every id a turn can end on."""
    gen_path = base_dir / "generation_config.json"
    try:
        gen = json.loads(gen_path.read_text(encoding="utf-8")) if gen_path.is_file() else {}
    except (OSError, ValueError):
        gen = {}
    if not gen:
        gen = {k: config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if config.get(k) is not None}
    atomic_write(out_dir / "generation_config.json", json.dumps(gen, indent=2) + "\n")
    ids = eos_token_ids(out_dir)
    if ids:
        gen["eos_token_id"] = ids[0] if len(ids) == 1 else ids
    atomic_write(out_dir / "generation_config.json", json.dumps(gen, indent=2) + "\n")
    return {"eos_token_ids": ids, "end_of_turn": end_of_turn_token(out_dir),
            "chat_template": read_chat_template(out_dir) is not None}


def write_model_card(out_dir: Path, text: str) -> None:
    atomic_write(out_dir / "README.md", text)
